#include "controlnet.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>

#include "errors.h"
#include "safetensors.h"
#include "side_engine.h"
#include "single_file.h"
#include "util.h"

namespace sde {
namespace {

constexpr int kControlFormat = 2;  // export/aoti_controlnet.py CONTROL_FORMAT

// A diffusers ControlNetModel folder's weights, as "controlnet/<key>" (the plain files, else the
// reduced-precision variant), and its config.json.
WeightMap folder_weights(const std::string &dir, Json *config) {
  *config = Json::read_file(dir + "/config.json");
  std::string cls = config->get_string("_class_name", "ControlNetModel");
  if (cls != "ControlNetModel")
    throw FormatError(dir + ": config.json names " + cls + ", not a ControlNetModel");
  std::vector<std::string> files, variants;
  for (const auto &name : list_dir(dir)) {
    if (!ends_with(name, ".safetensors")) continue;
    bool variant = name.find(".fp16.") != std::string::npos || name.find(".bf16.") != std::string::npos;
    (variant ? variants : files).push_back(name);
  }
  if (files.empty()) files = variants;
  if (files.empty()) throw IoError(dir + " holds no .safetensors weights");
  WeightMap weights;
  for (const auto &name : files) {
    SafetensorsFile file(dir + "/" + name);
    for (const auto &key : file.names()) weights["controlnet/" + key] = file.tensor(key);
  }
  return weights;
}

}  // namespace

ControlNet::ControlNet(const std::string &path, const Model &model, const char *engine_dir) : model_(model) {
  name_ = path.substr(path.find_last_of('/') == std::string::npos ? 0 : path.find_last_of('/') + 1);
  Json config;
  WeightMap weights;
  bool folder = is_dir(path);
  std::unique_ptr<SafetensorsFile> file;
  if (folder) {
    weights = folder_weights(path, &config);
  } else if (is_file(path)) {
    if (!ends_with(path, ".safetensors"))
      throw FormatError(path + ": a ControlNet single file must be .safetensors (load .pth files from Python)");
    file = std::make_unique<SafetensorsFile>(path);
  } else {
    throw IoError("no such ControlNet: " + path);
  }
  // The engine: the given folder, or the cached one that fits the weights and the model.
  auto fit = [&](const Json &meta) { return folder ? weights : single_file_weights(*file, meta); };
  auto load = [&](const std::string &dir, const Json &meta) -> std::string {
    WeightMap candidate = fit(meta);
    std::string why = side_engine_mismatch(meta, kControlFormat, {"controlnet", "unet_control"}, model, candidate);
    if (!why.empty()) return why;
    engine_dir_ = dir;
    weights = std::move(candidate);
    if (!folder) config = meta.at("controlnet_config");
    c10::InferenceMode guard;
    const Json &nets = meta.at("networks");
    controlnet_ = std::make_unique<Network>(dir, "controlnet", nets.at("controlnet"), model.instances(),
                                            model.device_index(), model.per_instance());
    unet_control_ = std::make_unique<Network>(dir, "unet_control", nets.at("unet_control"), model.instances(),
                                              model.device_index(), model.per_instance());
    controlnet_->load_weights(weights, {}, model.dtype(), model.device());
    unet_control_->load_weights(model.weights(), {}, model.dtype(), model.device());
    return "";
  };
  std::string reasons;
  if (find_side_engine(engine_dir, "controlnet", "controlnet_engine.json", load, &reasons).empty())
    throw FormatError("the ControlNet " + path + " does not fit the model, or no compiled ControlNet engine fits it " +
                      "and the model (build one with `sdengine export aoti MODEL --controlnet " + path +
                      "`, or set engine_dir)" + (reasons.empty() ? std::string(": the cache holds none") : ":" + reasons));
  conditioning_channels_ = static_cast<int>(config.get_number("conditioning_channels", 3));
  if (const Json *pool = config.find("global_pool_conditions"); pool && pool->is_bool()) global_pool_ = pool->boolean();
}

ControlNet::~ControlNet() = default;

std::vector<at::Tensor> ControlNet::outputs(const std::vector<at::Tensor> &inputs, int instance) const {
  return controlnet_->run_all(inputs, instance);
}

at::Tensor ControlNet::unet(const std::vector<at::Tensor> &inputs, int instance) const {
  return unet_control_->run(inputs, instance);
}

std::vector<at::Tensor> ControlNet::scaled(std::vector<at::Tensor> out, const at::Tensor &scale, bool guess_mode) const {
  size_t skips = out.size() - 1;  // the last one is the mid block's
  for (size_t k = 0; k < out.size(); ++k) {
    at::Tensor factor = scale;  // 0-d float32: the residual keeps its dtype
    if (guess_mode && !global_pool_) factor = scale * std::pow(10.0, -1.0 + static_cast<double>(k) / skips);
    out[k] = out[k] * factor;
    if (global_pool_) out[k] = out[k].mean({2, 3}, /*keepdim=*/true);
  }
  return out;
}

}  // namespace sde
