// Compiled engines (export/aoti.py): an engine folder's engine.json, the engine cache and
// the choice of the engine that runs a checkpoint, and one compiled network (an
// AOTInductor package) holding the checkpoint's weights.
#pragma once

#include <ATen/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine_meta.h"
#include "json.h"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace sde {

// Where a network's weights come from: "<component>/<key>" -> tensor (CPU views of mapped
// files, or the caller's memory).
using WeightMap = std::unordered_map<std::string, at::Tensor>;

// read_engine_json (<engine_dir>/engine.json, checked): engine_meta.h.
// Why an engine cannot run here (format, torch version, device, CPU ISA), or "" when it can.
std::string engine_mismatch(const Json &engine);
// Why `weights` (and the engine's own buffers) do not fit the engine's constants, or "".
std::string weights_mismatch(const Json &engine, const WeightMap &weights, const WeightMap &buffers);
// The engine's non-checkpoint constants (buffers.safetensors), by "<network>/<fqn>".
WeightMap read_buffers(const std::string &engine_dir);
// The engine's floating dtype (engine.json "dtype").
at::ScalarType engine_dtype(const Json &engine, const std::string &where);
// The weight a constant of `component` reads: "<component>/<key>", trying transformers 5's
// CLIP layout (no "text_model." prefix) when the usual key is absent. nullptr when absent.
const at::Tensor *find_weight(const WeightMap &weights, const std::string &component, const std::string &key);

// The cached engine ($SDE_CACHE_DIR/aoti, default ~/.cache/sdengine/aoti) that runs here and
// fits a checkpoint: `fit(engine)` gives the weights as that engine names them, or throws
// FormatError saying why they do not fit. FormatError listing every candidate's reason when
// none fits; `what` names the checkpoint in messages.
std::string find_engine(const std::function<WeightMap(const Json &)> &fit, const std::string &what);

// One compiled network of an engine: `instances` AOTInductor model instances sharing the
// weights. A request runs it on the instance it holds (Model's instance pool): with one
// thread-safe package for all instances (the default), the package's container picks a free
// model and `instance` is only checked; with one single-threaded package per instance
// (per_instance), the run takes no lock and records no event, the form a CUDA graph can
// capture, and the caller must hold `instance` exclusively.
class Network {
 public:
  Network(const std::string &engine_dir, const std::string &name, const Json &info, int instances,
          int device_index, bool per_instance);
  ~Network();
  const std::string &name() const { return name_; }
  int instances() const { return instances_; }
  // Hands the weights to the compiled model (no copy when dtype, device and layout fit).
  void load_weights(const WeightMap &weights, const WeightMap &buffers, at::ScalarType dtype, at::Device device);
  at::Tensor run(const std::vector<at::Tensor> &inputs, int instance) const;  // the first output
  std::vector<at::Tensor> run_all(const std::vector<at::Tensor> &inputs, int instance) const;
  bool is_static() const { return !static_shape_.empty(); }
  // The tensor every instance computes with for the checkpoint weight "<component>/<key>", or
  // for the network's own constant (buffer) `fqn`; nullptr when it has none. Changed in place
  // by LoRAs and embeddings (lora.h): the constants are user-managed, read where they are.
  at::Tensor *weight(const std::string &component_key);
  at::Tensor *buffer(const std::string &fqn);

 private:
  std::string name_, component_, prefix_;
  int instances_ = 1;
  std::vector<std::pair<std::string, std::vector<int64_t>>> constants_;  // fqn, shape (engine.json)
  // engine.json static_shape: the first input's only shape, for a network whose dynamic compile
  // failed (export/aoti.py ATTEMPTS); empty when dynamic. Batch-1 networks run row by row.
  std::vector<int64_t> static_shape_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> shared_;       // thread-safe, all instances
  std::vector<std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> single_;  // per_instance
  std::vector<at::Tensor> keep_alive_;  // constants are user-managed: they must outlive the loaders' use
  std::unordered_map<std::string, at::Tensor> by_weight_, by_buffer_;  // "<component>/<key>" / fqn -> constant
};

}  // namespace sde
