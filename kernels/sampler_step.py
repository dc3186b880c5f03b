"""Classifier-free guidance fused with one sampler update, one kernel per sampler family.

Each kernel reads the UNet output once (the unconditional half, then the conditional half,
as diffusers concatenates `[uncond, cond]` on the batch dim), x once (and the noise or the
previous denoised estimate where the sampler needs it), and writes each output once:

    guided = uncond + cfg_scale · (cond − uncond)       (Ho & Salimans 2022)

then converts ε- or v-prediction (Salimans & Ho 2022) to what the update needs and applies:

| op          | algorithm                                                   | x is             | per-step scalars                         |
|-------------|-------------------------------------------------------------|------------------|------------------------------------------|
| `euler`     | Euler, Karras et al. 2022 (k-diffusion `sample_euler`)      | σ-space latent   | sigma, sigma_next                        |
| `euler_a`   | Euler ancestral (k-diffusion `sample_euler_ancestral`)      | σ-space latent   | sigma, sigma_next, eta (+ noise)         |
| `ddim`      | DDIM, Song et al. 2020 (diffusers `DDIMScheduler.step`)     | VP latent        | alpha_t, alpha_prev, eta (+ noise)       |
| `dpmpp_2m`  | DPM-Solver++(2M), Lu et al. 2022 (k-diffusion `sample_dpmpp_2m`) | σ-space latent | sigma, sigma_next, sigma_prev (+ old denoised) |
| `lcm`       | LCM, Luo et al. 2023 (diffusers `LCMScheduler.step`)        | VP latent        | alpha_t, alpha_prev, c_skip, c_out (+ noise) |

Scalars, for the sampler loop (step i of a schedule):
- σ-space samplers use k-diffusion's sigmas: `sigma = sigmas[i]`, `sigma_next = sigmas[i+1]`
  (0 at the last step), `sigma_prev = sigmas[i-1]` (pass 0 at the first step: DPM++(2M) then
  takes its first-order step and ignores `old_denoised`). x is the latent in σ-space
  (x = x0 + σ·ε, i.e. diffusers' latents · init_noise_sigma), and the UNet saw
  x / sqrt(σ² + 1) at timestep t(σ); the σ-space prediction conversions are k-diffusion's
  (CompVisDenoiser: denoised = x − σ·ε; CompVisVDenoiser: denoised = x/(σ²+1) − σ·v/sqrt(σ²+1)).
- `euler_a`: `eta` scales the ancestral noise (1 = k-diffusion's default); the kernel derives
  k-diffusion's `get_ancestral_step`: σ_up = min(σ_next, eta·sqrt(σ_next²(σ²−σ_next²)/σ²)),
  σ_down = sqrt(σ_next² − σ_up²), and x_next = x + d·(σ_down − σ) + noise·σ_up.
- VP samplers take diffusers' quantities: `alpha_t = alphas_cumprod[t]`,
  `alpha_prev = alphas_cumprod[t_prev]` (or `final_alpha_cumprod` when t_prev < 0).
  DDIM's `eta` is diffusers' eta (0 = deterministic); its noise term is added when `noise` is
  given, so pass noise whenever eta > 0. LCM's `c_skip`, `c_out` are
  `LCMScheduler.get_scalings_for_boundary_condition_discrete(t)` (see `lcm_scalings`);
  LCM's noise is the fresh noise of every step but the last; pass `noise=None` at the last
  step, where x_next is the denoised sample itself.
- `cfg_scale` is the guidance scale. If the model output has x's batch (not twice it),
  guidance is off and cfg_scale is ignored (LCM with guidance embedding, or scale 1).

Names: `<name>_triton(...)` is the Triton wrapper (check shapes, allocate, launch; it also takes
`out=`), `<name>_ref(...)` the plain-torch reference with the wrapper's signature, `_<name>_kernel`
the @triton.jit kernel. The dispatching op is kernels/ops.py's `sampler_step_<name>` (public as
`sdengine.kernels.sampler_step_<name>`, registered as `torch.ops.sdengine.sampler_step_<name>`), and
a whole step's in-place update is ops.py's `sampler_update`: the one rule of kernels/ops.py picks
the kernel or the reference.

Every scalar may be a Python number or a 1-element tensor. For a CUDA graph, pass 1-element
float32 tensors on x's device and update them in place between replays: the kernels read
them on the device, so no step needs a host sync. Arithmetic is fp32 throughout; outputs
take x's dtype. `prediction_type` is "epsilon" or "v_prediction" (a compile-time constant).
"""

import torch

from ._triton import cast_out, check_launch, gpu_path, launcher, tl, triton

PREDICTION_TYPES = ("epsilon", "v_prediction")
_GPU_BLOCK = 1024


@triton.jit
def _guided(Model, offs, mask, N, cfg_scale, DO_CFG: tl.constexpr):
    """The guided model output at offs: uncond + cfg_scale·(cond − uncond), in fp32."""
    first = tl.load(Model + offs, mask=mask, other=0.0).to(tl.float32)
    out = first
    if DO_CFG:
        cond = tl.load(Model + N + offs, mask=mask, other=0.0).to(tl.float32)
        out = first + cfg_scale * (cond - first)
    return out


@triton.jit
def _denoised_sigma(x, model, sigma, V_PRED: tl.constexpr):
    """k-diffusion's denoiser output D(x; σ) from an ε- or v-prediction of σ-space x."""
    if V_PRED:
        c_skip = 1.0 / (sigma * sigma + 1.0)
        c_out = -sigma * tl.sqrt(c_skip)
        den = x * c_skip + model * c_out
    else:
        den = x - sigma * model
    return den


@triton.jit
def _x0_eps_alpha(x, model, alpha_t, V_PRED: tl.constexpr):
    """(predicted x0, predicted ε) of VP-space x from an ε- or v-prediction, as diffusers."""
    sqrt_a = tl.sqrt(alpha_t)
    sqrt_b = tl.sqrt(1.0 - alpha_t)
    if V_PRED:
        x0 = sqrt_a * x - sqrt_b * model
        eps = sqrt_a * model + sqrt_b * x
    else:
        x0 = (x - sqrt_b * model) / sqrt_a
        eps = model
    return x0, eps


@triton.jit
def _euler_kernel(Model, X, Out, CfgScale, Sigma, SigmaNext, N,
                  BLOCK: tl.constexpr, DO_CFG: tl.constexpr, V_PRED: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    sigma = tl.load(Sigma).to(tl.float32)
    sigma_next = tl.load(SigmaNext).to(tl.float32)
    model = _guided(Model, offs, mask, N, tl.load(CfgScale).to(tl.float32), DO_CFG)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    d = (x - _denoised_sigma(x, model, sigma, V_PRED)) / sigma
    tl.store(Out + offs, cast_out(x + d * (sigma_next - sigma), Out.dtype.element_ty), mask=mask)


@triton.jit
def _euler_a_kernel(Model, X, Noise, Out, CfgScale, Sigma, SigmaNext, Eta, N,
                    BLOCK: tl.constexpr, DO_CFG: tl.constexpr, V_PRED: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    sigma = tl.load(Sigma).to(tl.float32)
    sigma_next = tl.load(SigmaNext).to(tl.float32)
    eta = tl.load(Eta).to(tl.float32)
    # k-diffusion get_ancestral_step (clamped at 0 against rounding below the square roots)
    sigma_up = tl.minimum(sigma_next, eta * tl.sqrt(tl.maximum(
        sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma), 0.0)))
    sigma_down = tl.sqrt(tl.maximum(sigma_next * sigma_next - sigma_up * sigma_up, 0.0))
    model = _guided(Model, offs, mask, N, tl.load(CfgScale).to(tl.float32), DO_CFG)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(Noise + offs, mask=mask, other=0.0).to(tl.float32)
    d = (x - _denoised_sigma(x, model, sigma, V_PRED)) / sigma
    x_next = x + d * (sigma_down - sigma) + noise * sigma_up
    tl.store(Out + offs, cast_out(x_next, Out.dtype.element_ty), mask=mask)


@triton.jit
def _ddim_kernel(Model, X, Noise, Out, CfgScale, AlphaT, AlphaPrev, Eta, N,
                 BLOCK: tl.constexpr, DO_CFG: tl.constexpr, V_PRED: tl.constexpr, HAS_NOISE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    alpha_t = tl.load(AlphaT).to(tl.float32)
    alpha_prev = tl.load(AlphaPrev).to(tl.float32)
    eta = tl.load(Eta).to(tl.float32)
    variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)
    std = eta * tl.sqrt(variance)
    model = _guided(Model, offs, mask, N, tl.load(CfgScale).to(tl.float32), DO_CFG)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x0, eps = _x0_eps_alpha(x, model, alpha_t, V_PRED)
    x_prev = tl.sqrt(alpha_prev) * x0 + tl.sqrt(1.0 - alpha_prev - std * std) * eps
    if HAS_NOISE:
        x_prev += std * tl.load(Noise + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + offs, cast_out(x_prev, Out.dtype.element_ty), mask=mask)


@triton.jit
def _dpmpp_2m_kernel(Model, X, OldDenoised, Out, DenoisedOut, CfgScale, Sigma, SigmaNext, SigmaPrev, N,
                     BLOCK: tl.constexpr, DO_CFG: tl.constexpr, V_PRED: tl.constexpr, HAS_OLD: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    sigma = tl.load(Sigma).to(tl.float32)
    sigma_next = tl.load(SigmaNext).to(tl.float32)
    sigma_prev = tl.load(SigmaPrev).to(tl.float32)
    model = _guided(Model, offs, mask, N, tl.load(CfgScale).to(tl.float32), DO_CFG)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    denoised = _denoised_sigma(x, model, sigma, V_PRED)
    # t = −log σ, h = t_next − t: exp(−h) = σ_next/σ, so −expm1(−h) = 1 − σ_next/σ.
    ratio = sigma_next / sigma
    d = denoised
    if HAS_OLD:
        # Second order unless this is the first step (σ_prev ≤ 0) or the last (σ_next = 0):
        # 1/(2r) = h / (2·h_last), h_last = t − t_prev = log(σ_prev/σ).
        second = (sigma_prev > 0.0) & (sigma_next > 0.0)
        h = tl.log(sigma / tl.where(second, sigma_next, 1.0))
        h_last = tl.log(tl.where(second, sigma_prev, 2.0 * sigma) / sigma)
        w = tl.where(second, h / (2.0 * h_last), 0.0)
        old = tl.load(OldDenoised + offs, mask=tl.where(second, mask, False), other=0.0).to(tl.float32)
        d = (1.0 + w) * denoised - w * old
    x_next = ratio * x + (1.0 - ratio) * d
    tl.store(DenoisedOut + offs, cast_out(denoised, DenoisedOut.dtype.element_ty), mask=mask)
    tl.store(Out + offs, cast_out(x_next, Out.dtype.element_ty), mask=mask)


@triton.jit
def _lcm_kernel(Model, X, Noise, Out, CfgScale, AlphaT, AlphaPrev, CSkip, COut, N,
                BLOCK: tl.constexpr, DO_CFG: tl.constexpr, V_PRED: tl.constexpr, HAS_NOISE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    alpha_t = tl.load(AlphaT).to(tl.float32)
    c_skip = tl.load(CSkip).to(tl.float32)
    c_out = tl.load(COut).to(tl.float32)
    model = _guided(Model, offs, mask, N, tl.load(CfgScale).to(tl.float32), DO_CFG)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x0, eps = _x0_eps_alpha(x, model, alpha_t, V_PRED)
    denoised = c_out * x0 + c_skip * x
    x_next = denoised
    if HAS_NOISE:
        alpha_prev = tl.load(AlphaPrev).to(tl.float32)
        x_next = tl.sqrt(alpha_prev) * denoised + tl.sqrt(1.0 - alpha_prev) * tl.load(
            Noise + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + offs, cast_out(x_next, Out.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Wrappers: check shapes, allocate, launch.


def _scalar(name, value, device):
    """A 1-element float32 tensor on `device` (no copy when it already is one)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"sampler_step: {name} must hold one element; got shape {tuple(value.shape)}")
        if value.device != device or value.dtype != torch.float32:
            value = value.to(device=device, dtype=torch.float32)
        return value.reshape(1)
    return torch.full((1,), float(value), device=device, dtype=torch.float32)


def _check(name, model_out, x, prediction_type, **tensors):
    """Validate shapes; return (do_cfg, contiguous model_out, x, and the named tensors)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"sampler_step.{name}: prediction_type must be one of {PREDICTION_TYPES}; "
                         f"got {prediction_type!r}")
    if not x.is_floating_point() or x.dim() == 0:
        raise ValueError(f"sampler_step.{name}: x must be a float tensor (B, ...); got {x.dtype} {tuple(x.shape)}")
    if model_out.shape[1:] != x.shape[1:] or model_out.shape[0] not in (x.shape[0], 2 * x.shape[0]):
        raise ValueError(f"sampler_step.{name}: model_out must be (2B, ...) [uncond, cond] or (B, ...) for x "
                         f"{tuple(x.shape)}; got {tuple(model_out.shape)}")
    out = [model_out.shape[0] == 2 * x.shape[0], _flat(model_out, x), _flat(x, x)]
    for key, t in tensors.items():
        if t is not None and t.shape != x.shape:
            raise ValueError(f"sampler_step.{name}: {key} must have x's shape {tuple(x.shape)}; got {tuple(t.shape)}")
        out.append(_flat(t, x) if t is not None else None)
    return out


def _flat(t, x):
    """t in x's memory format, dense, so one flat index addresses the same element of each."""
    fmt = torch.channels_last if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                                  and not x.is_contiguous()) else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _launch(kernel, x, args, **meta):
    n = x.numel()
    block = _GPU_BLOCK if gpu_path(x) else min(65536, triton.next_power_of_2(max(n, 16)))
    launcher(kernel, x)[(triton.cdiv(n, block),)](*args, n, BLOCK=block, **meta)


def _new_out(out, x):
    if out is None:
        return torch.empty_like(x)
    if out.shape != x.shape or out.dtype != x.dtype or out.stride() != x.stride():
        raise ValueError(f"sampler_step: out must match x ({tuple(x.shape)}, {x.dtype}, strides {x.stride()})")
    return out


def euler_triton(model_out, x, cfg_scale, sigma, sigma_next, prediction_type="epsilon", *, out=None):
    """CFG + one Euler step (k-diffusion `sample_euler`, s_churn = 0) of σ-space x; returns x_next."""
    check_launch("sampler_step.euler", x)
    do_cfg, model_out, x = _check("euler", model_out, x, prediction_type)
    out = _new_out(out, x)
    dev = x.device
    _launch(_euler_kernel, x, (model_out, x, out, _scalar("cfg_scale", cfg_scale, dev),
                               _scalar("sigma", sigma, dev), _scalar("sigma_next", sigma_next, dev)),
            DO_CFG=do_cfg, V_PRED=prediction_type == "v_prediction")
    return out


def euler_a_triton(model_out, x, noise, cfg_scale, sigma, sigma_next, eta=1.0, prediction_type="epsilon", *, out=None):
    """CFG + one Euler-ancestral step (k-diffusion `sample_euler_ancestral`, s_noise = 1); returns x_next.

    noise: standard normal, x's shape (k-diffusion's `noise_sampler(sigma, sigma_next)`)."""
    check_launch("sampler_step.euler_a", x)
    do_cfg, model_out, x, noise = _check("euler_a", model_out, x, prediction_type, noise=noise)
    if noise is None:
        raise ValueError("sampler_step.euler_a: noise is required (pass torch.randn_like(x))")
    out = _new_out(out, x)
    dev = x.device
    _launch(_euler_a_kernel, x, (model_out, x, noise, out, _scalar("cfg_scale", cfg_scale, dev),
                                 _scalar("sigma", sigma, dev), _scalar("sigma_next", sigma_next, dev),
                                 _scalar("eta", eta, dev)),
            DO_CFG=do_cfg, V_PRED=prediction_type == "v_prediction")
    return out


def ddim_triton(model_out, x, cfg_scale, alpha_t, alpha_prev, eta=0.0, noise=None, prediction_type="epsilon", *,
                out=None):
    """CFG + one DDIM step (diffusers `DDIMScheduler.step`, no clipping) of VP-space x; returns x_prev."""
    check_launch("sampler_step.ddim", x)
    if noise is None and not isinstance(eta, torch.Tensor) and eta > 0:
        raise ValueError(f"sampler_step.ddim: eta={eta} > 0 needs noise (diffusers' variance_noise)")
    do_cfg, model_out, x, noise = _check("ddim", model_out, x, prediction_type, noise=noise)
    out = _new_out(out, x)
    dev = x.device
    _launch(_ddim_kernel, x, (model_out, x, noise if noise is not None else x, out,
                              _scalar("cfg_scale", cfg_scale, dev), _scalar("alpha_t", alpha_t, dev),
                              _scalar("alpha_prev", alpha_prev, dev), _scalar("eta", eta, dev)),
            DO_CFG=do_cfg, V_PRED=prediction_type == "v_prediction", HAS_NOISE=noise is not None)
    return out


def dpmpp_2m_triton(model_out, x, old_denoised, cfg_scale, sigma, sigma_next, sigma_prev, prediction_type="epsilon",
             *, out=None, denoised_out=None):
    """CFG + one DPM-Solver++(2M) step (k-diffusion `sample_dpmpp_2m`); returns (x_next, denoised).

    old_denoised: the previous step's denoised (None, or anything with sigma_prev = 0, at the
    first step). denoised_out may be old_denoised itself: each element is read before it is
    overwritten, so one buffer carries the history across steps (and across CUDA-graph replays)."""
    check_launch("sampler_step.dpmpp_2m", x)
    do_cfg, model_out, x, old_denoised = _check("dpmpp_2m", model_out, x, prediction_type,
                                                old_denoised=old_denoised)
    out = _new_out(out, x)
    denoised_out = _new_out(denoised_out, x)
    dev = x.device
    _launch(_dpmpp_2m_kernel, x, (model_out, x, old_denoised if old_denoised is not None else x, out, denoised_out,
                                  _scalar("cfg_scale", cfg_scale, dev), _scalar("sigma", sigma, dev),
                                  _scalar("sigma_next", sigma_next, dev), _scalar("sigma_prev", sigma_prev, dev)),
            DO_CFG=do_cfg, V_PRED=prediction_type == "v_prediction", HAS_OLD=old_denoised is not None)
    return out, denoised_out


def lcm_triton(model_out, x, noise, cfg_scale, alpha_t, alpha_prev, c_skip, c_out, prediction_type="epsilon", *,
               out=None):
    """CFG + one LCM step (diffusers `LCMScheduler.step`, no clipping) of VP-space x; returns x_next.

    With noise (every step but the last) x_next = sqrt(alpha_prev)·denoised + sqrt(1 − alpha_prev)·noise;
    with noise=None (the last step) x_next = denoised, diffusers' final output."""
    check_launch("sampler_step.lcm", x)
    do_cfg, model_out, x, noise = _check("lcm", model_out, x, prediction_type, noise=noise)
    out = _new_out(out, x)
    dev = x.device
    _launch(_lcm_kernel, x, (model_out, x, noise if noise is not None else x, out,
                             _scalar("cfg_scale", cfg_scale, dev), _scalar("alpha_t", alpha_t, dev),
                             _scalar("alpha_prev", alpha_prev, dev), _scalar("c_skip", c_skip, dev),
                             _scalar("c_out", c_out, dev)),
            DO_CFG=do_cfg, V_PRED=prediction_type == "v_prediction", HAS_NOISE=noise is not None)
    return out


def lcm_scalings(timestep, timestep_scaling=10.0, sigma_data=0.5):
    """(c_skip, c_out) of diffusers' `LCMScheduler.get_scalings_for_boundary_condition_discrete`."""
    scaled = torch.as_tensor(timestep, dtype=torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


# ---------------------------------------------------------------------------------------
# References: plain torch, fp32, the same signatures. Scalars may be numbers or tensors.


def _t(v):
    return torch.as_tensor(v, dtype=torch.float32).reshape(())


def _cfg_ref(model_out, x, cfg_scale):
    m = model_out.float()
    if model_out.shape[0] == 2 * x.shape[0]:
        uncond, cond = m.chunk(2)
        return uncond + _t(cfg_scale) * (cond - uncond)
    return m


def _denoised_sigma_ref(x, model, sigma, prediction_type):
    if prediction_type == "v_prediction":  # k-diffusion CompVisVDenoiser
        c_skip = 1 / (sigma**2 + 1)
        return x * c_skip + model * (-sigma / (sigma**2 + 1) ** 0.5)
    return x - sigma * model  # CompVisDenoiser


def _x0_eps_alpha_ref(x, model, alpha_t, prediction_type):
    if prediction_type == "v_prediction":
        return alpha_t**0.5 * x - (1 - alpha_t) ** 0.5 * model, alpha_t**0.5 * model + (1 - alpha_t) ** 0.5 * x
    return (x - (1 - alpha_t) ** 0.5 * model) / alpha_t**0.5, model


def euler_ref(model_out, x, cfg_scale, sigma, sigma_next, prediction_type="epsilon"):
    sigma, sigma_next, xf = _t(sigma), _t(sigma_next), x.float()
    denoised = _denoised_sigma_ref(xf, _cfg_ref(model_out, x, cfg_scale), sigma, prediction_type)
    d = (xf - denoised) / sigma  # k-diffusion to_d
    return (xf + d * (sigma_next - sigma)).to(x.dtype)


def euler_a_ref(model_out, x, noise, cfg_scale, sigma, sigma_next, eta=1.0, prediction_type="epsilon"):
    sigma, sigma_next, eta, xf = _t(sigma), _t(sigma_next), _t(eta), x.float()
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).clamp(min=0) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2).clamp(min=0) ** 0.5
    denoised = _denoised_sigma_ref(xf, _cfg_ref(model_out, x, cfg_scale), sigma, prediction_type)
    d = (xf - denoised) / sigma
    return (xf + d * (sigma_down - sigma) + noise.float() * sigma_up).to(x.dtype)


def ddim_ref(model_out, x, cfg_scale, alpha_t, alpha_prev, eta=0.0, noise=None, prediction_type="epsilon"):
    alpha_t, alpha_prev, eta, xf = _t(alpha_t), _t(alpha_prev), _t(eta), x.float()
    x0, eps = _x0_eps_alpha_ref(xf, _cfg_ref(model_out, x, cfg_scale), alpha_t, prediction_type)
    std = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)) ** 0.5
    x_prev = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
    if noise is not None:
        x_prev = x_prev + std * noise.float()
    return x_prev.to(x.dtype)


def dpmpp_2m_ref(model_out, x, old_denoised, cfg_scale, sigma, sigma_next, sigma_prev, prediction_type="epsilon"):
    sigma, sigma_next, sigma_prev, xf = _t(sigma), _t(sigma_next), _t(sigma_prev), x.float()
    denoised = _denoised_sigma_ref(xf, _cfg_ref(model_out, x, cfg_scale), sigma, prediction_type)
    ratio = sigma_next / sigma  # exp(−h)
    d = denoised
    if old_denoised is not None:
        second = (sigma_prev > 0) & (sigma_next > 0)
        h = torch.log(sigma / torch.where(second, sigma_next, 1.0))
        h_last = torch.log(torch.where(second, sigma_prev, 2 * sigma) / sigma)
        w = torch.where(second, h / (2 * h_last), 0.0)  # 1/(2r)
        old = torch.where(second, old_denoised.float(), 0.0)
        d = (1 + w) * denoised - w * old
    x_next = ratio * xf + (1 - ratio) * d  # = (σ_next/σ)·x − expm1(−h)·d
    return x_next.to(x.dtype), denoised.to(x.dtype)


def lcm_ref(model_out, x, noise, cfg_scale, alpha_t, alpha_prev, c_skip, c_out, prediction_type="epsilon"):
    alpha_t, alpha_prev, xf = _t(alpha_t), _t(alpha_prev), x.float()
    x0, _ = _x0_eps_alpha_ref(xf, _cfg_ref(model_out, x, cfg_scale), alpha_t, prediction_type)
    denoised = _t(c_out) * x0 + _t(c_skip) * xf
    if noise is None:
        return denoised.to(x.dtype)
    return (alpha_prev**0.5 * denoised + (1 - alpha_prev) ** 0.5 * noise.float()).to(x.dtype)
