#include "sampling.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "errors.h"
#include "json.h"

namespace sde {
namespace {

// numpy.linspace(start, stop, num) in float64: i * step + start, the last point exactly stop.
std::vector<double> np_linspace(double start, double stop, int num) {
  std::vector<double> y(static_cast<size_t>(std::max(num, 0)));
  if (num <= 0) return y;
  if (num == 1) {
    y[0] = start;
    return y;
  }
  int div = num - 1;
  double delta = stop - start, step = delta / div;
  for (int i = 0; i < num; ++i) y[i] = (step == 0 ? (i / static_cast<double>(div)) * delta : i * step) + start;
  y[num - 1] = stop;
  return y;
}

// numpy.arange(start, stop, step) in float64.
std::vector<double> np_arange(double start, double stop, double step) {
  double n = std::ceil((stop - start) / step);
  std::vector<double> y;
  for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) y.push_back(start + i * step);
  return y;
}

double np_round(double v) { return std::nearbyint(v); }  // half to even, as numpy.round
double f32(double v) { return static_cast<double>(static_cast<float>(v)); }

enum class Style { Ddim, K, Dpm };

// schedules.spaced_timesteps: descending timesteps of `steps` steps (float64 values of what
// numpy computes: float32 for the "k" style, integers otherwise).
std::vector<double> spaced_timesteps(const std::string &spacing, int steps, int T, int offset, Style style) {
  std::vector<double> t;
  auto reversed = [](std::vector<double> v) {
    std::reverse(v.begin(), v.end());
    return v;
  };
  if (spacing == "simple") {
    for (int i = 0; i < steps; ++i) {
      double v = static_cast<double>(static_cast<int64_t>(T - 1 - std::floor(static_cast<double>(int64_t(i) * T) / steps)));
      t.push_back(style == Style::K ? f32(v) : v);
    }
    return t;
  }
  if (style == Style::Dpm && spacing == "linspace") {
    auto lin = reversed(np_linspace(0, T - 1, steps + 1));
    lin.pop_back();
    for (double v : lin) t.push_back(static_cast<double>(static_cast<int64_t>(np_round(v))));
    return t;
  }
  if (style == Style::Dpm && spacing == "leading") {
    int ratio = T / (steps + 1);
    for (int i = steps; i >= 1; --i) t.push_back(np_round(static_cast<double>(int64_t(i) * ratio)) + offset);
    return t;
  }
  if (style != Style::Dpm && spacing == "linspace") {
    auto lin = reversed(np_linspace(0, T - 1, steps));
    for (double v : lin) t.push_back(style == Style::K ? f32(v) : static_cast<double>(static_cast<int64_t>(np_round(v))));
    return t;
  }
  if (style != Style::Dpm && spacing == "leading") {
    int ratio = T / steps;
    for (int i = steps - 1; i >= 0; --i) {
      double v = np_round(static_cast<double>(int64_t(i) * ratio));
      t.push_back(style == Style::K ? f32(static_cast<float>(v) + static_cast<float>(offset)) : v + offset);
    }
    return t;
  }
  if (spacing == "trailing") {
    for (double v : np_arange(T, 0, -static_cast<double>(T) / steps)) {
      double r = np_round(v);
      t.push_back(style == Style::K ? f32(static_cast<float>(r) - 1.0f) : static_cast<double>(static_cast<int64_t>(r)) - 1);
    }
    return t;
  }
  throw InvalidArgument("unsupported timestep_spacing '" + spacing + "'; choose leading, trailing or linspace");
}

// float32 alphas_cumprod of the training schedule, computed with the same torch ops as
// schedules.training_alphas_cumprod.
at::Tensor training_alphas_cumprod(const SchedulerConfig &cfg, bool clamp_zero_snr) {
  int n = cfg.num_train_timesteps;
  at::Tensor betas;
  auto f = at::TensorOptions().dtype(at::kFloat);
  if (cfg.beta_schedule == "linear") {
    betas = at::linspace(cfg.beta_start, cfg.beta_end, n, f);
  } else if (cfg.beta_schedule == "scaled_linear") {
    betas = at::pow(at::linspace(std::pow(cfg.beta_start, 0.5), std::pow(cfg.beta_end, 0.5), n, f), 2);
  } else if (cfg.beta_schedule == "squaredcos_cap_v2") {
    std::vector<float> b(n);
    auto alpha_bar = [](double t) { return std::pow(std::cos((t + 0.008) / 1.008 * M_PI / 2), 2); };
    for (int i = 0; i < n; ++i)
      b[i] = static_cast<float>(std::min(1 - alpha_bar(double(i + 1) / n) / alpha_bar(double(i) / n), 0.999));
    betas = at::tensor(b, f);
  } else {
    throw InvalidArgument("unsupported beta_schedule '" + cfg.beta_schedule + "'");
  }
  if (cfg.rescale_betas_zero_snr) {
    at::Tensor abs = at::cumprod(1.0 - betas, 0).sqrt();
    at::Tensor first = abs[0].clone(), last = abs[-1].clone();
    abs -= last;
    abs *= first / (first - last);
    at::Tensor ab = abs.pow(2);
    at::Tensor alphas = at::cat({ab.slice(0, 0, 1), ab.slice(0, 1) / ab.slice(0, 0, -1)});
    betas = 1 - alphas;
  }
  at::Tensor ac = at::cumprod(1.0 - betas, 0);
  if (cfg.rescale_betas_zero_snr && clamp_zero_snr) ac[-1] = std::pow(2.0, -24);
  return ac;
}

std::vector<double> to_vector(const at::Tensor &t) {
  at::Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

// numpy.interp(x, arange(len(fp)), fp)
double interp_index(double x, const std::vector<double> &fp) {
  size_t n = fp.size();
  if (x <= 0) return fp[0];
  if (x >= static_cast<double>(n - 1)) return fp[n - 1];
  size_t j = static_cast<size_t>(std::floor(x));
  if (static_cast<double>(j) == x) return fp[j];
  double slope = (fp[j + 1] - fp[j]) / 1.0;
  return slope * (x - static_cast<double>(j)) + fp[j];
}

// schedules.sigma_to_t: log-sigma interpolation between neighbouring training timesteps.
double sigma_to_t(double sigma, const std::vector<float> &log_sigmas) {
  double log_sigma = std::log(std::max(sigma, 1e-10));
  int64_t n = static_cast<int64_t>(log_sigmas.size());
  int64_t low = 0;
  for (int64_t k = 0; k < n; ++k)
    if (log_sigma - static_cast<double>(log_sigmas[k]) >= 0) low = k;  // the last index at or below
  low = std::min(low, n - 2);
  double lo = log_sigmas[low], hi = log_sigmas[low + 1];
  double w = std::clamp((lo - log_sigma) / (lo - hi), 0.0, 1.0);
  return (1 - w) * static_cast<double>(low) + w * static_cast<double>(low + 1);
}

std::vector<double> sigmas_karras(int n, double sigma_min, double sigma_max, double rho = 7.0) {
  auto ramp = np_linspace(0, 1, n);
  double min_inv = std::pow(sigma_min, 1 / rho), max_inv = std::pow(sigma_max, 1 / rho);
  std::vector<double> out;
  for (double r : ramp) out.push_back(std::pow(max_inv + r * (min_inv - max_inv), rho));
  return out;
}

std::vector<double> sigmas_exponential(int n, double sigma_min, double sigma_max) {
  std::vector<double> out;
  for (double v : np_linspace(std::log(sigma_max), std::log(sigma_min), n)) out.push_back(std::exp(v));
  return out;
}

struct ScheduleSettings {
  const char *spacing;  // nullptr: the config's
  int offset;           // -1: the config's
  const char *shape;    // nullptr: from the config
};

ScheduleSettings settings_of(sde_schedule s) {
  switch (s) {
    case SDE_SCHEDULE_NORMAL: return {"linspace", -1, "interp"};
    case SDE_SCHEDULE_KARRAS: return {nullptr, -1, "karras"};
    case SDE_SCHEDULE_EXPONENTIAL: return {nullptr, -1, "exponential"};
    case SDE_SCHEDULE_SGM_UNIFORM: return {"trailing", -1, "interp"};
    case SDE_SCHEDULE_SIMPLE: return {"simple", -1, "interp"};
    case SDE_SCHEDULE_DDIM_UNIFORM: return {"leading", 1, "interp"};
    default: return {nullptr, -1, nullptr};
  }
}

}  // namespace

SchedulerConfig SchedulerConfig::from_json(const Json &j, const std::string &where) {
  SchedulerConfig c;
  try {
    c.num_train_timesteps = j.get_int("num_train_timesteps", c.num_train_timesteps, 2, 100000);
    c.beta_start = j.get_number("beta_start", c.beta_start);
    c.beta_end = j.get_number("beta_end", c.beta_end);
    c.beta_schedule = j.get_string("beta_schedule", c.beta_schedule);
    c.prediction_type = j.get_string("prediction_type", c.prediction_type);
    c.timestep_spacing = j.get_string("timestep_spacing", c.timestep_spacing);
    c.steps_offset = j.get_int("steps_offset", c.steps_offset, 0, 1000);
    c.clip_sample = j.get_bool("clip_sample", c.clip_sample);
    c.clip_sample_range = j.get_number("clip_sample_range", c.clip_sample_range);
    c.set_alpha_to_one = j.get_bool("set_alpha_to_one", c.set_alpha_to_one);
    c.rescale_betas_zero_snr = j.get_bool("rescale_betas_zero_snr", c.rescale_betas_zero_snr);
    c.use_karras_sigmas = j.get_bool("use_karras_sigmas", c.use_karras_sigmas);
    c.use_exponential_sigmas = j.get_bool("use_exponential_sigmas", c.use_exponential_sigmas);
    c.final_sigmas_type = j.get_string("final_sigmas_type", c.final_sigmas_type);
    if (const Json *v = j.find("sigma_min"); v && v->is_number()) c.has_sigma_min = true, c.sigma_min = v->number();
    if (const Json *v = j.find("sigma_max"); v && v->is_number()) c.has_sigma_max = true, c.sigma_max = v->number();
    c.lower_order_final = j.get_bool("lower_order_final", c.lower_order_final);
    c.euler_at_final = j.get_bool("euler_at_final", c.euler_at_final);
    c.solver_type = j.get_string("solver_type", "");
    c.skip_prk_steps = j.get_bool("skip_prk_steps", c.skip_prk_steps);
  } catch (const FormatError &e) {
    throw FormatError(where + ": " + e.what());
  }
  if (c.prediction_type != "epsilon" && c.prediction_type != "v_prediction" && c.prediction_type != "sample")
    throw FormatError(where + ": unsupported prediction_type '" + c.prediction_type + "'");
  if (c.num_train_timesteps < 2) throw FormatError(where + ": num_train_timesteps must be at least 2");
  return c;
}

namespace {

// Index of the first step img2img keeps: diffusers' get_timesteps (plan.py kept_steps).
int kept_steps(int steps, double strength) {
  if (!(strength >= 0.0 && strength <= 1.0))
    throw InvalidArgument("strength must be in [0, 1], got " + std::to_string(strength));
  int init_timestep = std::min(static_cast<int>(steps * strength), steps);
  if (init_timestep < 1)
    throw InvalidArgument("strength=" + std::to_string(strength) + " with steps=" + std::to_string(steps) +
                          " leaves no denoising step; raise strength to at least " + std::to_string(1.0 / steps) +
                          " or use more steps");
  return std::max(steps - init_timestep, 0);
}

template <typename T>
void drop_first(std::vector<T> &values, int count) {
  values.erase(values.begin(), values.begin() + std::min<size_t>(static_cast<size_t>(count), values.size()));
}

Plan full_plan(sde_sampler sampler, sde_schedule schedule, int steps, const SchedulerConfig &cfg);

}  // namespace

Plan make_plan(sde_sampler sampler, sde_schedule schedule, int steps, const SchedulerConfig &cfg, double strength) {
  if (steps < 1) throw InvalidArgument("steps must be at least 1, got " + std::to_string(steps));
  int start = kept_steps(steps, strength);
  Plan plan = full_plan(sampler, schedule, steps, cfg);
  plan.start = start;
  drop_first(plan.timesteps, start);
  drop_first(plan.prev_timesteps, start);
  drop_first(plan.sigmas, start);  // sigma samplers: the kept steps' sigmas and the final one
  return plan;
}

at::Tensor initial_state(const Plan &plan, const at::Tensor &noise, const at::Tensor &init_latents) {
  if (!init_latents.defined()) {
    at::Tensor x = noise * plan.init_noise_sigma;
    if (plan.is_sigma_sampler() && plan.vp_latents) x = x * std::pow(1 + std::pow(plan.sigmas[0], 2), 0.5);  // VP -> VE
    return x;
  }
  if (plan.is_sigma_sampler()) return init_latents + noise * plan.sigmas[0];
  double a = plan.alphas_cumprod[static_cast<size_t>(plan.timesteps[0])];
  return init_latents * std::pow(a, 0.5) + noise * std::pow(1 - a, 0.5);
}

namespace {

Plan full_plan(sde_sampler sampler, sde_schedule schedule, int steps, const SchedulerConfig &cfg) {
  const int T = cfg.num_train_timesteps;
  if (sampler < 0 || sampler >= SDE_SAMPLER_COUNT) throw InvalidArgument("sampler out of range");
  if (schedule < 0 || schedule >= SDE_SCHEDULE_COUNT) throw InvalidArgument("schedule out of range");
  if (steps < 1) throw InvalidArgument("steps must be at least 1, got " + std::to_string(steps));
  if (steps > T)
    throw InvalidArgument("steps=" + std::to_string(steps) + " exceeds the model's num_train_timesteps=" + std::to_string(T));
  const char *name = sampler == SDE_SAMPLER_DPMPP_2M ? "dpmpp_2m" : sampler == SDE_SAMPLER_PNDM ? "pndm" : "ddim";
  if ((sampler == SDE_SAMPLER_DPMPP_2M || sampler == SDE_SAMPLER_PNDM) && steps < 2)
    throw InvalidArgument(std::string("sampler '") + name + "' is a multistep method and needs steps >= 2, got steps=" +
                          std::to_string(steps));
  if ((sampler == SDE_SAMPLER_DDIM || sampler == SDE_SAMPLER_PNDM) &&
      (schedule == SDE_SCHEDULE_KARRAS || schedule == SDE_SCHEDULE_EXPONENTIAL))
    throw InvalidArgument(std::string("sampler '") + name + "' cannot follow the '" + sde_schedule_name(schedule) +
                          "' schedule; it supports: default, normal, sgm_uniform, simple, ddim_uniform");

  ScheduleSettings s = settings_of(schedule);
  std::string spacing = s.spacing ? s.spacing : cfg.timestep_spacing;
  int offset = s.offset >= 0 ? s.offset : cfg.steps_offset;
  std::string shape = s.shape ? s.shape
                      : cfg.use_karras_sigmas    ? "karras"
                      : cfg.use_exponential_sigmas ? "exponential"
                                                   : "interp";
  Plan plan;
  plan.sampler = sampler;
  plan.clip_range = (cfg.clip_sample && sampler == SDE_SAMPLER_DDIM) ? cfg.clip_sample_range : 0.0;

  if (sampler == SDE_SAMPLER_DDIM || sampler == SDE_SAMPLER_PNDM) {
    at::Tensor ac = training_alphas_cumprod(cfg, false);
    plan.alphas_cumprod = to_vector(ac);
    plan.final_alpha_cumprod = cfg.set_alpha_to_one ? 1.0 : plan.alphas_cumprod[0];
    std::vector<double> descending = spaced_timesteps(spacing, steps, T, offset, Style::Ddim);
    if (sampler == SDE_SAMPLER_PNDM) {
      // diffusers' plms_timesteps (skip_prk_steps): the second timestep evaluated twice.
      if (!cfg.skip_prk_steps)
        throw InvalidArgument("pndm: only skip_prk_steps=True (PLMS, as every Stable Diffusion config sets) is supported");
      plan.timesteps = {descending[0], descending[1]};  // [d0, d1, d1, d2, ..., d_{n-1}]
      for (size_t i = 1; i < descending.size(); ++i) plan.timesteps.push_back(descending[i]);
      plan.stride = T / steps;
    } else {
      plan.timesteps = descending;
      for (double t : plan.timesteps) plan.prev_timesteps.push_back(t - T / steps);
    }
    for (double t : plan.timesteps)
      if (t < 0 || t >= T) throw InvalidArgument("the schedule produced timestep " + std::to_string(t) + " outside [0, " + std::to_string(T) + ")");
    return plan;
  }

  at::Tensor ac = training_alphas_cumprod(cfg, true);
  plan.alphas_cumprod = to_vector(ac);
  at::Tensor train_sigmas_t = at::pow((1 - ac) / ac, 0.5);  // float32, ascending in t
  std::vector<double> train_sigmas = to_vector(train_sigmas_t);
  for (double v : train_sigmas) plan.log_sigmas.push_back(std::log(static_cast<float>(v)));

  bool k_style = sampler == SDE_SAMPLER_EULER || sampler == SDE_SAMPLER_EULER_A;
  std::vector<double> timesteps = spaced_timesteps(spacing, steps, T, offset, k_style ? Style::K : Style::Dpm);
  std::vector<double> sigmas;
  for (double t : timesteps) sigmas.push_back(interp_index(t, train_sigmas));
  double lo, hi;
  if (k_style) {
    lo = sigmas.back();
    hi = sigmas.front();
  } else {
    lo = train_sigmas.front();
    hi = train_sigmas.back();
  }
  bool round_t = !k_style && cfg.beta_schedule != "squaredcos_cap_v2";
  if (shape == "karras" || shape == "exponential") {
    lo = cfg.has_sigma_min ? cfg.sigma_min : lo;
    hi = cfg.has_sigma_max ? cfg.sigma_max : hi;
    sigmas = shape == "karras" ? sigmas_karras(steps, lo, hi) : sigmas_exponential(steps, lo, hi);
    timesteps.clear();
    for (double sg : sigmas) timesteps.push_back(sigma_to_t(sg, plan.log_sigmas));
    if (shape == "karras" && round_t)
      for (double &t : timesteps) t = np_round(t);
  }
  if (!k_style) {
    for (double &t : timesteps) t = static_cast<double>(static_cast<int64_t>(t));  // .astype(int64) truncates
  } else {
    for (double &t : timesteps) t = f32(t);
  }
  double final_sigma = 0.0;
  if (cfg.final_sigmas_type == "sigma_min") {
    final_sigma = static_cast<double>(at::pow((1 - ac[0]) / ac[0], 0.5).item<float>());
  } else if (cfg.final_sigmas_type != "zero") {
    throw InvalidArgument("unsupported final_sigmas_type '" + cfg.final_sigmas_type + "'; choose zero or sigma_min");
  }
  sigmas.push_back(final_sigma);
  for (double &sg : sigmas) sg = f32(sg);
  plan.timesteps = timesteps;
  plan.sigmas = sigmas;
  if (k_style) {
    float max_sigma = static_cast<float>(*std::max_element(sigmas.begin(), sigmas.end()));
    bool plain = spacing == "linspace" || spacing == "trailing" || spacing == "simple";
    plan.init_noise_sigma = plain ? max_sigma : static_cast<double>(std::sqrt(max_sigma * max_sigma + 1.0f));
  } else {
    plan.init_noise_sigma = 1.0;
    plan.vp_latents = true;
    plan.lower_order_final = cfg.euler_at_final || (cfg.lower_order_final && steps < 15);
    plan.heun_solver = cfg.solver_type == "heun";
  }
  return plan;
}

}  // namespace

// ---------------------------------------------------------------------------
// The sampler step on device tensors
// ---------------------------------------------------------------------------

namespace {

// (x0, eps) of a raw model output at x = sqrt(a) x0 + sqrt(1 - a) eps (denoiser.to_x0_eps),
// with sa = sqrt(a) and s1a = sqrt(1 - a) as 0-d tensors.
std::pair<at::Tensor, at::Tensor> x0_eps(const at::Tensor &out, const at::Tensor &x, const at::Tensor &sa,
                                         const at::Tensor &s1a, const std::string &pred) {
  if (pred == "epsilon") return {(x - out * s1a) / sa, out};
  if (pred == "v_prediction") return {x * sa - out * s1a, out * sa + x * s1a};
  return {out, (x - out * sa) / s1a};
}

}  // namespace

at::Tensor step_model_input(const at::Tensor &x, const at::Tensor &scalars) { return x * scalars[kColCIn]; }

void step_update(const StepKind &kind, const StepBuffers &b, const at::Tensor &out, const at::Tensor &scalars) {
  auto col = [&](StepColumn c) { return scalars[c]; };  // a 0-d view of the step's row: no copy, no sync
  const at::Tensor &x = b.x;
  switch (kind.sampler) {
    case SDE_SAMPLER_EULER:
    case SDE_SAMPLER_EULER_A:
    case SDE_SAMPLER_DPMPP_2M: {
      // The Denoiser of denoiser.py: x_t = x * alpha (alpha = c_in, VE -> VP), s = sigma * alpha.
      at::Tensor alpha = col(kColCIn), s = col(kColA);
      at::Tensor x_t = x * alpha;
      at::Tensor x0 = kind.prediction_type == "epsilon"        ? (x_t - out * s) / alpha
                      : kind.prediction_type == "v_prediction" ? x_t * alpha - out * s
                                                               : out;
      if (kind.sampler == SDE_SAMPLER_DPMPP_2M) {
        // DPM-Solver++(2M), Lu et al. 2022, Algorithm 2, in k-diffusion's sigma form:
        // x_next = x * sigma_next / sigma - x0 * expm1(-h) + (x0 - x0_prev) * c2 (c2 = 0 for a
        // first-order step; x_next = x0 where sigma_next is 0).
        b.x_next.copy_(x * col(kColD) - x0 * col(kColE) + (x0 - b.h1) * col(kColF));
        b.remembered.copy_(x0);
      } else {
        // Euler (Karras et al. 2022, Algorithm 2 without churn), and the ancestral Euler of
        // k-diffusion (down to sigma_down, then fresh noise of std sigma_up; sigma_up = 0 for euler).
        at::Tensor d = (x - x0) / col(kColB);
        at::Tensor next = x + d * col(kColC);
        if (kind.sampler == SDE_SAMPLER_EULER_A) next = next + b.noise * col(kColD);
        b.x_next.copy_(next);
      }
      return;
    }
    case SDE_SAMPLER_DDIM: {
      // DDIM (Song et al. 2021, eq. 12), timestep_samplers.sample_ddim.
      auto [x0, eps] = x0_eps(out, x, col(kColA), col(kColB), kind.prediction_type);
      if (kind.clip_range > 0) x0 = x0.clamp(-kind.clip_range, kind.clip_range);
      b.x_next.copy_(x0 * col(kColC) + eps * col(kColD) + b.noise * col(kColE));
      return;
    }
    case SDE_SAMPLER_PNDM: {
      // PLMS: Liu et al., "Pseudo Numerical Methods for Diffusion Models on Manifolds" (2022),
      // eq. 12, with diffusers' start: Adams-Bashforth on eps (the current one and the last three
      // remembered, with the step's weights), then the transfer phi of eq. 9 from x (or, on the
      // repeated second step, from the state before the first).
      at::Tensor eps = x0_eps(out, x, col(kColA), col(kColB), kind.prediction_type).second;
      at::Tensor e = eps * col(kColC) + b.h1 * col(kColD) + b.h2 * col(kColE) + b.h3 * col(kColF);
      at::Tensor base = x * col(kColG) + b.start * col(kColH);
      b.x_next.copy_(base * col(kColI) - e * col(kColJ));
      b.remembered.copy_(eps);
      return;
    }
    default:
      throw InvalidArgument("sampler out of range");
  }
}

StepPlan::StepPlan(const Plan &plan, const SchedulerConfig &cfg, double eta) : plan_(plan), eta_(eta) {
  kind_.sampler = plan.sampler;
  kind_.prediction_type = cfg.prediction_type;
  kind_.clip_range = plan.clip_range;
}

bool StepPlan::draws_noise(size_t i) const {
  if (plan_.sampler == SDE_SAMPLER_EULER_A) return plan_.sigmas[i + 1] > 0;
  if (plan_.sampler == SDE_SAMPLER_DDIM) return eta_ > 0;
  return false;
}

at::Tensor StepPlan::table(double guidance) const {
  const Plan &plan = plan_;
  size_t n = steps();
  std::vector<double> rows(n * kStepColumns, 0.0);
  auto alpha_at = [&](int64_t t) { return t >= 0 ? plan.alphas_cumprod[t] : plan.final_alpha_cumprod; };
  double h_last = 0.0;
  for (size_t i = 0; i < n; ++i) {
    double *r = &rows[i * kStepColumns];
    r[kColT] = plan.timesteps[i];
    r[kColCIn] = 1.0;
    r[kColGuidance] = guidance;
    switch (plan.sampler) {
      case SDE_SAMPLER_EULER:
      case SDE_SAMPLER_EULER_A:
      case SDE_SAMPLER_DPMPP_2M: {
        double sigma = plan.sigmas[i], sigma_next = plan.sigmas[i + 1];
        double alpha = std::pow(std::pow(sigma, 2) + 1, -0.5);
        r[kColCIn] = alpha;
        r[kColA] = sigma * alpha;
        if (plan.sampler == SDE_SAMPLER_EULER) {
          r[kColB] = sigma;
          r[kColC] = sigma_next - sigma;
        } else if (plan.sampler == SDE_SAMPLER_EULER_A) {
          double sigma_up = std::min(sigma_next, std::pow(std::pow(sigma_next, 2) *
                                                              (std::pow(sigma, 2) - std::pow(sigma_next, 2)) /
                                                              std::pow(sigma, 2),
                                                          0.5));
          double sigma_down = std::pow(std::pow(sigma_next, 2) - std::pow(sigma_up, 2), 0.5);
          r[kColB] = sigma;
          r[kColC] = sigma_down - sigma;
          r[kColD] = sigma_next > 0 ? sigma_up : 0.0;
        } else if (sigma_next == 0) {  // dpmpp_2m's last step: x_next = x0
          r[kColD] = 0.0;
          r[kColE] = -1.0;
          r[kColF] = 0.0;
        } else {
          double h = std::log(sigma) - std::log(sigma_next);
          r[kColD] = sigma_next / sigma;
          r[kColE] = std::expm1(-h);
          bool second_order = i > 0 && !(plan.lower_order_final && i == n - 1);
          // d1 = (x0 - x0_prev) / (h_last / h); midpoint: x -= d1 * expm1(-h) / 2; heun: x += d1 * (expm1(-h) / h + 1)
          double weight = plan.heun_solver ? std::expm1(-h) / h + 1 : -0.5 * std::expm1(-h);
          r[kColF] = second_order ? weight * h / h_last : 0.0;
          h_last = h;
        }
        break;
      }
      case SDE_SAMPLER_DDIM: {
        int64_t t = static_cast<int64_t>(plan.timesteps[i]), t_prev = static_cast<int64_t>(plan.prev_timesteps[i]);
        double a = plan.alphas_cumprod[t];
        double a_t = alpha_at(t), a_prev = alpha_at(t_prev);
        double variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev);
        double std_dev = eta_ * std::pow(variance, 0.5);
        r[kColA] = std::pow(a, 0.5);
        r[kColB] = std::pow(1 - a, 0.5);
        r[kColC] = std::pow(a_prev, 0.5);
        r[kColD] = std::pow(1 - a_prev - std::pow(std_dev, 2), 0.5);
        r[kColE] = eta_ > 0 ? std_dev : 0.0;
        break;
      }
      case SDE_SAMPLER_PNDM: {
        // diffusers' PNDMScheduler.step_plms: eps of the step, Adams-Bashforth weights by how
        // many eps are remembered; the second step repeats the first's transfer from its start.
        int64_t t = static_cast<int64_t>(plan.timesteps[i]);
        r[kColA] = std::pow(plan.alphas_cumprod[t], 0.5);
        r[kColB] = std::pow(1 - plan.alphas_cumprod[t], 0.5);
        int64_t t_from = t, t_to = t - plan.stride;
        // remembered before this step: none at i = 0 and 1, then min(i - 1, 3)
        double c_e = 1, c1 = 0, c2 = 0, c3 = 0, from_x = 1, from_start = 0;
        if (i == 1) {  // (eps + eps_0) / 2, from the start, over the first step's interval
          c_e = 0.5, c1 = 0.5, from_x = 0, from_start = 1;
          t_from = t + plan.stride, t_to = t;
        } else if (i == 2) {
          c_e = 1.5, c1 = -0.5;
        } else if (i == 3) {
          c_e = 23.0 / 12, c1 = -16.0 / 12, c2 = 5.0 / 12;
        } else if (i >= 4) {
          c_e = 55.0 / 24, c1 = -59.0 / 24, c2 = 37.0 / 24, c3 = -9.0 / 24;
        }
        // the transfer phi(x_t, eps, t -> t_prev), eq. 9
        double a_t = plan.alphas_cumprod[t_from], a_prev = alpha_at(t_to);
        double denom = a_t * std::pow(1 - a_prev, 0.5) + std::pow(a_t * (1 - a_t) * a_prev, 0.5);
        r[kColC] = c_e, r[kColD] = c1, r[kColE] = c2, r[kColF] = c3;
        r[kColG] = from_x, r[kColH] = from_start;
        r[kColI] = std::pow(a_prev / a_t, 0.5);
        r[kColJ] = (a_prev - a_t) / denom;
        break;
      }
      default:
        throw InvalidArgument("sampler out of range");
    }
  }
  return at::tensor(rows, at::kDouble).to(at::kFloat).reshape({static_cast<int64_t>(n), kStepColumns});
}

void StepPlan::before(size_t i, StepBuffers &b) const {
  if (plan_.sampler == SDE_SAMPLER_PNDM && i == 0) b.start.copy_(b.x);
}

void StepPlan::after(size_t i, StepBuffers &b) const {
  b.x.copy_(b.x_next);
  if (plan_.sampler == SDE_SAMPLER_DPMPP_2M) {
    b.h1.copy_(b.remembered);
  } else if (plan_.sampler == SDE_SAMPLER_PNDM && i != 1) {  // the repeated step's eps is not remembered
    b.h3.copy_(b.h2);
    b.h2.copy_(b.h1);
    b.h1.copy_(b.remembered);
  }
}

at::Tensor StepPlan::latents(const at::Tensor &state, size_t i) const {
  if (plan_.is_sigma_sampler() && plan_.vp_latents)
    return state * std::pow(1 + std::pow(plan_.sigmas[i + 1], 2), -0.5);  // VE -> VP
  return state;
}

}  // namespace sde
