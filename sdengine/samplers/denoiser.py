"""The one denoiser wrapper: adapts an epsilon-, v- or sample-prediction model to the
samplers, so that no sampler cares which kind of model it drives.

This is k-diffusion's external.py (DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser) in
one class. A discrete-time diffusion model is trained on x_t = alpha_t * x0 + sigma_t * eps
("VP" units, alpha_t^2 + sigma_t^2 = 1) and predicts one of
- eps         (Ho et al., "Denoising Diffusion Probabilistic Models", 2020),
- v = alpha_t * eps - sigma_t * x0   (Salimans & Ho, "Progressive Distillation", 2022),
- x0 itself   ("sample").
`to_x0_eps` turns any of them into the pair (x0, eps).

Two views of the same model:
- `denoiser(x, sigma) -> x0` in VE units (x = x0 + sigma * eps), for the sigma-space samplers.
  The UNet gets x / sqrt(sigma^2 + 1) (that is x_t in VP units) and the timestep of sigma.
- `denoiser.at_timestep(x, t) -> (x0, eps)` in VP units at a training timestep t, for the
  timestep-space samplers (DDIM, DDPM, PLMS, LCM).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .schedules import sigma_to_t


def to_x0_eps(output: torch.Tensor, x_t: torch.Tensor, alpha, sigma, prediction_type: str):
    """(x0, eps) from a raw model output at x_t = alpha * x0 + sigma * eps (VP units)."""
    if prediction_type == "epsilon":
        return (x_t - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * output, alpha * output + sigma * x_t
    if prediction_type == "sample":
        return output, (x_t - alpha * output) / sigma
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; choose epsilon, v_prediction or sample")


class Denoiser:
    """Wraps `model_fn(x_in, t) -> raw output` (the UNet with guidance applied).

    alphas_cumprod: float64 (T,) training schedule; prediction_type: "epsilon" | "v_prediction" | "sample";
    timesteps_of_sigmas: {sigma: t} -- the exact timestep a scheduler feeds at each of its own
    sigmas (e.g. rounded ones); any other sigma (a midpoint of Heun or DPM2) is converted by
    log-sigma interpolation. clip_range: clamp x0 to [-r, r] (config clip_sample), or None.

    The model receives `t` as a float32 tensor of shape (B,) on x's device, holding the
    scheduler's timestep value (the UNet's time embedding casts to float32 anyway).
    """

    def __init__(self, model_fn: Callable, alphas_cumprod: torch.Tensor, prediction_type: str, *,
                 log_sigmas: np.ndarray, timesteps_of_sigmas: Optional[dict] = None,
                 clip_range: Optional[float] = None):
        self.model_fn = model_fn
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type
        self.log_sigmas = log_sigmas
        self.timesteps_of_sigmas = dict(timesteps_of_sigmas or {})
        self.clip_range = clip_range

    def sigma_to_t(self, sigma, intermediate: bool = False) -> float:
        """The timestep of a schedule sigma (exact, from the table), or the log-sigma interpolation
        of an intermediate one."""
        sigma = float(sigma)
        t = None if intermediate else self.timesteps_of_sigmas.get(sigma)
        return float(sigma_to_t(sigma, self.log_sigmas)) if t is None else t

    def _model(self, x_in: torch.Tensor, t: float) -> torch.Tensor:
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.float32, device=x_in.device)
        return self.model_fn(x_in, t_in)

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        return x0 if self.clip_range is None else x0.clamp(-self.clip_range, self.clip_range)

    def __call__(self, x: torch.Tensor, sigma, intermediate: bool = False) -> torch.Tensor:
        """x0 predicted from x = x0 + sigma * eps (VE units). intermediate: sigma lies between
        schedule points (a solver's midpoint), so its timestep is interpolated."""
        sigma = float(sigma)
        alpha = (sigma ** 2 + 1) ** -0.5  # c_in: VE -> VP
        x_t = x * alpha
        t = self.sigma_to_t(sigma, intermediate)
        x0, _ = to_x0_eps(self._model(x_t, t), x_t, alpha, sigma * alpha, self.prediction_type)
        return self._clip(x0)

    def at_timestep(self, x: torch.Tensor, t: int):
        """(x0, eps) predicted from x = x_t at training timestep t (VP units). eps is the model's,
        before x0 is clipped (as DDIM uses it)."""
        a = float(self.alphas_cumprod[int(t)])
        x0, eps = to_x0_eps(self._model(x, float(t)), x, a ** 0.5, (1 - a) ** 0.5, self.prediction_type)
        return self._clip(x0), eps
