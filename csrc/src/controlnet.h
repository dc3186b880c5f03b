// A ControlNet loaded for one model: its compiled engine (export/aoti_controlnet.py:
// controlnet.pt2, the ControlNet at scale 1, and unet_control.pt2, the model's UNet taking the
// residuals, holding the model's own UNet tensors), its weights and what the request loop needs
// (conditioning channels, global pooling). Immutable after loading: any number of requests may
// run it at once.
#pragma once

#include <ATen/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "json.h"
#include "model.h"
#include "sdengine.h"

namespace sde {

class ControlNet {
 public:
  ControlNet(const std::string &path, const Model &model, const char *engine_dir);
  ~ControlNet();

  const Model &model() const { return model_; }
  int conditioning_channels() const { return conditioning_channels_; }
  const std::string &name() const { return name_; }

  // The zero convolutions' outputs at scale 1, one per UNet skip then the mid block's:
  // inputs x (B, C, h, w), t (B,), context, cond (B, C_cond, H, W) [, text_embeds, time_ids].
  // On the model's compiled-model instance `instance` (the request's).
  std::vector<at::Tensor> outputs(const std::vector<at::Tensor> &inputs, int instance) const;
  // The model's UNet with residuals: inputs x, t, context [, text_embeds, time_ids], then the
  // down residuals and the mid residual.
  at::Tensor unet(const std::vector<at::Tensor> &inputs, int instance) const;

  // The residuals the UNet adds, from outputs(): times scale (a 0-d float32 device tensor: a graph
  // of the step serves every scale), and in guess mode times 10^(-1 + k / n) for skip k of n;
  // averaged over H, W for global-pool ControlNets (sdengine.models.controlnet.scale_residuals).
  std::vector<at::Tensor> scaled(std::vector<at::Tensor> outputs, const at::Tensor &scale, bool guess_mode) const;
  bool global_pool() const { return global_pool_; }

 private:
  const Model &model_;
  std::string name_, engine_dir_;
  int conditioning_channels_ = 3;
  bool global_pool_ = false;
  std::unique_ptr<Network> controlnet_, unet_control_;
};

}  // namespace sde

// The C API's handle (sdengine.h).
struct sde_controlnet {
  std::unique_ptr<sde::ControlNet> impl;
};
