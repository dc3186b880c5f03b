// Every sampler as a program of model evaluations (sampling.h): the samplers of
// sdengine/samplers/sigma_samplers.py, timestep_samplers.py and a1111.py, step for step, with
// each update written as a linear combination (Lin) of the registers and the evaluation's
// products. Register 0 holds the x the model is evaluated at next; each sampler names what its
// other registers keep (the previous denoised, derivatives, the state before a substep).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>

#include "errors.h"
#include "names.h"
#include "sampling.h"
#include "schedule_math.h"

namespace sde {
namespace {

using namespace detail;

Lin R(int r) { return Lin::of(r); }
Lin X0() { return Lin::of(kBasisX0); }
Lin EPS() { return Lin::of(kBasisEps); }
Lin EPS_U() { return Lin::of(kBasisEpsUncond); }
Lin NOISE() { return Lin::of(kBasisNoise); }
Lin DIFF() { return Lin::of(kBasisDiff); }  // R0 - x0 of the evaluation

// sigma_samplers.ancestral_step: (sigma_down, sigma_up)
std::pair<double, double> ancestral(double sigma_from, double sigma_to, double eta) {
  if (eta == 0) return {sigma_to, 0.0};
  double up = std::min(sigma_to, eta * std::sqrt(sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) /
                                                 (sigma_from * sigma_from)));
  return {std::sqrt(sigma_to * sigma_to - up * up), up};
}

// sigma_samplers._log_midpoint: exp(lerp(log a, log b, 0.5)) in float32
double log_midpoint(double a, double b) {
  float la = std::log(static_cast<float>(a)), lb = std::log(static_cast<float>(b));
  return static_cast<double>(std::exp(lb - (lb - la) * 0.5f));
}

// The model as the samplers see it: how to evaluate it for a state at a point of the run.
struct Denoiser {
  const Plan &plan;
  std::string prediction_type;
  std::map<double, double> exact;  // diffusers: {plan sigma: plan timestep}
  bool a1111 = false, lcm = false;
  std::vector<float> lcm_log_sigmas;  // A1111's LCM: the model's sigmas at its 50 timesteps
  int lcm_skip = 20;

  Denoiser(const Plan &p, std::string pred) : plan(p), prediction_type(std::move(pred)) {
    a1111 = p.conventions == Conventions::A1111;
    if (!a1111 && p.is_sigma_sampler())
      for (size_t i = 0; i + 1 < p.sigmas.size(); ++i) exact[p.sigmas[i]] = p.timesteps[i];
    lcm = a1111 && p.sampler == SDE_SAMPLER_LCM;
    if (lcm) {
      lcm_skip = static_cast<int>(p.alphas_cumprod.size()) / 50;
      for (int k = 0; k < 50; ++k) lcm_log_sigmas.push_back(p.log_sigmas[static_cast<size_t>(k * lcm_skip + lcm_skip - 1)]);
    }
  }

  // x0 of a state in VE units (x = x0 + sigma eps) at sigma: denoiser.Denoiser.__call__, or
  // A1111's CompVisDenoiser / LCM denoiser. intermediate: between schedule points (diffusers
  // interpolates its timestep).
  Eval at_sigma(double sigma, bool intermediate = false) const {
    Eval e;
    if (lcm) {
      float ls = std::log(static_cast<float>(sigma));
      size_t nearest = 0;
      for (size_t k = 1; k < lcm_log_sigmas.size(); ++k)
        if (std::fabs(ls - lcm_log_sigmas[k]) < std::fabs(ls - lcm_log_sigmas[nearest])) nearest = k;
      e.t = static_cast<double>(static_cast<float>(nearest * lcm_skip + (lcm_skip - 1)));
      e.c_in = std::pow(sigma * sigma + 1, -0.5);
      double st = e.t * 10.0, c_skip = 0.25 / (st * st + 0.25), c_out = st / std::sqrt(st * st + 0.25);
      e.x0_x = c_out + c_skip, e.x0_out = -sigma * c_out;  // (x - eps sigma) c_out + x c_skip
      return e;
    }
    if (a1111) {
      float s = static_cast<float>(sigma);
      e.t = a1111_sigma_to_t(s, plan.log_sigmas);
      e.c_in = std::pow(s * s + 1.0f, -0.5f);
      double sd = s;
      if (prediction_type == "epsilon") {
        e.x0_x = 1, e.x0_out = -sd;
      } else {
        e.x0_x = 1 / (sd * sd + 1), e.x0_out = -sd * std::pow(sd * sd + 1, -0.5);
      }
      return e;
    }
    double alpha = std::pow(sigma * sigma + 1, -0.5);
    auto it = intermediate ? exact.end() : exact.find(sigma);
    e.t = it != exact.end() ? it->second : sigma_to_t(sigma, plan.log_sigmas);
    e.c_in = alpha;
    if (prediction_type == "epsilon") {
      e.x0_x = 1, e.x0_out = -sigma;  // (x alpha - out sigma alpha) / alpha
    } else if (prediction_type == "v_prediction") {
      e.x0_x = alpha * alpha, e.x0_out = -sigma * alpha;
    } else {
      e.x0_out = 1;
    }
    if (plan.clip_range > 0) e.clip = plan.clip_range;
    return e;
  }

  // (x0, eps) of a state in VP units at a training timestep: Denoiser.at_timestep (diffusers), or
  // eps as A1111's CompVisTimestepsDenoiser gives it (x0 left to the sampler). `t_in` is what the
  // UNet gets (A1111's UniPC: fractional); t the integer timestep of the conversion.
  Eval at_timestep(int t, double t_in = -1) const {
    Eval e;
    e.t = t_in >= 0 ? static_cast<double>(static_cast<float>(t_in)) : t;
    double a = plan.alphas_cumprod[static_cast<size_t>(t)];
    if (a1111) {
      if (prediction_type == "epsilon") {
        e.eps_out = 1;
      } else {  // ldm's sqrt buffers, float32
        e.eps_out = static_cast<float>(std::sqrt(a)), e.eps_x = static_cast<float>(std::sqrt(1 - a));
      }
      return e;
    }
    double sa = std::sqrt(a), s1a = std::sqrt(1 - a);
    if (prediction_type == "epsilon") {
      e.x0_x = 1 / sa, e.x0_out = -s1a / sa, e.eps_out = 1;
    } else if (prediction_type == "v_prediction") {
      e.x0_x = sa, e.x0_out = -s1a, e.eps_out = sa, e.eps_x = s1a;
    } else {
      e.x0_out = 1, e.eps_x = 1 / s1a, e.eps_out = -sa / s1a;
    }
    if (plan.clip_range > 0) e.clip = plan.clip_range;
    return e;
  }
};

// Builds a program: evaluations and the loop steps they end.
struct Builder {
  Program p;
  void add(Eval e) { p.evals.push_back(std::move(e)); }
  Eval &last() { return p.evals.back(); }
  // The loop step ends with the last evaluation; its state is `reg` * scale.
  void end_step(double scale = 1.0, int reg = 0) {
    Eval &e = last();
    if (e.steps_ended++ == 0) e.latents_scale = scale, e.latents_register = reg;
    p.steps += 1;
  }
};

// ---------------------------------------------------------------------------
// Sigma samplers (sigma_samplers.py; A1111's other k-diffusion samplers, a1111.py)
// ---------------------------------------------------------------------------

struct SigmaRun {
  const Plan &plan;
  const Denoiser &den;
  Builder &b;
  double eta;
  // The evaluation `e` draws the noise of the step (or substep) from sigma to sigma_next.
  void draws(Eval &e, double sigma, double sigma_next) const {
    e.noise = plan.brownian ? NoiseKind::Brownian : NoiseKind::Draw;
    e.noise_from = sigma, e.noise_to = sigma_next;
  }
  int n() const { return static_cast<int>(plan.sigmas.size()) - 1; }
  double sigma(int i) const { return plan.sigmas[static_cast<size_t>(i)]; }
  double scale(double sigma_next) const { return plan.vp_latents ? std::pow(1 + sigma_next * sigma_next, -0.5) : 1.0; }
  Lin d(double s) const { return DIFF() / s; }  // to_d at the evaluated state

  void euler() {
    for (int i = 0; i < n(); ++i) {
      double s = sigma(i), sn = sigma(i + 1);
      Eval e = den.at_sigma(s);
      e.update[0] = R(0) + d(s) * (sn - s);
      b.add(e);
      b.end_step(scale(sn));
    }
  }

  void euler_ancestral() {
    for (int i = 0; i < n(); ++i) {
      double s = sigma(i), sn = sigma(i + 1);
      auto [down, up] = ancestral(s, sn, eta);
      Eval e = den.at_sigma(s);
      e.update[0] = R(0) + d(s) * (down - s);
      if (sn > 0) e.update[0] = e.update[0] + NOISE() * up, e.noise = NoiseKind::Draw;
      b.add(e);
      b.end_step(scale(sn));
    }
  }

  // One Heun step from R0 (Euler into sigma 0); A1111's Restart reuses it.
  void heun_step(double s, double sn) {
    Eval e = den.at_sigma(s);
    double dt = sn - s;
    if (sn == 0) {
      e.update[0] = R(0) + d(s) * dt;
      b.add(e);
      return;
    }
    e.update[1] = R(0);      // x
    e.update[2] = d(s);      // d
    e.update[0] = R(0) + d(s) * dt;
    b.add(e);
    Eval e2 = den.at_sigma(sn);
    e2.update[0] = R(1) + (R(2) + d(sn)) * (dt / 2);
    b.add(e2);
  }

  void heun() {
    for (int i = 0; i < n(); ++i) {
      heun_step(sigma(i), sigma(i + 1));
      b.end_step(scale(sigma(i + 1)));
    }
  }

  // _dpm_2_step from R0 (evaluated at s) to sigma_to; `extra` is added to the result (noise).
  void dpm_2_step(Eval e, double s, double sigma_to, Lin extra) {
    if (sigma_to == 0) {
      e.update[0] = R(0) + d(s) * (sigma_to - s) + extra;
      b.add(e);
      return;
    }
    double mid = log_midpoint(s, sigma_to);
    e.update[1] = R(0);
    e.update[0] = R(0) + d(s) * (mid - s);
    b.add(e);
    Eval e2 = den.at_sigma(mid, true);
    e2.update[0] = R(1) + d(mid) * (sigma_to - s) + extra;
    b.add(e2);
  }

  void dpm_2() {
    for (int i = 0; i < n(); ++i) {
      dpm_2_step(den.at_sigma(sigma(i)), sigma(i), sigma(i + 1), Lin());
      b.end_step(scale(sigma(i + 1)));
    }
  }

  void dpm_2_ancestral() {
    for (int i = 0; i < n(); ++i) {
      double s = sigma(i), sn = sigma(i + 1);
      auto [down, up] = ancestral(s, sn, eta);
      dpm_2_step(den.at_sigma(s), s, down, down != 0 ? NOISE() * up : Lin());
      if (down != 0) b.last().noise = NoiseKind::Draw;
      b.end_step(scale(sn));
    }
  }

  // Integral from sigmas[i] to sigmas[i+1] of the Lagrange basis polynomial through
  // sigmas[i], ..., sigmas[i-order+1] that is 1 at sigmas[i-j] (sigma_samplers._lms_coefficient).
  double lms_coefficient(int order, int i, int j) const {
    std::vector<double> poly = {1.0};  // low to high degree
    double denom = 1.0;
    for (int k = 0; k < order; ++k) {
      if (k == j) continue;
      double root = sigma(i - k);
      std::vector<double> next(poly.size() + 1, 0.0);
      for (size_t m = 0; m < poly.size(); ++m) next[m + 1] += poly[m], next[m] -= root * poly[m];
      poly = next;
      denom *= sigma(i - j) - root;
    }
    auto antiderivative = [&](double x) {
      double v = 0;
      for (size_t m = poly.size(); m-- > 0;) v = v * x + poly[m] / denom / static_cast<double>(m + 1);
      return v * x;
    };
    return antiderivative(sigma(i + 1)) - antiderivative(sigma(i));
  }

  void lms() {  // R1, R2, R3: the derivatives of the last three steps, newest first
    for (int i = 0; i < n(); ++i) {
      double s = sigma(i);
      Eval e = den.at_sigma(s);
      int order = std::min(i + 1, plan.order);
      Lin ds[4] = {d(s), R(1), R(2), R(3)};
      Lin x = R(0);
      for (int j = 0; j < order; ++j) x = x + ds[j] * lms_coefficient(order, i, j);
      e.update[0] = x;
      e.update[1] = d(s), e.update[2] = R(1), e.update[3] = R(2);
      b.add(e);
      b.end_step(scale(sigma(i + 1)));
    }
  }

  void dpmpp_2m_sde(double sde_eta, bool lower_order_final, const std::string &solver_type) {
    std::optional<double> h_last;  // R1: the previous denoised
    for (int i = 0; i < n(); ++i) {
      double s = sigma(i), sn = sigma(i + 1);
      Eval e = den.at_sigma(s);
      if (sn == 0) {
        e.update[0] = X0();
      } else {
        double h = std::log(s) - std::log(sn), eta_h = sde_eta * h;
        double coeff = -std::expm1(-h - eta_h);
        Lin x = R(0) * ((sn / s) * std::exp(-eta_h)) + X0() * coeff;
        if (i > 0 && h_last && !(lower_order_final && i == n() - 1)) {
          Lin d1 = (X0() - R(1)) / (*h_last / h);
          x = x + d1 * (solver_type == "heun" ? coeff / (-h - eta_h) + 1 : 0.5 * coeff);
        }
        if (sde_eta != 0) {
          x = x + NOISE() * (sn * std::sqrt(-std::expm1(-2 * eta_h)));
          draws(e, s, sn);
        }
        e.update[0] = x;
        h_last = h;
      }
      e.update[1] = X0();
      b.add(e);
      b.end_step(scale(sn));
    }
  }

  void dpmpp_3m_sde() {  // R1, R2: the denoised one and two steps back
    std::optional<double> h_1, h_2;
    for (int i = 0; i < n(); ++i) {
      double s = sigma(i), sn = sigma(i + 1);
      Eval e = den.at_sigma(s);
      std::optional<double> h;
      if (sn == 0) {
        e.update[0] = X0();
      } else {
        h = std::log(s) - std::log(sn);
        double h_eta = *h * (eta + 1);
        Lin x = R(0) * std::exp(-h_eta) - X0() * std::expm1(-h_eta);
        double phi_2 = std::expm1(-h_eta) / h_eta + 1;
        if (h_2) {
          double r0 = *h_1 / *h, r1 = *h_2 / *h;
          Lin d1_0 = (X0() - R(1)) / r0, d1_1 = (R(1) - R(2)) / r1;
          Lin d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1)), d2 = (d1_0 - d1_1) / (r0 + r1);
          double phi_3 = phi_2 / h_eta - 0.5;
          x = x + d1 * phi_2 - d2 * phi_3;
        } else if (h_1) {
          x = x + (X0() - R(1)) * (phi_2 / (*h_1 / *h));
        }
        if (eta != 0) {
          x = x + NOISE() * (sn * std::sqrt(-std::expm1(-2 * *h * eta)));
          draws(e, s, sn);
        }
        e.update[0] = x;
      }
      e.update[1] = X0(), e.update[2] = R(1);
      h_2 = h_1, h_1 = h;
      b.add(e);
      b.end_step(scale(sn));
    }
  }

  void dpmpp_sde(double r = 0.5) {  // R1: x, R2: denoised (during the step's second evaluation)
    double fac = 1 / (2 * r);
    for (int i = 0; i < n(); ++i) {
      double s = sigma(i), sn = sigma(i + 1);
      Eval e = den.at_sigma(s);
      if (sn == 0) {
        e.update[0] = R(0) + d(s) * (sn - s);
        b.add(e);
        b.end_step(scale(sn));
        continue;
      }
      double t = -std::log(s), t_next = -std::log(sn);
      double st = t + (t_next - t) * r, sigma_s = std::exp(-st);
      auto [sd, su] = ancestral(s, sigma_s, eta);
      e.update[0] = R(0) * (sd / s) - X0() * std::expm1(t + std::log(sd)) + NOISE() * su;
      draws(e, s, sigma_s);
      e.update[1] = R(0), e.update[2] = X0();
      b.add(e);
      Eval e2 = den.at_sigma(sigma_s, true);
      auto [sd2, su2] = ancestral(s, sn, eta);
      Lin denoised_d = R(2) * (1 - fac) + X0() * fac;
      e2.update[0] = R(1) * (sd2 / s) - denoised_d * std::expm1(t + std::log(sd2)) + NOISE() * su2;
      draws(e2, s, sn);
      b.add(e2);
      b.end_step(scale(sn));
    }
  }

  // One UniPC predictor (model_t null) or corrector step in VE units (sigma_samplers._unipc_update).
  static Lin unipc_update(const Lin &x, const std::vector<Lin> &denoised, const std::vector<double> &lambdas,
                          double lambda_t, double sigma_ratio, int order, const std::string &solver,
                          const Lin *model_t) {
    const Lin &m0 = denoised.back();
    double lambda_s0 = lambdas.back(), h = lambda_t - lambda_s0;
    std::vector<double> rks;
    std::vector<Lin> d1s;
    for (int k = 1; k < order; ++k) {
      double rk = (lambdas[lambdas.size() - 1 - k] - lambda_s0) / h;
      rks.push_back(rk);
      d1s.push_back((denoised[denoised.size() - 1 - k] - m0) / rk);
    }
    rks.push_back(1.0);
    double hh = -h, h_phi_1 = std::expm1(hh), h_phi_k = h_phi_1 / hh - 1;
    double b_h = solver == "bh1" ? hh : std::expm1(hh);
    double factorial = 1;
    std::vector<double> rmat, bvec;  // R: order x order, row k = rks^k
    for (int k = 1; k <= order; ++k) {
      for (double rk : rks) rmat.push_back(std::pow(rk, k - 1));
      bvec.push_back(h_phi_k * factorial / b_h);
      factorial *= k + 1;
      h_phi_k = h_phi_k / hh - 1 / factorial;
    }
    Lin x_t = x * sigma_ratio - m0 * h_phi_1;
    if (!model_t) {
      if (!d1s.empty()) {
        std::vector<double> rhos;
        if (order == 2) {
          rhos = {0.5};
        } else {  // R[:-1, :-1] rhos = b[:-1]
          int m = order - 1;
          std::vector<double> sub;
          for (int r = 0; r < m; ++r)
            for (int c = 0; c < m; ++c) sub.push_back(rmat[static_cast<size_t>(r * order + c)]);
          rhos = solve(sub, std::vector<double>(bvec.begin(), bvec.end() - 1), m);
        }
        Lin sum;
        for (size_t k = 0; k < d1s.size(); ++k) sum = sum + d1s[k] * rhos[k];
        x_t = x_t - sum * b_h;
      }
      return x_t;
    }
    std::vector<double> rhos = order == 1 ? std::vector<double>{0.5} : solve(rmat, bvec, order);
    Lin correction = (*model_t - m0) * rhos.back();
    for (size_t k = 0; k < d1s.size(); ++k) correction = correction + d1s[k] * rhos[k];
    return x_t - correction * b_h;
  }

  // diffusers' UniPC (sigma_samplers.unipc): R1 the last step's start, R2.. the last `order`
  // denoised, oldest first.
  void unipc() {
    int order = plan.order;
    if (order + 2 > kRegisters) throw InvalidArgument("unipc: solver_order above " + std::to_string(kRegisters - 2));
    std::vector<double> lambdas;
    std::vector<Lin> history;  // in registers 2 .. 2 + size
    int last_order = 0;
    bool has_last = false;
    auto disabled = [&](int step) {
      return std::find(plan.disable_corrector.begin(), plan.disable_corrector.end(), step) != plan.disable_corrector.end();
    };
    for (int i = 0; i < n(); ++i) {
      double s = sigma(i), sn = sigma(i + 1), lam = -std::log(s);
      Eval e = den.at_sigma(s);
      Lin x = R(0), model_t = X0();
      if (has_last && !disabled(i - 1))
        x = unipc_update(R(1), history, lambdas, lam, s / sigma(i - 1), last_order, plan.solver_type, &model_t);
      history.push_back(X0());
      lambdas.push_back(lam);
      if (static_cast<int>(history.size()) > order) history.erase(history.begin()), lambdas.erase(lambdas.begin());
      int this_order = plan.lower_order_final ? std::min(order, n() - i) : order;
      this_order = std::min(this_order, i + 1);
      e.update[1] = x;
      for (size_t k = 0; k < history.size(); ++k) e.update[2 + k] = history[k];
      e.update[0] = sn == 0 ? X0()
                            : unipc_update(x, history, lambdas, -std::log(sn), sn / s, this_order, plan.solver_type, nullptr);
      b.add(e);
      b.end_step(scale(sn));
      for (size_t k = 0; k < history.size(); ++k) history[k] = R(static_cast<int>(2 + k));
      has_last = true, last_order = this_order;
    }
  }

  // A1111's DPM++ 2S a (k-diffusion sample_dpmpp_2s_ancestral)
  void dpmpp_2s_ancestral() {
    for (int i = 0; i < n(); ++i) {
      double s = sigma(i), sn = sigma(i + 1);
      auto [down, up] = ancestral(s, sn, eta);
      Lin extra = sn > 0 ? NOISE() * up : Lin();
      Eval e = den.at_sigma(s);
      if (down == 0) {
        e.update[0] = R(0) + d(s) * (down - s) + extra;
        if (sn > 0) e.noise = NoiseKind::Draw;
        b.add(e);
      } else {
        double t = -std::log(s), t_next = -std::log(down), h = t_next - t, st = t + 0.5 * h;
        e.update[1] = R(0);
        e.update[0] = R(0) * (std::exp(-st) / s) - X0() * std::expm1(-0.5 * h);
        b.add(e);
        Eval e2 = den.at_sigma(std::exp(-st), true);
        e2.update[0] = R(1) * (down / s) - X0() * std::expm1(-h) + extra;
        if (sn > 0) e2.noise = NoiseKind::Draw;
        b.add(e2);
      }
      b.end_step();
    }
  }

  // A1111's Restart: Heun steps along its pairs, fresh noise lifting x where a pair starts
  // above where the last one ended.
  void restart() {
    std::optional<double> last;
    for (const auto &[s, sn] : plan.pairs) {
      size_t first = b.p.evals.size();
      heun_step(s, sn);
      if (last && *last < s) b.p.evals[first].lift = std::sqrt(s * s - *last * *last);
      last = sn;
      b.end_step();
    }
  }

  // A1111's LCM: x becomes the consistency model's x0, then noise of std sigma_next.
  void lcm() {
    for (int i = 0; i < n(); ++i) {
      double sn = sigma(i + 1);
      Eval e = den.at_sigma(sigma(i));
      e.update[0] = X0();
      if (sn > 0) e.update[0] = X0() + NOISE() * sn, e.noise = NoiseKind::Draw;
      b.add(e);
      b.end_step();
    }
  }
};

// ---------------------------------------------------------------------------
// DPM-Solver (a1111.py _DPMSolver: times t = -log sigma in float32)
// ---------------------------------------------------------------------------

float dpm_t(float sigma) { return -std::log(sigma); }
float dpm_sigma(float t) { return std::exp(-t); }

// (t_down, sigma_up) of DPMSolver.ancestral_target, in float32
std::pair<float, float> ancestral_target(float t, float t_next, float t_end, double eta) {
  if (eta == 0) return {t_next, 0.0f};
  float sf = dpm_sigma(t), st = dpm_sigma(t_next), e = static_cast<float>(eta);
  float up = std::min(st, e * std::sqrt(st * st * (sf * sf - st * st) / (sf * sf)));
  float t_down = std::min(t_end, dpm_t(std::sqrt(st * st - up * up)));
  float sd = dpm_sigma(t_down);
  return {t_down, std::sqrt(st * st - sd * sd)};
}

// One DPM-Solver step of `order` from R1 (x) with R2 = eps at t (the first evaluation made by
// the caller): appends its further evaluations; the last one's update puts the result (plus
// `extra`) in R0 and R1. Returns x at t_next as a Lin over the last evaluation's basis.
struct DPMSolverStep {
  const Denoiser &den;
  Builder &b;
  // eps of the evaluated state at sigma(t): (R0 - x0) / sigma
  static Lin eps_at(float t) { return DIFF() / static_cast<double>(dpm_sigma(t)); }
  // After the evaluation at t (R0 = x): order 1, 2 (r1) or 3 (r1 = 1/3, r2 = 2/3). `first` is
  // that evaluation, not yet added. For order 3 with r1 = 1/3, the low estimate of DPM adaptive
  // (order 2 at r1 = 1/3) goes to R5 and the high one to R6 when `both`.
  void run(Eval first, float t, float t_next, int order, double r1_in, Lin extra, bool both = false) {
    float r1 = static_cast<float>(r1_in), h = t_next - t;
    float sn = dpm_sigma(t_next), em_h = std::expm1(h);
    Lin eps = eps_at(t);
    if (order == 1) {
      first.update[0] = R(0) - eps * static_cast<double>(sn * em_h) + extra;
      b.add(first);
      return;
    }
    float s1 = t + r1 * h;
    first.update[1] = R(0), first.update[2] = eps;
    first.update[0] = R(0) - eps * static_cast<double>(dpm_sigma(s1) * std::expm1(r1 * h));
    b.add(first);
    Eval e1 = den.at_sigma(dpm_sigma(s1));
    Lin eps_r1 = eps_at(s1);
    Lin x2 = R(1) - R(2) * static_cast<double>(sn * em_h) - (eps_r1 - R(2)) * static_cast<double>(sn / (2 * r1) * em_h);
    if (order == 2) {
      e1.update[0] = x2 + extra;
      b.add(e1);
      return;
    }
    float r2 = static_cast<float>(2.0 / 3);
    float s2 = t + r2 * h;
    float sig2 = dpm_sigma(s2), em_r2h = std::expm1(r2 * h);
    e1.update[3] = eps_r1;
    if (both) e1.update[5] = x2;
    e1.update[0] = R(1) - R(2) * static_cast<double>(sig2 * em_r2h) -
                   (eps_r1 - R(2)) * static_cast<double>(sig2 * (r2 / r1) * (em_r2h / (r2 * h) - 1));
    b.add(e1);
    Eval e2 = den.at_sigma(sig2);
    Lin eps_r2 = eps_at(s2);
    Lin x3 = R(1) - R(2) * static_cast<double>(sn * em_h) - (eps_r2 - R(2)) * static_cast<double>(sn / r2 * (em_h / h - 1));
    if (both) e2.update[6] = x3;
    e2.update[0] = x3 + extra;
    b.add(e2);
  }
};

// DPM-Solver-fast's step orders (a1111.dpm_fast_orders)
std::vector<int> dpm_fast_orders(int nfe) {
  int m = nfe / 3 + 1;
  std::vector<int> out;
  if (nfe % 3 == 0) {
    out.assign(static_cast<size_t>(std::max(m - 2, 0)), 3);
    out.push_back(2), out.push_back(1);
  } else {
    out.assign(static_cast<size_t>(m - 1), 3);
    out.push_back(nfe % 3);
  }
  return out;
}

void dpm_fast(const Plan &plan, const Denoiser &den, Builder &b) {
  std::vector<int> orders = dpm_fast_orders(plan.nfe);
  std::vector<float> times = torch_linspace(dpm_t(static_cast<float>(plan.dpm_sigma_max)),
                                            dpm_t(static_cast<float>(plan.dpm_sigma_min)), static_cast<int>(orders.size()) + 1);
  float t_end = times.back();
  DPMSolverStep solver{den, b};
  for (size_t i = 0; i < orders.size(); ++i) {
    auto [t_down, up] = ancestral_target(times[i], times[i + 1], t_end, plan.eta);
    Eval first = den.at_sigma(dpm_sigma(times[i]));
    // order 2: r1 = 1/2; order 3: r1 = 1/3, r2 = 2/3 (DPMSolver.order_2 / order_3 defaults)
    solver.run(first, times[i], t_down, orders[i], orders[i] == 3 ? 1.0 / 3 : 0.5, NOISE() * static_cast<double>(up));
    b.last().noise = NoiseKind::Draw;
    b.end_step();
  }
}

// ---------------------------------------------------------------------------
// Timestep samplers: diffusers' (timestep_samplers.py) and A1111's (a1111.py)
// ---------------------------------------------------------------------------

struct TimestepRun {
  const Plan &plan;
  const Denoiser &den;
  Builder &b;
  double eta;
  int n() const { return static_cast<int>(plan.timesteps.size()); }
  int t(int i) const { return static_cast<int>(plan.timesteps[static_cast<size_t>(i)]); }
  int t_prev(int i) const { return static_cast<int>(plan.prev_timesteps[static_cast<size_t>(i)]); }
  double alpha(int t) const { return t >= 0 ? plan.alphas_cumprod[static_cast<size_t>(t)] : plan.final_alpha_cumprod; }

  void ddim() {
    for (int i = 0; i < n(); ++i) {
      Eval e = den.at_timestep(t(i));
      double a_t = alpha(t(i)), a_prev = alpha(t_prev(i));
      double variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev), std_dev = eta * std::sqrt(variance);
      e.update[0] = X0() * std::sqrt(a_prev) + EPS() * std::sqrt(1 - a_prev - std_dev * std_dev);
      if (eta > 0) e.update[0] = e.update[0] + NOISE() * std_dev, e.noise = NoiseKind::Draw;
      b.add(e);
      b.end_step();
    }
  }

  void ddpm() {  // float32 coefficients, as diffusers' DDPMScheduler
    for (int i = 0; i < n(); ++i) {
      Eval e = den.at_timestep(t(i));
      float a_t = static_cast<float>(alpha(t(i)));
      float a_prev = t_prev(i) >= 0 ? static_cast<float>(alpha(t_prev(i))) : 1.0f;
      float beta_t = 1 - a_t / a_prev;
      float x0_coeff = std::sqrt(a_prev) * beta_t / (1 - a_t);
      float x_coeff = std::sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t);
      e.update[0] = X0() * x0_coeff + R(0) * x_coeff;
      if (t(i) > 0) {
        float variance = plan.fixed_large ? beta_t : std::max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20f);
        e.update[0] = e.update[0] + NOISE() * static_cast<double>(std::sqrt(variance));
        e.noise = NoiseKind::Draw;
      }
      b.add(e);
      b.end_step();
    }
  }

  // diffusers' PLMS (timestep_samplers.pndm): R1, R2, R3 the last eps, newest first; R4 the
  // first step's start, which the repeated second step redoes.
  void pndm() {
    int stored = 0;  // eps remembered before this step
    for (int counter = 0; counter < n(); ++counter) {
      Eval e = den.at_timestep(t(counter));
      int t_from = t(counter), t_to = t(counter) - plan.stride;
      Lin x = R(0), eps_e;
      int ets = counter != 1 ? std::min(stored, 3) + 1 : stored;  // len(ets) after this step's append
      if (counter == 1) t_to = t_from, t_from = t_from + plan.stride;
      if (ets == 1 && counter == 0) {
        eps_e = EPS();
        e.update[4] = R(0);
      } else if (ets == 1 && counter == 1) {
        eps_e = (EPS() + R(1)) * 0.5;
        x = R(4);
      } else if (ets == 2) {
        eps_e = (EPS() * 3 - R(1)) / 2;
      } else if (ets == 3) {
        eps_e = (EPS() * 23 - R(1) * 16 + R(2) * 5) / 12;
      } else {
        eps_e = (EPS() * 55 - R(1) * 59 + R(2) * 37 - R(3) * 9) / 24;
      }
      double a_t = alpha(t_from), a_prev = alpha(t_to);
      double denom = a_t * std::sqrt(1 - a_prev) + std::sqrt(a_t * (1 - a_t) * a_prev);
      e.update[0] = x * std::sqrt(a_prev / a_t) - eps_e * ((a_prev - a_t) / denom);
      if (counter != 1) {
        e.update[1] = EPS(), e.update[2] = R(1), e.update[3] = R(2);
        stored = ets;
      }
      b.add(e);
      b.end_step();
    }
  }

  void lcm() {
    for (int i = 0; i < n(); ++i) {
      Eval e = den.at_timestep(t(i));
      double st = t(i) * plan.timestep_scaling;
      double c_skip = 0.25 / (st * st + 0.25), c_out = st / std::sqrt(st * st + 0.25);
      Lin denoised = X0() * c_out + R(0) * c_skip;
      if (i == n() - 1) {
        e.update[0] = denoised;
      } else {
        double a_prev = alpha(t(i + 1));
        e.update[0] = denoised * std::sqrt(a_prev) + NOISE() * std::sqrt(1 - a_prev);
        e.noise = NoiseKind::Draw;
      }
      b.add(e);
      b.end_step();
    }
  }

  // A1111's DDIM (CFG++: x0 from the guided eps at scale / 12.5, the direction from the
  // unconditional eps); it draws noise at every step, eta 0 included.
  void a1111_ddim(bool cfgpp) {
    for (int i = 0; i < n(); ++i) {
      Eval e = den.at_timestep(t(i));
      double a_t = alpha(t(i)), a_prev = alpha(t_prev(i));
      double sigma_t = plan.eta * std::sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev));
      if (cfgpp) e.guidance = 1 / 12.5;
      Lin pred_x0 = (R(0) - EPS() * std::sqrt(1 - a_t)) / std::sqrt(a_t);
      e.update[0] = pred_x0 * std::sqrt(a_prev) + (cfgpp ? EPS_U() : EPS()) * std::sqrt(1 - a_prev - sigma_t * sigma_t) +
                    NOISE() * sigma_t;
      e.noise = NoiseKind::Draw;
      b.add(e);
      b.end_step();
    }
  }

  // A1111's PLMS: R1 the step's x, R2 the first step's eps, R3..R5 the eps history (newest first).
  void a1111_plms() {
    int history = 0;
    for (int i = 0; i < n(); ++i) {
      double a_t = alpha(t(i)), a_prev = alpha(t_prev(i));
      auto x_prev_of = [&](const Lin &x, const Lin &eps) {
        return (x - eps * std::sqrt(1 - a_t)) / std::sqrt(a_t) * std::sqrt(a_prev) + eps * std::sqrt(1 - a_prev);
      };
      Eval e = den.at_timestep(t(i));
      if (history == 0) {
        e.update[1] = R(0), e.update[2] = EPS();
        e.update[0] = x_prev_of(R(0), EPS());
        b.add(e);
        Eval e2 = den.at_timestep(t_prev(i));
        e2.update[0] = x_prev_of(R(1), (R(2) + EPS()) * 0.5);
        e2.update[3] = R(2);
        b.add(e2);
      } else {
        Lin e_prime = history == 1   ? (EPS() * 3 - R(3)) / 2
                      : history == 2 ? (EPS() * 23 - R(3) * 16 + R(4) * 5) / 12
                                     : (EPS() * 55 - R(3) * 59 + R(4) * 37 - R(5) * 9) / 24;
        e.update[0] = x_prev_of(R(0), e_prime);
        e.update[3] = EPS(), e.update[4] = R(3), e.update[5] = R(4);
        b.add(e);
      }
      history = std::min(history + 1, 3);
      b.end_step();
    }
  }
};

// A1111's UniPC (a1111.unipc over ContinuousVP), in float32 as A1111 computes it.
struct ContinuousVP {
  std::vector<float> log_alphas, keys;
  explicit ContinuousVP(const std::vector<double> &alphas_cumprod) {
    int n = static_cast<int>(alphas_cumprod.size());
    for (double a : alphas_cumprod) log_alphas.push_back(0.5f * std::log(static_cast<float>(a)));
    std::vector<float> k = torch_linspace(0.0f, 1.0f, n + 1);
    keys.assign(k.begin() + 1, k.end());
  }
  int n() const { return static_cast<int>(log_alphas.size()); }
  float log_alpha(float t) const {
    int low = static_cast<int>(std::upper_bound(keys.begin(), keys.end(), t) - keys.begin()) - 1;
    low = std::clamp(low, 0, n() - 2);
    float x0 = keys[low], x1 = keys[low + 1], y0 = log_alphas[low], y1 = log_alphas[low + 1];
    return y0 + (t - x0) * (y1 - y0) / (x1 - x0);
  }
  float alpha(float t) const { return std::exp(log_alpha(t)); }
  float std_(float t) const { return std::sqrt(1.0f - std::exp(2.0f * log_alpha(t))); }
  float lam(float t) const {
    float la = log_alpha(t);
    return la - 0.5f * std::log(1.0f - std::exp(2.0f * la));
  }
  float model_time(float t) const { return (t - 1.0f / static_cast<float>(n())) * 1000.0f; }
};

void a1111_unipc(const Plan &plan, const Denoiser &den, Builder &b) {
  const int order = 3;  // a1111.UNIPC_ORDER (bh1, lower order final)
  ContinuousVP vp(plan.alphas_cumprod);
  const std::vector<float> &times = plan.times;
  const int steps = static_cast<int>(times.size()) - 1;
  // Registers: R0 the next evaluation's input, R1 the state x, R2.. the history of x0 (oldest
  // first). Each evaluation after the first is the corrector's model value at the predicted
  // point; its update corrects x and predicts the next point.
  auto eval_at = [&](float t) {  // x0 = (x - std eps) / alpha at time t
    Eval e = den.at_timestep(static_cast<int>(vp.model_time(t)), vp.model_time(t));
    double alpha = vp.alpha(t), sd = vp.std_(t);
    e.x0_x = (1 - sd * e.eps_x) / alpha, e.x0_out = -sd * e.eps_out / alpha;
    return e;
  };
  struct Coefficients {
    double x_scale, m0_scale, alpha_bh;
    std::vector<double> rks, rhos_p, rhos_c;
  };
  std::vector<float> history_t = {times[0]};
  auto coefficients = [&](float t, int step_order) {
    Coefficients c;
    float t_prev = history_t.back(), lam_prev = vp.lam(t_prev), lam_t = vp.lam(t);
    float h = lam_t - lam_prev, hh = -h;
    std::vector<float> rks;
    for (int k = 1; k < step_order; ++k) rks.push_back((vp.lam(history_t[history_t.size() - 1 - k]) - lam_prev) / h);
    for (float rk : rks) c.rks.push_back(rk);
    rks.push_back(1.0f);
    float h_phi_1 = std::expm1(hh), b_h = hh, h_phi_k = h_phi_1 / hh - 1, factorial = 1;
    std::vector<double> rmat, bvec;
    for (int k = 1; k <= step_order; ++k) {
      for (float rk : rks) rmat.push_back(std::pow(rk, static_cast<float>(k - 1)));
      bvec.push_back(h_phi_k * factorial / b_h);
      factorial *= static_cast<float>(k + 1);
      h_phi_k = h_phi_k / hh - 1 / factorial;
    }
    float alpha_t = vp.alpha(t);
    c.x_scale = vp.std_(t) / vp.std_(t_prev);
    c.m0_scale = alpha_t * h_phi_1;
    c.alpha_bh = alpha_t * b_h;
    if (step_order == 2) {
      c.rhos_p = {0.5};
    } else if (step_order > 2) {
      int m = step_order - 1;
      std::vector<double> sub;
      for (int r = 0; r < m; ++r)
        for (int col = 0; col < m; ++col) sub.push_back(rmat[static_cast<size_t>(r * step_order + col)]);
      c.rhos_p = solve(sub, std::vector<double>(bvec.begin(), bvec.end() - 1), m);
    }
    c.rhos_c = step_order == 1 ? std::vector<double>{0.5} : solve(rmat, bvec, step_order);
    for (double &v : c.rhos_p) v = static_cast<float>(v);
    for (double &v : c.rhos_c) v = static_cast<float>(v);
    return c;
  };
  auto differences = [](const std::vector<Lin> &history, const Coefficients &c) {
    std::vector<Lin> out;
    for (size_t k = 1; k <= c.rks.size(); ++k)
      out.push_back((history[history.size() - 1 - k] - history.back()) / c.rks[k - 1]);
    return out;
  };
  auto predictor = [&](const Lin &x, const std::vector<Lin> &history, const Coefficients &c) {
    Lin x_t = x * c.x_scale - history.back() * c.m0_scale;
    std::vector<Lin> d = differences(history, c);
    Lin sum;
    for (size_t k = 0; k < d.size(); ++k) sum = sum + d[k] * c.rhos_p[k];
    return d.empty() ? x_t : x_t - sum * c.alpha_bh;
  };
  auto corrector = [&](const Lin &x, const std::vector<Lin> &history, const Lin &model_t, const Coefficients &c) {
    Lin x_base = x * c.x_scale - history.back() * c.m0_scale;
    std::vector<Lin> d = differences(history, c);
    Lin correction = (model_t - history.back()) * c.rhos_c.back();
    for (size_t k = 0; k < d.size(); ++k) correction = correction + d[k] * c.rhos_c[k];
    return x_base - correction * c.alpha_bh;
  };
  Eval e = eval_at(times[0]);  // step 0 first evaluates the model at the start
  std::vector<Lin> history = {X0()};
  Lin x = R(0);
  for (int i = 0; i < steps; ++i) {
    float t = times[static_cast<size_t>(i) + 1];
    int number = i + 1;
    bool warm = number < order;
    int step_order = warm ? number : std::min(order, steps + 1 - number);
    bool use_corrector = warm || number != steps;
    Coefficients c = coefficients(t, step_order);
    e.update[0] = predictor(x, history, c);
    e.update[1] = x;
    for (size_t k = 0; k < history.size(); ++k) e.update[2 + k] = history[k];
    if (!use_corrector) {  // the last step: its predicted point is the result
      b.add(e);
      b.end_step();
      break;
    }
    b.add(e);
    size_t kept = history.size();
    history.clear();
    for (size_t k = 0; k < kept; ++k) history.push_back(R(static_cast<int>(2 + k)));
    e = eval_at(t);
    x = corrector(R(1), history, X0(), c);
    if (!warm) history.erase(history.begin()), history_t.erase(history_t.begin());
    history.push_back(X0());
    history_t.push_back(t);
    // this evaluation ends step i; its update (filled by the next iteration) writes x to R1
    e.steps_ended = 1, e.latents_register = 1;
    b.p.steps += 1;
  }
}

}  // namespace

Program make_program(const Plan &plan, const std::string &prediction_type, double eta) {
  Denoiser den(plan, prediction_type);
  Builder b;
  bool a1111 = plan.conventions == Conventions::A1111;
  double sampler_eta = a1111 ? plan.eta : 1.0;  // diffusers' ancestral / SDE samplers run at eta 1
  SigmaRun sigma{plan, den, b, sampler_eta};
  TimestepRun timestep{plan, den, b, a1111 ? plan.eta : eta};
  switch (plan.sampler) {
    case SDE_SAMPLER_EULER: sigma.euler(); break;
    case SDE_SAMPLER_EULER_A: sigma.euler_ancestral(); break;
    case SDE_SAMPLER_HEUN: sigma.heun(); break;
    case SDE_SAMPLER_DPM_2: sigma.dpm_2(); break;
    case SDE_SAMPLER_DPM_2_A: sigma.dpm_2_ancestral(); break;
    case SDE_SAMPLER_LMS: sigma.lms(); break;
    case SDE_SAMPLER_DPMPP_2M:
      sigma.dpmpp_2m_sde(0.0, a1111 ? false : plan.lower_order_final, a1111 ? "midpoint" : plan.solver_type);
      break;
    case SDE_SAMPLER_DPMPP_2M_SDE:
      sigma.dpmpp_2m_sde(sampler_eta, a1111 ? false : plan.lower_order_final, a1111 ? "midpoint" : plan.solver_type);
      break;
    case SDE_SAMPLER_DPMPP_2M_SDE_HEUN: sigma.dpmpp_2m_sde(sampler_eta, false, "heun"); break;
    case SDE_SAMPLER_DPMPP_3M_SDE: sigma.dpmpp_3m_sde(); break;
    case SDE_SAMPLER_DPMPP_SDE: sigma.dpmpp_sde(); break;
    case SDE_SAMPLER_DPMPP_2S_A: sigma.dpmpp_2s_ancestral(); break;
    case SDE_SAMPLER_RESTART: sigma.restart(); break;
    case SDE_SAMPLER_DPM_FAST: dpm_fast(plan, den, b); break;
    case SDE_SAMPLER_DPM_ADAPTIVE: b.p.adaptive = true, b.p.steps = 1; break;
    case SDE_SAMPLER_UNIPC:
      if (a1111) a1111_unipc(plan, den, b);
      else sigma.unipc();
      break;
    case SDE_SAMPLER_LCM:
      if (a1111) sigma.lcm();
      else timestep.lcm();
      break;
    case SDE_SAMPLER_DDIM:
      if (a1111) timestep.a1111_ddim(false);
      else timestep.ddim();
      break;
    case SDE_SAMPLER_DDIM_CFGPP: timestep.a1111_ddim(true); break;
    case SDE_SAMPLER_DDPM: timestep.ddpm(); break;
    case SDE_SAMPLER_PNDM:
      if (a1111) timestep.a1111_plms();
      else timestep.pndm();
      break;
    default: throw InvalidArgument("sampler out of range");
  }
  return b.p;
}

void run_adaptive(const Plan &plan, const std::string &prediction_type, const at::Tensor &registers,
                  const std::function<void(const Eval &)> &evaluate, const std::function<at::Tensor()> &draw) {
  // a1111.dpm_adaptive with A1111's defaults: order 3, rtol 0.05, atol 0.0078, h_init 0.05,
  // accept_safety 0.81; the integral controller of k-diffusion's PIDStepSizeController.
  Denoiser den(plan, prediction_type);
  const double rtol = 0.05, atol = 0.0078, accept_safety = 0.81;
  const int order = 3;
  float s = dpm_t(static_cast<float>(plan.dpm_sigma_max)), t_end = dpm_t(static_cast<float>(plan.dpm_sigma_min));
  double h = 0.05, exponent = 1.0 / (plan.eta != 0 ? 1.5 : order);
  std::vector<double> inverse_errors;
  at::Tensor x_prev = registers[0].clone();
  while (s < t_end - 1e-5f) {
    float t = std::min(t_end, s + static_cast<float>(h));
    auto [t_down, up] = ancestral_target(s, t, t_end, plan.eta);
    Builder b;
    DPMSolverStep solver{den, b};
    solver.run(den.at_sigma(dpm_sigma(s)), s, t_down, 3, 1.0 / 3, Lin(), true);
    for (const Eval &e : b.p.evals) evaluate(e);
    at::Tensor x_low = registers[5], x_high = registers[6];
    at::Tensor delta = at::maximum(at::full({}, atol, x_low.options()),
                                   at::maximum(x_low.abs(), x_prev.abs()) * rtol);
    double error = (at::linalg_vector_norm((x_low - x_high) / delta) / std::sqrt(static_cast<double>(x_low.numel())))
                       .item<double>();
    double inverse_error = 1 / (static_cast<double>(static_cast<float>(error)) + 1e-8);
    if (inverse_errors.empty()) inverse_errors.assign(3, inverse_error);
    inverse_errors[0] = inverse_error;
    double factor = 1 + std::atan(std::pow(inverse_errors[0], exponent) - 1);
    h *= factor;
    if (factor >= accept_safety) {
      inverse_errors[2] = inverse_errors[1], inverse_errors[1] = inverse_errors[0];
      x_prev = x_low.clone();
      registers[0].copy_(x_high + draw() * static_cast<double>(up));
      s = t;
    } else {
      registers[0].copy_(registers[1]);  // the trial's start
    }
  }
}

}  // namespace sde
