"""Samplers and schedules: the A1111 / ComfyUI set, matching diffusers' schedulers step for step.

The pipeline calls two functions (docs/CONTRACTS.md):

    plan = plan_for(sampler, schedule, steps, scheduler_config, strength=1.0, eta=0.0)
    latents = sample(model_fn, noise, plan, step=None, init_latents=None, generators=None, callback=None)

How it is built (k-diffusion's structure):
- schedules.py: training schedule and sampling schedules (sigmas_karras, sigmas_exponential, spacing);
- plan.py: `make_plan` -> `Plan`, one run's timesteps / sigmas, as diffusers' set_timesteps + get_timesteps;
- denoiser.py: the one `Denoiser` wrapper that turns eps / v / x0 predictions into x0;
- sigma_samplers.py: `<name>(model, sigmas, noise, ...) -> step(x, i)` over sigmas (euler ... dpmpp, unipc);
- timestep_samplers.py: `<name>(model, timesteps, noise, ...) -> step(x, i)` over timesteps (ddim, ddpm, pndm, lcm);
- noise.py: `randn`, the noise every sampler draws (per-image generators);
- fused.py: what a backend's fused step (UNet + guidance + update in one) needs from the plan;
- `sample`: the one loop over steps, fused or not.
- names.py: the one table of samplers and schedules (their spellings, shared with the CLI and the
  C runtime, and their A1111 labels and API lists).

GPU fast path: `make_plan(...)` (or `timesteps_and_sigmas`) gives the per-step scalars up front;
`Plan.step_scalars()` returns timestep, sigma, sigma_next, c_in, sigma_up/down (sigma samplers) or
alpha_cumprod, alpha_cumprod_prev, c_skip, c_out (ddim, lcm). For a sigma sampler the state is
x = x0 + sigma * eps: start from `plan.initial_state(noise, init_latents)`, feed the UNet
x * c_in and t = timestep, and return `plan.latents(x)`.

Where sdengine deliberately differs from diffusers (tests/test_samplers.py checks the rest to 1e-6):
- pndm with a v-prediction model: PLMS combines eps (the paper), diffusers combines raw v;
- lms on an img2img tail: the order restarts at 1 (k-diffusion), diffusers keeps the absolute step's;
- dpmpp_sde draws independent per-image noise, not torchsde's Brownian tree (DPMSolverSDEScheduler);
- dpmpp_3m_sde follows k-diffusion; diffusers' third-order SDE DPM-Solver++ has the sign of its
  0.5 * D2 term flipped relative to its own ODE form;
- unipc with solver_type bh1 ending at sigma 0 returns x0 where diffusers returns NaN.
"""

from __future__ import annotations

import inspect
import re
from typing import Callable, Optional

import torch

from ..config import SchedulerConfig
from . import a1111 as _a1111
from . import sigma_samplers, timestep_samplers
from .denoiser import Denoiser, to_x0_eps
from .names import (A1111_SAMPLERS, A1111_SCHEDULES, NAMES, SAMPLERS, SCHEDULES, a1111_sampler_label,
                    a1111_schedule_label, split_a1111_label)
from .noise import randn
from .plan import MIN_STEPS, SCHEDULES_FOR, Plan, make_plan
from .schedules import sigma_to_t, sigmas_exponential, sigmas_karras

# Each sampler's step factory: <factory>(model, sigmas or timesteps, noise, **options) -> step(x, i) -> x
STEP_FACTORIES = {
    "ddim": timestep_samplers.ddim,
    "ddpm": timestep_samplers.ddpm,
    "pndm": timestep_samplers.pndm,
    "lcm": timestep_samplers.lcm,
    "lms": sigma_samplers.lms,
    "euler": sigma_samplers.euler,
    "euler_a": sigma_samplers.euler_ancestral,
    "heun": sigma_samplers.heun,
    "dpm_2": sigma_samplers.dpm_2,
    "dpm_2_a": sigma_samplers.dpm_2_ancestral,
    "dpmpp_2m": sigma_samplers.dpmpp_2m,
    "dpmpp_2m_sde": sigma_samplers.dpmpp_2m_sde,
    "dpmpp_sde": sigma_samplers.dpmpp_sde,
    "dpmpp_3m_sde": sigma_samplers.dpmpp_3m_sde,
    "unipc": sigma_samplers.unipc,
}
if STEP_FACTORIES.keys() != set(SAMPLERS):
    raise ImportError("sdengine.samplers: STEP_FACTORIES and names.py's sampler table disagree")

# diffusers' DPMSolverMultistepScheduler draws its SDE noise in float32 whatever the latents' dtype.
_FLOAT32_NOISE = ("dpmpp_2m_sde", "dpmpp_3m_sde")

# The DDPM of the seeds (Ho et al. 2020): linear betas 1e-4 .. 0.02 over T = 1000, epsilon
# prediction, in pixel space (x0 clipped to [-1, 1]); sample with "ddpm" or "ddim".
SEEDS_DDPM = SchedulerConfig(
    sampler="ddpm", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=0, clip_sample=True,
    clip_sample_range=1.0, set_alpha_to_one=True,
)

__all__ = [
    "SAMPLERS", "SCHEDULES", "SEEDS_DDPM", "NAMES", "Plan", "Denoiser", "resolve", "sample", "randn",
    "make_plan", "plan_for", "timesteps_and_sigmas", "normalize_name", "sigmas_karras", "sigmas_exponential",
    "sigma_to_t", "to_x0_eps", "STEP_FACTORIES", "MIN_STEPS", "SCHEDULES_FOR",
]


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

def normalize_name(name: str) -> str:
    """The key of a name in NAMES: lower case, "_" and "-" as spaces, whitespace collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", str(name).lower())).strip()


def _lookup_sampler(name: str):
    """(sampler, schedule or None) of a sampler name, possibly combined with a schedule."""
    key = normalize_name(name)
    if key in NAMES["samplers"]:
        return NAMES["samplers"][key], None
    for sched_key, schedule in NAMES["schedules"].items():
        if key.endswith(" " + sched_key):
            prefix = key[: -len(sched_key) - 1]
            if prefix in NAMES["samplers"]:
                return NAMES["samplers"][prefix], schedule
    raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)} "
                     f"(A1111/ComfyUI names such as 'DPM++ 2M Karras' or 'Euler a' work too)")


def _lookup_schedule(name: str) -> str:
    key = normalize_name(name)
    if key in NAMES["schedules"]:
        return NAMES["schedules"][key]
    raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")


def resolve(sampler: Optional[str], schedule: Optional[str], scheduler_config: SchedulerConfig):
    """Canonical (sampler, schedule) names.

    sampler None: the checkpoint's default (`scheduler_config.sampler`); schedule None: the one
    a combined name carries ("DPM++ 2M Karras"), else "default" (what the config says).
    Raises ValueError on unknown names (listing the valid ones), on a combined name whose
    schedule contradicts `schedule`, and on a sampler that cannot follow the schedule.
    """
    name, implied = _lookup_sampler(scheduler_config.sampler if sampler is None else sampler)
    chosen = None if schedule is None else _lookup_schedule(schedule)
    if implied is not None and chosen is not None and implied != chosen:
        raise ValueError(f"sampler {sampler!r} implies the {implied!r} schedule but schedule={schedule!r} was given")
    chosen = chosen or implied or "default"
    if chosen not in SCHEDULES_FOR[name]:
        raise ValueError(f"sampler {name!r} cannot follow the {chosen!r} schedule; "
                         f"it supports: {', '.join(SCHEDULES_FOR[name])}")
    return name, chosen


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# Vocabularies: whose rules a name follows (README, "Same seed, same image")
# ---------------------------------------------------------------------------

# diffusers-side schedule names -> A1111's (for snake_case names run under conventions="a1111")
_A1111_SCHEDULE_OF = {"default": "automatic", "normal": "normal", "karras": "karras", "exponential": "exponential",
                      "sgm_uniform": "sgm_uniform", "simple": "simple", "ddim_uniform": "ddim"}


def conventions_for(sampler: Optional[str], conventions: Optional[str] = None) -> str:
    """"a1111" or "diffusers": `conventions` when given; else A1111's rules for a sampler spelled
    as A1111 spells it ("Euler a", "DPM++ 2M Karras", "k_euler", "DDIM", "plms") when sdengine
    reproduces that sampler under them (a1111.SAMPLERS), diffusers' for everything else
    (sdengine's snake_case names, "ddim" and "lcm" included, ComfyUI's, diffusers' class names,
    the checkpoint's own scheduler)."""
    if conventions is not None:
        if conventions not in ("a1111", "diffusers"):
            raise ValueError(f"conventions must be 'a1111' or 'diffusers', got {conventions!r}")
        return conventions
    if sampler is None or str(sampler).strip() in SAMPLERS:  # sdengine's own names ("ddim", "lcm", "unipc")
        return "diffusers"
    label = a1111_sampler_label(split_a1111_label(sampler)[0])
    if label is not None and A1111_SAMPLERS[label][0] in _a1111.SAMPLERS:
        return "a1111"
    return "diffusers"


def resolve_a1111(sampler: Optional[str], schedule: Optional[str], scheduler_config: SchedulerConfig):
    """(sdengine sampler, A1111 schedule name or None for Automatic) of names run under A1111's
    rules: A1111's labels ("DPM++ 2M", "Karras"), or sdengine's names of the same samplers.
    ValueError for a sampler sdengine does not reproduce under A1111's rules."""
    name = scheduler_config.sampler if sampler is None else sampler
    label, implied = split_a1111_label(name)
    if a1111_sampler_label(label):
        canonical = A1111_SAMPLERS[a1111_sampler_label(label)][0]
        implied = None if implied is None else A1111_SCHEDULES[implied]
    elif name in _a1111.SAMPLERS:  # the name of a sampler that only A1111's rules run (dpm_fast, restart, ...)
        canonical, implied = name, None
    else:
        canonical, implied = _lookup_sampler(name)
        implied = None if implied is None else _A1111_SCHEDULE_OF.get(implied)
    if canonical not in _a1111.SAMPLERS:
        raise ValueError(f"sampler {name!r}: sdengine does not reproduce A1111's {_a1111_label(canonical)} yet "
                         f"(under A1111's rules it runs: {', '.join(_a1111.label_of(s) for s in _a1111.SAMPLERS)}); "
                         f"conventions='diffusers' runs diffusers' scheduler of that name")
    chosen = None
    if schedule is not None:
        label = a1111_schedule_label(schedule)
        if label is not None:
            chosen = A1111_SCHEDULES[label]
        elif normalize_name(schedule) in NAMES["schedules"]:
            chosen = _A1111_SCHEDULE_OF[NAMES["schedules"][normalize_name(schedule)]]
        else:
            raise ValueError(f"unknown schedule {schedule!r}; A1111's schedules: {', '.join(A1111_SCHEDULES)}")
    if implied is not None and chosen not in (None, "automatic") and implied != chosen:
        raise ValueError(f"sampler {sampler!r} implies the {implied!r} schedule but schedule={schedule!r} was given")
    chosen = chosen if chosen not in (None, "automatic") else implied
    return canonical, chosen


def _a1111_label(canonical: str) -> str:
    return next((label for label, (name, _) in A1111_SAMPLERS.items() if name == canonical), canonical)


def plan_for(sampler: Optional[str], schedule: Optional[str], steps: int, scheduler_config: SchedulerConfig, *,
             strength: float = 1.0, eta: Optional[float] = None, conventions: Optional[str] = None,
             is_sdxl: bool = False) -> Plan:
    """The Plan of a run from the names users give: None is the checkpoint's sampler and schedule.
    Under diffusers' rules `resolve` then `make_plan` (eta None: 0); under A1111's (see
    `conventions_for`) `resolve_a1111` then a1111.make_plan (eta None: A1111's default).
    Raises ValueError before any work for a bad name, step count or strength."""
    if conventions_for(sampler, conventions) == "a1111":
        name, schedule = resolve_a1111(sampler, schedule, scheduler_config)
        return _a1111.make_plan(name, schedule, steps, scheduler_config, strength=strength, eta=eta, is_sdxl=is_sdxl)
    name, schedule = resolve(sampler, schedule, scheduler_config)
    return make_plan(name, schedule, steps, scheduler_config, strength=strength, eta=eta or 0.0)


def timesteps_and_sigmas(sampler: str, schedule: Optional[str], steps: int, scheduler_config: SchedulerConfig,
                         strength: float = 1.0):
    """(timesteps, sigmas) float64 tensors of a run: see `make_plan` for everything else."""
    plan = plan_for(sampler, schedule, steps, scheduler_config, strength=strength)
    return plan.timesteps, plan.sigmas


def sample(model_fn: Optional[Callable], noise: torch.Tensor, plan: Plan, *, step: Optional[Callable] = None,
           init_latents: Optional[torch.Tensor] = None, generators=None, callback: Optional[Callable] = None,
           inpainting: bool = False, add_noise: bool = True, **options) -> torch.Tensor:
    """Run `plan` and return the final latents (what diffusers' pipeline decodes).

    The one loop: `x = step(x, i)` for every step of the plan, where step is
    - a backend's fused step `step(x, i, noise)` when given (UNet + guidance + sampler update in
      one: samplers/fused.py), its noise drawn as the unfused sampler draws it;
    - otherwise the plan's sampler (STEP_FACTORIES) around `model_fn(x_in, t) -> raw model output`
      in the plan's prediction_type, guidance applied: x_in is exactly what diffusers' pipeline
      feeds its UNet at that step (after scale_model_input), t a float32 tensor of shape (B,)
      holding the scheduler's timestep.
    plan: `make_plan` / `plan_for` (strength < 1 keeps the tail of the schedule for img2img).
    noise: unit-variance noise (B, C, h, w). txt2img: the start is noise * init_noise_sigma.
    init_latents: img2img / inpainting, noised to the plan's first step with `noise`. With
      `inpainting=True` and strength 1.0 the start is pure noise, as diffusers' inpainting
      pipeline does (is_strength_max).
    add_noise: False starts from init_latents as they are, diffusers' latents at the plan's first
      step (a run handed over mid-schedule: SDXL's refiner after denoising_end); noise may be None.
    generators: one CPU torch.Generator per image, for the noise of stochastic samplers; for an
      A1111 plan (plan.conventions "a1111") A1111's rng.ImageNoise of the images, whose first()
      drew `noise`.
    callback(step_index, latents) after every step (step_index counts this run's steps from 0,
      PLMS makes steps + 1 calls); latents are diffusers' latents after that step (a copy). An
      exception raised in it propagates (cancel).
    Other keyword options go to the sampler (e.g. order=3 for unipc) and override what the config
    says; a fused step takes none.
    """
    if not add_noise:
        if init_latents is None:
            raise ValueError("add_noise=False needs init_latents: the latents to continue from")
        x = plan.state_of(init_latents)
    else:
        if init_latents is not None and init_latents.shape != noise.shape:
            raise ValueError(f"init_latents shape {tuple(init_latents.shape)} differs from "
                             f"noise shape {tuple(noise.shape)}")
        pure_noise = init_latents is None or (inpainting and plan.strength == 1.0)
        x = plan.initial_state(noise, None if pure_noise else init_latents)
    if step is not None:
        if options:
            raise ValueError(f"a fused step takes no sampler options, got {', '.join(map(repr, sorted(options)))}")
        from .fused import with_noise

        step = with_noise(step, plan, generators, x.shape)
    else:
        step = _sampler_step(model_fn, plan, x, generators, options)
    for i in range(plan.num_steps):
        x = step(x, i)  # a fused step may hand back a buffer it overwrites at the next step: copies go out
        if callback is not None:
            callback(i, plan.latents(x, float(plan.sigmas[i + 1]) if plan.vp_latents else None).clone())
    return plan.latents(x).clone()


def _a1111_step(model_fn: Callable, plan: Plan, x: torch.Tensor, image_noise, options: dict) -> Callable:
    """step(x, i) of an A1111 plan: k-diffusion's sampler over CompVisDenoiser (LCM: A1111's LCM
    denoiser; DDIM, DDIM CFG++, PLMS: eps at integer timesteps), its noise from A1111's per-image
    generators (rng.ImageNoise.next) or, for the SDE samplers, Brownian trees."""
    from .rng import BrownianNoise

    factory = _a1111.STEP_FACTORIES[plan.sampler]
    unknown = sorted(set(options) - {"eta"})
    if unknown:
        raise ValueError(f"sampler {plan.sampler!r} has no option {', '.join(map(repr, unknown))} under A1111's rules")
    alphas_cumprod = plan.alphas_cumprod.float()
    if plan.sampler in _a1111.TIMESTEP_SAMPLERS:
        if plan.sampler == "ddim_cfgpp" and "with_uncond" not in inspect.signature(model_fn).parameters:
            raise ValueError("DDIM CFG++ needs the unconditional prediction: the model function must take "
                             "with_uncond and guidance_multiplier (as the pipeline's does)")
        denoiser = _a1111.TimestepDenoiser(model_fn, plan.alphas_cumprod, plan.prediction_type)
    elif plan.sampler == "lcm":
        denoiser = _a1111.LCMDenoiser(model_fn, _a1111.LCMSchedule(alphas_cumprod))
    else:
        denoiser = _a1111.CompVisDenoiser(model_fn, _a1111.DiscreteSchedule(alphas_cumprod), plan.prediction_type)
    if _a1111.options_of(plan.sampler).get("brownian"):
        sigmas = plan.sigmas.float()
        noise = BrownianNoise(x, float(sigmas[sigmas > 0].min()), float(sigmas.max()), image_noise.seeds)
    else:
        def noise(*interval):
            return image_noise.next().to(x.device, x.dtype)
    if plan.sampler == "unipc":
        return factory(denoiser, noise=noise, alphas_cumprod=alphas_cumprod, **dict(plan.options, **options))
    if plan.sampler in _a1111.TIMESTEP_SAMPLERS:
        return factory(denoiser, plan.timesteps, plan.prev_timesteps, noise, alphas_cumprod=alphas_cumprod,
                       **dict(plan.options, **options))
    return factory(denoiser, plan.sigmas, noise, **dict(plan.options, **options))


def _sampler_step(model_fn: Callable, plan: Plan, x: torch.Tensor, generators, options: dict) -> Callable:
    """step(x, i) of the plan's sampler around model_fn, with its options checked."""
    if plan.conventions == "a1111":
        return _a1111_step(model_fn, plan, x, generators, options)
    factory = STEP_FACTORIES[plan.sampler]
    allowed = set(inspect.signature(factory).parameters) - {"model", "sigmas", "timesteps", "noise"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"sampler {plan.sampler!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options are: {', '.join(sorted(allowed)) or 'none'}")
    denoiser = Denoiser(model_fn, plan.alphas_cumprod, plan.prediction_type,
                        log_sigmas=plan.log_sigmas, timesteps_of_sigmas=plan.timesteps_of_sigmas(),
                        clip_range=plan.clip_range)
    noise_dtype = torch.float32 if plan.sampler in _FLOAT32_NOISE else x.dtype

    def draw_noise(*interval):  # a sigma sampler names the step's (sigma, sigma_next); unused here
        return randn(x.shape, generators, x.device, noise_dtype).to(x.dtype)

    kwargs = dict(plan.options, **options)
    if plan.is_sigma_sampler:
        return factory(denoiser, plan.sigmas, draw_noise, **kwargs)
    if plan.sampler in ("ddim", "ddpm"):
        kwargs["prev_timesteps"] = plan.prev_timesteps
    if plan.sampler in ("ddim", "pndm"):
        kwargs["final_alpha_cumprod"] = plan.final_alpha_cumprod
    return factory(denoiser.at_timestep, plan.timesteps, draw_noise, alphas_cumprod=plan.alphas_cumprod, **kwargs)