// The weights of a single-file (LDM / A1111 layout) checkpoint as an engine names them,
// from engine.json's per-constant sources (export/aoti.py writes them from sdengine.ldm_layout).
#pragma once

#include "json.h"
#include "engine.h"  // WeightMap
#include "safetensors.h"

namespace sde {

// For every constant with single-file sources (engine.json "networks.*.ldm": [[key,
// transform], ...], the first key present wins): that tensor, transformed ("q" / "k" / "v":
// that third of a fused in_proj along dim 0; "transpose") and reshaped when its shape
// differs only by unit dimensions (LDM's 1x1 convolutions for diffusers' Linear weights),
// as "<component>/<key>". FormatError says why the file does not fit.
WeightMap single_file_weights(const SafetensorsFile &file, const Json &engine);

}  // namespace sde
