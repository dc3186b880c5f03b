"""Samplers over a sigma schedule (k-diffusion's sampling.py, one step at a time).

Each sampler is a step factory

    step = <name>(model, sigmas, noise, **options);  x = step(x, i)   # for i in range(len(sigmas) - 1)

and `samplers.sample` runs the one loop over steps, for these, the timestep samplers and a
backend's fused step alike. A step returns the state after step i and keeps what a multistep
method needs (previous denoised predictions) in its closure, so steps run in order, once each.
- model(x, sigma) -> x0, in VE units (x = x0 + sigma * eps): a `Denoiser`. Evaluations between
  schedule points (the midpoints of DPM-2 and DPM++ SDE) pass intermediate=True: the UNet then
  gets the interpolated timestep of that sigma, as in diffusers, even where it coincides with
  a (rounded) schedule timestep;
- x at step 0: the starting latents, x = x0 + sigmas[0] * eps;
- sigmas: descending 1-D float64 tensor, the last entry the final sigma (usually 0);
- noise(sigma, sigma_next) -> a fresh standard-normal tensor shaped like x for the step (or
  substep) from sigma to sigma_next (stochastic samplers only; A1111's SDE samplers draw it
  from a Brownian tree over that interval, k-diffusion's noise_sampler).

They are written so that they equal diffusers' schedulers step for step: where diffusers
differs from k-diffusion (the lower-order final step of DPM-Solver++, UniPC's corrector),
the options below select diffusers' behaviour.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.polynomial import polynomial as P


def to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma = (x - x0) / sigma (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0):
    """Split a step to sigma_to into a deterministic step down to sigma_down and fresh noise
    of std sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_to^2 (k-diffusion get_ancestral_step)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _log_midpoint(sigma_a: float, sigma_b: float) -> float:
    """exp((log a + log b) / 2), rounded through float32 as diffusers' KDPM2 schedulers compute it
    (so that the UNet gets the same interpolated timestep there)."""
    a, b = torch.tensor([sigma_a, sigma_b], dtype=torch.float32).log()
    return float(a.lerp(b, 0.5).exp())


def sigma_pair(sigmas, i: int):
    return float(sigmas[i]), float(sigmas[i + 1])


def euler(model, sigmas, noise):
    """Euler's method on the probability-flow ODE (Karras et al., "Elucidating the Design Space
    of Diffusion-Based Generative Models", 2022, Algorithm 2 without churn)."""

    @torch.no_grad()
    def step(x, i):
        sigma, sigma_next = sigma_pair(sigmas, i)
        return x + to_d(x, sigma, model(x, sigma)) * (sigma_next - sigma)

    return step


def euler_ancestral(model, sigmas, noise, *, eta=1.0):
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of std sigma_up
    (k-diffusion sample_euler_ancestral; Song et al., "Score-Based Generative Modeling through
    SDEs", 2021, ancestral sampling)."""

    @torch.no_grad()
    def step(x, i):
        sigma, sigma_next = sigma_pair(sigmas, i)
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        return x + noise(sigma, sigma_next) * sigma_up if sigma_next > 0 else x

    return step


def heun(model, sigmas, noise):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); Euler on the last step to sigma 0."""

    @torch.no_grad()
    def step(x, i):
        sigma, sigma_next = sigma_pair(sigmas, i)
        d = to_d(x, sigma, model(x, sigma))
        dt = sigma_next - sigma
        if sigma_next == 0:
            return x + d * dt
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next))
        return x + (d + d_2) / 2 * dt

    return step


def dpm_2(model, sigmas, noise):
    """DPM-Solver-2 in the midpoint form of k-diffusion (Lu et al., "DPM-Solver", 2022,
    Algorithm 4; Karras et al. 2022): a half step to the log-midpoint sigma, then the full
    step with the derivative there."""

    @torch.no_grad()
    def step(x, i):
        sigma, sigma_next = sigma_pair(sigmas, i)
        return _dpm_2_step(model, x, sigma, sigma_next, model(x, sigma))

    return step


def _dpm_2_step(model, x, sigma, sigma_to, denoised):
    """One DPM-Solver-2 step from sigma to sigma_to: Euler to the log-midpoint sigma, then the
    full step with the derivative there (a plain Euler step when sigma_to is 0)."""
    d = to_d(x, sigma, denoised)
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = _log_midpoint(sigma, sigma_to)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid, intermediate=True))
    return x + d_2 * (sigma_to - sigma)


def dpm_2_ancestral(model, sigmas, noise, *, eta=1.0):
    """Ancestral DPM-Solver-2 (k-diffusion sample_dpm_2_ancestral): a DPM-2 step down to sigma_down,
    then fresh noise of std sigma_up."""

    @torch.no_grad()
    def step(x, i):
        sigma, sigma_next = sigma_pair(sigmas, i)
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = _dpm_2_step(model, x, sigma, sigma_down, denoised)
        return x + noise(sigma, sigma_next) * sigma_up if sigma_down != 0 else x

    return step


def _lms_coefficient(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """Integral from sigmas[i] to sigmas[i+1] of the Lagrange basis polynomial through
    sigmas[i], ..., sigmas[i-order+1] that is 1 at sigmas[i-j] (exact polynomial integration)."""
    others = [sigmas[i - k] for k in range(order) if k != j]
    poly = P.polyfromroots(others) / np.prod([sigmas[i - j] - s for s in others]) if others else np.array([1.0])
    antiderivative = P.polyint(poly)
    return float(P.polyval(sigmas[i + 1], antiderivative) - P.polyval(sigmas[i], antiderivative))


def lms(model, sigmas, noise, *, order=4):
    """Linear multistep method of order 4 on the probability-flow ODE, with the step-size-aware
    Lagrange coefficients of k-diffusion (Karras et al. 2022 / Liu et al., "Pseudo Numerical
    Methods for Diffusion Models", 2022). On an img2img tail the order restarts at 1 (as
    k-diffusion); diffusers' LMSDiscreteScheduler instead takes the order from the absolute
    step index there and mixes in coefficients of sigmas before the tail."""
    sigmas_np = np.asarray([float(s) for s in sigmas], dtype=np.float64)
    ds = []  # the derivatives of the last `order` steps, newest last

    @torch.no_grad()
    def step(x, i):
        sigma = float(sigmas[i])
        ds.append(to_d(x, sigma, model(x, sigma)))
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(cur_order, sigmas_np, i, j) for j in range(cur_order)]
        return x + sum(c * d for c, d in zip(coeffs, reversed(ds)))

    return step


def dpmpp_2m(model, sigmas, noise, *, lower_order_final=False, solver_type="midpoint"):
    """DPM-Solver++(2M): Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models" (2022), Algorithm 2, in k-diffusion's sigma form. First order on the
    first step and on a step to sigma 0; also on the last step when `lower_order_final`.
    solver_type "midpoint" (paper) or "heun" (diffusers' alternative second-order term).
    It is the ODE of dpmpp_2m_sde (eta = 0), whose terms then reduce to it exactly."""
    return dpmpp_2m_sde(model, sigmas, noise, eta=0.0, lower_order_final=lower_order_final, solver_type=solver_type)


def dpmpp_2m_sde(model, sigmas, noise, *, eta=1.0, lower_order_final=False, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE: the second-order multistep solver of the diffusion SDE in data
    prediction (Lu et al., "DPM-Solver++", 2022, sec. 5 / appendix), k-diffusion's
    sample_dpmpp_2m_sde; eta=1 is the SDE, eta=0 the ODE."""
    n = len(sigmas) - 1
    last = {"denoised": None, "h": None}  # the previous step's

    @torch.no_grad()
    def step(x, i):
        sigma, sigma_next = sigma_pair(sigmas, i)
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            coeff = -math.expm1(-h - eta_h)  # 1 - exp(-2h) for eta=1
            x = (sigma_next / sigma) * math.exp(-eta_h) * x + coeff * denoised
            if last["denoised"] is not None and not (lower_order_final and i == n - 1):
                d1 = (denoised - last["denoised"]) / (last["h"] / h)
                if solver_type == "heun":
                    x = x + (coeff / (-h - eta_h) + 1) * d1
                else:
                    x = x + 0.5 * coeff * d1
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h))
            last["h"] = h
        last["denoised"] = denoised
        return x

    return step


def dpmpp_3m_sde(model, sigmas, noise, *, eta=1.0):
    """DPM-Solver++(3M) SDE: the third-order multistep variant of DPM-Solver++ for the diffusion
    SDE (Lu et al., "DPM-Solver++", 2022), as k-diffusion's sample_dpmpp_3m_sde."""
    last = {"denoised_1": None, "denoised_2": None, "h_1": None, "h_2": None}  # one and two steps back

    @torch.no_grad()
    def step(x, i):
        sigma, sigma_next = sigma_pair(sigmas, i)
        denoised = model(x, sigma)
        denoised_1, denoised_2, h_1, h_2 = last["denoised_1"], last["denoised_2"], last["h_1"], last["h_2"]
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta))
        last.update(denoised_1=denoised, denoised_2=denoised_1, h_1=h, h_2=h_1)
        return x

    return step


def dpmpp_sde(model, sigmas, noise, *, eta=1.0, r=0.5):
    """DPM-Solver++ SDE: the second-order singlestep (2S) solver of the diffusion SDE with an
    intermediate point at fraction r of the step in lambda (Lu et al., "DPM-Solver++", 2022),
    as k-diffusion's sample_dpmpp_sde. Its noise is two independent draws per step from
    `noise(sigma, sigma_to)` for each substep (diffusers and sdengine draw them independently per
    image; A1111 from a Brownian tree per image seed)."""
    fac = 1 / (2 * r)

    @torch.no_grad()
    def step(x, i):
        sigma, sigma_next = sigma_pair(sigmas, i)
        denoised = model(x, sigma)
        if sigma_next == 0:
            return x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        s = t + (t_next - t) * r
        sigma_s = math.exp(-s)
        # Step 1: to the intermediate point s.
        sd, su = ancestral_step(sigma, sigma_s, eta)
        x_2 = (sd / sigma) * x - math.expm1(t + math.log(sd)) * denoised
        x_2 = x_2 + noise(sigma, sigma_s) * su
        denoised_2 = model(x_2, sigma_s, intermediate=True)
        # Step 2: the full step with the combined data prediction.
        sd, su = ancestral_step(sigma, sigma_next, eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sd / sigma) * x - math.expm1(t + math.log(sd)) * denoised_d
        return x + noise(sigma, sigma_next) * su

    return step


def _unipc_update(x, denoised_list, lambda_list, lambda_t, sigma_ratio, order, solver_type, model_t=None):
    """One UniPC predictor (model_t None) or corrector step (model_t = x0 at the new point) in
    VE units, from the data predictions `denoised_list` (newest last) at log-SNRs `lambda_list`."""
    m0, lambda_s0 = denoised_list[-1], lambda_list[-1]
    h = lambda_t - lambda_s0
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lambda_list[-(k + 1)] - lambda_s0) / h
        rks.append(rk)
        d1s.append((denoised_list[-(k + 1)] - m0) / rk)
    rks.append(1.0)
    rks = np.asarray(rks, dtype=np.float64)
    hh = -h  # data prediction (predict_x0)
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    factorial = 1
    R, b = [], []
    for k in range(1, order + 1):
        R.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = np.stack(R), np.asarray(b)
    x_t = sigma_ratio * x - h_phi_1 * m0
    if model_t is None:  # predictor UniP
        if d1s:
            rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            x_t = x_t - b_h * sum(float(rho) * d for rho, d in zip(rhos, d1s))
        return x_t
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b)  # corrector UniC
    correction = sum(float(rho) * d for rho, d in zip(rhos[:-1], d1s)) + float(rhos[-1]) * (model_t - m0)
    return x_t - b_h * correction


def unipc(model, sigmas, noise, *, order=2, lower_order_final=True, solver_type="bh2", disable_corrector=()):
    """UniPC: Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
    Diffusion Models" (2023), Algorithms 1-3, data-prediction form with B(h) = bh2 (or bh1),
    as diffusers' UniPCMultistepScheduler. Every model evaluation serves both the corrector
    (UniC) of the previous step and the predictor (UniP) of this one."""
    n = len(sigmas) - 1
    last = {"denoised": [], "lambda": [], "x": None, "order": None}  # the last `order` points; the last step's start

    @torch.no_grad()
    def step(x, i):
        sigma, sigma_next = sigma_pair(sigmas, i)
        denoised = model(x, sigma)
        lam = -math.log(sigma)
        if last["x"] is not None and (i - 1) not in disable_corrector:
            x = _unipc_update(last["x"], last["denoised"], last["lambda"], lam, sigma / float(sigmas[i - 1]),
                              last["order"], solver_type, model_t=denoised)
        last["denoised"] = (last["denoised"] + [denoised])[-order:]
        last["lambda"] = (last["lambda"] + [lam])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, i + 1)  # warm-up: as many previous points as exist
        last["x"], last["order"] = x, this_order
        if sigma_next == 0:
            return denoised
        return _unipc_update(x, last["denoised"], last["lambda"], -math.log(sigma_next), sigma_next / sigma,
                             this_order, solver_type)

    return step
