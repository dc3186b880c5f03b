#include "engine.h"

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>

#include "engine_meta.h"
#include "errors.h"
#include "safetensors.h"
#include "util.h"

namespace sde {
namespace {

std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

// "2.13.0+cpu" -> "2.13.0"
std::string base_version(const std::string &v) { return v.substr(0, v.find('+')); }

std::string cache_root() {
  if (const char *dir = std::getenv("SDE_CACHE_DIR"); dir && *dir) return std::string(dir) + "/aoti";
  const char *home = std::getenv("HOME");
  return std::string(home ? home : ".") + "/.cache/sdengine/aoti";
}

}  // namespace

// ---------------------------------------------------------------------------
// engine.json, and the choice of an engine
// ---------------------------------------------------------------------------

at::ScalarType engine_dtype(const Json &engine, const std::string &where) {
  std::string name = engine.get_string("dtype", "fp32");
  if (name == "fp32") return at::kFloat;
  if (name == "fp16") return at::kHalf;
  if (name == "bf16") return at::kBFloat16;
  throw FormatError(where + ": unknown dtype '" + name + "'");
}

std::string engine_mismatch(const Json &engine) {
  if (engine.get_number("format", 0) != kFormatVersion)
    return "it has format " + std::to_string(static_cast<int>(engine.get_number("format", 0))) + ", this library reads " +
           std::to_string(kFormatVersion);
  std::string built = base_version(engine.get_string("torch_version", "?"));
  if (built != torch_version()) return "it was built with torch " + built + " and this library links torch " + torch_version();
  std::string device = engine.get_string("device", "?");
  if (device == "cpu") {
    std::string cap = engine.get_string("cpu_capability", "");
    if (!cap.empty() && cap != at::get_cpu_capability())
      return "it was compiled for " + cap + " CPUs and this CPU runs " + at::get_cpu_capability();
  } else if (device == "cuda") {
    if (!at::hasCUDA()) return "it is a CUDA engine and this torch has no CUDA device";
  } else {
    return "unknown device '" + device + "'";
  }
  return "";
}

const at::Tensor *find_weight(const WeightMap &weights, const std::string &component, const std::string &key) {
  auto it = weights.find(component + "/" + key);
  if (it != weights.end()) return &it->second;
  const std::string prefix = "text_model.";
  if (key.rfind(prefix, 0) == 0) {
    it = weights.find(component + "/" + key.substr(prefix.size()));
    if (it != weights.end()) return &it->second;
  }
  return nullptr;
}

std::string weights_mismatch(const Json &engine, const WeightMap &weights, const WeightMap &buffers) {
  for (const auto &[name, net] : engine.at("networks").members()) {
    std::string component = net.at("component").str(), prefix = net.at("prefix").str();
    for (const auto &[fqn, shape_json] : net.at("constants").members()) {
      std::string key = fqn.substr(prefix.size());
      const at::Tensor *w = find_weight(weights, component, key);
      if (!w) {
        auto b = buffers.find(name + "/" + fqn);
        if (b != buffers.end()) continue;
        return "the weights have no '" + component + "/" + key + "'";
      }
      std::vector<int64_t> shape;
      for (const auto &d : shape_json.array()) shape.push_back(d.integer());
      if (w->sizes().vec() != shape) {
        std::string got, want;
        for (auto d : w->sizes()) got += std::to_string(d) + ",";
        for (auto d : shape) want += std::to_string(d) + ",";
        return "'" + component + "/" + key + "' has shape (" + got + ") but the engine expects (" + want + ")";
      }
    }
  }
  return "";
}

WeightMap read_buffers(const std::string &engine_dir) {
  WeightMap out;
  std::string path = engine_dir + "/buffers.safetensors";
  if (!is_file(path)) return out;
  SafetensorsFile file(path);
  for (const auto &name : file.names()) out[name] = file.tensor(name);
  return out;
}

std::string find_engine(const std::function<WeightMap(const Json &)> &fit, const std::string &what) {
  std::string root = cache_root();
  std::string reasons;
  for (const auto &entry : list_dir(root)) {
    std::string dir = root + "/" + entry, meta = dir + "/engine.json";
    if (entry[0] == '.' || !is_file(meta)) continue;
    try {
      Json engine = read_engine_json(dir);  // checked (engine_meta.h): a corrupt entry is skipped
      std::string why = engine_mismatch(engine);
      if (why.empty()) why = weights_mismatch(engine, fit(engine), read_buffers(dir));
      if (why.empty()) return dir;
      reasons += "\n  " + entry + ": " + why;
    } catch (const Error &e) {
      reasons += "\n  " + entry + ": " + e.what();
    }
  }
  throw FormatError("no compiled engine in " + root + " fits " + what + " (build one with `sdengine export aoti " +
                    what + "`, or set engine_dir)" +
                    (reasons.empty() ? std::string(": the cache is empty") : ":" + reasons));
}

// ---------------------------------------------------------------------------
// Network
// ---------------------------------------------------------------------------

namespace {

std::unique_ptr<torch::inductor::AOTIModelPackageLoader> open_package(const std::string &package, bool single_threaded,
                                                                      int runners, int device_index) {
  try {
    return std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        package, "model", single_threaded, static_cast<size_t>(runners), static_cast<c10::DeviceIndex>(device_index));
  } catch (const c10::Error &e) {
    throw FormatError("cannot load the compiled package " + package + ": " + e.what_without_backtrace());
  } catch (const std::exception &e) {
    throw FormatError("cannot load the compiled package " + package + ": " + e.what());
  }
}

}  // namespace

Network::Network(const std::string &engine_dir, const std::string &name, const Json &info, int instances,
                 int device_index, bool per_instance)
    : name_(name), instances_(std::max(instances, 1)) {
  component_ = info.at("component").str();
  prefix_ = info.at("prefix").str();
  for (const auto &[fqn, shape_json] : info.at("constants").members()) {
    std::vector<int64_t> shape;
    for (const auto &d : shape_json.array()) shape.push_back(d.integer());
    constants_.emplace_back(fqn, shape);
  }
  if (const Json *shape = info.find("static_shape"); shape && shape->is_array())
    for (const auto &d : shape->array()) static_shape_.push_back(d.integer());
  std::string package = engine_dir + "/" + info.at("package").str();
  if (!is_file(package)) throw IoError("engine package missing: " + package);
  if (per_instance) {
    for (int i = 0; i < instances_; ++i) single_.push_back(open_package(package, true, 1, device_index));
  } else {
    shared_ = open_package(package, false, instances_, device_index);
  }
  // engine.json lists what torch.export saw; the package keeps only the constants it uses.
  auto &loader = shared_ ? *shared_ : *single_.front();
  std::vector<std::string> used = loader.get_constant_fqns();
  std::sort(used.begin(), used.end());
  std::vector<std::pair<std::string, std::vector<int64_t>>> kept;
  for (auto &c : constants_)
    if (std::binary_search(used.begin(), used.end(), c.first)) kept.push_back(std::move(c));
  constants_.swap(kept);
}

Network::~Network() = default;

void Network::load_weights(const WeightMap &weights, const WeightMap &buffers, at::ScalarType dtype,
                           at::Device device) {
  std::unordered_map<std::string, at::Tensor> constants;
  for (const auto &[fqn, shape] : constants_) {
    std::string key = fqn.substr(prefix_.size());
    const at::Tensor *w = find_weight(weights, component_, key);
    if (!w) {
      auto b = buffers.find(name_ + "/" + fqn);
      if (b == buffers.end()) throw FormatError("the weights have no '" + component_ + "/" + key + "' (" + name_ + ")");
      w = &b->second;
    }
    if (w->sizes().vec() != shape)
      throw FormatError("'" + component_ + "/" + key + "' has a shape that does not fit the engine");
    // Integer buffers (position ids) keep their dtype; floating weights take the engine's.
    at::ScalarType want = at::isFloatingType(w->scalar_type()) ? dtype : w->scalar_type();
    at::Tensor t = w->to(device, want).contiguous();  // no copy when it already fits
    constants[fqn] = t;
    keep_alive_.push_back(t);
    (find_weight(weights, component_, key) ? by_weight_[component_ + "/" + key] : by_buffer_[fqn]) = t;
  }
  auto load = [&](torch::inductor::AOTIModelPackageLoader &loader) {
    try {
      loader.load_constants(constants, /*use_inactive=*/false, /*check_full_update=*/true, /*user_managed=*/true);
    } catch (const c10::Error &e) {
      throw FormatError("the compiled " + name_ + " refused its weights: " + e.what_without_backtrace());
    }
  };
  if (shared_) load(*shared_);
  for (auto &loader : single_) load(*loader);  // every instance reads the same tensors: no copy
}

at::Tensor Network::run(const std::vector<at::Tensor> &inputs, int instance) const {
  return run_all(inputs, instance)[0];
}

at::Tensor *Network::weight(const std::string &component_key) {
  auto it = by_weight_.find(component_key);
  return it == by_weight_.end() ? nullptr : &it->second;
}

at::Tensor *Network::buffer(const std::string &fqn) {
  auto it = by_buffer_.find(fqn);
  return it == by_buffer_.end() ? nullptr : &it->second;
}

namespace {

std::string shape_string(const std::vector<int64_t> &shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + ")";
}

template <typename Call>
std::vector<at::Tensor> checked_run(const std::string &name, Call &&call) {
  std::vector<at::Tensor> out;
  try {
    out = call();
  } catch (const c10::Error &e) {
    throw DeviceError("the compiled " + name + " failed: " + e.what_without_backtrace());
  } catch (const std::exception &e) {
    throw DeviceError("the compiled " + name + " failed: " + e.what());
  }
  if (out.empty()) throw DeviceError("the compiled " + name + " returned no output");
  return out;
}

}  // namespace

std::vector<at::Tensor> Network::run_all(const std::vector<at::Tensor> &inputs, int instance) const {
  if (instance < 0 || instance >= instances_)
    throw Error(SDE_ERR_INTERNAL, name_ + ": no instance " + std::to_string(instance));
  auto call = [&](const std::vector<at::Tensor> &args) {
    if (shared_) return checked_run(name_, [&] { return shared_->run(args); });
    return checked_run(name_, [&] { return single_[static_cast<size_t>(instance)]->run(args); });
  };
  if (static_shape_.empty() || inputs.at(0).sizes().vec() == static_shape_) return call(inputs);
  // A static network: a batch-1 one runs row by row, every other shape is refused.
  std::vector<int64_t> row_shape = inputs[0].sizes().vec();
  if (!row_shape.empty()) row_shape[0] = 1;
  if (static_shape_[0] != 1 || row_shape != static_shape_)
    throw InvalidArgument("the " + name_ + " network of this engine runs inputs of shape " + shape_string(static_shape_) +
                          " only (it was compiled with static shapes after its dynamic compile failed: engine.json "
                          "networks." + name_ + ".attempts), not " + shape_string(inputs[0].sizes().vec()));
  std::vector<std::vector<at::Tensor>> rows;  // per output, the rows
  for (int64_t i = 0; i < inputs[0].size(0); ++i) {
    std::vector<at::Tensor> args;
    for (const auto &t : inputs) args.push_back(t.slice(0, i, i + 1).contiguous());
    std::vector<at::Tensor> out = call(args);
    rows.resize(out.size());
    for (size_t k = 0; k < out.size(); ++k) rows[k].push_back(out[k]);
  }
  std::vector<at::Tensor> out;
  for (auto &parts : rows) out.push_back(at::cat(parts));
  return out;
}

}  // namespace sde
