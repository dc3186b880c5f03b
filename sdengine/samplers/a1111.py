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
samplers both vocabularies share; this module adds A1111's others).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from . import sigma_samplers as K
from .names import A1111_SAMPLERS, A1111_SCHEDULES

# The samplers of A1111's list that sdengine runs under A1111's rules (names.A1111_SAMPLERS).
SAMPLERS = ("dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_2s_a", "dpmpp_3m_sde", "euler_a",
            "euler", "lms", "heun", "dpm_2", "dpm_2_a")
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
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
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
}
assert set(STEP_FACTORIES) == set(SAMPLERS)


# ---------------------------------------------------------------------------
# The plan of a run
# ---------------------------------------------------------------------------

def make_plan(sampler: str, schedule: Optional[str], steps: int, cfg, *, strength: float = 1.0,
              eta: Optional[float] = None, is_sdxl: bool = False):
    """The Plan of an A1111 sampler (sdengine name, SAMPLERS) following an A1111 schedule name
    (None: Automatic) for `steps` steps of the model whose scheduler config is `cfg`, keeping the
    img2img tail of `strength`. eta: the ancestral / SDE noise scale (None: A1111's 1.0); the
    deterministic samplers ignore it, as in A1111."""
    from .plan import Plan, check_config

    check_config(cfg)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    alphas_cumprod = ldm_alphas_cumprod(cfg)
    model = DiscreteSchedule(alphas_cumprod)
    run_schedule = schedule_of(sampler, schedule)
    sigmas = sigmas_for(sampler, schedule, steps, model, is_sdxl=is_sdxl)
    start = img2img_start(steps, strength) if strength < 1.0 else 0
    sigmas = sigmas[start:]
    if len(sigmas) < 2:
        raise ValueError(f"strength={strength} with steps={steps} leaves no denoising step")
    options = {}  # A1111 passes eta only to the samplers that take one, and ignores it for the others
    if "eta" in options_of(sampler):
        options["eta"] = options_of(sampler)["eta"] if eta is None else float(eta)
    timesteps = model.sigma_to_t(sigmas[:-1].clamp(min=model.sigma_min))
    return Plan(
        sampler=sampler, schedule=run_schedule, steps=steps, start=start,
        timesteps=timesteps.double(), sigmas=sigmas.double(), alphas_cumprod=alphas_cumprod.double(),
        log_sigmas=model.log_sigmas.numpy(), init_noise_sigma=float(sigmas[0]), options=options,
        prediction_type=cfg.prediction_type, strength=strength, conventions="a1111",
    )
