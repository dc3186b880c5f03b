"""Samplers over a list of training timesteps, in their natural (VP) form, one step at a time.

Each sampler is a step factory, as in sigma_samplers.py

    step = <name>(model, timesteps, noise, **schedule);  x = step(x, i)   # for i in range(len(timesteps))

- model(x, t) -> (x0, eps) at x = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps (`Denoiser.at_timestep`),
  a_t = alphas_cumprod[t];
- timesteps: descending integer timesteps, one per model evaluation (one step each);
- the schedule keywords give alphas_cumprod and where each step lands;
- noise() -> standard normal like x (stochastic samplers only).
"""

from __future__ import annotations

import torch


def _alpha(alphas_cumprod, t: int, final_alpha_cumprod: float) -> float:
    """alphas_cumprod[t], or the final value past the end of the schedule (t < 0)."""
    return float(alphas_cumprod[t]) if t >= 0 else float(final_alpha_cumprod)


def ddim(model, timesteps, noise, *, prev_timesteps, alphas_cumprod, final_alpha_cumprod, eta=0.0):
    """DDIM: Song et al., "Denoising Diffusion Implicit Models" (2021), eq. 12. eta=0 is the
    deterministic sampler, eta=1 has DDPM's posterior variance. Step i goes from timesteps[i]
    to prev_timesteps[i] (< 0: to final_alpha_cumprod)."""

    @torch.no_grad()
    def step(x, i):
        t, t_prev = int(timesteps[i]), int(prev_timesteps[i])
        x0, eps = model(x, t)
        a_t = _alpha(alphas_cumprod, t, final_alpha_cumprod)
        a_prev = _alpha(alphas_cumprod, t_prev, final_alpha_cumprod)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * variance ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        return x + std * noise() if eta > 0 else x

    return step


def ddpm(model, timesteps, noise, *, prev_timesteps, alphas_cumprod, variance_type="fixed_small"):
    """Ancestral sampling of DDPM: Ho et al., "Denoising Diffusion Probabilistic Models" (2020),
    eq. 6-7 (posterior mean from x0 and x_t) with variance beta-tilde ("fixed_small") or beta
    ("fixed_large"); strided steps use the betas between the two timesteps (Nichol & Dhariwal 2021)."""
    # The step coefficients are computed in float32, as diffusers' DDPMScheduler does: for fine
    # steps 1 - a_t / a_prev cancels, and diffusers' rounding there is part of its result.
    alphas32 = torch.as_tensor(alphas_cumprod).to(torch.float32)

    @torch.no_grad()
    def step(x, i):
        t, t_prev = int(timesteps[i]), int(prev_timesteps[i])
        x0, _ = model(x, t)
        a_t = alphas32[t]
        a_prev = alphas32[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        beta_t = 1 - a_t / a_prev
        x0_coeff = float(a_prev ** 0.5 * beta_t / (1 - a_t))
        x_coeff = float((a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t))
        x = x0_coeff * x0 + x_coeff * x
        if t > 0:
            variance = beta_t if variance_type == "fixed_large" else \
                ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
            x = x + float(variance ** 0.5) * noise()
        return x

    return step


def _pndm_update(x, t: int, t_prev: int, eps, alphas_cumprod, final_alpha_cumprod):
    """The transfer phi(x_t, eps, t -> t_prev) of Liu et al. 2022, eq. 9 (a DDIM step)."""
    a_t = float(alphas_cumprod[t])
    a_prev = _alpha(alphas_cumprod, t_prev, final_alpha_cumprod)
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom


def pndm(model, timesteps, noise, *, stride, alphas_cumprod, final_alpha_cumprod):
    """PLMS, the pseudo linear multistep method: Liu et al., "Pseudo Numerical Methods for
    Diffusion Models on Manifolds" (2022), eq. 12, with diffusers' start (skip_prk_steps): the
    first step is taken twice, Euler then a 2-point average, then Adams-Bashforth of order 2-4 on eps.
    `timesteps` is diffusers' plms_timesteps (its second entry repeated); stride = T // steps.
    The multistep combination is taken over eps, as the paper defines it, for every prediction
    type; diffusers' PNDMScheduler combines raw v outputs of a v-prediction model instead (so for
    v-prediction the two differ, by ~1e-3 relative per step)."""
    last = {"ets": [], "x": None}  # the last four eps; the first step's start, which step 1 redoes

    @torch.no_grad()
    def step(x, counter):
        t = int(timesteps[counter])
        _, eps = model(x, t)
        t_prev = t - stride
        ets = last["ets"]
        if counter != 1:
            ets = last["ets"] = ets[-3:] + [eps]
        else:  # the repeated step redoes the first one, from its start
            t_prev, t = t, t + stride
        if len(ets) == 1 and counter == 0:
            e, last["x"] = eps, x
        elif len(ets) == 1 and counter == 1:
            e, x, last["x"] = (eps + ets[-1]) / 2, last["x"], None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        return _pndm_update(x, t, t_prev, e, alphas_cumprod, final_alpha_cumprod)

    return step


def lcm(model, timesteps, noise, *, alphas_cumprod, timestep_scaling=10.0, sigma_data=0.5):
    """Multistep consistency sampling: Luo et al., "Latent Consistency Models" (2023),
    Algorithm 1 (Song et al., "Consistency Models", 2023, Algorithm 1): at each step the
    consistency function c_skip * x + c_out * x0, re-noised to the next timestep."""
    n = len(timesteps)

    @torch.no_grad()
    def step(x, i):
        t = int(timesteps[i])
        x0, _ = model(x, t)
        scaled_t = t * timestep_scaling
        c_skip = sigma_data ** 2 / (scaled_t ** 2 + sigma_data ** 2)
        c_out = scaled_t / (scaled_t ** 2 + sigma_data ** 2) ** 0.5
        denoised = c_out * x0 + c_skip * x
        if i == n - 1:
            return denoised
        a_prev = float(alphas_cumprod[int(timesteps[i + 1])])
        return a_prev ** 0.5 * denoised + (1 - a_prev) ** 0.5 * noise()

    return step
