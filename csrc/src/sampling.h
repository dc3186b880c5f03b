// Sampling schedules and samplers, ported from sdengine/samplers/ with the same arithmetic and
// the same float32 roundings, so that both give the same latents for the same model output.
// Two sets of rules, as in Python (sdengine.samplers.plan_for):
//   - diffusers' (plan.py, schedules.py, denoiser.py, sigma_samplers.py, timestep_samplers.py):
//     each sampler spaced and rounded as its diffusers scheduler class;
//   - A1111's (a1111.py, rng.py): k-diffusion over the model's discrete sigmas, its 12 schedules,
//     its DDIM / PLMS / UniPC timesteps, its seeds (a1111.cpp).
// A run's sampler is written once, as a program of model evaluations (samplers.cpp): every
// sampler update is a linear combination of a few latent-sized registers and the evaluation's
// products (x0, eps, the unconditional eps, fresh noise) with per-evaluation coefficients, so
// that one set of tensor operations, captured once as a graph, serves every sampler.
#pragma once

#include <ATen/Tensor.h>

#include <array>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <set>
#include <utility>
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
  int solver_order = 2;
  std::vector<int> disable_corrector;
  std::string variance_type;  // ddpm: "" is fixed_small
  int original_inference_steps = 50;
  double timestep_scaling = 10.0;
  bool skip_prk_steps = true;
  // The keys the source config held ("given", else the object's keys); empty with
  // given_known false for a config whose every value counts (SchedulerConfig.given None).
  std::set<std::string> given;
  bool given_known = false;
  // Keys whose value sdengine does not reproduce (plan.py check_config), as "key=value".
  std::vector<std::string> unsupported;

  // From a diffusers scheduler_config.json (file: the keys it holds are the given ones), or from
  // sdengine's SchedulerConfig.to_dict() (engine.json's "scheduler", the Python bindings' config:
  // its "given" list, and without one every value counts).
  static SchedulerConfig from_json(const Json &j, const std::string &where, bool file = false);
  // The config as the diffusers scheduler class of `sampler` reads it (config.py
  // SchedulerConfig.for_sampler, from the same tables): a key the source lacked takes that
  // class's default.
  SchedulerConfig for_sampler(const std::string &sampler) const;
  // One sampling key from its JSON value (null: the key's default).
  void set_key(const std::string &key, const Json &value);
};

// Whose rules a run follows (sdengine.samplers.conventions_for).
enum class Conventions { Diffusers, A1111 };

// One run's schedule: the counterpart of sdengine.samplers.plan.Plan.
struct Plan {
  sde_sampler sampler;
  sde_schedule schedule = SDE_SCHEDULE_DEFAULT;
  Conventions conventions = Conventions::Diffusers;
  int steps = 0;                       // requested
  int start = 0;                       // first kept step of the requested schedule (img2img strength)
  std::vector<double> timesteps;       // (n,) the timestep the UNet gets at each step
  std::vector<double> sigmas;          // sigma samplers: (n + 1,) ending in the final sigma
  std::vector<double> prev_timesteps;  // ddim, ddpm, A1111's timestep samplers: where each step lands (< 0: the end)
  int stride = 0;                      // pndm: T // steps
  std::vector<double> alphas_cumprod;  // (T,) float32-rounded training schedule
  std::vector<float> log_sigmas;       // (T,) log sigma of every training timestep
  double init_noise_sigma = 1.0;
  bool vp_latents = false;             // DPM-Solver / UniPC: diffusers' latents are in VP units
  double final_alpha_cumprod = 1.0;
  double clip_range = 0.0;             // 0: no clipping of x0
  bool lower_order_final = false;
  std::string solver_type;             // dpmpp_2m(_sde): midpoint / heun; unipc: bh1 / bh2
  int order = 2;                       // unipc, lms
  std::vector<int> disable_corrector;  // unipc
  bool fixed_large = false;            // ddpm's variance_type
  double timestep_scaling = 10.0;      // lcm
  double noise_timestep = -1;          // A1111's timestep samplers' img2img: the timestep the image is noised to
  int loop_steps = -1;                 // steps of the loop when not len(sigmas) - 1 (A1111's restart, dpm adaptive, unipc)
  // A1111's options
  double eta = 0.0;
  bool has_eta = false;
  double dpm_sigma_min = 0, dpm_sigma_max = 0;  // dpm fast / adaptive
  int nfe = 0;                                   // dpm fast
  std::vector<std::pair<double, double>> pairs;  // restart
  std::vector<float> times;                      // A1111's unipc: continuous times (n + 1)
  bool ensd = false;                             // A1111 writes ENSD for it
  bool brownian = false;                         // A1111's SDE samplers: noise from a Brownian tree per seed

  bool is_sigma_sampler() const;
  int num_steps() const;  // steps of the loop (progress calls)
};

// diffusers' rules: resolves SDE_SCHEDULE_DEFAULT / the config and validates the steps
// (InvalidArgument); keeps the tail of the schedule that `strength` selects (diffusers'
// get_timesteps). `cfg` is read as the sampler's class reads it (for_sampler).
Plan make_plan(sde_sampler sampler, sde_schedule schedule, int steps, const SchedulerConfig &cfg,
               double strength = 1.0);
// A1111's rules (a1111.cpp; sdengine.samplers.a1111.make_plan). eta < 0: A1111's default.
Plan make_a1111_plan(sde_sampler sampler, sde_schedule schedule, int steps, const SchedulerConfig &cfg,
                     double strength, double eta, bool is_sdxl);

// The sampler's starting state (Plan.initial_state): unit-variance noise scaled for the
// sampler (txt2img, init_latents undefined), or init_latents noised to the first kept step
// (img2img: diffusers' scheduler.add_noise; A1111: noise * sigma_0, or its timestep's alpha).
at::Tensor initial_state(const Plan &plan, const at::Tensor &noise, const at::Tensor &init_latents);

// ---------------------------------------------------------------------------
// The program of a run: model evaluations and register updates
// ---------------------------------------------------------------------------
//
// The state of a run is kRegisters latent-sized float32 tensors R (register 0: the x the model
// is evaluated at next). An evaluation runs the model at R0 (input R0 * c_in, timestep t, the
// guidance scale times `guidance`) and forms
//   x0 = clamp(x0_x R0 + x0_out out, -clip, clip),  eps = eps_x R0 + eps_out out,
//   eps_u = eps_x R0 + eps_out out_uncond (the unconditional output; `out` without guidance),
// then every register becomes a linear combination of the registers, x0, eps, eps_u, the
// evaluation's noise (drawn before it) and R0 - x0 (the sigma samplers' x - denoised, formed by
// one subtraction as k-diffusion forms it, so that its cancellation is exact): R' = M [R; x0; eps;
// eps_u; noise; R0 - x0]. One row of a float32
// table holds an evaluation's numbers, so the same operations serve every evaluation of every
// sampler: the form a CUDA graph captures once and replays.
constexpr int kRegisters = 8;
enum Basis : int { kBasisX0 = kRegisters, kBasisEps, kBasisEpsUncond, kBasisNoise, kBasisDiff, kBasis };
enum EvalColumn : int64_t { kColT = 0, kColCIn, kColGuidance, kColX0X, kColX0Out, kColEpsX, kColEpsOut, kColClip, kEvalScalars };
constexpr int64_t kEvalColumns = kEvalScalars + kRegisters * kBasis;

// A linear combination of the basis (the registers before an evaluation and its products).
struct Lin {
  std::array<double, kBasis> c{};
  static Lin of(int basis) {
    Lin l;
    l.c[static_cast<size_t>(basis)] = 1.0;
    return l;
  }
  Lin operator+(const Lin &o) const {
    Lin r = *this;
    for (int i = 0; i < kBasis; ++i) r.c[i] += o.c[i];
    return r;
  }
  Lin operator-(const Lin &o) const { return *this + o * -1.0; }
  Lin operator*(double s) const {
    Lin r = *this;
    for (double &v : r.c) v *= s;
    return r;
  }
  Lin operator/(double s) const { return *this * (1.0 / s); }
};

// Where an evaluation's noise comes from (drawn before it, in the generators' order).
enum class NoiseKind { None, Draw, Brownian };

struct Eval {
  double t = 0, c_in = 1, guidance = 1;
  double x0_x = 0, x0_out = 0, eps_x = 0, eps_out = 0;
  double clip = std::numeric_limits<double>::infinity();
  NoiseKind noise = NoiseKind::None;
  double lift = 0;                      // fresh noise added to R0 before the evaluation (A1111's Restart)
  double noise_from = 0, noise_to = 0;  // Brownian: the interval (sigma, sigma_next) the noise spans
  std::array<Lin, kRegisters> update;   // each register after the evaluation
  int steps_ended = 0;                  // loop steps that end with this evaluation (progress calls)
  int latents_register = 0;             // where the state after the (first) step ended here is
  double latents_scale = 1.0;           // diffusers' latents after the step: that register * this
  Eval() {
    for (int r = 0; r < kRegisters; ++r) update[static_cast<size_t>(r)] = Lin::of(r);
  }
};

// The model as a sampler sees it at one point: how to evaluate it there (an Eval with t, c_in,
// the x0 / eps coefficients) for a state in VE units at `sigma` (sigma samplers), or in VP units
// at a timestep (timestep samplers).
struct Program {
  std::vector<Eval> evals;
  int steps = 0;              // loop steps (progress calls)
  bool adaptive = false;      // DPM adaptive: evaluations decided at run time (run_adaptive)
};

// The program of a plan (samplers.cpp): guidance is applied by the graph; eta is diffusers'
// DDIM eta (A1111's is in the plan).
Program make_program(const Plan &plan, const std::string &prediction_type, double eta);
// The table of a program's evaluations: (evals, kEvalColumns) float32 on the CPU.
at::Tensor program_table(const std::vector<Eval> &evals, double guidance);
at::Tensor eval_row(const Eval &e, double guidance);  // (kEvalColumns,)

// The evaluation on device tensors: R (kRegisters, N, C, h, w), model output and unconditional
// output (N, C, h, w), noise (N, C, h, w), scalars (kEvalColumns,). Writes R.
at::Tensor eval_model_input(const at::Tensor &registers, const at::Tensor &scalars);
void eval_update(const at::Tensor &registers, const at::Tensor &out, const at::Tensor &uncond, const at::Tensor &noise,
                 const at::Tensor &scalars);

// DPM adaptive (A1111's rules): runs the whole adaptive loop with `evaluate(e)` running one
// evaluation (the graphed model and update) and `draw()` giving the ancestral noise (N, C, h, w)
// on the device; the step-size controller reads the error norms on the host.
void run_adaptive(const Plan &plan, const std::string &prediction_type, const at::Tensor &registers,
                  const std::function<void(const Eval &)> &evaluate, const std::function<at::Tensor()> &draw);

// The noise of A1111's SDE samplers (rng.BrownianNoise): one torchsde BrownianTree per image seed
// over [sigma_min, sigma_max], seeded as torchsde seeds it (numpy's SeedSequence); a query gives
// W(sigma, sigma_next) / sqrt(|sigma_next - sigma|), (N, C, h, w) float32 on the CPU. a1111.cpp.
class BrownianNoise {
 public:
  BrownianNoise(const std::vector<uint64_t> &seeds, std::vector<int64_t> shape, double sigma_min, double sigma_max);
  ~BrownianNoise();
  at::Tensor operator()(double sigma, double sigma_next);

 private:
  struct Tree;
  std::vector<std::unique_ptr<Tree>> trees_;
  double t0_, t1_;
};

// A1111's per-image generators (rng.py ImageNoise): first() the start, next() each later draw.
struct SeedOptions {
  std::vector<uint64_t> seeds, subseeds;
  double subseed_strength = 0;
  int resize_w = 0, resize_h = 0;  // seed_resize_from (pixels); 0: none
  int64_t ensd = 0;
  bool philox = false;             // A1111's "NV" source; else torch's CPU generator
  int downscale = 8;
};
class ImageNoise {
 public:
  ImageNoise(SeedOptions options, std::vector<int64_t> shape);  // shape (C, h, w)
  ~ImageNoise();
  at::Tensor first();
  at::Tensor next();

 private:
  struct Source;
  std::unique_ptr<Source> fresh(uint64_t seed) const;
  SeedOptions o_;
  std::vector<int64_t> shape_;
  std::vector<std::unique_ptr<Source>> generators_;
  bool started_ = false;
};

}  // namespace sde
