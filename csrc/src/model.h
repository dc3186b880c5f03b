// A loaded model and the request pipeline: tokenize -> encode text -> initial latents ->
// sampler loop (UNet at batch 2N + guidance + sampler update) -> decode -> uint8 RGB.
// Immutable after loading, so any number of threads can run requests on it at once; each
// request holds one of the model's instances (compiled-model instances sharing the weights)
// for its whole run.
#pragma once

#include <ATen/Tensor.h>

#include <array>
#include <condition_variable>
#include <memory>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "checkpoint.h"
#include "engine.h"
#include "graphs.h"
#include "json.h"
#include "lora.h"
#include "sampling.h"
#include "sdengine.h"
#include "tokenizer.h"

namespace sde {

struct ModelInfo {
  SchedulerConfig scheduler;
  sde_sampler default_sampler = SDE_SAMPLER_DEFAULT;  // DEFAULT: the config's sampler is not implemented here
  std::string default_sampler_name;
  int latent_channels = 4;
  bool inpainting = false;  // a 9-channel UNet: latents, mask, masked-image latents
  bool sdxl = false;        // two text encoders, pooled text embedding and size conditioning
  int downscale = 8;        // pixels per latent cell
  int latent_multiple = 1;  // latent sizes must be multiples of this (engine.json)
  int max_prompt_windows = 1;  // 77-token windows the UNet's context may hold (engine.json)
  int default_size = 512;
  double scaling_factor = 0.18215;
  bool has_shift = false;
  double shift_factor = 0.0;
  int64_t text_dim = 0, text_dim_2 = 0, pooled_dim = 0;  // hidden sizes of the text encoders; SDXL's pooled size
  // clip_skip's bound (sdengine/request.py's; Model::Model) and the first text encoder's layers.
  int max_clip_skip = 0, text_layers = 0;
};

// What a request may run on: one compiled-model instance of every network (the networks'
// `instance` index), its graphs (graphs.h) and, on CUDA, its stream and memory pool.
struct Instance {
  int index = 0;
  std::unique_ptr<Capturer> capturer;
  std::unique_ptr<GraphCache> text, step, decode;
};

enum GraphKind { kTextGraphs = 0, kStepGraphs, kDecodeGraphs, kGraphKinds };

// Which of a model's instances a request runs on: acquire() waits for a free one.
class InstancePool {
 public:
  explicit InstancePool(int size);
  int size() const { return static_cast<int>(busy_.size()); }
  int acquire();
  void release(int instance);

 private:
  std::mutex mutex_;
  std::condition_variable freed_;
  std::vector<bool> busy_;
};

// Holds an instance for a scope.
class HeldInstance {
 public:
  explicit HeldInstance(InstancePool &pool) : pool_(pool), index_(pool.acquire()) {}
  ~HeldInstance() { pool_.release(index_); }
  HeldInstance(const HeldInstance &) = delete;
  HeldInstance &operator=(const HeldInstance &) = delete;
  int index() const { return index_; }

 private:
  InstancePool &pool_;
  int index_;
};

class Model {
 public:
  Model(ModelSource source, const sde_model_params &params);
  ~Model();

  const ModelInfo &info() const { return info_; }
  const Tokenizer &tokenizer() const { return tokenizer_; }

  // One request; returns the images (N, H, W, 3) uint8 on the CPU. Holds the model's read lock.
  at::Tensor generate(const sde_gen_params &p, sde_sampler sampler, std::vector<uint64_t> &seeds) const;
  void stats(sde_model_stats *out) const;

  // What a ControlNet loaded for this model needs (controlnet.h): the weights the networks read
  // (the UNet's feed the ControlNet engine's unet_control, no copy), dtype, device, and how the
  // model's networks are instantiated (one compiled-model instance per concurrent request).
  const WeightMap &weights() const { return weights_; }
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return device_; }
  int instances() const { return static_cast<int>(instances_.size()); }
  int device_index() const { return device_index_; }
  bool per_instance() const { return per_instance_; }

  // LoRAs and textual inversion (lora.cpp). Each holds the write lock: it waits for running
  // requests, and requests that arrive meanwhile wait for it.
  // Merge `set` in place of the merged set ({} restores the weights bit for bit).
  void set_loras(const std::vector<LoraSpec> &set);
  // Add a textual-inversion token to the tokenizer(s) and the engine's added-token tables;
  // returns the token (`token`, or the file's when empty).
  std::string load_embedding(const std::string &path, const std::string &token);
  // Teach the tokenizer(s) a token whose vectors the caller wrote into the added-token tables.
  void add_token(const std::string &token, const std::vector<int32_t> &ids, const std::vector<int32_t> &ids_2);

 private:
  WeightMap weights_;  // "<component>/<key>": the tensors handed to the networks (shared, not copied)
  int device_index_ = -1;
  bool per_instance_ = false;
  ModelInfo info_;
  Tokenizer tokenizer_;
  Json engine_;
  std::string engine_dir_;
  at::ScalarType dtype_;
  at::Device device_ = at::kCPU;
  std::unique_ptr<Tokenizer> tokenizer_2_;  // SDXL
  std::unique_ptr<Network> text_encoder_, text_encoder_2_, unet_, vae_decoder_, vae_encoder_;
  mutable std::array<GraphCounters, kGraphKinds> counters_;
  std::vector<std::unique_ptr<Instance>> instances_;  // one per concurrent request
  mutable std::unique_ptr<InstancePool> pool_;        // which instances are free
  mutable ReadWriteLock lock_;
  std::unique_ptr<LoraWeights> loras_;  // made on the first set_loras
  std::map<std::string, int64_t> added_tokens_;  // text encoder network -> rows of its added-token table in use
  at::Tensor *weight(const std::string &component_key);

  // -> (context (B, 77 * windows, D), pooled (B, P); undefined unless SDXL), float32 on the device.
  // a1111: the prompts in A1111's syntax as `windows` 75-token windows each (shorter prompts
  // padded with the empty prompt's windows, longer ones cut: prompt_windows gives the count),
  // emphasis applied (sdengine/prompt_syntax.py encode); else windows is 1.
  // clip_skip: every text encoder's (sde_gen_params.clip_skip, checked).
  std::pair<at::Tensor, at::Tensor> encode_text(const std::vector<std::string> &prompts, bool a1111, int windows,
                                                int clip_skip, Instance &inst) const;
  // How many 75-token windows the longest of these A1111-syntax prompts needs (the first
  // tokenizer's: prompt_syntax.count_windows).
  int prompt_windows(const std::vector<std::string> &prompts) const;
  // Scaled latents of an image (1, 3, H, W) in [-1, 1]: one posterior sample per generator
  // (diffusers' retrieve_latents(sample_mode="sample")). -> (N, C, h, w) on the device.
  at::Tensor encode_image(const at::Tensor &image, std::vector<at::Generator> &generators, Instance &inst) const;
  // Unscaled latents (N, C, h, w) -> images (N, 3, H, W) in about [-1, 1], float32 on the device.
  at::Tensor decode(const at::Tensor &z, Instance &inst) const;
};

}  // namespace sde
