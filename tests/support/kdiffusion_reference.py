"""k-diffusion driven as AUTOMATIC1111's web UI drives it: the reference of sdengine's A1111 rules.

How k-diffusion is imported. The PyPI package (k-diffusion 0.1.1.post1, whose sampling.py and
external.py equal the commit A1111 pins, ab527a9) runs `from . import augmentation, config,
evaluation, ...` in its __init__, which needs clean-fid, clip, kornia, wandb and torchvision;
torchvision from PyPI does not import beside the torch CPU build CI uses. The samplers need none
of that: `load()` imports k_diffusion.sampling and k_diffusion.external as submodules of a bare
package object (the installed files, unchanged), with a stand-in for the one torchvision module
k_diffusion/utils.py imports at the top (torchvision.transforms.functional, used only by its
PIL-conversion helpers, which raise if called) while those two modules load. CI installs
k-diffusion, torchsde, trampoline and torchdiffeq with --no-deps (.ci/run).

What A1111 does around k-diffusion (stable-diffusion-webui modules/sd_samplers_kdiffusion.py,
sd_schedulers.py, rng.py) is written here from its description, independently of
sdengine/samplers/a1111.py: the sampler table, get_sigmas, the start at noise * sigmas[0], the
per-image CPU generators behind TorchHijack.randn_like, and BrownianTreeNoiseSampler per seed.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types

import numpy as np
import torch

# label -> (k-diffusion function, A1111's options), as samplers_k_diffusion lists them (A1111 1.10)
A1111_K_SAMPLERS = {
    "DPM++ 2M": ("sample_dpmpp_2m", {"scheduler": "karras"}),
    "DPM++ SDE": ("sample_dpmpp_sde", {"scheduler": "karras", "brownian_noise": True}),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", {"scheduler": "exponential", "brownian_noise": True}),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", {"scheduler": "exponential", "brownian_noise": True,
                                                  "solver_type": "heun"}),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", {"scheduler": "karras"}),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", {"scheduler": "exponential", "discard_next_to_last_sigma": True,
                                             "brownian_noise": True}),
    "Euler a": ("sample_euler_ancestral", {}),
    "Euler": ("sample_euler", {}),
    "LMS": ("sample_lms", {}),
    "Heun": ("sample_heun", {}),
    "DPM2": ("sample_dpm_2", {"scheduler": "karras", "discard_next_to_last_sigma": True}),
    "DPM2 a": ("sample_dpm_2_ancestral", {"scheduler": "karras", "discard_next_to_last_sigma": True}),
}
SCHEDULE_LABELS = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                   "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")

_loaded = None


def load():
    """(k_diffusion.sampling, k_diffusion.external), without the package's __init__."""
    global _loaded
    if _loaded is not None:
        return _loaded
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        import pytest

        pytest.fail("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1 torchsde "
                    "trampoline torchdiffeq (the `test` extra / .ci/run)")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    saved = {name: sys.modules.get(name) for name in ("k_diffusion", "torchvision", "torchvision.transforms",
                                                       "torchvision.transforms.functional")}
    sys.modules["k_diffusion"] = package
    try:
        import torchvision.transforms.functional  # noqa: F401  (a working torchvision needs no stand-in)
    except Exception:  # noqa: BLE001 (absent, or the PyPI build that does not load beside torch's CPU build)
        stand_in = types.ModuleType("torchvision.transforms.functional")

        def missing(name):
            raise AttributeError(f"torchvision.transforms.functional.{name}: torchvision stand-in "
                                 "(k-diffusion's PIL helpers are not used by its samplers)")

        stand_in.__getattr__ = missing
        transforms = types.ModuleType("torchvision.transforms")
        transforms.functional = stand_in
        torchvision = types.ModuleType("torchvision")
        torchvision.transforms = transforms
        sys.modules.update({"torchvision": torchvision, "torchvision.transforms": transforms,
                            "torchvision.transforms.functional": stand_in})
    try:
        import k_diffusion.external as external
        import k_diffusion.sampling as sampling
    finally:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            if saved[name] is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved[name]
    _loaded = sampling, external
    return _loaded


def ldm_alphas_cumprod(beta_start=0.00085, beta_end=0.012, n=1000) -> torch.Tensor:
    """The LDM model's alphas_cumprod (ldm/models/diffusion/ddpm.py register_schedule, "linear"
    schedule = linear in sqrt(beta)): float64 arithmetic, stored as float32."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)


class _LDM(torch.nn.Module):
    """What CompVisDenoiser wraps: alphas_cumprod and apply_model(x, t) -> the model output."""

    def __init__(self, model_fn, alphas_cumprod):
        super().__init__()
        self.model_fn, self.alphas_cumprod = model_fn, alphas_cumprod

    def apply_model(self, x, t, cond=None):
        return self.model_fn(x, t)


def denoiser(model_fn, alphas_cumprod, v_prediction=False):
    _, external = load()
    cls = external.CompVisVDenoiser if v_prediction else external.CompVisDenoiser
    return cls(_LDM(model_fn, alphas_cumprod), quantize=False)


def get_sigmas(model_wrap, label: str, schedule: str, steps: int, is_sdxl=False) -> torch.Tensor:
    """A1111's KDiffusionSampler.get_sigmas, schedules as sd_schedulers.py defines them."""
    sampling, _ = load()
    options = A1111_K_SAMPLERS[label][1]
    discard = options.get("discard_next_to_last_sigma", False)
    n = steps + 1 if discard else steps
    name = options.get("scheduler") if schedule == "Automatic" else schedule.lower().replace(" ", "_")
    sigma_min, sigma_max = model_wrap.sigmas[0].item(), model_wrap.sigmas[-1].item()

    def by_timesteps(timesteps):
        return torch.FloatTensor([model_wrap.t_to_sigma(t) for t in timesteps] + [0.0])

    start, end = model_wrap.sigma_to_t(torch.tensor(sigma_max)), model_wrap.sigma_to_t(torch.tensor(sigma_min))
    if name in (None, "uniform"):
        sigmas = model_wrap.get_sigmas(n)
    elif name == "karras":
        sigmas = sampling.get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0)
    elif name == "exponential":
        sigmas = sampling.get_sigmas_exponential(n, sigma_min, sigma_max)
    elif name == "polyexponential":
        sigmas = sampling.get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0)
    elif name == "sgm_uniform":
        sigmas = by_timesteps(torch.linspace(start, end, n + 1)[:-1])
    elif name == "normal":
        sigmas = by_timesteps(torch.linspace(start, end, n))
    elif name == "kl_optimal":
        k = torch.arange(n + 1)
        sigmas = torch.tan(k / n * torch.arctan(torch.tensor(sigma_min)) +
                           (1 - k / n) * torch.arctan(torch.tensor(sigma_max)))
    elif name == "align_your_steps":
        table = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029] if is_sdxl else \
            [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        if n != len(table):
            logs = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), np.log(table[::-1]))
            table = list(np.exp(logs)[::-1])
        sigmas = torch.FloatTensor(list(table) + [0.0])
    elif name == "simple":
        stride = len(model_wrap.sigmas) / n
        sigmas = torch.FloatTensor([float(model_wrap.sigmas[-(1 + int(i * stride))]) for i in range(n)] + [0.0])
    elif name == "ddim":
        stride = max(len(model_wrap.sigmas) // n, 1)
        sigmas = torch.FloatTensor([float(s) for s in model_wrap.sigmas[1::stride]][::-1] + [0.0])
    elif name == "beta":
        from scipy import stats

        quantiles = [stats.beta.ppf(q, 0.6, 0.6) for q in 1 - np.linspace(0, 1, n)]
        sigmas = torch.FloatTensor([sigma_min + q * (sigma_max - sigma_min) for q in quantiles] + [0.0])
    else:
        raise ValueError(schedule)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


class _TorchHijack:
    """A1111's TorchHijack: k-diffusion's torch.randn_like draws the images' next noise."""

    def __init__(self, draw):
        self.draw = draw

    def __getattr__(self, name):
        return self.randn_like if name == "randn_like" else getattr(torch, name)

    def randn_like(self, x):
        return self.draw()


class CFGDenoiser:
    """A1111's CFGDenoiser (modules/sd_samplers_cfg_denoiser.py) for one prompt per image: the
    batch [cond rows, uncond rows] through the k-diffusion denoiser `inner`, then
    denoised = uncond + (cond - uncond) * cond_scale on the denoised (x0) outputs."""

    def __init__(self, inner, cond, uncond, cond_scale):
        self.inner, self.cond, self.uncond, self.cond_scale = inner, cond, uncond, cond_scale
        self.sigmas = inner.sigmas  # A1111's get_sigmas reads the model's sigmas from the wrap

    def __call__(self, x, sigma, **kwargs):
        x_out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([self.cond, self.uncond]))
        denoised_cond, denoised_uncond = x_out.chunk(2)
        return denoised_uncond + (denoised_cond - denoised_uncond) * self.cond_scale


def diffusers_denoiser(unet, alphas_cumprod, v_prediction=False):
    """k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser over a diffusers UNet
    (what CompVisDenoiser / CompVisVDenoiser are, over LDM's apply_model)."""
    _, external = load()

    def unet_fn(x, t, cond):
        return unet(x, t, encoder_hidden_states=cond).sample

    cls = external.DiscreteVDDPMDenoiser if v_prediction else external.DiscreteEpsDDPMDenoiser
    return cls(unet_fn, alphas_cumprod, quantize=False)


def sample(model_fn, alphas_cumprod, label, schedule, steps, seeds, shape, *, v_prediction=False, eta=None,
           is_sdxl=False):
    """The latents A1111 (CPU RNG source, no ENSD) draws with k-diffusion for these seeds, over
    a random stand-in model_fn(x_in, t) (see sample_with)."""
    model_wrap = denoiser(model_fn, alphas_cumprod, v_prediction)
    return sample_with(model_wrap, model_wrap, label, schedule, steps, seeds, shape, eta=eta, is_sdxl=is_sdxl)


def sample_with(model, model_wrap, label, schedule, steps, seeds, shape, *, eta=None, is_sdxl=False):
    """The latents A1111 (CPU RNG source, no ENSD) draws with k-diffusion's sampler of `label`:
    `model` is what the sampler calls (the CFG denoiser, or the bare wrap), `model_wrap` the
    k-diffusion denoiser whose sigmas the schedule reads. Per-image CPU generators: the first
    draw the start (times sigmas[0]), later draws the ancestral noise; the SDE samplers' noise
    from BrownianTreeNoiseSampler over the image seeds."""
    sampling, _ = load()
    sigmas = get_sigmas(model_wrap, label, schedule, steps, is_sdxl)
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def draw():
        return torch.stack([torch.randn(shape, generator=g) for g in generators])

    x = draw() * sigmas[0]
    funcname, options = A1111_K_SAMPLERS[label]
    func = getattr(sampling, funcname)
    kwargs = {}
    if "eta" in inspect.signature(func).parameters:
        kwargs["eta"] = 1.0 if eta is None else eta
    if options.get("brownian_noise"):
        kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                                    seed=list(seeds))
    if "solver_type" in options:
        kwargs["solver_type"] = options["solver_type"]
    saved = sampling.torch
    sampling.torch = _TorchHijack(draw)
    try:
        with torch.no_grad():
            return func(model, x, sigmas, extra_args={"cond": None}, disable=True, **kwargs)
    finally:
        sampling.torch = saved


__all__ = ["load", "ldm_alphas_cumprod", "denoiser", "diffusers_denoiser", "CFGDenoiser", "get_sigmas", "sample",
           "sample_with", "A1111_K_SAMPLERS", "SCHEDULE_LABELS"]
