// DeepCache in the C++ loop (sdengine/acceleration.py's DeepCache): a DeepCache engine loaded
// for one model and one skip branch (export/aoti_deepcache.py): the model's UNet as DeepCache's
// full step, which also returns the state entering the branch's first up layer, and as its
// cached step, which runs only the shallow branch from that kept state. Both hold the model's
// own UNet tensors (LoRAs merged into them reach it). Immutable after loading: any number of
// requests may run it at once.
#pragma once

#include <ATen/Tensor.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine.h"
#include "model.h"

namespace sde {

class DeepCacheEngine {
 public:
  DeepCacheEngine(const Model &model, int branch, const char *engine_dir);
  ~DeepCacheEngine();

  const Model &model() const { return model_; }
  int branch() const { return branch_; }
  // The kept state of a UNet batch (B, C, h, w): (B, channels, h / downscale, w / downscale).
  std::vector<int64_t> kept_shape(int64_t batch, int64_t h, int64_t w) const {
    return {batch, channels_, h / downscale_, w / downscale_};
  }

  // The full step: the UNet's inputs (x, t, context [, text_embeds, time_ids]) -> (output, kept state).
  std::pair<at::Tensor, at::Tensor> store(const std::vector<at::Tensor> &inputs, int instance) const;
  // The cached step: the UNet's inputs, then the kept state -> output.
  at::Tensor reuse(const std::vector<at::Tensor> &inputs, int instance) const;

 private:
  const Model &model_;
  int branch_ = 0;
  int64_t channels_ = 0, downscale_ = 1;
  std::unique_ptr<Network> store_, reuse_;
};

// DeepCache's schedule (sdengine/acceleration.py schedule, DeepCache alone): step i of a run is a
// full step when i is a multiple of interval, counted from the run's first step.
inline bool deepcache_full_step(int step, int interval) { return step % interval == 0; }

}  // namespace sde

// The C API's handle (sdengine.h).
struct sde_deepcache {
  std::unique_ptr<sde::DeepCacheEngine> impl;
};
