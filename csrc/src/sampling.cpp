#include "sampling.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include "errors.h"
#include "json.h"
#include "names.h"
#include "schedule_math.h"

namespace sde {
namespace detail {


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

std::vector<double> sigmas_karras(int n, double sigma_min, double sigma_max, double rho) {
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

double np_round(double v) { return std::nearbyint(v); }  // half to even, as numpy.round

std::vector<float> torch_linspace(float start, float stop, int num) {
  at::Tensor t = at::linspace(start, stop, num, at::kFloat).contiguous();
  return std::vector<float>(t.data_ptr<float>(), t.data_ptr<float>() + num);
}

std::vector<double> solve(std::vector<double> a, std::vector<double> b, int n) {
  for (int col = 0; col < n; ++col) {
    int pivot = col;
    for (int r = col + 1; r < n; ++r)
      if (std::fabs(a[r * n + col]) > std::fabs(a[pivot * n + col])) pivot = r;
    if (a[pivot * n + col] == 0) throw InvalidArgument("singular coefficient matrix");
    if (pivot != col) {
      for (int k = 0; k < n; ++k) std::swap(a[col * n + k], a[pivot * n + k]);
      std::swap(b[col], b[pivot]);
    }
    for (int r = col + 1; r < n; ++r) {
      double f = a[r * n + col] / a[col * n + col];
      for (int k = col; k < n; ++k) a[r * n + k] -= f * a[col * n + k];
      b[r] -= f * b[col];
    }
  }
  std::vector<double> x(static_cast<size_t>(n));
  for (int r = n - 1; r >= 0; --r) {
    double s = b[r];
    for (int k = r + 1; k < n; ++k) s -= a[r * n + k] * x[k];
    x[r] = s / a[r * n + r];
  }
  return x;
}

}  // namespace detail

namespace {

using namespace detail;

std::vector<double> np_arange(double start, double stop, double step) {
  double n = std::ceil((stop - start) / step);
  std::vector<double> y;
  for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) y.push_back(start + i * step);
  return y;
}


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


// The sampling keys sdengine reads, and the values of keys whose effect it does not reproduce
// (plan.py check_config: a value other than these is refused).
const char *const kSamplingKeys[] = {
    "timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range", "set_alpha_to_one", "skip_prk_steps",
    "use_karras_sigmas", "use_exponential_sigmas", "final_sigmas_type", "sigma_min", "sigma_max", "variance_type",
    "solver_order", "lower_order_final", "euler_at_final", "solver_type", "disable_corrector",
    "original_inference_steps", "timestep_scaling"};
const char *const kUnsupportedIfSet[][2] = {
    {"thresholding", "false"}, {"use_beta_sigmas", "false"}, {"use_lu_lambdas", "false"}, {"use_flow_sigmas", "false"},
    {"timestep_type", "\"discrete\""}, {"interpolation_type", "\"linear\""}, {"trained_betas", "null"}};

std::string json_text(const Json &v) {
  switch (v.type()) {
    case Json::Type::Null: return "null";
    case Json::Type::Bool: return v.boolean() ? "true" : "false";
    case Json::Type::String: return "\"" + v.str() + "\"";
    case Json::Type::Number: return v.is_integer() ? std::to_string(v.integer()) : std::to_string(v.number());
    default: return "[...]";
  }
}

bool same_json(const Json &v, const char *text) {
  Json want = Json::parse(std::string(text), "default");
  if (v.type() != want.type()) return false;
  switch (v.type()) {
    case Json::Type::Null: return true;
    case Json::Type::Bool: return v.boolean() == want.boolean();
    case Json::Type::String: return v.str() == want.str();
    case Json::Type::Number: return v.number() == want.number();
    default: return false;
  }
}

}  // namespace

void SchedulerConfig::set_key(const std::string &key, const Json &v) {
  const SchedulerConfig d;
  bool null = v.is_null();
  auto str = [&](std::string SchedulerConfig::*field) { this->*field = null ? d.*field : v.str(); };
  auto boolean = [&](bool SchedulerConfig::*field) { this->*field = null ? d.*field : v.boolean(); };
  auto number = [&](double SchedulerConfig::*field) { this->*field = null ? d.*field : v.number(); };
  auto integer = [&](int SchedulerConfig::*field, int lo, int hi) {
    if (null) {
      this->*field = d.*field;
      return;
    }
    if (!v.is_number() || v.number() != std::floor(v.number()) || v.number() < lo || v.number() > hi)
      throw FormatError(key + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    this->*field = static_cast<int>(v.number());
  };
  if (!null && !(v.is_string() || v.is_bool() || v.is_number() || v.is_array()))
    throw FormatError(key + " has an unexpected type");
  if (key == "timestep_spacing") str(&SchedulerConfig::timestep_spacing);
  else if (key == "steps_offset") integer(&SchedulerConfig::steps_offset, 0, 1000);
  else if (key == "clip_sample") boolean(&SchedulerConfig::clip_sample);
  else if (key == "clip_sample_range") number(&SchedulerConfig::clip_sample_range);
  else if (key == "set_alpha_to_one") boolean(&SchedulerConfig::set_alpha_to_one);
  else if (key == "skip_prk_steps") boolean(&SchedulerConfig::skip_prk_steps);
  else if (key == "use_karras_sigmas") boolean(&SchedulerConfig::use_karras_sigmas);
  else if (key == "use_exponential_sigmas") boolean(&SchedulerConfig::use_exponential_sigmas);
  else if (key == "final_sigmas_type") str(&SchedulerConfig::final_sigmas_type);
  else if (key == "sigma_min") has_sigma_min = !null, sigma_min = null ? 0.0 : v.number();
  else if (key == "sigma_max") has_sigma_max = !null, sigma_max = null ? 0.0 : v.number();
  else if (key == "variance_type") str(&SchedulerConfig::variance_type);
  else if (key == "solver_order") integer(&SchedulerConfig::solver_order, 1, kRegisters - 2);
  else if (key == "lower_order_final") boolean(&SchedulerConfig::lower_order_final);
  else if (key == "euler_at_final") boolean(&SchedulerConfig::euler_at_final);
  else if (key == "solver_type") str(&SchedulerConfig::solver_type);
  else if (key == "original_inference_steps") integer(&SchedulerConfig::original_inference_steps, 1, 100000);
  else if (key == "timestep_scaling") number(&SchedulerConfig::timestep_scaling);
  else if (key == "disable_corrector") {
    disable_corrector.clear();
    if (!null)
      for (const Json &step : v.array()) disable_corrector.push_back(static_cast<int>(step.integer()));
  }
}

SchedulerConfig SchedulerConfig::from_json(const Json &j, const std::string &where, bool file) {
  SchedulerConfig c;
  try {
    c.num_train_timesteps = j.get_int("num_train_timesteps", c.num_train_timesteps, 2, 100000);
    c.beta_start = j.get_number("beta_start", c.beta_start);
    c.beta_end = j.get_number("beta_end", c.beta_end);
    c.beta_schedule = j.get_string("beta_schedule", c.beta_schedule);
    c.prediction_type = j.get_string("prediction_type", c.prediction_type);
    c.rescale_betas_zero_snr = j.get_bool("rescale_betas_zero_snr", c.rescale_betas_zero_snr);
    for (const char *key : kSamplingKeys)
      if (const Json *v = j.find(key)) c.set_key(key, *v);
    for (const auto &row : kUnsupportedIfSet)
      if (const Json *v = j.find(row[0]); v && !v->is_null() && !same_json(*v, row[1]))
        c.unsupported.push_back(std::string(row[0]) + "=" + json_text(*v) + " (sdengine supports only " + row[0] +
                                "=" + row[1] + ")");
    c.given_known = true;
    const Json *given = j.find("given");
    if (given && given->is_array()) {
      for (const Json &key : given->array()) c.given.insert(key.str());
    } else if (file) {
      for (const auto &member : j.members()) c.given.insert(member.first);
    } else {
      c.given_known = false;  // a config built in code: every value counts
    }
  } catch (const FormatError &e) {
    throw FormatError(where + ": " + e.what());
  }
  if (c.prediction_type != "epsilon" && c.prediction_type != "v_prediction" && c.prediction_type != "sample")
    throw FormatError(where + ": unsupported prediction_type '" + c.prediction_type + "'");
  if (c.num_train_timesteps < 2) throw FormatError(where + ": num_train_timesteps must be at least 2");
  return c;
}

SchedulerConfig SchedulerConfig::for_sampler(const std::string &sampler) const {
  if (!given_known) return *this;
  std::map<std::string, std::string> defaults;
  for (const auto &[key, value] : scheduler_class_defaults(sampler)) defaults[key] = value;
  SchedulerConfig out = *this;
  for (const auto &[key, neutral] : neutral_sampling_values()) {
    auto d = defaults.find(key);
    if (d == defaults.end()) {
      out.set_key(key, Json::parse(neutral, "neutral value"));
    } else if (!given.count(key)) {
      const char *pipeline = sd_pipeline_value(key);
      out.set_key(key, Json::parse(pipeline ? std::string(pipeline) : d->second, "class default"));
    }
  }
  out.given_known = false;
  out.given.clear();
  return out;
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

bool is_k_style(sde_sampler s) {
  switch (s) {
    case SDE_SAMPLER_EULER: case SDE_SAMPLER_EULER_A: case SDE_SAMPLER_LMS: case SDE_SAMPLER_HEUN:
    case SDE_SAMPLER_DPM_2: case SDE_SAMPLER_DPM_2_A: case SDE_SAMPLER_DPMPP_SDE: return true;
    default: return false;
  }
}

bool is_dpm_style(sde_sampler s) {
  return s == SDE_SAMPLER_DPMPP_2M || s == SDE_SAMPLER_DPMPP_2M_SDE || s == SDE_SAMPLER_DPMPP_3M_SDE ||
         s == SDE_SAMPLER_UNIPC;
}

bool is_diffusers_timestep_sampler(sde_sampler s) {
  return s == SDE_SAMPLER_DDIM || s == SDE_SAMPLER_DDPM || s == SDE_SAMPLER_PNDM || s == SDE_SAMPLER_LCM;
}

// plan.py MIN_STEPS (unipc: at least its solver_order)
int min_steps(sde_sampler s, const SchedulerConfig &cfg) {
  switch (s) {
    case SDE_SAMPLER_PNDM: case SDE_SAMPLER_LMS: case SDE_SAMPLER_DPMPP_2M: case SDE_SAMPLER_DPMPP_2M_SDE: return 2;
    case SDE_SAMPLER_DPMPP_3M_SDE: return 3;
    case SDE_SAMPLER_UNIPC: return std::max(2, cfg.solver_order);
    default: return 1;
  }
}

Plan sigma_plan(sde_sampler sampler, int steps, const SchedulerConfig &cfg, const std::string &spacing, int offset,
                const std::string &shape) {
  const int T = cfg.num_train_timesteps;
  Plan plan;
  at::Tensor ac = training_alphas_cumprod(cfg, true);
  plan.alphas_cumprod = to_vector(ac);
  at::Tensor train_sigmas_t = at::pow((1 - ac) / ac, 0.5);  // float32, ascending in t
  std::vector<double> train_sigmas = to_vector(train_sigmas_t);
  for (double v : train_sigmas) plan.log_sigmas.push_back(std::log(static_cast<float>(v)));

  bool k_style = is_k_style(sampler);
  std::vector<double> timesteps = spaced_timesteps(spacing, steps, T, offset, k_style ? Style::K : Style::Dpm);
  std::vector<double> sigmas;
  for (double t : timesteps) sigmas.push_back(interp_index(t, train_sigmas));
  double lo, hi;
  bool round_t;
  if (k_style) {
    lo = sigmas.back(), hi = sigmas.front();
    round_t = sampler == SDE_SAMPLER_DPM_2 || sampler == SDE_SAMPLER_DPM_2_A;  // KDPM2 rounds its karras timesteps
  } else {
    lo = train_sigmas.front(), hi = train_sigmas.back();
    round_t = !(sampler != SDE_SAMPLER_UNIPC && cfg.beta_schedule == "squaredcos_cap_v2");
  }
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
  } else if (!(shape == "karras" && round_t)) {
    for (double &t : timesteps) t = f32(t);
  }
  double final_sigma = 0.0;
  if (cfg.final_sigmas_type == "sigma_min") {
    final_sigma = static_cast<double>(at::pow((1 - ac[0]) / ac[0], 0.5).item<float>());
  } else if (cfg.final_sigmas_type != "zero" && !cfg.final_sigmas_type.empty()) {
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
  }
  // plan.py _sigma_options
  if (sampler == SDE_SAMPLER_LMS) plan.order = 4;
  if (sampler == SDE_SAMPLER_DPMPP_2M || sampler == SDE_SAMPLER_DPMPP_2M_SDE) {
    plan.lower_order_final = cfg.euler_at_final || (cfg.lower_order_final && steps < 15);
    plan.solver_type = cfg.solver_type == "heun" ? "heun" : "midpoint";
  }
  if (sampler == SDE_SAMPLER_UNIPC) {
    plan.order = cfg.solver_order;
    plan.lower_order_final = cfg.lower_order_final;
    plan.solver_type = cfg.solver_type == "bh1" ? "bh1" : "bh2";
    plan.disable_corrector = cfg.disable_corrector;
  }
  return plan;
}

// schedules.lcm_timesteps
std::vector<double> lcm_timesteps(int steps, int T, int original_steps) {
  int k = T / original_steps;
  std::vector<double> origin;
  for (int i = 1; i <= original_steps; ++i) origin.push_back(static_cast<double>(i * k - 1));
  if (static_cast<int>(origin.size()) / steps < 1)
    throw InvalidArgument("lcm: steps=" + std::to_string(steps) + " exceeds the model's original_inference_steps=" +
                          std::to_string(original_steps) + "; use at most " + std::to_string(origin.size()) + " steps");
  std::reverse(origin.begin(), origin.end());
  std::vector<double> out;
  double step = static_cast<double>(origin.size()) / steps;  // numpy.linspace(0, len, steps, endpoint=False)
  for (int i = 0; i < steps; ++i) out.push_back(origin[static_cast<size_t>(std::floor(i * step))]);
  return out;
}

Plan timestep_plan(sde_sampler sampler, int steps, const SchedulerConfig &cfg, const std::string &spacing, int offset) {
  const int T = cfg.num_train_timesteps;
  Plan plan;
  plan.alphas_cumprod = to_vector(training_alphas_cumprod(cfg, false));
  plan.final_alpha_cumprod = cfg.set_alpha_to_one ? 1.0 : plan.alphas_cumprod[0];
  if (sampler == SDE_SAMPLER_LCM) {
    plan.timesteps = lcm_timesteps(steps, T, cfg.original_inference_steps);
    plan.timestep_scaling = cfg.timestep_scaling;
    return plan;
  }
  std::vector<double> descending = spaced_timesteps(spacing, steps, T, offset, Style::Ddim);
  if (sampler == SDE_SAMPLER_PNDM) {
    // diffusers' plms_timesteps (skip_prk_steps): the second timestep evaluated twice.
    if (!cfg.skip_prk_steps)
      throw InvalidArgument("pndm: only skip_prk_steps=True (PLMS, as every Stable Diffusion config sets) is supported; "
                            "choose another sampler for this scheduler config");
    plan.timesteps = {descending[0], descending[1]};  // [d0, d1, d1, d2, ..., d_{n-1}]
    for (size_t i = 1; i < descending.size(); ++i) plan.timesteps.push_back(descending[i]);
    plan.stride = T / steps;
  } else if (sampler == SDE_SAMPLER_DDIM) {
    plan.timesteps = descending;
    for (double t : plan.timesteps) plan.prev_timesteps.push_back(t - T / steps);  // t - T // steps, any spacing
  } else {  // ddpm: the next timestep of the list
    plan.timesteps = descending;
    for (size_t i = 1; i < descending.size(); ++i) plan.prev_timesteps.push_back(descending[i]);
    plan.prev_timesteps.push_back(-1);
    const std::string &v = cfg.variance_type;
    if (!v.empty() && v != "fixed_small" && v != "fixed_small_log" && v != "fixed_large")
      throw InvalidArgument("ddpm: unsupported variance_type '" + v + "'; choose fixed_small, fixed_small_log or fixed_large");
    plan.fixed_large = v == "fixed_large";
  }
  for (double t : plan.timesteps)
    if (t < 0 || t >= T)
      throw InvalidArgument("the schedule produced timestep " + std::to_string(t) + " outside [0, " + std::to_string(T) + ")");
  return plan;
}

}  // namespace

Plan make_plan(sde_sampler sampler, sde_schedule schedule, int steps, const SchedulerConfig &config, double strength) {
  if (sampler < 0 || sampler >= SDE_SAMPLER_COUNT) throw InvalidArgument("sampler out of range");
  if (schedule < 0 || schedule >= SDE_SCHEDULE_COUNT) throw InvalidArgument("schedule out of range");
  const std::string name = sampler_name(sampler);
  if (!is_k_style(sampler) && !is_dpm_style(sampler) && !is_diffusers_timestep_sampler(sampler))
    throw InvalidArgument("sampler '" + name + "' runs under A1111's rules only (conventions a1111)");
  if (schedule > SDE_SCHEDULE_DDIM_UNIFORM)
    throw InvalidArgument(std::string("schedule '") + schedule_name(schedule) +
                          "' is one of A1111's schedules: it runs under A1111's rules only (conventions a1111)");
  SchedulerConfig cfg = config.for_sampler(name);
  if (!cfg.unsupported.empty()) throw InvalidArgument("scheduler config: unsupported " + cfg.unsupported.front());
  bool timestep = is_diffusers_timestep_sampler(sampler);
  if ((timestep && (schedule == SDE_SCHEDULE_KARRAS || schedule == SDE_SCHEDULE_EXPONENTIAL)) ||
      (sampler == SDE_SAMPLER_LCM && schedule != SDE_SCHEDULE_DEFAULT))
    throw InvalidArgument("sampler '" + name + "' cannot follow the '" + schedule_name(schedule) + "' schedule; it supports: " +
                          (sampler == SDE_SAMPLER_LCM ? "default" : "default, normal, sgm_uniform, simple, ddim_uniform"));
  const int T = cfg.num_train_timesteps;
  if (steps < 1) throw InvalidArgument("steps must be at least 1, got " + std::to_string(steps));
  if (steps > T)
    throw InvalidArgument("steps=" + std::to_string(steps) + " exceeds the model's num_train_timesteps=" + std::to_string(T));
  if (steps < min_steps(sampler, cfg))
    throw InvalidArgument("sampler '" + name + "' is a multistep method and needs steps >= " +
                          std::to_string(min_steps(sampler, cfg)) + ", got steps=" + std::to_string(steps));
  int start = kept_steps(steps, strength);
  ScheduleSettings s = settings_of(schedule);
  std::string spacing = s.spacing ? s.spacing : cfg.timestep_spacing;
  int offset = s.offset >= 0 ? s.offset : cfg.steps_offset;
  std::string shape = s.shape ? s.shape
                      : cfg.use_karras_sigmas    ? "karras"
                      : cfg.use_exponential_sigmas ? "exponential"
                                                   : "interp";
  Plan plan = timestep ? timestep_plan(sampler, steps, cfg, spacing, offset)
                       : sigma_plan(sampler, steps, cfg, spacing, offset, shape);
  plan.sampler = sampler;
  plan.schedule = schedule;
  plan.steps = steps;
  bool clips = sampler == SDE_SAMPLER_DDIM || sampler == SDE_SAMPLER_DDPM || sampler == SDE_SAMPLER_HEUN ||
               sampler == SDE_SAMPLER_LCM;  // plan.py CLIPS_X0
  plan.clip_range = cfg.clip_sample && clips ? cfg.clip_sample_range : 0.0;
  plan.start = start;
  drop_first(plan.timesteps, start);
  drop_first(plan.prev_timesteps, start);
  drop_first(plan.sigmas, start);  // sigma samplers: the kept steps' sigmas and the final one
  return plan;
}

bool Plan::is_sigma_sampler() const {
  if (conventions == Conventions::A1111)
    return !(sampler == SDE_SAMPLER_DDIM || sampler == SDE_SAMPLER_DDIM_CFGPP || sampler == SDE_SAMPLER_PNDM ||
             sampler == SDE_SAMPLER_UNIPC);
  return !is_diffusers_timestep_sampler(sampler);
}

int Plan::num_steps() const {
  if (loop_steps >= 0) return loop_steps;
  return is_sigma_sampler() ? static_cast<int>(sigmas.size()) - 1 : static_cast<int>(timesteps.size());
}

at::Tensor initial_state(const Plan &plan, const at::Tensor &noise, const at::Tensor &init_latents) {
  if (!init_latents.defined()) {
    at::Tensor x = noise * plan.init_noise_sigma;
    if (plan.is_sigma_sampler() && plan.vp_latents) x = x * std::pow(1 + std::pow(plan.sigmas[0], 2), 0.5);  // VP -> VE
    return x;
  }
  if (plan.is_sigma_sampler())
    return init_latents + noise * (plan.conventions == Conventions::A1111 ? plan.init_noise_sigma : plan.sigmas[0]);
  double t = plan.noise_timestep >= 0 ? plan.noise_timestep : plan.timesteps[0];
  double a = plan.alphas_cumprod[static_cast<size_t>(t)];
  return init_latents * std::pow(a, 0.5) + noise * std::pow(1 - a, 0.5);
}

// ---------------------------------------------------------------------------
// The evaluation on device tensors
// ---------------------------------------------------------------------------

at::Tensor eval_model_input(const at::Tensor &registers, const at::Tensor &scalars) {
  return registers[0] * scalars[kColCIn];
}

void eval_update(const at::Tensor &registers, const at::Tensor &out, const at::Tensor &uncond, const at::Tensor &noise,
                 const at::Tensor &scalars) {
  auto col = [&](EvalColumn c) { return scalars[c]; };  // a 0-d view of the row: no copy, no host sync
  at::Tensor x = registers[0];
  at::Tensor clip = col(kColClip);
  at::Tensor x0 = at::clamp(x * col(kColX0X) + out * col(kColX0Out), -clip, clip);
  at::Tensor eps = x * col(kColEpsX) + out * col(kColEpsOut);
  at::Tensor eps_uncond = x * col(kColEpsX) + uncond * col(kColEpsOut);
  int64_t numel = x.numel();
  // (kBasis, numel): the registers, then x0, eps, eps_uncond, noise, x - x0
  at::Tensor basis = at::cat({registers.reshape({kRegisters, numel}), x0.reshape({1, numel}), eps.reshape({1, numel}),
                              eps_uncond.reshape({1, numel}), noise.reshape({1, numel}), (x - x0).reshape({1, numel})});
  at::Tensor mix = scalars.narrow(0, kEvalScalars, kRegisters * kBasis).view({kRegisters, kBasis});
  registers.copy_(at::mm(mix, basis).view(registers.sizes()));
}

at::Tensor eval_row(const Eval &e, double guidance) {
  std::vector<double> row(static_cast<size_t>(kEvalColumns), 0.0);
  row[kColT] = e.t;
  row[kColCIn] = e.c_in;
  row[kColGuidance] = guidance * e.guidance;
  row[kColX0X] = e.x0_x, row[kColX0Out] = e.x0_out, row[kColEpsX] = e.eps_x, row[kColEpsOut] = e.eps_out;
  row[kColClip] = e.clip;
  for (int r = 0; r < kRegisters; ++r)
    for (int b = 0; b < kBasis; ++b) row[static_cast<size_t>(kEvalScalars + r * kBasis + b)] = e.update[r].c[b];
  return at::tensor(row, at::kDouble).to(at::kFloat);
}

at::Tensor program_table(const std::vector<Eval> &evals, double guidance) {
  std::vector<at::Tensor> rows;
  for (const Eval &e : evals) rows.push_back(eval_row(e, guidance));
  if (rows.empty()) return at::zeros({0, kEvalColumns}, at::kFloat);
  return at::stack(rows);
}

}  // namespace sde
