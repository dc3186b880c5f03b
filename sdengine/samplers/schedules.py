"""Noise schedules: the training schedule (betas, alphas_cumprod) and the sampling schedules.

A sampling schedule is a descending list of noise levels. sdengine writes them in
two equivalent units:
- sigma ("VE" units, k-diffusion): x = x0 + sigma * eps, sigma = sqrt((1 - a) / a);
- timestep t in [0, T): the training step whose alphas_cumprod a gives that sigma.

Every function here reproduces the arithmetic of diffusers' schedulers, including
where they round to float32, so that sdengine's samplers match them to the last digit:
betas in float32 (`torch.linspace`), sigma tables in float32, spacing and
interpolation in numpy float64, the finished sigmas rounded to float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch


# ---------------------------------------------------------------------------
# Training schedule
# ---------------------------------------------------------------------------

def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Nichol & Dhariwal, "Improved DDPM" (2021), eq. 17 ("squaredcos_cap_v2")."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
             for i in range(num_train_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the last step has zero SNR: Lin et al., "Common Diffusion Noise
    Schedules and Sample Steps are Flawed" (2023), Algorithm 1."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def training_betas(cfg) -> torch.Tensor:
    """float32 betas of a SchedulerConfig (beta_schedule, beta_start, beta_end, rescale_betas_zero_snr)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":  # linear in sqrt(beta): the LDM / SD schedule
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    else:
        raise ValueError(f"unsupported beta_schedule {cfg.beta_schedule!r}; "
                         "choose linear, scaled_linear or squaredcos_cap_v2")
    if cfg.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def training_alphas_cumprod(cfg, *, clamp_zero_snr: bool = False) -> torch.Tensor:
    """float32 alphas_cumprod (T,). With zero-terminal-SNR betas the last entry is 0;
    `clamp_zero_snr` replaces it by 2**-24 so that its sigma is finite (what diffusers'
    sigma-based schedulers do)."""
    alphas_cumprod = torch.cumprod(1.0 - training_betas(cfg), dim=0)
    if cfg.rescale_betas_zero_snr and clamp_zero_snr:
        alphas_cumprod[-1] = 2 ** -24
    return alphas_cumprod


def training_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """float32 sigma of every training timestep, ascending with t: sqrt((1 - a) / a)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of a sigma: linear interpolation in log-sigma between the two
    neighbouring training timesteps (k-diffusion's DiscreteSchedule.sigma_to_t)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


# ---------------------------------------------------------------------------
# Sampling schedules
# ---------------------------------------------------------------------------

def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho):
    Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models"
    (2022), eq. 5. The final sigma (0 or sigma_min) is not included."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in log sigma
    (k-diffusion's get_sigmas_exponential). The final sigma is not included."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def spaced_timesteps(spacing: str, steps: int, num_train_timesteps: int, steps_offset: int, style: str) -> np.ndarray:
    """Descending timesteps of `steps` sampling steps, as each diffusers scheduler family spaces them.

    spacing: "leading" (DDIM paper: 0, k, 2k, ... + steps_offset), "trailing" (Lin et al. 2023,
    table 2: from T-1 down), "linspace" (evenly from T-1 to 0), or "simple" (ComfyUI's
    "simple": T-1 - floor(i * T / steps)).
    style: "ddim" (DDIM/DDPM/PNDM: integers), "k" (Euler/Heun/LMS/KDPM2: float32, linspace not
    rounded) or "dpm" (DPMSolverMultistep/UniPC: steps+1 points with the last dropped, integers).
    """
    T = num_train_timesteps
    if spacing == "simple":
        t = (T - 1 - np.floor(np.arange(steps) * T / steps)).astype(np.int64)
        return t.astype(np.float32) if style == "k" else t
    if style == "dpm":
        if spacing == "linspace":
            return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        if spacing == "leading":
            ratio = T // (steps + 1)
            return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    elif spacing == "linspace":
        if style == "k":
            return np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
        return np.linspace(0, T - 1, steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = T // steps
        t = (np.arange(0, steps) * ratio).round()[::-1].copy()
        return t.astype(np.float32) + steps_offset if style == "k" else t.astype(np.int64) + steps_offset
    if spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / steps))
        return t.astype(np.float32) - 1 if style == "k" else t.astype(np.int64) - 1
    raise ValueError(f"unsupported timestep_spacing {spacing!r}; choose leading, trailing or linspace")


def lcm_timesteps(steps: int, num_train_timesteps: int, original_inference_steps: int = 50) -> np.ndarray:
    """The timesteps of a Latent Consistency Model: `steps` of the skipping-step schedule of its
    distillation (Luo et al., "Latent Consistency Models" (2023), sec. 4.3)."""
    k = num_train_timesteps // original_inference_steps
    origin = np.asarray(list(range(1, original_inference_steps + 1))) * k - 1
    if len(origin) // steps < 1:
        raise ValueError(f"lcm: steps={steps} exceeds the model's original_inference_steps="
                         f"{original_inference_steps}; use at most {len(origin)} steps")
    origin = origin[::-1].copy()
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[idx]
