// A1111's rules (sdengine/samplers/a1111.py, rng.py): the model's discrete sigmas from the LDM
// alphas_cumprod, A1111's 12 schedules and each sampler's Automatic one, its DDIM / PLMS / UniPC
// timesteps, its img2img tails, and its seeds (variation seeds, seed resizing, ENSD, the CPU
// and NV (Philox) sources). Float32 where k-diffusion and A1111 compute in float32 tensors.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "errors.h"
#include "names.h"
#include "sampling.h"
#include "schedule_math.h"

namespace sde {
namespace detail {

float a1111_sigma_to_t(float sigma, const std::vector<float> &log_sigmas) {
  float log_sigma = std::log(sigma);
  int64_t n = static_cast<int64_t>(log_sigmas.size()), low = 0;
  for (int64_t k = 0; k < n; ++k)
    if (log_sigma - log_sigmas[static_cast<size_t>(k)] >= 0) low = k;  // cumsum(dists >= 0).argmax()
  low = std::min(low, n - 2);
  float lo = log_sigmas[static_cast<size_t>(low)], hi = log_sigmas[static_cast<size_t>(low + 1)];
  float w = std::clamp((lo - log_sigma) / (lo - hi), 0.0f, 1.0f);
  return (1 - w) * static_cast<float>(low) + w * static_cast<float>(low + 1);
}

}  // namespace detail

namespace {

using namespace detail;

// The model's discrete schedule (k_diffusion DiscreteSchedule), or A1111's LCM schedule (the
// sigmas at LCM's 50 timesteps 19, 39, ..., 999: nearest timestep, no interpolation).
struct Discrete {
  std::vector<float> sigmas, log_sigmas;  // ascending in t
  bool lcm = false;
  int skip = 1;
  float sigma_min() const { return sigmas.front(); }
  float sigma_max() const { return sigmas.back(); }

  float sigma_to_t(float sigma) const {
    if (!lcm) return a1111_sigma_to_t(sigma, log_sigmas);
    float ls = std::log(sigma);
    size_t nearest = 0;
    for (size_t k = 1; k < log_sigmas.size(); ++k)
      if (std::fabs(ls - log_sigmas[k]) < std::fabs(ls - log_sigmas[nearest])) nearest = k;
    return static_cast<float>(nearest * skip + (skip - 1));
  }
  float index_to_sigma(float t) const {
    int64_t low = static_cast<int64_t>(std::floor(t)), high = static_cast<int64_t>(std::ceil(t));
    float w = t - std::floor(t);
    return std::exp((1 - w) * log_sigmas[static_cast<size_t>(low)] + w * log_sigmas[static_cast<size_t>(high)]);
  }
  float t_to_sigma(float t) const {
    if (!lcm) return index_to_sigma(t);
    float index = std::clamp((t - static_cast<float>(skip - 1)) / static_cast<float>(skip), 0.0f,
                             static_cast<float>(sigmas.size() - 1));
    return index_to_sigma(index);
  }
  std::vector<float> get_sigmas(int n) const {  // A1111's "Uniform"
    std::vector<float> ts = lcm ? torch_linspace(sigma_to_t(sigma_max()), sigma_to_t(sigma_min()), n)
                                : torch_linspace(static_cast<float>(sigmas.size() - 1), 0.0f, n);
    std::vector<float> out;
    for (float t : ts) out.push_back(t_to_sigma(t));
    out.push_back(0.0f);
    return out;
  }
};

// a1111.ldm_alphas_cumprod: float64 betas and cumprod, stored as float32
std::vector<double> ldm_alphas_cumprod(const SchedulerConfig &cfg) {
  int n = cfg.num_train_timesteps;
  at::Tensor betas;
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  if (cfg.beta_schedule == "scaled_linear") {
    betas = at::pow(at::linspace(std::pow(cfg.beta_start, 0.5), std::pow(cfg.beta_end, 0.5), n, f64), 2);
  } else if (cfg.beta_schedule == "linear") {
    betas = at::linspace(cfg.beta_start, cfg.beta_end, n, f64);
  } else {
    throw InvalidArgument("A1111's rules take an LDM noise schedule (scaled_linear or linear betas), not beta_schedule='" +
                          cfg.beta_schedule + "'; use conventions diffusers");
  }
  if (cfg.rescale_betas_zero_snr)
    throw InvalidArgument("A1111's rules with zero-terminal-SNR betas (rescale_betas_zero_snr) are not reproduced; use "
                          "conventions diffusers");
  return to_vector(at::cumprod(1 - betas, 0).to(at::kFloat));
}

Discrete discrete_schedule(const std::vector<double> &alphas_cumprod, bool lcm) {
  Discrete d;
  at::Tensor ac = at::tensor(alphas_cumprod, at::kDouble).to(at::kFloat);
  if (lcm) {
    d.lcm = true;
    d.skip = static_cast<int>(alphas_cumprod.size()) / 50;
    ac = ac.index_select(0, at::arange(50, at::kLong) * d.skip + (d.skip - 1));
  }
  at::Tensor sigmas = at::pow((1 - ac) / ac, 0.5).contiguous();
  at::Tensor logs = sigmas.log().contiguous();
  d.sigmas.assign(sigmas.data_ptr<float>(), sigmas.data_ptr<float>() + sigmas.numel());
  d.log_sigmas.assign(logs.data_ptr<float>(), logs.data_ptr<float>() + logs.numel());
  return d;
}

// ---- A1111's schedules (modules/sd_schedulers.py) ----------------------------------------

std::vector<float> karras(int n, double sigma_min, double sigma_max, double rho = 7.0) {
  std::vector<float> ramp = torch_linspace(0.0f, 1.0f, n), out;
  double min_inv = std::pow(sigma_min, 1 / rho), max_inv = std::pow(sigma_max, 1 / rho);
  for (float r : ramp)
    out.push_back(std::pow(static_cast<float>(max_inv) + r * static_cast<float>(min_inv - max_inv), static_cast<float>(rho)));
  out.push_back(0.0f);
  return out;
}

std::vector<float> exponential(int n, double sigma_min, double sigma_max) {
  std::vector<float> out;
  for (float v : torch_linspace(static_cast<float>(std::log(sigma_max)), static_cast<float>(std::log(sigma_min)), n))
    out.push_back(std::exp(v));
  out.push_back(0.0f);
  return out;
}

std::vector<float> polyexponential(int n, double sigma_min, double sigma_max, double rho = 1.0) {
  std::vector<float> out;
  float span = static_cast<float>(std::log(sigma_max) - std::log(sigma_min)), base = static_cast<float>(std::log(sigma_min));
  for (float r : torch_linspace(1.0f, 0.0f, n)) out.push_back(std::exp(std::pow(r, static_cast<float>(rho)) * span + base));
  out.push_back(0.0f);
  return out;
}

std::vector<float> normal(int n, const Discrete &model, bool sgm) {
  float start = model.sigma_to_t(model.sigma_max()), end = model.sigma_to_t(model.sigma_min());
  std::vector<float> ts = torch_linspace(start, end, sgm ? n + 1 : n), out;
  if (sgm) ts.pop_back();
  for (float t : ts) out.push_back(model.t_to_sigma(t));
  out.push_back(0.0f);
  return out;
}

std::vector<float> kl_optimal(int n, double sigma_min, double sigma_max) {
  float alpha_min = std::atan(static_cast<float>(sigma_min)), alpha_max = std::atan(static_cast<float>(sigma_max));
  std::vector<float> out;
  for (int step = 0; step <= n; ++step) {
    float f = static_cast<float>(step) / static_cast<float>(n);
    out.push_back(std::tan(f * alpha_min + (1.0f - f) * alpha_max));
  }
  return out;
}

std::vector<float> align_your_steps(int n, bool sdxl) {
  static const double sd1[] = {14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029};
  static const double xl[] = {14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029};
  const double *published = sdxl ? xl : sd1;
  std::vector<double> sigmas(published, published + 11);
  if (n != 11) {
    std::vector<double> ys;  // log of the reversed sigmas, at xs = linspace(0, 1, 11)
    for (int k = 10; k >= 0; --k) ys.push_back(std::log(published[k]));
    std::vector<double> xs = np_linspace(0, 1, 11), interpolated;
    for (double x : np_linspace(0, 1, n)) {
      size_t j = std::min<size_t>(static_cast<size_t>(std::upper_bound(xs.begin(), xs.end(), x) - xs.begin()), 10);
      j = std::max<size_t>(j, 1);
      double y = x >= xs.back() ? ys.back() : ys[j - 1] + (ys[j] - ys[j - 1]) / (xs[j] - xs[j - 1]) * (x - xs[j - 1]);
      interpolated.push_back(std::exp(y));
    }
    sigmas.assign(interpolated.rbegin(), interpolated.rend());
  }
  std::vector<float> out(sigmas.begin(), sigmas.end());
  out.push_back(0.0f);
  return out;
}

std::vector<float> simple(int n, const Discrete &model) {
  double stride = static_cast<double>(model.sigmas.size()) / n;
  std::vector<float> out;
  for (int i = 0; i < n; ++i) out.push_back(model.sigmas[model.sigmas.size() - 1 - static_cast<size_t>(i * stride)]);
  out.push_back(0.0f);
  return out;
}

std::vector<float> ddim_schedule(int n, const Discrete &model) {
  size_t stride = std::max<size_t>(model.sigmas.size() / static_cast<size_t>(n), 1);
  std::vector<float> picked;
  for (size_t t = 1; t < model.sigmas.size(); t += stride) picked.push_back(model.sigmas[t]);
  std::reverse(picked.begin(), picked.end());
  picked.push_back(0.0f);
  return picked;
}

// The regularized incomplete beta function I_x(a, b) (Numerical Recipes' continued fraction).
double incomplete_beta(double x, double a, double b) {
  if (x <= 0) return 0;
  if (x >= 1) return 1;
  auto fraction = [](double x, double a, double b) {
    const double tiny = 1e-300;
    double qab = a + b, qap = a + 1, qam = a - 1, c = 1, d = 1 - qab * x / qap;
    d = 1 / (std::fabs(d) < tiny ? tiny : d);
    double h = d;
    for (int m = 1; m <= 10000; ++m) {
      double m2 = 2.0 * m, aa = m * (b - m) * x / ((qam + m2) * (a + m2));
      d = 1 + aa * d, d = 1 / (std::fabs(d) < tiny ? tiny : d);
      c = 1 + aa / c, c = std::fabs(c) < tiny ? tiny : c;
      h *= d * c;
      aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
      d = 1 + aa * d, d = 1 / (std::fabs(d) < tiny ? tiny : d);
      c = 1 + aa / c, c = std::fabs(c) < tiny ? tiny : c;
      double del = d * c;
      h *= del;
      if (std::fabs(del - 1) < 1e-16) break;
    }
    return h;
  };
  double front = std::exp(std::lgamma(a + b) - std::lgamma(a) - std::lgamma(b) + a * std::log(x) + b * std::log1p(-x));
  if (x < (a + 1) / (a + b + 2)) return front * fraction(x, a, b) / a;
  return 1 - front * fraction(1 - x, b, a) / b;
}

// scipy.stats.beta.ppf by bisection (to double precision)
double beta_ppf(double q, double a, double b) {
  if (q <= 0) return 0;
  if (q >= 1) return 1;
  double lo = 0, hi = 1;
  for (int i = 0; i < 200 && hi - lo > 1e-17; ++i) {
    double mid = 0.5 * (lo + hi);
    (incomplete_beta(mid, a, b) < q ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

std::vector<float> beta_schedule(int n, double sigma_min, double sigma_max) {
  std::vector<float> out;
  for (double r : np_linspace(0, 1, n))
    out.push_back(static_cast<float>(sigma_min + beta_ppf(1 - r, 0.6, 0.6) * (sigma_max - sigma_min)));
  out.push_back(0.0f);
  return out;
}

// The schedule a sampler runs: `schedule`, or its own for the default (Automatic).
sde_schedule schedule_of(sde_sampler sampler, sde_schedule schedule) {
  if (schedule != SDE_SCHEDULE_DEFAULT) return schedule;
  A1111Options o = a1111_options(sampler);
  return o.scheduler.empty() ? SDE_SCHEDULE_UNIFORM : schedule_of_name(o.scheduler);
}

// a1111.sigmas_for: the float32 sigmas (+ final 0) of `steps` steps
std::vector<float> sigmas_for(sde_sampler sampler, sde_schedule schedule, int steps, const Discrete &model, bool sdxl) {
  bool discard = a1111_options(sampler).discard;
  int n = discard ? steps + 1 : steps;
  double lo = model.sigma_min(), hi = model.sigma_max();
  std::vector<float> s;
  switch (schedule_of(sampler, schedule)) {
    case SDE_SCHEDULE_UNIFORM: s = model.get_sigmas(n); break;
    case SDE_SCHEDULE_KARRAS: s = karras(n, lo, hi); break;
    case SDE_SCHEDULE_EXPONENTIAL: s = exponential(n, lo, hi); break;
    case SDE_SCHEDULE_POLYEXPONENTIAL: s = polyexponential(n, lo, hi); break;
    case SDE_SCHEDULE_SGM_UNIFORM: s = normal(n, model, true); break;
    case SDE_SCHEDULE_NORMAL: s = normal(n, model, false); break;
    case SDE_SCHEDULE_KL_OPTIMAL: s = kl_optimal(n, lo, hi); break;
    case SDE_SCHEDULE_ALIGN_YOUR_STEPS: s = align_your_steps(n, sdxl); break;
    case SDE_SCHEDULE_SIMPLE: s = simple(n, model); break;
    case SDE_SCHEDULE_DDIM_UNIFORM: s = ddim_schedule(n, model); break;
    case SDE_SCHEDULE_BETA: s = beta_schedule(n, lo, hi); break;
    default: throw InvalidArgument("schedule out of range");
  }
  if (discard) s.erase(s.end() - 2);
  return s;
}

// a1111.restart_pairs
std::vector<std::pair<double, double>> restart_pairs(std::vector<float> sigmas) {
  int steps = static_cast<int>(sigmas.size()) - 1;
  int restart_steps = 0, restart_times = 0;
  long restart_at = -1;
  auto argmin = [](const std::vector<float> &v, float target) {
    size_t best = 0;
    for (size_t k = 1; k < v.size(); ++k)
      if (std::fabs(v[k] - target) < std::fabs(v[best] - target)) best = k;
    return best;
  };
  if (steps >= 20) {
    restart_steps = steps >= 36 ? steps / 4 : 9;
    restart_times = steps >= 36 ? 2 : 1;
    sigmas = karras(steps - restart_steps * restart_times, sigmas[sigmas.size() - 2], sigmas[0]);
    restart_at = static_cast<long>(argmin(sigmas, 0.1f));
  }
  std::vector<std::pair<double, double>> pairs;
  for (size_t i = 0; i + 1 < sigmas.size(); ++i) {
    pairs.emplace_back(sigmas[i], sigmas[i + 1]);
    if (static_cast<long>(i + 1) == restart_at) {
      size_t low = i + 1, high = argmin(sigmas, 2.0f);
      if (high < low) {
        std::vector<float> down = karras(restart_steps + 1, sigmas[low], sigmas[high]);
        down.pop_back();
        for (int r = 0; r < restart_times; ++r)
          for (size_t k = 0; k + 1 < down.size(); ++k) pairs.emplace_back(down[k], down[k + 1]);
      }
    }
  }
  return pairs;
}

}  // namespace

Plan make_a1111_plan(sde_sampler sampler, sde_schedule schedule, int steps, const SchedulerConfig &cfg, double strength,
                     double eta, bool sdxl) {
  if (sampler < 0 || sampler >= SDE_SAMPLER_COUNT) throw InvalidArgument("sampler out of range");
  if (schedule < 0 || schedule >= SDE_SCHEDULE_COUNT) throw InvalidArgument("schedule out of range");
  A1111Options options = a1111_options(sampler);
  if (!options.known)
    throw InvalidArgument(std::string("sampler '") + sampler_name(sampler) + "' is not one of A1111's samplers; use "
                          "conventions diffusers");
  if (!cfg.unsupported.empty()) throw InvalidArgument("scheduler config: unsupported " + cfg.unsupported.front());
  if (cfg.prediction_type != "epsilon" && cfg.prediction_type != "v_prediction")
    throw InvalidArgument("A1111's rules take epsilon or v_prediction models, not '" + cfg.prediction_type +
                          "'; use conventions diffusers");
  if (steps < 1) throw InvalidArgument("steps must be an integer >= 1, got " + std::to_string(steps));
  if (!(strength >= 0.0 && strength <= 1.0)) throw InvalidArgument("strength must be in [0, 1], got " + std::to_string(strength));
  Plan plan;
  plan.conventions = Conventions::A1111;
  plan.sampler = sampler;
  plan.steps = steps;
  plan.alphas_cumprod = ldm_alphas_cumprod(cfg);
  plan.has_eta = options.has_eta;
  plan.eta = options.has_eta ? (eta >= 0 ? eta : options.eta) : 0.0;
  plan.ensd = options.ensd;
  plan.brownian = options.brownian;
  plan.order = sampler == SDE_SAMPLER_LMS ? 4 : 2;
  auto no_step = [&] {
    return InvalidArgument("strength=" + std::to_string(strength) + " with steps=" + std::to_string(steps) +
                           " leaves no denoising step");
  };
  bool timestep = sampler == SDE_SAMPLER_DDIM || sampler == SDE_SAMPLER_DDIM_CFGPP || sampler == SDE_SAMPLER_PNDM ||
                  sampler == SDE_SAMPLER_UNIPC;
  if (timestep) {
    // A1111's DDIM / PLMS / UniPC timesteps: 1, 1 + T // steps, ... (clipped to T - 1)
    const int T = cfg.num_train_timesteps;
    if (T != 1000)
      throw InvalidArgument("A1111's " + options.label + " takes a model of 1000 training timesteps, not " +
                            std::to_string(T) + "; use conventions diffusers");
    std::vector<double> ts;
    for (int t = 0; t < T; t += std::max(T / steps, 1)) ts.push_back(std::clamp(t + 1, 0, T - 1));
    if (strength < 1.0) {
      size_t t_enc = static_cast<size_t>(std::min(strength, 0.999) * steps);
      plan.noise_timestep = ts.at(t_enc);
      ts.resize(t_enc);
    }
    if (ts.size() < 2) throw no_step();
    plan.schedule = SDE_SCHEDULE_DEFAULT;
    for (double a : plan.alphas_cumprod) plan.log_sigmas.push_back(std::log(std::sqrt(static_cast<float>((1 - a) / a))));
    if (sampler == SDE_SAMPLER_UNIPC) {
      if (ts.size() < 3)
        throw InvalidArgument("A1111's UniPC (order 3) needs at least 3 steps; steps=" + std::to_string(steps) +
                              " with strength=" + std::to_string(strength) + " gives " + std::to_string(ts.size()));
      float t_start = plan.noise_timestep < 0 ? 1.0f : static_cast<float>(ts.back()) / 1000.0f + 1.0f / 1000.0f;
      plan.times = torch_linspace(t_start, 1.0f / static_cast<float>(plan.alphas_cumprod.size()),
                                  static_cast<int>(ts.size()) + 1);
      plan.loop_steps = static_cast<int>(ts.size());
      for (size_t i = 0; i + 1 < plan.times.size(); ++i)
        plan.timesteps.push_back((plan.times[i] - 1.0f / static_cast<float>(plan.alphas_cumprod.size())) * 1000.0f);
      return plan;
    }
    for (size_t i = ts.size() - 1; i >= 1; --i) {  // evaluated ts[1:][::-1], landing ts[:-1][::-1]
      plan.timesteps.push_back(ts[i]);
      plan.prev_timesteps.push_back(ts[i - 1]);
    }
    return plan;
  }
  Discrete model = discrete_schedule(plan.alphas_cumprod, sampler == SDE_SAMPLER_LCM);
  plan.log_sigmas = sampler == SDE_SAMPLER_LCM ? discrete_schedule(plan.alphas_cumprod, false).log_sigmas : model.log_sigmas;
  plan.schedule = schedule_of(sampler, schedule);
  std::vector<float> sigmas = sigmas_for(sampler, schedule, steps, model, sdxl);
  int start = 0;
  if (strength < 1.0) start = steps - static_cast<int>(std::min(strength, 0.999) * steps) - 1;  // a1111.img2img_start
  sigmas.erase(sigmas.begin(), sigmas.begin() + std::min<size_t>(static_cast<size_t>(start), sigmas.size()));
  if (sigmas.size() < 2) throw no_step();
  plan.start = start;
  plan.init_noise_sigma = sigmas[0];
  if (sampler == SDE_SAMPLER_DPM_FAST || sampler == SDE_SAMPLER_DPM_ADAPTIVE) {
    // the model's sigma range (an img2img tail's), not the schedule: that only scales the start
    plan.dpm_sigma_min = start == 0 ? model.sigma_min() : sigmas[sigmas.size() - 2];
    plan.dpm_sigma_max = start == 0 ? model.sigma_max() : sigmas[0];
    plan.nfe = static_cast<int>(sigmas.size()) - 1;
    // dpm fast: one loop step per solver step (a1111.dpm_fast_orders: nfe // 3 + 1 of them); adaptive: one
    plan.loop_steps = sampler == SDE_SAMPLER_DPM_ADAPTIVE ? 1 : plan.nfe / 3 + 1;
  } else if (sampler == SDE_SAMPLER_RESTART) {
    plan.pairs = restart_pairs(sigmas);
    plan.loop_steps = static_cast<int>(plan.pairs.size());
  }
  for (float s : sigmas) plan.sigmas.push_back(s);
  for (size_t i = 0; i + 1 < sigmas.size(); ++i)
    plan.timesteps.push_back(model.sigma_to_t(sigmas.back() == 0 ? std::max(sigmas[i], model.sigma_min()) : sigmas[i]));
  return plan;
}

// ---------------------------------------------------------------------------
// A1111's seeds (rng.py)
// ---------------------------------------------------------------------------

struct ImageNoise::Source {
  bool philox = false;
  uint64_t seed = 0;
  uint64_t offset = 0;   // philox: draws so far
  at::Generator cpu;     // torch's CPU generator

  at::Tensor randn(const std::vector<int64_t> &shape) {
    if (!philox) return at::randn(shape, cpu, at::kFloat);
    // Philox 4x32-10, Box-Muller: element i of draw k is from counter (k, 0, i, 0), key (seed lo, seed hi)
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    at::Tensor out = at::empty({n}, at::kFloat);
    float *dst = out.data_ptr<float>();
    const double inv = static_cast<double>(2.3283064e-10f);
    const double inv_2pi = static_cast<double>(static_cast<float>(2.3283064e-10 * 6.2831855));
    const double half = static_cast<double>(2.3283064e-10f / 2), half_2pi = static_cast<double>(static_cast<float>(inv_2pi) / 2);
    for (int64_t i = 0; i < n; ++i) {
      uint32_t c0 = static_cast<uint32_t>(offset), c1 = 0, c2 = static_cast<uint32_t>(i), c3 = 0;
      uint32_t k0 = static_cast<uint32_t>(seed & 0xFFFFFFFFu), k1 = static_cast<uint32_t>(seed >> 32);
      for (int r = 0; r < 10; ++r) {
        uint64_t p0 = static_cast<uint64_t>(c0) * 0xD2511F53u, p1 = static_cast<uint64_t>(c2) * 0xCD9E8D57u;
        uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
        uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
        uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0, c1 = n1, c2 = n2, c3 = n3;
        if (r < 9) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
      }
      double u = c0 * inv + half, v = c1 * inv_2pi + half_2pi;
      dst[i] = static_cast<float>(std::sqrt(-2.0 * std::log(u)) * std::sin(v));
    }
    offset += 1;
    return out.view(shape);
  }
};

ImageNoise::ImageNoise(SeedOptions options, std::vector<int64_t> shape) : o_(std::move(options)), shape_(std::move(shape)) {
  for (uint64_t seed : o_.seeds) generators_.push_back(fresh(seed));
}

ImageNoise::~ImageNoise() = default;

std::unique_ptr<ImageNoise::Source> ImageNoise::fresh(uint64_t seed) const {
  auto s = std::make_unique<Source>();
  s->philox = o_.philox;
  s->seed = seed;
  if (!o_.philox) s->cpu = at::make_generator<at::CPUGeneratorImpl>(seed);
  return s;
}

namespace {

// rng.slerp over the norms of dim 1 (C, h, w tensors)
at::Tensor slerp(double strength, const at::Tensor &low, const at::Tensor &high) {
  at::Tensor low_norm = low / at::norm(low, 2, {1}, true), high_norm = high / at::norm(high, 2, {1}, true);
  at::Tensor dot = (low_norm * high_norm).sum(1);
  if (dot.mean().item<float>() > 0.9995f) return low * strength + high * (1 - strength);
  at::Tensor omega = at::acos(dot), so = at::sin(omega);
  return (at::sin((1.0 - strength) * omega) / so).unsqueeze(1) * low + (at::sin(strength * omega) / so).unsqueeze(1) * high;
}

// rng._paste_centred: noise (C, h', w') centred on canvas (C, h, w)
at::Tensor paste_centred(const at::Tensor &noise, at::Tensor canvas) {
  int64_t dx = (canvas.size(2) - noise.size(2)) / 2, dy = (canvas.size(1) - noise.size(1)) / 2;
  if (canvas.size(2) - noise.size(2) < 0 && (canvas.size(2) - noise.size(2)) % 2) dx -= 1;  // Python's floor division
  if (canvas.size(1) - noise.size(1) < 0 && (canvas.size(1) - noise.size(1)) % 2) dy -= 1;
  int64_t w = dx >= 0 ? noise.size(2) : noise.size(2) + 2 * dx, h = dy >= 0 ? noise.size(1) : noise.size(1) + 2 * dy;
  int64_t tx = std::max<int64_t>(dx, 0), ty = std::max<int64_t>(dy, 0), sx = std::max<int64_t>(-dx, 0),
          sy = std::max<int64_t>(-dy, 0);
  canvas.narrow(1, ty, h).narrow(2, tx, w).copy_(noise.narrow(1, sy, h).narrow(2, sx, w));
  return canvas;
}

}  // namespace

at::Tensor ImageNoise::first() {
  bool resized = o_.resize_w > 0 && o_.resize_h > 0;
  std::vector<int64_t> noise_shape = resized ? std::vector<int64_t>{shape_[0], o_.resize_h / o_.downscale, o_.resize_w / o_.downscale}
                                             : shape_;
  std::vector<at::Tensor> images;
  for (size_t i = 0; i < o_.seeds.size(); ++i) {
    at::Tensor noise = resized ? fresh(o_.seeds[i])->randn(noise_shape) : generators_[i]->randn(shape_);
    if (o_.subseed_strength != 0) {
      uint64_t subseed = i < o_.subseeds.size() ? o_.subseeds[i] : 0;
      noise = slerp(o_.subseed_strength, noise, fresh(subseed)->randn(noise_shape));
    }
    if (resized) noise = paste_centred(noise, generators_[i]->randn(shape_));
    images.push_back(noise);
  }
  if (o_.ensd != 0) {
    generators_.clear();
    for (uint64_t seed : o_.seeds) generators_.push_back(fresh(seed + static_cast<uint64_t>(o_.ensd)));
  }
  started_ = true;
  return at::stack(images);
}

at::Tensor ImageNoise::next() {
  if (!started_) return first();
  std::vector<at::Tensor> images;
  for (auto &g : generators_) images.push_back(g->randn(shape_));
  return at::stack(images);
}

}  // namespace sde

// ---------------------------------------------------------------------------
// The noise of A1111's SDE samplers: torchsde's BrownianTree (one per image seed), seeded by
// numpy's SeedSequence as torchsde seeds it (torchsde/_brownian/brownian_interval.py,
// numpy/random/bit_generator.pyx)
// ---------------------------------------------------------------------------

namespace sde {
namespace {

// numpy.random.SeedSequence(entropy, spawn_key, pool_size).generate_state(n) (uint32 words)
std::vector<uint32_t> seed_sequence_state(uint64_t entropy, const std::vector<uint64_t> &spawn_key, size_t pool_size,
                                          size_t n_words) {
  const uint32_t kInitA = 0x43b0d7e5u, kMultA = 0x931e8875u, kInitB = 0x8b51f9ddu, kMultB = 0x58f38dedu;
  const uint32_t kMixMultL = 0xca01f9ddu, kMixMultR = 0x4973f715u;
  auto words = [](uint64_t n) {  // _int_to_uint32_array: little-endian 32-bit words, [0] for 0
    std::vector<uint32_t> out;
    if (n == 0) out.push_back(0);
    while (n > 0) out.push_back(static_cast<uint32_t>(n & 0xFFFFFFFFu)), n >>= 32;
    return out;
  };
  std::vector<uint32_t> entropy_array = words(entropy), spawn;
  for (uint64_t k : spawn_key)
    for (uint32_t w : words(k)) spawn.push_back(w);
  if (!spawn.empty() && entropy_array.size() < pool_size) entropy_array.resize(pool_size, 0);
  entropy_array.insert(entropy_array.end(), spawn.begin(), spawn.end());
  uint32_t hash_const = kInitA;
  auto hashmix = [&](uint32_t value) {
    value ^= hash_const;
    hash_const *= kMultA;
    value *= hash_const;
    value ^= value >> 16;
    return value;
  };
  auto mix = [](uint32_t x, uint32_t y) {
    uint32_t result = kMixMultL * x - kMixMultR * y;
    return result ^ (result >> 16);
  };
  std::vector<uint32_t> pool(pool_size);
  for (size_t i = 0; i < pool_size; ++i) pool[i] = hashmix(i < entropy_array.size() ? entropy_array[i] : 0);
  for (size_t src = 0; src < pool_size; ++src)
    for (size_t dst = 0; dst < pool_size; ++dst)
      if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
  for (size_t src = pool_size; src < entropy_array.size(); ++src)
    for (size_t dst = 0; dst < pool_size; ++dst) pool[dst] = mix(pool[dst], hashmix(entropy_array[src]));
  std::vector<uint32_t> state(n_words);
  uint32_t hash_b = kInitB;
  for (size_t i = 0; i < n_words; ++i) {
    uint32_t v = pool[i % pool_size];
    v ^= hash_b;
    hash_b *= kMultB;
    v *= hash_b;
    v ^= v >> 16;
    state[i] = v;
  }
  return state;
}

// Python's round(x, 6): the correctly rounded decimal (printf's) read back
double round6(double x) {
  char text[64];
  std::snprintf(text, sizeof text, "%.6f", x);
  return std::strtod(text, nullptr);
}

constexpr size_t kPoolSize = 24;  // torchsde BrownianTree's pool_size

}  // namespace

// One node of the halfway tree: [start, end], split at its rounded midpoint on demand.
struct BrownianNoise::Tree {
  struct Node {
    double start, end, midway = 0;
    bool split = false;
    uint64_t spawn_key = 0, depth = 0;
    uint32_t w_seed = 0;
    Node *parent = nullptr;
    bool is_left = false;
    std::unique_ptr<Node> left, right;
    at::Tensor w;  // this node's increment (computed on demand, kept)
  };
  uint64_t entropy;
  std::vector<int64_t> shape;
  Node root;

  at::Tensor randn(uint32_t seed) const {
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
    return at::randn(shape, g, at::kFloat);
  }
  void split_exact(Node &node, double midway) {
    node.midway = round6(midway);
    node.split = true;
    if (node.parent) node.spawn_key = 2 * node.parent->spawn_key + (node.is_left ? 0 : 1), node.depth = node.parent->depth + 1;
    node.w_seed = seed_sequence_state(entropy, {node.spawn_key, node.depth}, kPoolSize, 4)[0];
    node.left = std::make_unique<Node>();
    node.right = std::make_unique<Node>();
    *node.left = Node{node.start, round6(midway)};
    *node.right = Node{round6(midway), node.end};
    node.left->parent = node.right->parent = &node;
    node.left->is_left = true;
  }
  void split(Node &node, double midway) {  // halfway tree: split at the half until midway is a boundary
    split_exact(node, 0.5 * (node.end + node.start));
    if (midway > node.midway) split(*node.right, midway);
    else if (midway < node.midway) split(*node.left, midway);
  }
  void loc(Node &node, double ta, double tb, std::vector<Node *> &out) {
    if (ta < node.start || tb > node.end) return loc(*node.parent, ta, tb, out);  // the parent's jurisdiction
    if (ta == node.start && tb == node.end) {
      out.push_back(&node);
      return;
    }
    if (!node.split) {
      if (ta == node.start) {
        split(node, tb);
        loc(*node.left, ta, tb, out);
        return;
      }
      split(node, ta);
      loc(*node.right, ta, tb, out);
      return;
    }
    if (tb <= node.midway) return loc(*node.left, ta, tb, out);
    if (ta >= node.midway) return loc(*node.right, ta, tb, out);
    loc(*node.left, ta, node.midway, out);
    loc(*node.right, node.midway, tb, out);
  }
  const at::Tensor &increment(Node &node) {  // the Brownian bridge from the parent's increment
    if (node.w.defined()) return node.w;
    Node &parent = *node.parent;
    const at::Tensor &w = increment(parent);
    double h_reciprocal = 1 / (parent.end - parent.start);
    double left_diff = parent.midway - parent.start, right_diff = parent.end - parent.midway;
    at::Tensor mean = w * left_diff * h_reciprocal;
    double var = left_diff * right_diff * h_reciprocal;
    at::Tensor left_w = mean + std::sqrt(var) * randn(parent.w_seed);
    node.w = node.is_left ? left_w : w - left_w;
    return node.w;
  }
};

BrownianNoise::BrownianNoise(const std::vector<uint64_t> &seeds, std::vector<int64_t> shape, double sigma_min,
                             double sigma_max) {
  // torch.tensor(float(sigma)): float32 values
  double lo32 = static_cast<float>(sigma_min), hi32 = static_cast<float>(sigma_max);
  t0_ = std::min(lo32, hi32), t1_ = std::max(lo32, hi32);
  for (uint64_t seed : seeds) {
    auto tree = std::make_unique<Tree>();
    tree->entropy = seed;
    tree->shape = shape;
    tree->root.start = round6(t0_), tree->root.end = round6(t1_);
    uint32_t w_seed = seed_sequence_state(seed, {}, kPoolSize, 3)[0];
    tree->root.w = tree->randn(w_seed) * std::sqrt(t1_ - t0_);
    trees_.push_back(std::move(tree));
  }
}

BrownianNoise::~BrownianNoise() = default;

at::Tensor BrownianNoise::operator()(double sigma, double sigma_next) {
  float a = static_cast<float>(sigma), b = static_cast<float>(sigma_next);
  double lo = std::min(a, b), hi = std::max(a, b);
  double sign = a < b ? 1.0 : -1.0;
  double start = round6(t0_), end = round6(t1_);
  lo = round6(std::clamp(lo, start, end)), hi = round6(std::clamp(hi, start, end));  // torchsde clamps, then rounds
  std::vector<at::Tensor> images;
  for (auto &tree : trees_) {
    at::Tensor w;
    if (lo == hi) {
      w = at::zeros(tree->shape, at::kFloat);
    } else {
      std::vector<Tree::Node *> nodes;
      tree->loc(tree->root, lo, hi, nodes);
      w = tree->increment(*nodes[0]).clone();
      for (size_t k = 1; k < nodes.size(); ++k) w = w + tree->increment(*nodes[k]);
    }
    images.push_back(w);
  }
  float span = std::sqrt(std::fabs(b - a));
  return at::stack(images) * sign / span;
}

}  // namespace sde
