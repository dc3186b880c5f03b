// What the engines beside a model's engine share (export/side_engine.py): ControlNet engines
// (controlnet.h) and DeepCache engines (deepcache.h). Each is a folder with a meta file
// (format, torch version, device, dtype, CPU capability, and per network its package,
// component, constant prefix and constants' shapes), found in a given folder or searched for
// in the engine cache.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "engine.h"
#include "json.h"
#include "model.h"

namespace sde {

// $SDE_CACHE_DIR/aoti, else ~/.cache/sdengine/aoti (export/aoti.py cache_root).
std::string engine_cache_root();

// Why the engine of `meta` cannot run with this model, or "": its format, torch version, device,
// CPU capability and dtype, that it has `networks`, and that every constant of every network is
// in the weights of its component (the model's for "unet", else `own`) with the engine's shape.
std::string side_engine_mismatch(const Json &meta, int format, const std::vector<std::string> &networks,
                                 const Model &model, const WeightMap &own);

// The engine folder: `engine_dir` if given, else the first entry of the cache named
// `prefix`-... for which load(dir, meta) returns "" (else why not). Returns "" when none fits,
// with each folder's reason in *reasons.
std::string find_side_engine(const char *engine_dir, const std::string &prefix, const std::string &meta_file,
                             const std::function<std::string(const std::string &, const Json &)> &load,
                             std::string *reasons);

}  // namespace sde
