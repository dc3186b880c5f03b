#include "controlnet.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <dirent.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "errors.h"
#include "safetensors.h"
#include "single_file.h"
#include "util.h"

namespace sde {
namespace {

constexpr int kControlFormat = 2;  // export/aoti_controlnet.py CONTROL_FORMAT

std::string cache_root() {
  if (const char *dir = std::getenv("SDE_CACHE_DIR"); dir && *dir) return std::string(dir) + "/aoti";
  const char *home = std::getenv("HOME");
  return std::string(home ? home : ".") + "/.cache/sdengine/aoti";
}

std::string dtype_name(at::ScalarType dtype) {
  return dtype == at::kHalf ? "fp16" : dtype == at::kBFloat16 ? "bf16" : "fp32";
}

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

// Why the ControlNet engine at `dir` cannot run these weights with this model, or "".
std::string controlnet_engine_mismatch(const Json &meta, const WeightMap &weights, const Model &model) {
  if (meta.get_number("format", 0) != kControlFormat)
    return "it has format " + std::to_string(static_cast<int>(meta.get_number("format", 0))) + ", this library reads " +
           std::to_string(kControlFormat);
  std::string built = meta.get_string("torch_version", "?");
  built = built.substr(0, built.find('+'));
  std::string here = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                     std::to_string(TORCH_VERSION_PATCH);
  if (built != here) return "it was built with torch " + built + " and this library links torch " + here;
  std::string device = meta.get_string("device", "?");
  if (device != (model.device().is_cuda() ? "cuda" : "cpu"))
    return "it is a " + device + " engine and the model runs on " + (model.device().is_cuda() ? "cuda" : "cpu");
  if (device == "cpu") {
    std::string cap = meta.get_string("cpu_capability", "");
    if (!cap.empty() && cap != at::get_cpu_capability())
      return "it was compiled for " + cap + " CPUs and this CPU runs " + at::get_cpu_capability();
  }
  if (meta.get_string("dtype", "?") != dtype_name(model.dtype()))
    return "it is a " + meta.get_string("dtype", "?") + " engine and the model runs in " + dtype_name(model.dtype());
  const Json *networks = meta.find("networks");
  if (!networks || !networks->find("controlnet") || !networks->find("unet_control"))
    return "it lacks the controlnet or unet_control network";
  for (const auto &[name, net] : networks->members()) {
    std::string component = net.at("component").str(), prefix = net.at("prefix").str();
    const WeightMap &source = component == "unet" ? model.weights() : weights;
    for (const auto &[fqn, shape_json] : net.at("constants").members()) {
      std::string key = component + "/" + fqn.substr(prefix.size());
      auto it = source.find(key);
      if (it == source.end()) return "the weights have no '" + key + "'";
      std::vector<int64_t> shape;
      for (const auto &d : shape_json.array()) shape.push_back(d.integer());
      if (it->second.sizes().vec() != shape)
        return "'" + key + "' has shape " + std::to_string(it->second.dim()) + "-d " +
               c10::str(it->second.sizes()) + " but the engine expects " + c10::str(at::IntArrayRef(shape));
    }
  }
  return "";
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
  std::string reasons;
  auto try_engine = [&](const std::string &dir) -> bool {
    std::string meta_path = dir + "/controlnet_engine.json";
    if (!is_file(meta_path)) {
      reasons += "\n  " + dir + ": no controlnet_engine.json";
      return false;
    }
    try {
      Json meta = Json::read_file(meta_path);
      WeightMap candidate = fit(meta);
      std::string why = controlnet_engine_mismatch(meta, candidate, model);
      if (!why.empty()) {
        reasons += "\n  " + dir + ": " + why;
        return false;
      }
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
      return true;
    } catch (const Error &e) {
      reasons += "\n  " + dir + ": " + e.what();
      return false;
    }
  };
  bool found = false;
  if (engine_dir) {
    found = try_engine(engine_dir);
  } else {
    for (const auto &entry : list_dir(cache_root()))
      if (entry.rfind("controlnet-", 0) == 0 && (found = try_engine(cache_root() + "/" + entry))) break;
  }
  if (!found)
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
