#include "checkpoint.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cctype>

#include "engine_meta.h"
#include "errors.h"
#include "safetensors.h"
#include "single_file.h"
#include "util.h"

namespace sde {
namespace {

// Weights of a diffusers folder, by "<component>/<key>".
WeightMap read_diffusers_weights(const std::string &model_dir) {
  WeightMap weights;
  for (const std::string component : {"text_encoder", "text_encoder_2", "unet", "vae"}) {
    std::string dir = model_dir + "/" + component;
    if (component == "text_encoder_2" && !is_dir(dir)) continue;  // SDXL only
    if (!is_dir(dir)) throw IoError("model folder has no " + component + "/: " + dir);
    std::vector<std::string> files, variants;
    for (const auto &name : list_dir(dir)) {
      if (!ends_with(name, ".safetensors")) continue;
      bool variant = name.find(".fp16.") != std::string::npos || name.find(".bf16.") != std::string::npos;
      (variant ? variants : files).push_back(name);
    }
    if (files.empty()) files = variants;  // only a reduced-precision variant was saved
    if (files.empty()) throw IoError(dir + " holds no .safetensors weights");
    for (const auto &name : files) {
      SafetensorsFile file(dir + "/" + name);
      for (const auto &key : file.names()) weights[component + "/" + key] = file.tensor(key);
    }
  }
  return weights;
}

// "epsilon" or "v_prediction" for the names users and file headers write; "" for others.
std::string normalize_prediction_type(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  if (name == "epsilon" || name == "eps") return "epsilon";
  if (name == "v" || name == "v_prediction" || name == "v-prediction") return "v_prediction";
  return "";
}

}  // namespace

std::string checked_prediction_type(const char *name) {
  std::string out = normalize_prediction_type(name);
  if (out.empty())
    throw InvalidArgument(std::string("prediction_type must be \"epsilon\" or \"v_prediction\", got \"") + name + "\"");
  return out;
}

namespace {

// What a single file predicts, as sdengine.ldm_layout.detect_config decides: the caller's
// prediction_type, else the header's SAI Model Spec (modelspec.prediction_type, or a
// modelspec.architecture naming the SD2 512 or 768-v model), else a "v_pred" key, else
// the family's default (SD2 text-to-image: v_prediction).
std::string single_file_prediction_type(const SafetensorsFile &file, const Json &single_file,
                                        const sde_model_params &params) {
  if (params.prediction_type) return checked_prediction_type(params.prediction_type);
  if (std::string declared = normalize_prediction_type(file.metadata("modelspec.prediction_type")); !declared.empty())
    return declared;
  std::string architecture = file.metadata("modelspec.architecture");
  if (architecture.rfind("stable-diffusion-v2-768-v", 0) == 0) return "v_prediction";
  if (architecture.rfind("stable-diffusion-v2-512", 0) == 0) return "epsilon";
  if (file.contains("v_pred")) return "v_prediction";
  return single_file.get_string("default_prediction_type", "epsilon");
}

ModelSource load_diffusers_folder(const std::string &model_dir, const sde_model_params &params) {
  ModelSource source;
  source.weights = read_diffusers_weights(model_dir);
  source.vae = Json::read_file(model_dir + "/vae/config.json");
  source.unet = Json::read_file(model_dir + "/unet/config.json");
  source.where = model_dir + "/scheduler/scheduler_config.json";
  source.scheduler = Json::read_file(source.where);
  source.scheduler_file = true;
  source.engine_dir = params.engine_dir ? params.engine_dir
                                        : find_engine([&](const Json &) { return source.weights; }, model_dir);
  source.tokenizer_dir = params.tokenizer_dir ? params.tokenizer_dir : model_dir + "/tokenizer";
  if (params.tokenizer_2_dir) source.tokenizer_2_dir = params.tokenizer_2_dir;
  else if (is_dir(model_dir + "/tokenizer_2")) source.tokenizer_2_dir = model_dir + "/tokenizer_2";
  return source;
}

ModelSource load_single_file(const std::string &path, const sde_model_params &params) {
  SafetensorsFile file(path);
  ModelSource source;
  if (params.engine_dir) {
    source.engine_dir = params.engine_dir;
  } else {
    source.engine_dir = find_engine([&](const Json &engine) { return single_file_weights(file, engine); }, path);
  }
  Json engine = read_engine_json(source.engine_dir);
  try {
    source.weights = single_file_weights(file, engine);
  } catch (const FormatError &e) {
    throw FormatError(path + " does not fit the engine " + source.engine_dir + ": " + e.what());
  }
  const Json &single = engine.at("single_file");
  const Json &config = engine.at("config");
  source.vae = config.at("vae");
  source.unet = config.at("unet");
  std::string prediction_type = single_file_prediction_type(file, single, params);
  source.scheduler = single.at("schedulers").at(prediction_type);
  source.where = source.engine_dir + "/engine.json (single_file.schedulers." + prediction_type + ")";
  source.zero_snr = file.contains("ztsnr");
  if (params.tokenizer_dir) {
    source.tokenizer_dir = params.tokenizer_dir;
  } else if (const Json *tokenizer = single.find("tokenizer"); tokenizer && tokenizer->is_string()) {
    source.tokenizer_dir = source.engine_dir + "/" + tokenizer->str();
  } else {
    throw InvalidArgument("the engine " + source.engine_dir + " has no tokenizer for single files (its text encoder "
                          "does not use CLIP's vocabulary): set tokenizer_dir");
  }
  if (params.tokenizer_2_dir) {
    source.tokenizer_2_dir = params.tokenizer_2_dir;
  } else if (const Json *tokenizer = single.find("tokenizer_2"); tokenizer && tokenizer->is_string()) {
    source.tokenizer_2_dir = source.engine_dir + "/" + tokenizer->str();
  }
  return source;
}

}  // namespace

ModelSource load_path(const std::string &path, const sde_model_params &params) {
  if (is_dir(path)) return load_diffusers_folder(path, params);
  if (!is_file(path)) throw IoError("model not found: " + path + " (give a diffusers folder or a .safetensors file)");
  if (!ends_with(path, ".safetensors"))
    throw FormatError(path + ": the native runtime reads diffusers folders and single-file .safetensors checkpoints; "
                             "load pickled .ckpt files from Python (sdengine.load(path, backend='native'))");
  return load_single_file(path, params);
}

ModelSource load_tensors(WeightMap weights, const std::string &model_dir, const std::string &config_json,
                         const sde_model_params &params) {
  ModelSource source;
  source.weights = std::move(weights);
  if (!config_json.empty()) {
    Json cfg = Json::parse(config_json, "config_json");
    source.vae = cfg.at("vae");
    source.unet = cfg.at("unet");
    source.scheduler = cfg.at("scheduler");
    source.where = "config_json";
  } else {
    source.vae = Json::read_file(model_dir + "/vae/config.json");
    source.unet = Json::read_file(model_dir + "/unet/config.json");
    source.where = model_dir + "/scheduler/scheduler_config.json";
    source.scheduler = Json::read_file(source.where);
    source.scheduler_file = true;
  }
  std::string what = model_dir.empty() ? std::string("these weights") : model_dir;
  source.engine_dir = params.engine_dir ? params.engine_dir
                                        : find_engine([&](const Json &) { return source.weights; }, what);
  if (params.tokenizer_dir) {
    source.tokenizer_dir = params.tokenizer_dir;
  } else if (!model_dir.empty()) {
    source.tokenizer_dir = model_dir + "/tokenizer";
  } else {
    throw InvalidArgument("tokenizer_dir is required when the model is given as tensors without a model folder");
  }
  if (params.tokenizer_2_dir) source.tokenizer_2_dir = params.tokenizer_2_dir;
  else if (!model_dir.empty() && is_dir(model_dir + "/tokenizer_2")) source.tokenizer_2_dir = model_dir + "/tokenizer_2";
  return source;
}

}  // namespace sde
