"""A sampling plan: everything a run of one sampler needs, computed up front.

`make_plan(sampler, schedule, steps, scheduler_config, strength)` reproduces the
`set_timesteps` of the diffusers scheduler that corresponds to `sampler`, and the tail
selection of diffusers' img2img `get_timesteps`. The per-step scalars it holds are what
the fused GPU sampler kernels need (see `Plan.step_scalars`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch

from . import schedules as S
from .names import A1111_TIMESTEP_SAMPLERS, SCHEDULES

# Which diffusers scheduler family each sampler reproduces.
K_STYLE = ("euler", "euler_a", "lms", "heun", "dpm_2", "dpm_2_a", "dpmpp_sde")  # Euler/Heun/LMS/KDPM2 spacing
DPM_STYLE = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc")  # DPMSolverMultistep/UniPC spacing
TIMESTEP_SAMPLERS = ("ddim", "ddpm", "pndm", "lcm")
SIGMA_SAMPLERS = K_STYLE + DPM_STYLE

# The schedules each kind of sampler can follow. Timestep-space samplers need integer
# timesteps, so sigma-shaped schedules (karras, exponential) are impossible for them; LCM
# follows the skipping-step schedule it was distilled on.
_SIGMA_SHAPED = ("karras", "exponential")
SCHEDULES_FOR = {
    **{s: SCHEDULES for s in SIGMA_SAMPLERS},
    **{s: tuple(name for name in SCHEDULES if name not in _SIGMA_SHAPED) for s in ("ddim", "ddpm", "pndm")},
    "lcm": ("default",),
}

# Multistep samplers need this many steps to take even one step of their nominal order.
MIN_STEPS = {"pndm": 2, "lms": 2, "dpmpp_2m": 2, "dpmpp_2m_sde": 2, "dpmpp_3m_sde": 3, "unipc": 2}

# Samplers whose diffusers scheduler honours clip_sample (clamps x0).
CLIPS_X0 = ("ddim", "ddpm", "heun", "lcm")

# (timestep_spacing, steps_offset, sigma shape) a schedule name stands for; None keeps the config's.
_SCHEDULE_SETTINGS = {
    "default": (None, None, None),
    "normal": ("linspace", None, "interp"),
    "karras": (None, None, "karras"),
    "exponential": (None, None, "exponential"),
    "sgm_uniform": ("trailing", None, "interp"),
    "simple": ("simple", None, "interp"),
    "ddim_uniform": ("leading", 1, "interp"),
}


@dataclass(frozen=True)
class Plan:
    """One sampler run's schedule.

    sigma samplers (K_STYLE, DPM_STYLE): `sigmas` (n+1,) are the kept sigmas plus the final
    one, `timesteps` (n,) the timestep the UNet gets at each; the sampler state is in VE
    units, x = x0 + sigma * eps. Timestep samplers: `timesteps` are the model evaluations
    (PLMS evaluates n+1 times), the state is diffusers' latents, and `sigmas` is informational.
    """

    sampler: str
    schedule: str
    steps: int                    # requested steps (the whole schedule)
    start: int                    # first kept step (img2img / inpainting strength)
    timesteps: torch.Tensor       # float64
    sigmas: torch.Tensor          # float64, VE units, float32-rounded as diffusers stores them
    alphas_cumprod: torch.Tensor  # float64 (T,), float32-rounded training schedule
    log_sigmas: np.ndarray        # float32 log sigma of every training timestep (for sigma -> t)
    init_noise_sigma: float       # diffusers' init_noise_sigma: txt2img latents = noise * this
    vp_latents: bool = False      # sigma sampler whose diffusers latents are VP (DPM-Solver, UniPC)
    final_alpha_cumprod: float = 1.0
    prev_timesteps: Optional[torch.Tensor] = None  # ddim / ddpm: where each step lands (-1: the end)
    clip_range: Optional[float] = None
    options: dict = field(default_factory=dict)    # keyword options of the sampler function
    prediction_type: str = "epsilon"              # the model's (scheduler config's)
    strength: float = 1.0                         # img2img / inpainting: the part of the schedule kept
    conventions: str = "diffusers"                # whose rules: "diffusers" (this module) or "a1111" (a1111.py)
    loop_steps: Optional[int] = None              # steps of a loop that is not one per sigma (A1111's Restart,
                                                  # its restarts included; DPM adaptive: 1, the whole run)
    noise_timestep: Optional[float] = None        # timestep img2img noises the image to, where it is not the
                                                  # first evaluated (A1111's DDIM / PLMS: the one above)

    @property
    def is_sigma_sampler(self) -> bool:
        if self.conventions == "a1111":
            return self.sampler not in A1111_TIMESTEP_SAMPLERS
        return self.sampler in SIGMA_SAMPLERS

    @property
    def num_steps(self) -> int:
        """Steps this run takes, i.e. callback calls (diffusers' PLMS takes one more than requested)."""
        if self.loop_steps is not None:
            return self.loop_steps
        return len(self.sigmas) - 1 if self.is_sigma_sampler else len(self.timesteps)

    def timesteps_of_sigmas(self) -> dict:
        """{sigma: timestep} at the plan's own sigmas (the denoiser interpolates between)."""
        if not self.is_sigma_sampler:
            return {}
        return {float(s): float(t) for s, t in zip(self.sigmas[:-1], self.timesteps)}

    def initial_state(self, noise: torch.Tensor, init_latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sampler's starting state: pure noise (txt2img), or `init_latents` noised to the first
        kept step (diffusers' scheduler.add_noise)."""
        if init_latents is None:
            latents = noise * self.init_noise_sigma
            if self.is_sigma_sampler and self.vp_latents:
                return latents * (1 + float(self.sigmas[0]) ** 2) ** 0.5  # VP -> VE
            return latents
        if self.is_sigma_sampler:
            return init_latents + noise * (self.init_noise_sigma if self.conventions == "a1111" else float(self.sigmas[0]))
        a = float(self.alphas_cumprod[int(self.timesteps[0] if self.noise_timestep is None else self.noise_timestep)])
        return a ** 0.5 * init_latents + (1 - a) ** 0.5 * noise

    def latents(self, state: torch.Tensor, sigma_next: Optional[float] = None) -> torch.Tensor:
        """diffusers' latents for a sampler state at sigma_next (default: the end of the plan)."""
        if self.is_sigma_sampler and self.vp_latents:
            sigma_next = float(self.sigmas[-1]) if sigma_next is None else sigma_next
            return state * (1 + sigma_next ** 2) ** -0.5  # VE -> VP
        return state

    def state_of(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampler state of diffusers' latents at the plan's first step (the inverse of
        `latents`): where a run handed over mid-schedule (a refiner) continues."""
        if self.is_sigma_sampler and self.vp_latents:
            return latents * (1 + float(self.sigmas[0]) ** 2) ** 0.5  # VP -> VE
        return latents

    def window(self, start: int, stop: Optional[int] = None) -> "Plan":
        """The plan's steps [start, stop): one schedule cut in parts that run one after the other
        (diffusers' denoising_end / denoising_start; the last steps of a longer schedule, A1111's
        img2img steps). A multistep sampler's history starts again at `start`, as a new diffusers
        scheduler's does; a window that ends early does not treat its last step as the schedule's
        (no lower-order final step)."""
        stop = self.num_steps if stop is None else stop
        if self.sampler == "pndm":
            raise ValueError("sampler 'pndm' (PLMS) cannot run part of a schedule; choose another sampler")
        if not 0 <= start < stop <= self.num_steps:
            raise ValueError(f"a window [{start}, {stop}) of a plan of {self.num_steps} steps must hold a step")
        options = dict(self.options)
        if stop < self.num_steps and "lower_order_final" in options:
            options["lower_order_final"] = False
        return replace(
            self, start=self.start + start, timesteps=self.timesteps[start:stop].clone(),
            sigmas=self.sigmas[start:stop + 1].clone(),
            prev_timesteps=None if self.prev_timesteps is None else self.prev_timesteps[start:stop].clone(),
            options=options)

    def step_scalars(self) -> dict:
        """Per-step scalars for fused sampler kernels, as float64 CPU tensors of length n (kept steps).

        Sigma samplers: timestep, sigma, sigma_next, c_in = 1/sqrt(sigma^2+1) (the UNet input
        scale), sigma_up / sigma_down (the ancestral split of euler_a). For euler_a the update is
        x += (x - denoised) / sigma * (sigma_down - sigma) + noise * sigma_up; dpmpp_2m derives
        its step sizes h = log(sigma / sigma_next) from the same sigmas (first order where
        sigma_next is 0, on the first step, and on the last when options["lower_order_final"]).
        ddim: timestep, alpha_cumprod, alpha_cumprod_prev. lcm: timestep, alpha_cumprod,
        alpha_cumprod_prev (of the next timestep; 1 on the last step), c_skip, c_out.
        """
        f64 = dict(dtype=torch.float64)
        if self.is_sigma_sampler:
            sigma, sigma_next = self.sigmas[:-1], self.sigmas[1:]
            sigma_up = torch.minimum(sigma_next, (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
            return {
                "timestep": self.timesteps.clone(),
                "sigma": sigma.clone(),
                "sigma_next": sigma_next.clone(),
                "c_in": (sigma ** 2 + 1) ** -0.5,
                "sigma_up": sigma_up,
                "sigma_down": (sigma_next ** 2 - sigma_up ** 2).clamp(min=0) ** 0.5,
            }
        t = self.timesteps.long()
        a_t = self.alphas_cumprod[t]
        out = {"timestep": self.timesteps.clone(), "alpha_cumprod": a_t}
        if self.prev_timesteps is not None:
            prev = self.prev_timesteps.long()
            out["alpha_cumprod_prev"] = torch.where(
                prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], torch.tensor(self.final_alpha_cumprod, **f64))
        if self.sampler == "lcm":
            scaled = self.timesteps * self.options["timestep_scaling"]
            out["c_skip"] = 0.25 / (scaled ** 2 + 0.25)
            out["c_out"] = scaled / (scaled ** 2 + 0.25) ** 0.5
            nxt = torch.cat([a_t[1:], torch.ones(1, **f64)])
            out["alpha_cumprod_prev"] = nxt
        return out


# Scheduler-config keys that change the schedule in ways sdengine does not implement: a value
# other than the default listed here is refused rather than silently ignored.
_UNSUPPORTED_IF_SET = {
    "thresholding": False,            # dynamic thresholding (Imagen)
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "timestep_type": "discrete",      # "continuous": EDM-style v models
    "interpolation_type": "linear",   # "log_linear" sigma interpolation
    "trained_betas": None,
}


def check_config(cfg) -> None:
    """Refuse scheduler-config keys whose effect sdengine does not reproduce, naming the key."""
    for key, default in _UNSUPPORTED_IF_SET.items():
        value = cfg.get(key, default)
        if value is not None and value != default:
            raise ValueError(f"scheduler config: unsupported {key}={value!r} (sdengine supports only "
                             f"{key}={default!r})")


def _f32(values) -> np.ndarray:
    """float64 copies of float32-rounded values (diffusers stores sigmas in float32)."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def _check_steps(sampler: str, steps, cfg) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps > cfg.num_train_timesteps:
        raise ValueError(f"steps={steps} exceeds the model's num_train_timesteps={cfg.num_train_timesteps}")
    need = MIN_STEPS.get(sampler, 1)
    if sampler == "unipc":
        need = max(need, int(cfg.get("solver_order", 2) or 2))
    if steps < need:
        raise ValueError(f"sampler {sampler!r} is a multistep method and needs steps >= {need}, got steps={steps}")


def kept_steps(steps: int, strength: float) -> int:
    """Index of the first step img2img keeps: diffusers' get_timesteps."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(int(steps * strength), steps)
    if init_timestep < 1:
        raise ValueError(f"strength={strength} with steps={steps} leaves no denoising step; "
                         f"raise strength to at least {1 / steps:.3g} or use more steps")
    return max(steps - init_timestep, 0)


def steps_before(plan: Plan, fraction: float, num_train_timesteps: int) -> int:
    """How many of the plan's steps come before `fraction` of the denoising: those whose timestep
    is at or above the cutoff round(T - fraction * T) (diffusers' SDXL denoising_end on the base,
    denoising_start on the refiner, whose steps are the rest)."""
    cutoff = int(round(num_train_timesteps - fraction * num_train_timesteps))
    return int((plan.timesteps >= cutoff).sum())


def make_plan(sampler: str, schedule: str, steps: int, cfg, *, strength: float = 1.0, eta: float = 0.0) -> Plan:
    """The plan of `sampler` (canonical name) following `schedule` for `steps` steps of the
    model whose scheduler config is `cfg`, keeping the tail selected by `strength`. The config is
    read as the sampler's diffusers class reads it: keys it lacks take that class's defaults
    (SchedulerConfig.for_sampler)."""
    cfg = cfg.for_sampler(sampler)
    if schedule not in SCHEDULES_FOR[sampler]:
        raise ValueError(f"sampler {sampler!r} cannot follow the {schedule!r} schedule; "
                         f"it supports: {', '.join(SCHEDULES_FOR[sampler])}")
    check_config(cfg)
    _check_steps(sampler, steps, cfg)
    start = kept_steps(steps, strength)
    spacing, offset, shape = _SCHEDULE_SETTINGS[schedule]
    spacing = spacing or cfg.timestep_spacing
    offset = cfg.steps_offset if offset is None else offset
    if shape is None:
        shape = "karras" if cfg.use_karras_sigmas else "exponential" if cfg.use_exponential_sigmas else "interp"
    clip_range = cfg.clip_sample_range if cfg.clip_sample and sampler in CLIPS_X0 else None
    if sampler in SIGMA_SAMPLERS:
        plan = _sigma_plan(sampler, schedule, steps, start, cfg, spacing, offset, shape, clip_range)
    else:
        plan = _timestep_plan(sampler, schedule, steps, start, cfg, spacing, offset, clip_range, eta)
    return replace(plan, prediction_type=cfg.prediction_type, strength=strength)


def _final_sigma(cfg, alphas_cumprod: torch.Tensor) -> float:
    kind = cfg.final_sigmas_type or "zero"
    if kind == "zero":
        return 0.0
    if kind == "sigma_min":
        return float(((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5)
    raise ValueError(f"unsupported final_sigmas_type {kind!r}; choose zero or sigma_min")


def _sigma_plan(sampler, schedule, steps, start, cfg, spacing, offset, shape, clip_range) -> Plan:
    T = cfg.num_train_timesteps
    alphas_cumprod = S.training_alphas_cumprod(cfg, clamp_zero_snr=True)
    train_sigmas = S.training_sigmas(alphas_cumprod)  # float32, ascending in t
    log_sigmas = np.log(train_sigmas)
    sigma_min_cfg, sigma_max_cfg = cfg.get("sigma_min"), cfg.get("sigma_max")
    if sampler in K_STYLE:
        # EulerDiscreteScheduler.set_timesteps (also LMS, Heun, KDPM2, DPMSolverSDE)
        timesteps = S.spaced_timesteps(spacing, steps, T, offset, style="k").astype(np.float64)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        lo, hi = sigmas[-1], sigmas[0]  # karras / exponential span the spaced sigmas
        round_t = sampler in ("dpm_2", "dpm_2_a")  # KDPM2 rounds its karras timesteps
        to_int = False
    else:
        # DPMSolverMultistepScheduler / UniPCMultistepScheduler.set_timesteps
        timesteps = S.spaced_timesteps(spacing, steps, T, offset, style="dpm").astype(np.float64)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        lo, hi = float(train_sigmas[0]), float(train_sigmas[-1])  # the whole training range
        round_t = not (sampler != "unipc" and cfg.beta_schedule == "squaredcos_cap_v2")
        to_int = True
    if shape in ("karras", "exponential"):
        lo = float(sigma_min_cfg) if sigma_min_cfg is not None else float(lo)
        hi = float(sigma_max_cfg) if sigma_max_cfg is not None else float(hi)
        sigmas = S.sigmas_karras(steps, lo, hi) if shape == "karras" else S.sigmas_exponential(steps, lo, hi)
        timesteps = S.sigma_to_t(sigmas, log_sigmas)
        if shape == "karras" and round_t:
            timesteps = timesteps.round()
    if to_int:
        timesteps = timesteps.astype(np.int64).astype(np.float64)  # diffusers' .to(torch.int64) truncates
    elif sampler in K_STYLE and not (shape == "karras" and round_t):
        timesteps = _f32(timesteps)
    final = _final_sigma(cfg, alphas_cumprod)
    sigmas = _f32(np.concatenate([sigmas, [final]]))
    if sampler in K_STYLE:
        # diffusers' Euler-family init_noise_sigma: sigma_max, or sqrt(sigma_max^2 + 1) for "leading"
        max_sigma = torch.tensor(sigmas.max(), dtype=torch.float32)
        init = max_sigma if spacing in ("linspace", "trailing", "simple") else (max_sigma ** 2 + 1) ** 0.5
        init_noise_sigma = float(init)
    else:
        init_noise_sigma = 1.0
    return Plan(
        sampler=sampler, schedule=schedule, steps=steps, start=start,
        timesteps=torch.from_numpy(timesteps[start:].copy()),
        sigmas=torch.from_numpy(sigmas[start:].copy()),
        alphas_cumprod=alphas_cumprod.double(), log_sigmas=log_sigmas,
        init_noise_sigma=init_noise_sigma, vp_latents=sampler in DPM_STYLE,
        clip_range=clip_range, options=_sigma_options(sampler, steps, cfg),
    )


def _sigma_options(sampler, steps, cfg) -> dict:
    if sampler == "lms":
        return {"order": 4}
    solver_type = cfg.get("solver_type", None)
    lower_order_final = bool(cfg.get("euler_at_final", False)) or (
        bool(cfg.get("lower_order_final", True)) and steps < 15)
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        return {"lower_order_final": lower_order_final,
                "solver_type": solver_type if solver_type in ("midpoint", "heun") else "midpoint"}
    if sampler == "unipc":
        return {"order": int(cfg.get("solver_order", 2) or 2),
                "lower_order_final": bool(cfg.get("lower_order_final", True)),
                "solver_type": solver_type if solver_type in ("bh1", "bh2") else "bh2",
                "disable_corrector": tuple(cfg.get("disable_corrector", ()) or ())}
    return {}


def _timestep_plan(sampler, schedule, steps, start, cfg, spacing, offset, clip_range, eta) -> Plan:
    T = cfg.num_train_timesteps
    alphas_cumprod = S.training_alphas_cumprod(cfg)
    train_sigmas = S.training_sigmas(alphas_cumprod)
    final_alpha = 1.0 if cfg.set_alpha_to_one else float(alphas_cumprod[0])
    prev = None
    if sampler == "lcm":
        timesteps = S.lcm_timesteps(steps, T, int(cfg.get("original_inference_steps", 50) or 50))
        options = {"timestep_scaling": float(cfg.get("timestep_scaling", 10.0) or 10.0)}
    else:
        descending = S.spaced_timesteps(spacing, steps, T, offset, style="ddim")
        if sampler == "pndm":
            if not cfg.skip_prk_steps:
                raise ValueError("pndm: only skip_prk_steps=True (PLMS, as every Stable Diffusion config sets) is "
                                 "supported; choose another sampler for this scheduler config")
            ascending = descending[::-1]
            timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
            options = {"stride": T // steps}
        elif sampler == "ddim":
            timesteps = descending
            prev = descending - T // steps  # diffusers' DDIM: t - T // steps whatever the spacing
            options = {"eta": float(eta)}
        else:  # ddpm: the next timestep of the list
            timesteps = descending
            prev = np.concatenate([descending[1:], [-1]])
            variance_type = cfg.get("variance_type", None) or "fixed_small"
            if variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
                raise ValueError(f"ddpm: unsupported variance_type {variance_type!r}; "
                                 "choose fixed_small, fixed_small_log or fixed_large")
            options = {"variance_type": "fixed_large" if variance_type == "fixed_large" else "fixed_small"}
    timesteps = np.asarray(timesteps, dtype=np.int64)
    sigmas = np.concatenate([train_sigmas[timesteps].astype(np.float64), [0.0]])
    kept = slice(start, None)
    return Plan(
        sampler=sampler, schedule=schedule, steps=steps, start=start,
        timesteps=torch.from_numpy(timesteps[kept].astype(np.float64)),
        sigmas=torch.from_numpy(sigmas[kept].copy()),
        alphas_cumprod=alphas_cumprod.double(), log_sigmas=np.log(train_sigmas),
        init_noise_sigma=1.0, final_alpha_cumprod=final_alpha,
        prev_timesteps=None if prev is None else torch.from_numpy(np.asarray(prev[kept], dtype=np.float64)),
        clip_range=clip_range, options=options,
    )
