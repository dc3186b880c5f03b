#include "side_engine.h"

#include <ATen/ATen.h>
#include <torch/version.h>

#include <cstdlib>

#include "errors.h"
#include "util.h"

namespace sde {

std::string engine_cache_root() {
  if (const char *dir = std::getenv("SDE_CACHE_DIR"); dir && *dir) return std::string(dir) + "/aoti";
  const char *home = std::getenv("HOME");
  return std::string(home ? home : ".") + "/.cache/sdengine/aoti";
}

namespace {

std::string dtype_name(at::ScalarType dtype) {
  return dtype == at::kHalf ? "fp16" : dtype == at::kBFloat16 ? "bf16" : "fp32";
}

}  // namespace

std::string side_engine_mismatch(const Json &meta, int format, const std::vector<std::string> &networks,
                                 const Model &model, const WeightMap &own) {
  if (meta.get_number("format", 0) != format)
    return "it has format " + std::to_string(static_cast<int>(meta.get_number("format", 0))) + ", this library reads " +
           std::to_string(format);
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
  const Json *nets = meta.find("networks");
  for (const auto &name : networks)
    if (!nets || !nets->find(name)) return "it lacks the " + name + " network";
  for (const auto &[name, net] : nets->members()) {
    std::string component = net.at("component").str(), prefix = net.at("prefix").str();
    const WeightMap &source = component == "unet" ? model.weights() : own;
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

std::string find_side_engine(const char *engine_dir, const std::string &prefix, const std::string &meta_file,
                             const std::function<std::string(const std::string &, const Json &)> &load,
                             std::string *reasons) {
  auto attempt = [&](const std::string &dir) -> bool {
    std::string meta_path = dir + "/" + meta_file;
    if (!is_file(meta_path)) {
      *reasons += "\n  " + dir + ": no " + meta_file;
      return false;
    }
    try {
      std::string why = load(dir, Json::read_file(meta_path));
      if (why.empty()) return true;
      *reasons += "\n  " + dir + ": " + why;
    } catch (const Error &e) {
      *reasons += "\n  " + dir + ": " + e.what();
    }
    return false;
  };
  if (engine_dir) return attempt(engine_dir) ? std::string(engine_dir) : std::string();
  std::string root = engine_cache_root();
  for (const auto &entry : list_dir(root))
    if (entry.rfind(prefix + "-", 0) == 0 && attempt(root + "/" + entry)) return root + "/" + entry;
  return "";
}

}  // namespace sde
