// Reading checkpoints: a diffusers folder, a single-file (LDM / A1111 layout) .safetensors
// checkpoint, or weights the caller holds, into the weights, configs and folders a Model is
// built from. Nothing here runs a network.
#pragma once

#include <string>

#include "engine.h"
#include "json.h"
#include "sdengine.h"

namespace sde {

// Everything a Model is built from: the weights, the configs the request loop reads, and
// the engine and tokenizer folders.
struct ModelSource {
  WeightMap weights;
  Json vae, unet, scheduler;  // diffusers' config objects (vae/config.json, ...)
  std::string where;          // where the scheduler config came from, for messages
  bool scheduler_file = false;  // a diffusers scheduler_config.json (its keys are the given ones), not sdengine's to_dict()
  bool zero_snr = false;      // a single file's "ztsnr" marker: rescale the betas to zero terminal SNR
  std::string engine_dir;
  std::string tokenizer_dir;
  std::string tokenizer_2_dir;  // SDXL; "" when the checkpoint has none
};

// A diffusers folder or a single-file (LDM / A1111 layout) .safetensors checkpoint, read here.
// Without params.engine_dir the engine is the cached one that fits the weights.
ModelSource load_path(const std::string &path, const sde_model_params &params);
// Weights the caller holds; configs from model_dir, or from config_json (engine.json's "config").
ModelSource load_tensors(WeightMap weights, const std::string &model_dir, const std::string &config_json,
                         const sde_model_params &params);

// "epsilon" or "v_prediction" for the names users write ("eps", "v", ...); InvalidArgument otherwise.
std::string checked_prediction_type(const char *name);

}  // namespace sde
