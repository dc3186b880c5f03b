// engine.json, checked in one place before the runtime uses any of it. A corrupt or
// half-written engine.json is a FormatError naming the key and the rule, never a crash or a
// silently wrong engine; the cache search skips such an entry (and Python rebuilds it).
//
// The rules (export/aoti.py check_engine_meta holds the same ones; tests/test_fuzz.py
// checks that both accept exactly the same files):
// - JSON as Python's json module reads it, no key twice in any object, at most 16 levels;
// - format kFormatVersion (below); torch_version, cpu_capability strings; device "cpu" or "cuda"; dtype "fp32",
//   "fp16" or "bf16"; latent_multiple in [1, 64], max_batch in [1, 4096], max_latent in
//   [1, 65536], max_prompt_windows in [1, 4096] (integers);
// - config.vae (latent_channels in [1, 64], block_out_channels 1 to 8 integers in
//   [1, 65536], scaling_factor > 0, shift_factor null or finite), config.unet (in_channels
//   in [1, 1024], sample_size in [1, 4096]) and config.scheduler objects, each key optional;
// - networks: text_encoder, unet, vae_decoder, vae_encoder (and text_encoder_2), each with
//   a package file name ("*.pt2", no folder, not hidden), a component (text_encoder,
//   text_encoder_2, unet, vae), a prefix, constants {name starting with the prefix: shape of
//   at most 8 integers in [0, 2^31 - 1]} and optionally ldm {constant: [[key, transform],
//   ...] with transforms "", "q", "k", "v", "transpose"}, compile_s (a number) and
//   static_shape (null, or 1 to 8 integers in [1, 2^31 - 1]: export/aoti.py's static retry);
// - single_file, when present: family, default_prediction_type ("epsilon" or
//   "v_prediction"), schedulers.epsilon and schedulers.v_prediction, optional tokenizer and
//   tokenizer_2 folder names (no folder separator, not hidden);
// - a scheduler: num_train_timesteps in [2, 100000], steps_offset in [0, 1000] (integers),
//   beta_start, beta_end, clip_sample_range finite numbers, sigma_min and sigma_max null or
//   finite, prediction_type "epsilon", "v_prediction" or "sample", the flags the samplers
//   read booleans, the names they read strings; each key optional, null as absent.
#pragma once

#include <string>

#include "json.h"

namespace sde {

constexpr int kFormatVersion = 6;  // engine.json's format: export/engine_meta.py FORMAT_VERSION

// FormatError "<where>: <key> <rule>" when `engine` breaks a rule above.
void check_engine_json(const Json &engine, const std::string &where);

// Reads and checks <engine_dir>/engine.json (IoError when absent).
Json read_engine_json(const std::string &engine_dir);

}  // namespace sde
