// Sampling schedules and samplers, ported from sdengine/samplers/ (plan.py, schedules.py,
// denoiser.py, sigma_samplers.py, timestep_samplers.py) with the same arithmetic and the same float32
// roundings, so that both give the same latents for the same model output:
//   euler, euler_a, dpmpp_2m (sigma samplers, k-diffusion form), ddim and pndm (timestep form),
//   following the default, normal, karras, exponential, sgm_uniform, simple or ddim_uniform
//   schedule.
#pragma once

#include <ATen/Tensor.h>

#include <string>
#include <vector>

#include "sdengine.h"

namespace sde {

class Json;

// The keys of diffusers' scheduler_config.json that the samplers read (SchedulerConfig).
struct SchedulerConfig {
  std::string default_sampler = "pndm";  // the sdengine name of the config's scheduler class
  int num_train_timesteps = 1000;
  double beta_start = 0.00085, beta_end = 0.012;
  std::string beta_schedule = "scaled_linear";
  std::string prediction_type = "epsilon";
  std::string timestep_spacing = "leading";
  int steps_offset = 1;
  bool clip_sample = false;
  double clip_sample_range = 1.0;
  bool set_alpha_to_one = false;
  bool rescale_betas_zero_snr = false;
  bool use_karras_sigmas = false, use_exponential_sigmas = false;
  std::string final_sigmas_type = "zero";
  bool has_sigma_min = false, has_sigma_max = false;
  double sigma_min = 0.0, sigma_max = 0.0;
  bool lower_order_final = true, euler_at_final = false;
  std::string solver_type;
  bool skip_prk_steps = true;

  // From a scheduler_config.json (or the "scheduler" object of engine.json).
  static SchedulerConfig from_json(const Json &j, const std::string &where);
};

// One run's schedule: the counterpart of sdengine.samplers.plan.Plan.
struct Plan {
  sde_sampler sampler;
  int start = 0;                       // first kept step of the requested schedule (img2img strength)
  std::vector<double> timesteps;       // (n,) the timestep the UNet gets at each step
  std::vector<double> sigmas;          // sigma samplers: (n + 1,) ending in the final sigma
  std::vector<double> prev_timesteps;  // ddim: where each step lands (< 0: the end)
  int stride = 0;                      // pndm: T // steps
  std::vector<double> alphas_cumprod;  // (T,) float32-rounded training schedule
  std::vector<float> log_sigmas;       // (T,) log sigma of every training timestep
  double init_noise_sigma = 1.0;
  bool vp_latents = false;             // dpmpp_2m: diffusers' latents are in VP units
  double final_alpha_cumprod = 1.0;
  double clip_range = 0.0;             // 0: no clipping of x0
  bool lower_order_final = false;
  bool heun_solver = false;            // dpmpp_2m solver_type "heun" (default "midpoint")

  bool is_sigma_sampler() const { return sampler != SDE_SAMPLER_DDIM && sampler != SDE_SAMPLER_PNDM; }
};

// Resolves SDE_SCHEDULE_DEFAULT / the config and validates the steps (InvalidArgument);
// keeps the tail of the schedule that `strength` selects (diffusers' get_timesteps).
Plan make_plan(sde_sampler sampler, sde_schedule schedule, int steps, const SchedulerConfig &cfg,
               double strength = 1.0);

// The sampler's starting state (Plan.initial_state): unit-variance noise scaled for the
// sampler (txt2img, init_latents undefined), or init_latents noised to the first kept step
// (img2img: diffusers' scheduler.add_noise).
at::Tensor initial_state(const Plan &plan, const at::Tensor &noise, const at::Tensor &init_latents);

// ---------------------------------------------------------------------------
// The sampler step on device tensors
// ---------------------------------------------------------------------------
//
// Every sampler update is written as tensor operations whose per-step numbers come from one
// row of a float32 table (steps x kStepColumns, step_table), held on the device. The same
// operations then serve every step and every request of a shape: the form a CUDA graph
// captures once and replays (model.cpp). Columns 0-2 are common; the others depend on the
// sampler (step_table documents each).
enum StepColumn : int64_t { kColT = 0, kColCIn, kColGuidance, kColA, kColB, kColC, kColD, kColE, kColF, kColG, kColH, kColI, kColJ };
constexpr int64_t kStepColumns = 13;

// What a step's operations depend on besides the table: fixed for a cached step.
struct StepKind {
  sde_sampler sampler = SDE_SAMPLER_EULER;
  std::string prediction_type = "epsilon";
  double clip_range = 0.0;  // ddim: clamp x0 to [-clip_range, clip_range]; 0: no clamp
};

// The buffers of a step, each shaped like the latents (N, C, h, w), float32 on the device.
struct StepBuffers {
  at::Tensor x;           // the sampler state before the step
  at::Tensor noise;       // the step's fresh standard-normal noise (euler_a; ddim with eta > 0)
  at::Tensor x_next;      // written: the state after the step
  at::Tensor remembered;  // written: what later steps read (dpmpp_2m: denoised; pndm: eps)
  at::Tensor h1, h2, h3;  // read: dpmpp_2m: h1 = the previous denoised; pndm: the last three eps
  at::Tensor start;       // pndm: the state before its first step (the second step restarts there)
};

// The UNet input of a step: x * c_in.
at::Tensor step_model_input(const at::Tensor &x, const at::Tensor &scalars);
// The update of one step: x_next (and remembered) from the state and the guided model output
// (the config's prediction type). Only tensor operations: no host value, no host sync.
void step_update(const StepKind &kind, const StepBuffers &b, const at::Tensor &model_out, const at::Tensor &scalars);

// One run's steps on the host side: the table, the noise draws and the bookkeeping between
// steps, for a plan.
class StepPlan {
 public:
  StepPlan(const Plan &plan, const SchedulerConfig &cfg, double eta);
  const StepKind &kind() const { return kind_; }
  size_t steps() const { return plan_.timesteps.size(); }  // model evaluations (PNDM: steps + 1)
  // (steps, kStepColumns) float32 on the CPU.
  at::Tensor table(double guidance) const;
  // Whether step i adds fresh noise (drawn before it, in the generators' order).
  bool draws_noise(size_t i) const;
  // The host's share around step i: before, pndm's restart point; after, x <- x_next and the
  // history (dpmpp_2m: the last denoised; pndm: the last three eps, its repeated step excepted).
  void before(size_t i, StepBuffers &b) const;
  void after(size_t i, StepBuffers &b) const;
  // diffusers' latents for the state after step i (the final latents for i = steps() - 1).
  at::Tensor latents(const at::Tensor &state, size_t i) const;

 private:
  Plan plan_;
  StepKind kind_;
  double eta_;
};

}  // namespace sde
