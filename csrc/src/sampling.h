// Sampling schedules and samplers, ported from sdengine/samplers/ (plan.py, schedules.py,
// denoiser.py, k_samplers.py, t_samplers.py) with the same arithmetic and the same float32
// roundings, so that both give the same latents for the same model output:
//   euler, euler_a, dpmpp_2m (sigma samplers, k-diffusion form), ddim and pndm (timestep form),
//   following the default, normal, karras, exponential, sgm_uniform, simple or ddim_uniform
//   schedule.
#pragma once

#include <ATen/Tensor.h>

#include <functional>
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

// model(x_in, t) -> raw model output (the config's prediction type, guidance applied).
using ModelFn = std::function<at::Tensor(const at::Tensor &x_in, double t)>;
// noise() -> standard normal noise shaped like the latents, drawn per image.
using NoiseFn = std::function<at::Tensor()>;
// on_step(step_index) after each step; it throws to cancel.
using StepFn = std::function<void(int step)>;

// Runs the plan from its initial state and returns diffusers' final latents.
at::Tensor sample(const Plan &plan, const SchedulerConfig &cfg, const ModelFn &model, const at::Tensor &start,
                  const NoiseFn &draw_noise, const StepFn &on_step, double eta);

}  // namespace sde
