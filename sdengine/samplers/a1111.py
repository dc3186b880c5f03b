"""A1111's rules: its sampler and schedule labels draw the image AUTOMATIC1111's web UI draws.

Where diffusers' schedulers (plan.py) each space and round their own timesteps, A1111 runs
k-diffusion (crowsonkb/k-diffusion, the commit A1111 pins equals PyPI 0.1.1.post1) over the
model's discrete schedule (stable-diffusion-webui modules/sd_samplers_kdiffusion.py):
- the model's sigmas come from the LDM alphas_cumprod (float64 betas and cumprod, stored as
  float32: ldm's DDPM.register_schedule), sigma = sqrt((1 - a) / a) in float32;
- `CompVisDenoiser` (k_diffusion/external.py): the UNet gets x / sqrt(sigma^2 + 1) and the
  *fractional* timestep of sigma, by linear interpolation in log sigma; a v model goes through
  `CompVisVDenoiser`'s c_skip / c_out;
- sigmas of a run: the schedule label's function (modules/sd_schedulers.py), "Automatic" being
  the sampler's own (samplers_k_diffusion options: Karras for DPM++ 2M, Exponential for DPM++
  2M SDE, ...; the model's sigmas otherwise); DPM2, DPM2 a and DPM++ 3M SDE compute one sigma
  more and discard the next-to-last (discard_next_to_last_sigma);
- txt2img starts at noise * sigma_0 (no sqrt(sigma^2 + 1)); img2img keeps
  sigmas[steps - t_enc - 1:] with t_enc = int(min(strength, 0.999) * steps)
  (sd_samplers_common.setup_img2img_steps) and starts at image + noise * that sigma;
- the noise: rng.py (sdengine/samplers/rng.py) for the start and the ancestral samplers, a
  Brownian tree per image seed for the SDE samplers.

The sampler maths is k-diffusion's sampling.py, one step at a time (sigma_samplers.py holds the
samplers both vocabularies share; this module adds A1111's others): DPM fast and DPM adaptive are
k-diffusion's DPMSolver; Restart is A1111's sd_samplers_extra.restart_sampler; LCM its
sd_samplers_lcm (its own 50-sigma denoiser); DDIM, DDIM CFG++ and PLMS its
sd_samplers_timesteps(_impl), which step over timesteps 1, 1 + 1000 // steps, ... in VP latents,
and UniPC its models/diffusion/uni_pc, in continuous time over as many steps.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from . import sigma_samplers as K
from .names import A1111_SAMPLERS, A1111_SCHEDULES, A1111_TIMESTEP_SAMPLERS

# The samplers of A1111's list that sdengine runs under A1111's rules (names.A1111_SAMPLERS).
SAMPLERS = ("dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_2s_a", "dpmpp_3m_sde", "euler_a",
            "euler", "lms", "heun", "dpm_2", "dpm_2_a", "dpm_fast", "dpm_adaptive", "restart", "lcm", "ddim",
            "ddim_cfgpp", "pndm", "unipc")
# Those that step over timesteps in VP latents (sd_samplers_timesteps.py), not over sigmas.
TIMESTEP_SAMPLERS = A1111_TIMESTEP_SAMPLERS
# CFG++ (Chung et al., "CFG++: Manifold-constrained Classifier Free Guidance", 2024): A1111 maps
# its CFG scale from [0, 12.5] to [0, 1] (cond_scale_miltiplier in sd_samplers_timesteps_impl.ddim_cfgpp).
CFGPP_SCALE_MULTIPLIER = 1 / 12.5
LCM_ORIGINAL_STEPS = 50  # LCMCompVisDenoiser: the 50 timesteps 19, 39, ..., 999 LCM was distilled on
# Align Your Steps: the 10-step sigmas NVIDIA published for SD1.5 and SDXL (Sabour et al., "Align
# Your Steps", 2024; research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html), as A1111 uses them.
AYS_SIGMAS = {
    "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}
BETA_SCHEDULE_ALPHA = BETA_SCHEDULE_BETA = 0.6  # A1111's beta_dist_alpha / beta_dist_beta defaults


def label_of(sampler: str) -> str:
    """A1111's label of an sdengine sampler name under A1111's rules."""
    return next(label for label, (name, _) in A1111_SAMPLERS.items() if name == sampler)


def options_of(sampler: str) -> dict:
    return A1111_SAMPLERS[label_of(sampler)][1]


# ---------------------------------------------------------------------------
# The model's discrete schedule (k_diffusion/external.py DiscreteSchedule, in float32)
# ---------------------------------------------------------------------------

def ldm_alphas_cumprod(cfg) -> torch.Tensor:
    """float32 alphas_cumprod (T,) as the LDM model A1111 loads holds them: betas and their
    cumulative product in float64, stored as float32 (ldm/models/diffusion/ddpm.py)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":  # LDM's "linear": linear in sqrt(beta)
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float64) ** 2
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    else:
        raise ValueError(f"A1111's rules take an LDM noise schedule (scaled_linear or linear betas), not "
                         f"beta_schedule={cfg.beta_schedule!r}; use conventions='diffusers'")
    if cfg.rescale_betas_zero_snr:
        raise ValueError("A1111's rules with zero-terminal-SNR betas (rescale_betas_zero_snr) are not reproduced; "
                         "use conventions='diffusers'")
    return torch.cumprod(1 - betas, dim=0).to(torch.float32)


class DiscreteSchedule:
    """The model's sigmas and the sigma <-> fractional-timestep maps of k-diffusion's
    DiscreteSchedule, in float32 as k-diffusion computes them."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # float32, ascending in t
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])

    def sigma_to_t(self, sigma) -> torch.Tensor:
        """Fractional timestep: linear interpolation in log sigma between the neighbouring
        training timesteps, clamped to [0, T-1]."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float32).log()
        # k-diffusion's dists.ge(0).cumsum(0).argmax(0): the last training timestep whose log
        # sigma is <= log_sigma (0 if none), found by binary search in the ascending log sigmas
        # instead of a (T, n) table
        low = (torch.searchsorted(self.log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(
            0, self.log_sigmas.shape[0] - 2)
        low_log, high_log = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((low_log - log_sigma) / (low_log - high_log)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(log_sigma.shape)

    def t_to_sigma(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        """n sigmas at evenly spaced timesteps T-1 .. 0, then 0 (A1111's "Uniform")."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return _append_zero(self.t_to_sigma(t))


class LCMSchedule(DiscreteSchedule):
    """A1111's LCMCompVisDenoiser schedule (modules/sd_samplers_lcm.py): the model's sigmas at the
    50 timesteps 19, 39, ..., 999 only. sigma -> t is the nearest of those timesteps (no
    interpolation); t -> sigma interpolates in log sigma between them; get_sigmas(n) spaces n
    timesteps evenly from 999 to 19."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.skip = len(alphas_cumprod) // LCM_ORIGINAL_STEPS
        kept = torch.arange(LCM_ORIGINAL_STEPS) * self.skip + (self.skip - 1)  # 19, 39, ..., 999
        super().__init__(alphas_cumprod[kept])

    def sigma_to_t(self, sigma) -> torch.Tensor:
        log_sigma = torch.as_tensor(sigma, dtype=torch.float32).log()
        nearest = (log_sigma - self.log_sigmas[:, None]).abs().argmin(dim=0).view(log_sigma.shape)
        return (nearest * self.skip + (self.skip - 1)).to(torch.float32)

    def t_to_sigma(self, t) -> torch.Tensor:
        index = ((torch.as_tensor(t, dtype=torch.float32) - (self.skip - 1)) / self.skip).clamp(0, len(self.sigmas) - 1)
        return super().t_to_sigma(index)

    def get_sigmas(self, n: int) -> torch.Tensor:
        start, end = self.sigma_to_t(torch.tensor(self.sigma_max)), self.sigma_to_t(torch.tensor(self.sigma_min))
        return _append_zero(self.t_to_sigma(torch.linspace(float(start), float(end), n)))


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# ---------------------------------------------------------------------------
# Schedules (modules/sd_schedulers.py; karras / exponential / polyexponential are k-diffusion's)
# ---------------------------------------------------------------------------

def _karras(n, sigma_min, sigma_max, model, rho=7.0):
    """Karras et al. (2022), eq. 5: evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def _exponential(n, sigma_min, sigma_max, model):
    """Evenly spaced in log sigma."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def _polyexponential(n, sigma_min, sigma_max, model, rho=1.0):
    """Polynomial in log sigma (k-diffusion get_sigmas_polyexponential; rho 1 is exponential)."""
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def _uniform(n, sigma_min, sigma_max, model):
    return model.get_sigmas(n)


def _normal(n, sigma_min, sigma_max, model, sgm=False):
    """The model's sigmas at timesteps evenly spaced between those of sigma_max and sigma_min
    (SGM Uniform: n + 1 of them, the last dropped)."""
    start, end = model.sigma_to_t(torch.tensor(sigma_max)), model.sigma_to_t(torch.tensor(sigma_min))
    timesteps = torch.linspace(float(start), float(end), n + 1)[:-1] if sgm else torch.linspace(float(start), float(end), n)
    return torch.tensor([float(model.t_to_sigma(t)) for t in timesteps] + [0.0], dtype=torch.float32)


def _sgm_uniform(n, sigma_min, sigma_max, model):
    return _normal(n, sigma_min, sigma_max, model, sgm=True)


def _kl_optimal(n, sigma_min, sigma_max, model):
    """Evenly spaced in arctan(sigma) (Sabour et al. 2024, "Align Your Steps", eq. on the KL-optimal
    schedule); it ends at sigma_min, not 0, as A1111's."""
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    step = torch.arange(n + 1)
    return torch.tan(step / n * alpha_min + (1.0 - step / n) * alpha_max)


def _align_your_steps(n, sigma_min, sigma_max, model, kind="sd1"):
    """NVIDIA's 10-step schedule, interpolated log-linearly to n steps."""
    sigmas = list(AYS_SIGMAS[kind])
    if n != len(sigmas):
        xs, ys = np.linspace(0, 1, len(sigmas)), np.log(sigmas[::-1])
        sigmas = list(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1])
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def _simple(n, sigma_min, sigma_max, model):
    """Every (T / n)-th of the model's sigmas from the top (ComfyUI's "simple")."""
    stride = len(model.sigmas) / n
    return torch.tensor([float(model.sigmas[-(1 + int(i * stride))]) for i in range(n)] + [0.0], dtype=torch.float32)


def _ddim(n, sigma_min, sigma_max, model):
    """The model's sigmas at DDIM's timesteps 1, 1 + T // n, ... (its "uniform" discretization)."""
    stride, picked, t = max(len(model.sigmas) // n, 1), [], 1
    while t < len(model.sigmas):
        picked.append(float(model.sigmas[t]))
        t += stride
    return torch.tensor(picked[::-1] + [0.0], dtype=torch.float32)


def _beta(n, sigma_min, sigma_max, model):
    """Sigmas at the quantiles of a Beta(0.6, 0.6) distribution (Lee et al., "Beta Sampling is
    All You Need", 2024)."""
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover
        raise ImportError("A1111's Beta schedule needs scipy: pip install 'sdengine[a1111]'") from None
    quantiles = [stats.beta.ppf(q, BETA_SCHEDULE_ALPHA, BETA_SCHEDULE_BETA) for q in 1 - np.linspace(0, 1, n)]
    return torch.tensor([sigma_min + q * (sigma_max - sigma_min) for q in quantiles] + [0.0], dtype=torch.float32)


SCHEDULE_FUNCTIONS = {
    "uniform": _uniform, "karras": _karras, "exponential": _exponential, "polyexponential": _polyexponential,
    "sgm_uniform": _sgm_uniform, "kl_optimal": _kl_optimal, "align_your_steps": _align_your_steps,
    "simple": _simple, "normal": _normal, "ddim": _ddim, "beta": _beta,
}
assert set(SCHEDULE_FUNCTIONS) | {"automatic"} == set(A1111_SCHEDULES.values())


def schedule_of(sampler: str, schedule: Optional[str]) -> str:
    """The schedule a sampler runs: `schedule` (an A1111 schedule name), or for None / "automatic"
    the sampler's own (Uniform when it has none)."""
    if schedule in (None, "automatic"):
        return options_of(sampler).get("scheduler") or "uniform"
    return schedule


def sigmas_for(sampler: str, schedule: Optional[str], steps: int, model: DiscreteSchedule, *,
               is_sdxl: bool = False) -> torch.Tensor:
    """The float32 sigmas (+ final 0) of `steps` steps: KDiffusionSampler.get_sigmas."""
    discard = options_of(sampler).get("discard", False)
    n = steps + 1 if discard else steps
    name = schedule_of(sampler, schedule)
    kwargs = {"kind": "sdxl" if is_sdxl else "sd1"} if name == "align_your_steps" else {}
    sigmas = SCHEDULE_FUNCTIONS[name](n, model.sigma_min, model.sigma_max, model, **kwargs)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.to(torch.float32)


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first sigma img2img keeps: steps - t_enc - 1, t_enc = int(min(strength, 0.999) * steps)."""
    t_enc = int(min(strength, 0.999) * steps)
    return steps - t_enc - 1


# ---------------------------------------------------------------------------
# The denoiser (k_diffusion/external.py CompVisDenoiser / CompVisVDenoiser)
# ---------------------------------------------------------------------------

class CompVisDenoiser:
    """x0 from x = x0 + sigma * eps: the UNet gets x * c_in and the fractional timestep of sigma.
    epsilon: x0 = x - sigma * eps; v_prediction: x0 = c_skip * x + c_out * v (sigma_data 1)."""

    def __init__(self, model_fn, schedule: DiscreteSchedule, prediction_type: str):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"A1111's rules take epsilon or v_prediction models, not {prediction_type!r}; "
                             "use conventions='diffusers'")
        self.model_fn, self.schedule, self.prediction_type = model_fn, schedule, prediction_type

    def __call__(self, x: torch.Tensor, sigma, intermediate: bool = False) -> torch.Tensor:
        sigma32 = torch.tensor(float(sigma), dtype=torch.float32)
        t = self.schedule.sigma_to_t(sigma32)
        c_in = float((sigma32 ** 2 + 1) ** -0.5)
        out = self.model_fn(x * c_in, t.to(x.device).expand(x.shape[0]))
        sigma = float(sigma32)
        if self.prediction_type == "epsilon":
            return x - out * sigma
        c_skip, c_out = 1 / (sigma ** 2 + 1), -sigma * (sigma ** 2 + 1) ** -0.5
        return x * c_skip + out * c_out


# ---------------------------------------------------------------------------
# Samplers of A1111's list that sigma_samplers.py does not hold (k-diffusion sampling.py)
# ---------------------------------------------------------------------------

def dpmpp_2s_ancestral(model, sigmas, noise, *, eta=1.0):
    """DPM-Solver++(2S) with ancestral noise: Lu et al., "DPM-Solver++" (2022), Algorithm 1
    (singlestep, r = 1/2) to sigma_down, then fresh noise of std sigma_up (k-diffusion
    sample_dpmpp_2s_ancestral)."""

    @torch.no_grad()
    def step(x, i):
        sigma, sigma_next = K.sigma_pair(sigmas, i)
        denoised = model(x, sigma)
        sigma_down, sigma_up = K.ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + K.to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (math.exp(-s) / sigma) * x - math.expm1(-0.5 * h) * denoised
            denoised_2 = model(x_2, math.exp(-s), intermediate=True)
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_2
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_up
        return x

    return step


def dpmpp_2m_sde_heun(model, sigmas, noise, *, eta=1.0):
    """DPM++ 2M SDE with the Heun-type second-order term (A1111's "DPM++ 2M SDE Heun")."""
    return K.dpmpp_2m_sde(model, sigmas, noise, eta=eta, solver_type="heun")


class _DPMSolver:
    """DPM-Solver (Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
    Sampling in Around 10 Steps", 2022, Algorithms 1-3 in the time t = -log sigma), as k-diffusion's
    DPMSolver runs it: times are float32 tensors, eps = (x - x0) / sigma, and the single-step
    solvers of order 1, 2 (r1 = 1/2, or 1/3 for the adaptive low-order estimate) and 3
    (r1 = 1/3, r2 = 2/3) reuse the eps at the start of their step."""

    def __init__(self, model):
        self.model = model

    @staticmethod
    def t(sigma):
        return -torch.as_tensor(sigma, dtype=torch.float32).log()

    @staticmethod
    def sigma(t):
        return t.neg().exp()

    def eps(self, x, t):
        sigma = self.sigma(t)
        return (x - self.model(x, sigma)) / sigma

    def order_1(self, x, t, t_next, eps):
        return x - self.sigma(t_next) * (t_next - t).expm1() * eps

    def _eps_r1(self, x, t, h, eps, r1, cache):
        """eps at the first intermediate time t + r1 h; `cache` keeps it for the other solver of
        the same step (DPM adaptive's second- and third-order estimates share it at r1 = 1/3)."""
        if cache is not None and "eps_r1" in cache:
            return cache["eps_r1"]
        s1 = t + r1 * h
        eps_r1 = self.eps(x - self.sigma(s1) * (r1 * h).expm1() * eps, s1)
        if cache is not None:
            cache["eps_r1"] = eps_r1
        return eps_r1

    def order_2(self, x, t, t_next, eps, r1=0.5, cache=None):
        h = t_next - t
        eps_r1 = self._eps_r1(x, t, h, eps, r1, cache)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def order_3(self, x, t, t_next, eps, r1=1 / 3, r2=2 / 3, cache=None):
        h = t_next - t
        s2 = t + r2 * h
        eps_r1 = self._eps_r1(x, t, h, eps, r1, cache)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(u2, s2)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def ancestral_target(self, t, t_next, t_end, eta):
        """(time the deterministic part steps to, std of the noise added after it): the
        ancestral split of sigma(t) -> sigma(t_next), never past t_end."""
        if not eta:
            return t_next, 0.0
        sigma_from, sigma_to = self.sigma(t), self.sigma(t_next)
        sigma_up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
        t_down = torch.minimum(t_end, self.t((sigma_to ** 2 - sigma_up ** 2) ** 0.5))
        return t_down, (sigma_to ** 2 - self.sigma(t_down) ** 2) ** 0.5


def dpm_fast_orders(nfe: int) -> list:
    """The orders of DPM-Solver-fast's steps for nfe model evaluations (Lu et al. 2022, sec. 3.4):
    as many third-order steps as fit, the rest in one lower-order step (2 then 1 when nfe % 3 == 0)."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def dpm_fast_times(sigma_min: float, sigma_max: float, nfe: int) -> torch.Tensor:
    """The float32 times t = -log sigma of DPM-Solver-fast's steps: evenly spaced, len(orders) + 1."""
    return torch.linspace(float(_DPMSolver.t(sigma_max)), float(_DPMSolver.t(sigma_min)), len(dpm_fast_orders(nfe)) + 1)


def dpm_fast(model, sigmas, noise, *, sigma_min, sigma_max, nfe, eta=1.0):
    """DPM-Solver-fast with ancestral noise (k-diffusion sample_dpm_fast): fixed steps in t, third
    order where nfe allows. Step i runs one solver step of orders[i] (several model evaluations).
    The noise is drawn at every step, of std 0 when eta is 0, as k-diffusion draws it."""
    solver, orders = _DPMSolver(model), dpm_fast_orders(nfe)
    times = dpm_fast_times(sigma_min, sigma_max, nfe)
    t_end = times[-1]

    @torch.no_grad()
    def step(x, i):
        t, t_next = times[i], times[i + 1]
        t_down, sigma_up = solver.ancestral_target(t, t_next, t_end, eta)
        eps = solver.eps(x, t)
        x = (solver.order_1, solver.order_2, solver.order_3)[orders[i] - 1](x, t, t_down, eps)
        return x + sigma_up * noise(solver.sigma(t), solver.sigma(t_next))

    return step


def dpm_adaptive(model, sigmas, noise, *, sigma_min, sigma_max, eta=1.0, order=3, rtol=0.05, atol=0.0078, h_init=0.05,
                 accept_safety=0.81):
    """DPM-Solver-23 with adaptive step size (Lu et al. 2022, Algorithm 5; k-diffusion
    sample_dpm_adaptive with A1111's defaults): each trial step compares a second-order (r1 = 1/3)
    and a third-order estimate, an integral controller (k-diffusion's PIDStepSizeController with
    pcoeff = dcoeff = 0) scales the step and accepts it or not. The whole run is one step of the
    plan: the number of model evaluations is not known in advance."""
    if order not in (2, 3):
        raise ValueError(f"DPM adaptive: order must be 2 or 3, got {order}")
    solver = _DPMSolver(model)

    @torch.no_grad()
    def step(x, i):
        s, t_end = solver.t(sigma_max), solver.t(sigma_min)
        h, exponent, inverse_errors = h_init, 1 / (1.5 if eta else order), None
        tol_abs, tol_rel = torch.tensor(atol), torch.tensor(rtol)
        x_prev = x
        while s < t_end - 1e-5:
            t = torch.minimum(t_end, s + h)
            t_down, sigma_up = solver.ancestral_target(s, t, t_end, eta)
            eps = solver.eps(x, s)
            if order == 2:
                x_low, x_high = solver.order_1(x, s, t_down, eps), solver.order_2(x, s, t_down, eps)
            else:
                cache = {}
                x_low = solver.order_2(x, s, t_down, eps, r1=1 / 3, cache=cache)
                x_high = solver.order_3(x, s, t_down, eps, cache=cache)
            delta = torch.maximum(tol_abs, tol_rel * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            # the controller: factor = limiter(1 / error) ** (1 / order), limiter(v) = 1 + atan(v - 1)
            inverse_error = 1 / (float(error) + 1e-8)
            if inverse_errors is None:
                inverse_errors = [inverse_error] * 3
            inverse_errors[0] = inverse_error
            factor = 1 + math.atan(inverse_errors[0] ** exponent - 1)
            h *= factor
            if factor >= accept_safety:
                inverse_errors[1:] = inverse_errors[:2]
                x_prev = x_low
                x = x_high + sigma_up * noise(solver.sigma(s), solver.sigma(t))
                s = t
        return x

    return step


def restart_pairs(sigmas: torch.Tensor) -> list:
    """The (sigma, sigma_next) steps of A1111's Restart sampler (sd_samplers_extra.restart_sampler;
    Xu et al., "Restart Sampling for Improving Generative Processes", 2023). Under 20 steps, the
    schedule's own steps (no restart). From 20 steps, a Karras schedule of steps - K * R steps over
    the same range, and after the step that lands nearest sigma 0.1, R times a jump back to the
    sigma nearest 2 and K Karras steps down again (K = 9, R = 1; from 36 steps K = steps // 4, R = 2)."""
    sigmas = sigmas.to(torch.float32)
    steps = len(sigmas) - 1
    restarts = {}
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = _karras(steps - restart_steps * restart_times, float(sigmas[-2]), float(sigmas[0]), None)
        restarts = {int((sigmas - 0.1).abs().argmin()): (restart_steps + 1, restart_times, 2.0)}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((float(sigmas[i]), float(sigmas[i + 1])))
        if i + 1 in restarts:
            restart_steps, restart_times, restart_max = restarts[i + 1]
            low, high = i + 1, int((sigmas - restart_max).abs().argmin())
            if high < low:
                down = _karras(restart_steps, float(sigmas[low]), float(sigmas[high]), None)[:-1]
                pairs += [(float(a), float(b)) for a, b in zip(down[:-1], down[1:])] * restart_times
    return pairs


def restart(model, sigmas, noise, *, pairs):
    """Restart sampling as A1111 runs it: Heun steps (Euler into sigma 0) along `pairs`
    (restart_pairs); where a step starts above where the last one ended, fresh noise first lifts
    x from that sigma to the step's: x += noise * sqrt(sigma^2 - last^2)."""
    last = [None]

    @torch.no_grad()
    def step(x, i):
        sigma, sigma_next = pairs[i]
        if last[0] is not None and last[0] < sigma:
            x = x + noise(sigma, sigma_next) * (sigma ** 2 - last[0] ** 2) ** 0.5
        last[0] = sigma_next
        return K.heun(model, (sigma, sigma_next), noise)(x, 0)

    return step


class LCMDenoiser:
    """A1111's LCMCompVisDenoiser: the UNet gets x / sqrt(sigma^2 + 1) and the nearest of LCM's
    50 timesteps; its output is read as eps (whatever the model's prediction type, as A1111 does),
    then LCM's boundary condition (Luo et al., "Latent Consistency Models", 2023, eq. 9 with
    sigma_data 0.5 and the timestep scaled by 10) mixes that x0 with x itself."""

    def __init__(self, model_fn, schedule: LCMSchedule):
        self.model_fn, self.schedule = model_fn, schedule

    def __call__(self, x: torch.Tensor, sigma, intermediate: bool = False) -> torch.Tensor:
        sigma = float(sigma)
        t = self.schedule.sigma_to_t(torch.tensor(sigma, dtype=torch.float32))
        eps = self.model_fn(x * (sigma ** 2 + 1) ** -0.5, t.to(x.device).expand(x.shape[0]))
        scaled_t = float(t) * 10.0
        c_skip, c_out = 0.25 / (scaled_t ** 2 + 0.25), scaled_t / (scaled_t ** 2 + 0.25) ** 0.5
        return (x - eps * sigma) * c_out + x * c_skip


def lcm(model, sigmas, noise):
    """A1111's sample_lcm: x becomes the consistency model's x0, then noise of std sigma_next."""

    @torch.no_grad()
    def step(x, i):
        sigma, sigma_next = K.sigma_pair(sigmas, i)
        x = model(x, sigma)
        return x + noise(sigma, sigma_next) * sigma_next if sigma_next > 0 else x

    return step


# ---------------------------------------------------------------------------
# The timestep samplers (modules/sd_samplers_timesteps.py, sd_samplers_timesteps_impl.py)
# ---------------------------------------------------------------------------

def a1111_timesteps(steps: int, T: int = 1000) -> np.ndarray:
    """A1111's DDIM / PLMS timesteps, ascending: 1, 1 + T // steps, ... below T (clipped to T - 1).
    There are ceil(T / (T // steps)) of them, not always `steps`, and the loop evaluates the model
    at all but the first: a run of 20 steps makes 19 DDIM steps, ending at timestep 1."""
    return np.clip(np.arange(0, T, T // steps) + 1, 0, T - 1)


class TimestepDenoiser:
    """eps(x, t) at an integer timestep, as A1111's CompVisTimestepsDenoiser / VDenoiser give it:
    the model's eps, or from v: sqrt(a_t) v + sqrt(1 - a_t) x. With `uncond=True` (CFG++) it
    returns (guided eps, the unconditional eps), the guidance scale multiplied by
    guidance_multiplier."""

    def __init__(self, model_fn, alphas_cumprod: torch.Tensor, prediction_type: str):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"A1111's rules take epsilon or v_prediction models, not {prediction_type!r}; "
                             "use conventions='diffusers'")
        self.model_fn, self.prediction_type = model_fn, prediction_type
        # ldm's sqrt_alphas_cumprod / sqrt_one_minus_alphas_cumprod buffers, stored as float32
        alphas_cumprod = alphas_cumprod.double()
        self.sqrt_a, self.sqrt_1m_a = alphas_cumprod.sqrt().float(), (1 - alphas_cumprod).sqrt().float()

    def _eps(self, out, x, t):
        if self.prediction_type == "epsilon":
            return out
        return float(self.sqrt_a[t]) * out + float(self.sqrt_1m_a[t]) * x

    def __call__(self, x, t: float, *, uncond: bool = False, guidance_multiplier: float = 1.0):
        """eps at timestep t (UniPC's are fractional; a v output is converted at int(t), as A1111's)."""
        t_in = torch.full((x.shape[0],), float(t), device=x.device)
        t = int(t)
        if not uncond:
            return self._eps(self.model_fn(x, t_in), x, t)
        guided, unguided = self.model_fn(x, t_in, with_uncond=True, guidance_multiplier=guidance_multiplier)
        return self._eps(guided, x, t), self._eps(unguided, x, t)


def _ddim_update(x, e_t, direction_eps, a_t, a_prev, sigma_t, noise):
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps_dir + sigma_t z, x0 = (x - sqrt(1 - a_t) e_t) / sqrt(a_t)
    (Song et al., "Denoising Diffusion Implicit Models", 2021, eq. 12). A1111 draws z at every step,
    eta 0 included."""
    pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
    z = noise()
    return a_prev ** 0.5 * pred_x0 + (1 - a_prev - sigma_t ** 2) ** 0.5 * direction_eps + sigma_t * z


def _ddim_sigma(a_t: float, a_prev: float, eta: float) -> float:
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5


def ddim(model, timesteps, prev_timesteps, noise, *, alphas_cumprod, eta=0.0):
    """A1111's DDIM over its timesteps (a1111_timesteps), in VP latents."""

    @torch.no_grad()
    def step(x, i):
        a_t, a_prev = float(alphas_cumprod[int(timesteps[i])]), float(alphas_cumprod[int(prev_timesteps[i])])
        e_t = model(x, int(timesteps[i]))
        return _ddim_update(x, e_t, e_t, a_t, a_prev, _ddim_sigma(a_t, a_prev, eta), noise)

    return step


def ddim_cfgpp(model, timesteps, prev_timesteps, noise, *, alphas_cumprod, eta=0.0):
    """DDIM with CFG++ (Chung et al. 2024) as A1111's ddim_cfgpp: the guidance scale divided by
    12.5 for x0, and the unconditional eps for the direction back to x_prev."""

    @torch.no_grad()
    def step(x, i):
        a_t, a_prev = float(alphas_cumprod[int(timesteps[i])]), float(alphas_cumprod[int(prev_timesteps[i])])
        e_t, e_uncond = model(x, int(timesteps[i]), uncond=True, guidance_multiplier=CFGPP_SCALE_MULTIPLIER)
        return _ddim_update(x, e_t, e_uncond, a_t, a_prev, _ddim_sigma(a_t, a_prev, eta), noise)

    return step


def plms(model, timesteps, prev_timesteps, noise, *, alphas_cumprod):
    """Pseudo linear multistep (Liu et al., "Pseudo Numerical Methods for Diffusion Models on
    Manifolds", 2022) as A1111's plms: the first step a pseudo improved Euler step (eps averaged
    with the eps at the DDIM estimate of x_prev), then Adams-Bashforth of order 2, 3 and 4 on the
    eps history, each through the deterministic DDIM update."""
    history = []

    @torch.no_grad()
    def step(x, i):
        a_t, a_prev = float(alphas_cumprod[int(timesteps[i])]), float(alphas_cumprod[int(prev_timesteps[i])])

        def x_prev_of(eps):
            return _ddim_update(x, eps, eps, a_t, a_prev, 0.0, lambda: 0.0)

        e_t = model(x, int(timesteps[i]))
        if not history:
            e_prime = (e_t + model(x_prev_of(e_t), int(prev_timesteps[i]))) / 2
        elif len(history) == 1:
            e_prime = (3 * e_t - history[-1]) / 2
        elif len(history) == 2:
            e_prime = (23 * e_t - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history.append(e_t)
        del history[:-3]
        return x_prev_of(e_prime)

    return step


# ---------------------------------------------------------------------------
# UniPC (modules/models/diffusion/uni_pc, driven by sd_samplers_timesteps_impl.unipc)
# ---------------------------------------------------------------------------

# A1111's UniPC options and their defaults (modules/shared_options.py: uni_pc_variant,
# uni_pc_skip_type, uni_pc_order, uni_pc_lower_order_final)
UNIPC_VARIANT, UNIPC_ORDER, UNIPC_LOWER_ORDER_FINAL = "bh1", 3, True


class ContinuousVP:
    """The discrete model as a continuous-time VP process on t in [1/N, 1] (Lu et al., DPM-Solver,
    2022, appendix; A1111's NoiseScheduleVP('discrete')): log alpha_t is piecewise linear in t
    through (k + 1) / N -> 0.5 log alphas_cumprod[k], in float32; sigma_t = sqrt(1 - alpha_t^2)
    and lambda_t = log alpha_t - log sigma_t."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.log_alphas = 0.5 * alphas_cumprod.float().log()
        self.n = len(self.log_alphas)
        self.keys = torch.linspace(0.0, 1.0, self.n + 1)[1:]

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        low = (torch.searchsorted(self.keys, t, right=True) - 1).clamp(0, self.n - 2)  # the ends extrapolate
        x0, x1, y0, y1 = self.keys[low], self.keys[low + 1], self.log_alphas[low], self.log_alphas[low + 1]
        return y0 + (t - x0) * (y1 - y0) / (x1 - x0)

    def alpha(self, t):
        return self.log_alpha(t).exp()

    def std(self, t):
        return (1.0 - (2.0 * self.log_alpha(t)).exp()).sqrt()

    def lam(self, t):
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * (1.0 - (2.0 * log_alpha).exp()).log()

    def model_time(self, t):
        """The UNet's timestep of time t: (t - 1/N) * 1000, fractional between the training steps."""
        return (t - 1.0 / self.n) * 1000.0


def unipc(model, times, noise, *, alphas_cumprod, order=UNIPC_ORDER, variant=UNIPC_VARIANT,
          lower_order_final=UNIPC_LOWER_ORDER_FINAL):
    """UniPC (Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
    Diffusion Models", 2023), multistep, data prediction, B(h) = h (bh1) or e^h - 1 (bh2), as A1111
    runs it: over `times` (float32, from t_start down to 1/N, evenly spaced in t), warming up at
    orders 1 .. order-1, the last steps at lower order, the corrector (UniC) at every step but the
    last, whose model value at the predicted x serves as the next step's history. model(x, t) is
    eps at the fractional model timestep. Step i lands on times[i + 1]; step 0 first evaluates
    the model at times[0]."""
    vp = ContinuousVP(alphas_cumprod)
    steps = len(times) - 1
    history, history_t = [], []

    def x0_of(x, t):
        eps = model(x, float(vp.model_time(t)))
        return (x - vp.std(t) * eps) / vp.alpha(t)

    def update(x, t, step_order, use_corrector):
        t_prev = history_t[-1]
        lam_prev, lam_t = vp.lam(t_prev), vp.lam(t)
        h = lam_t - lam_prev
        hh = -h
        rks, differences = [], []
        for k in range(1, step_order):
            rk = (vp.lam(history_t[-(k + 1)]) - lam_prev) / h
            rks.append(rk)
            differences.append((history[-(k + 1)] - history[-1]) / rk)
        rks = torch.tensor([float(r) for r in rks] + [1.0])
        h_phi_1 = hh.expm1()
        b_h = hh if variant == "bh1" else hh.expm1()
        rows, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
        for k in range(1, step_order + 1):
            rows.append(rks ** (k - 1))
            b.append(float(h_phi_k * factorial / b_h))
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        R, b = torch.stack(rows), torch.tensor(b)
        alpha_t, sigma_t, sigma_prev = vp.alpha(t), vp.std(t), vp.std(t_prev)
        x_base = (sigma_t / sigma_prev) * x - (alpha_t * h_phi_1) * history[-1]
        x_t = x_base
        if differences:  # UniP: the predictor's correction from the history
            rhos_p = torch.tensor([0.5]) if step_order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            x_t = x_base - (alpha_t * b_h) * sum(r * d for r, d in zip(rhos_p, differences))
        if not use_corrector:
            return x_t, None
        model_t = x0_of(x_t, t)  # UniC: the corrector with the model at the predicted point
        rhos_c = torch.tensor([0.5]) if step_order == 1 else torch.linalg.solve(R, b)
        correction = sum(r * d for r, d in zip(rhos_c[:-1], differences)) + rhos_c[-1] * (model_t - history[-1])
        return x_base - (alpha_t * b_h) * correction, model_t

    @torch.no_grad()
    def step(x, i):
        if i == 0:
            history.append(x0_of(x, times[0]))
            history_t.append(times[0])
        t, number = times[i + 1], i + 1
        if number < order:  # warm-up at order 1, 2, ...
            x, model_x = update(x, t, number, use_corrector=True)
            history.append(model_x)
            history_t.append(t)
            return x
        step_order = min(order, steps + 1 - number) if lower_order_final else order
        x, model_x = update(x, t, step_order, use_corrector=number != steps)
        del history[0], history_t[0]
        history.append(model_x)
        history_t.append(t)
        return x

    return step


STEP_FACTORIES = {
    "dpmpp_2m": lambda model, sigmas, noise, eta=None: K.dpmpp_2m(model, sigmas, noise),
    "dpmpp_sde": K.dpmpp_sde,
    "dpmpp_2m_sde": K.dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": dpmpp_2m_sde_heun,
    "dpmpp_2s_a": dpmpp_2s_ancestral,
    "dpmpp_3m_sde": K.dpmpp_3m_sde,
    "euler_a": K.euler_ancestral,
    "euler": lambda model, sigmas, noise, eta=None: K.euler(model, sigmas, noise),
    "lms": lambda model, sigmas, noise, eta=None: K.lms(model, sigmas, noise),
    "heun": lambda model, sigmas, noise, eta=None: K.heun(model, sigmas, noise),
    "dpm_2": lambda model, sigmas, noise, eta=None: K.dpm_2(model, sigmas, noise),
    "dpm_2_a": K.dpm_2_ancestral,
    "dpm_fast": dpm_fast,
    "dpm_adaptive": dpm_adaptive,
    "restart": restart,
    "lcm": lambda model, sigmas, noise, eta=None: lcm(model, sigmas, noise),
    "ddim": ddim,
    "ddim_cfgpp": ddim_cfgpp,
    "pndm": plms,
    "unipc": unipc,
}
assert set(STEP_FACTORIES) == set(SAMPLERS)


# ---------------------------------------------------------------------------
# The plan of a run
# ---------------------------------------------------------------------------

def make_plan(sampler: str, schedule: Optional[str], steps: int, cfg, *, strength: float = 1.0,
              eta: Optional[float] = None, is_sdxl: bool = False):
    """The Plan of an A1111 sampler (sdengine name, SAMPLERS) following an A1111 schedule name
    (None: Automatic) for `steps` steps of the model whose scheduler config is `cfg`, keeping the
    img2img tail of `strength`. eta: the ancestral / SDE noise scale (None: A1111's default: 1.0,
    0 for DDIM's eta); the deterministic samplers ignore it, as in A1111. The timestep samplers
    (DDIM, DDIM CFG++, PLMS) ignore the schedule, as A1111 does: their plan says Automatic."""
    from .plan import check_config

    check_config(cfg)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    alphas_cumprod = ldm_alphas_cumprod(cfg)
    options = {}  # A1111 passes eta only to the samplers that take one, and ignores it for the others
    if "eta" in options_of(sampler):
        options["eta"] = options_of(sampler)["eta"] if eta is None else float(eta)
    if sampler in TIMESTEP_SAMPLERS:
        return _timestep_plan(sampler, steps, cfg, alphas_cumprod, strength, options)
    model = LCMSchedule(alphas_cumprod) if sampler == "lcm" else DiscreteSchedule(alphas_cumprod)
    sigmas = sigmas_for(sampler, schedule, steps, model, is_sdxl=is_sdxl)
    start = img2img_start(steps, strength) if strength < 1.0 else 0
    sigmas = sigmas[start:]
    if len(sigmas) < 2:
        raise ValueError(f"strength={strength} with steps={steps} leaves no denoising step")
    init_noise_sigma, loop_steps = float(sigmas[0]), None
    if sampler in ("dpm_fast", "dpm_adaptive"):
        # A1111 hands DPM fast / adaptive the model's sigma range (an img2img tail's: sigma_sched[0]
        # and sigma_sched[-2]) and the step count, not the schedule: that only scales the start.
        sigma_min, sigma_max = (model.sigma_min, model.sigma_max) if start == 0 else (float(sigmas[-2]), float(sigmas[0]))
        options.update(sigma_min=sigma_min, sigma_max=sigma_max)
        if sampler == "dpm_fast":
            options["nfe"] = len(sigmas) - 1
            sigmas = _DPMSolver.sigma(dpm_fast_times(sigma_min, sigma_max, options["nfe"]))
        else:
            sigmas, loop_steps = torch.tensor([sigma_max, sigma_min]), 1
    elif sampler == "restart":
        options["pairs"] = restart_pairs(sigmas)
        loop_steps = len(options["pairs"])
    at_sigma = sigmas[:-1].clamp(min=model.sigma_min) if float(sigmas[-1]) == 0 else sigmas[:-1]
    return _plan(sampler=sampler, schedule=schedule_of(sampler, schedule), steps=steps, start=start,
                 timesteps=model.sigma_to_t(at_sigma).double(), sigmas=sigmas.double(),
                 alphas_cumprod=alphas_cumprod.double(), log_sigmas=model.log_sigmas.numpy(),
                 init_noise_sigma=init_noise_sigma, options=options, loop_steps=loop_steps,
                 prediction_type=cfg.prediction_type, strength=strength)


def _timestep_plan(sampler, steps, cfg, alphas_cumprod, strength, options):
    """DDIM / DDIM CFG++ / PLMS / UniPC (CompVisSampler): the model runs at A1111's timesteps but the
    first, each step landing on the timestep below. img2img (sample_img2img) keeps
    timesteps[:t_enc] with t_enc = int(min(strength, 0.999) * steps) and noises the image to
    timesteps[t_enc], one above the first it evaluates."""
    if cfg.num_train_timesteps != 1000:
        raise ValueError(f"A1111's {label_of(sampler)} takes a model of 1000 training timesteps, not "
                         f"{cfg.num_train_timesteps}; use conventions='diffusers'")
    timesteps = a1111_timesteps(steps)
    noise_timestep = None
    if strength < 1.0:
        t_enc = int(min(strength, 0.999) * steps)
        timesteps, noise_timestep = timesteps[:t_enc], float(timesteps[t_enc])
    if len(timesteps) < 2:
        raise ValueError(f"strength={strength} with steps={steps} leaves no denoising step")
    if sampler == "unipc":
        return _unipc_plan(timesteps, noise_timestep, steps, cfg, alphas_cumprod, strength)
    evaluated, landing = timesteps[1:][::-1].copy(), timesteps[:-1][::-1].copy()
    train_sigmas = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()) ** 0.5
    sigmas = torch.cat([train_sigmas[torch.from_numpy(evaluated)], train_sigmas[int(landing[-1])].view(1)])
    return _plan(sampler=sampler, schedule="automatic", steps=steps, start=0,
                 timesteps=torch.from_numpy(evaluated).double(), prev_timesteps=torch.from_numpy(landing).double(),
                 sigmas=sigmas, alphas_cumprod=alphas_cumprod.double(), log_sigmas=train_sigmas.float().log().numpy(),
                 init_noise_sigma=1.0, noise_timestep=noise_timestep, options=options,
                 prediction_type=cfg.prediction_type, strength=strength)


def _unipc_plan(timesteps, noise_timestep, steps, cfg, alphas_cumprod, strength):
    """A1111's UniPC (sd_samplers_timesteps_impl.unipc): as many steps as A1111's DDIM timesteps,
    evenly spaced in continuous time from 1 (img2img: the last kept timestep / 1000 + 1/1000)
    down to 1/N, where it stops (its sigma, not 0)."""
    if len(timesteps) < UNIPC_ORDER:
        raise ValueError(f"A1111's UniPC (order {UNIPC_ORDER}) needs at least {UNIPC_ORDER} steps; "
                         f"steps={steps} with strength={strength} gives {len(timesteps)}")
    vp = ContinuousVP(alphas_cumprod)
    t_start = torch.tensor(1.0) if noise_timestep is None else torch.tensor(int(timesteps[-1])) / 1000 + 1 / 1000
    times = torch.linspace(float(t_start), 1.0 / vp.n, len(timesteps) + 1)
    sigmas = (vp.std(times) / vp.alpha(times)).double()
    return _plan(sampler="unipc", schedule="automatic", steps=steps, start=0,
                 timesteps=vp.model_time(times[:-1]).double(), sigmas=sigmas, alphas_cumprod=alphas_cumprod.double(),
                 log_sigmas=sigmas.float().log().numpy(), init_noise_sigma=1.0, noise_timestep=noise_timestep,
                 loop_steps=len(timesteps), options={"times": times}, prediction_type=cfg.prediction_type,
                 strength=strength)


def _plan(**fields):
    from .plan import Plan

    return Plan(conventions="a1111", **fields)
