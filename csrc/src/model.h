// A loaded model: the compiled networks (AOTInductor packages) holding the checkpoint's
// weights, the tokenizer and the configs the request loop needs. Immutable after
// loading, so any number of threads can run requests on it at once.
#pragma once

#include <ATen/Tensor.h>

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "json.h"
#include "sampling.h"
#include "sdengine.h"
#include "tokenizer.h"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace sde {

// Where a network's weights come from: "<component>/<key>" -> tensor (CPU views of mapped
// files, or the caller's memory).
using WeightMap = std::unordered_map<std::string, at::Tensor>;

// One compiled network of an engine.
class Network {
 public:
  Network(const std::string &engine_dir, const std::string &name, const Json &info, int num_runners,
          int device_index);
  ~Network();
  // Hands the weights to the compiled model (no copy when dtype, device and layout fit).
  void load_weights(const WeightMap &weights, const WeightMap &buffers, at::ScalarType dtype, at::Device device);
  at::Tensor run(const std::vector<at::Tensor> &inputs) const;  // the first output
  std::vector<at::Tensor> run_all(const std::vector<at::Tensor> &inputs) const;

 private:
  std::string name_, component_, prefix_;
  std::vector<std::pair<std::string, std::vector<int64_t>>> constants_;  // fqn, shape (engine.json)
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
  std::vector<at::Tensor> keep_alive_;  // constants are user-managed: they must outlive the loader's use
};

struct ModelInfo {
  SchedulerConfig scheduler;
  sde_sampler default_sampler = SDE_SAMPLER_DEFAULT;  // DEFAULT: the config's sampler is not implemented here
  std::string default_sampler_name;
  int latent_channels = 4;
  bool inpainting = false;  // a 9-channel UNet: latents, mask, masked-image latents
  bool sdxl = false;        // two text encoders, pooled text embedding and size conditioning
  int downscale = 8;        // pixels per latent cell
  int latent_multiple = 1;  // latent sizes must be multiples of this (engine.json)
  int default_size = 512;
  double scaling_factor = 0.18215;
  bool has_shift = false;
  double shift_factor = 0.0;
};

// Everything a Model is built from, gathered by the load_* functions below: the weights,
// the configs the request loop reads, and the engine and tokenizer folders.
struct ModelSource {
  WeightMap weights;
  Json vae, unet, scheduler;  // diffusers' config objects (vae/config.json, ...)
  std::string where;          // where the scheduler config came from, for messages
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

class Model {
 public:
  Model(ModelSource source, const sde_model_params &params);
  ~Model();

  const ModelInfo &info() const { return info_; }
  const Tokenizer &tokenizer() const { return tokenizer_; }

  // One request; returns the images (N, H, W, 3) uint8 on the CPU.
  at::Tensor generate(const sde_gen_params &p, sde_sampler sampler, std::vector<uint64_t> &seeds) const;

 private:
  ModelInfo info_;
  Tokenizer tokenizer_;
  Json engine_;
  std::string engine_dir_;
  at::ScalarType dtype_;
  at::Device device_ = at::kCPU;
  std::unique_ptr<Tokenizer> tokenizer_2_;  // SDXL
  std::unique_ptr<Network> text_encoder_, text_encoder_2_, unet_, vae_decoder_, vae_encoder_;

  // -> (context (B, 77, D), pooled (B, P); undefined unless SDXL), float32 on the device.
  std::pair<at::Tensor, at::Tensor> encode_text(const std::vector<std::string> &prompts) const;
  // Scaled latents of an image (1, 3, H, W) in [-1, 1]: one posterior sample per generator
  // (diffusers' retrieve_latents(sample_mode="sample")). -> (N, C, h, w) on the device.
  at::Tensor encode_image(const at::Tensor &image, std::vector<at::Generator> &generators) const;
};


}  // namespace sde
