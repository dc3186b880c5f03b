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
    "DPM fast": ("sample_dpm_fast", {}),
    "DPM adaptive": ("sample_dpm_adaptive", {}),
    # A1111's own (sd_samplers_extra.py, sd_samplers_lcm.py): restart_sample / lcm_sample below
    "Restart": ("restart", {"scheduler": "karras"}),
    "LCM": ("lcm", {}),
}
# A1111's timestep samplers (sd_samplers_timesteps.py): timestep_sample below
TIMESTEP_LABELS = ("DDIM", "PLMS", "DDIM CFG++")
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
    except ImportError as e:
        import pytest

        pytest.skip(f"needs k-diffusion ({e}): pip install --no-deps k-diffusion==0.1.1.post1 torchdiffeq==0.2.5 "
                    "trampoline==0.1.2 (as .ci/run does; its declared dependencies are not needed)")
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
    if label == "LCM":
        model_wrap = lcm_denoiser(lambda x, t, cond=None: model_fn(x, t), alphas_cumprod)
    else:
        model_wrap = denoiser(model_fn, alphas_cumprod, v_prediction)
    return sample_with(model_wrap, model_wrap, label, schedule, steps, seeds, shape, eta=eta, is_sdxl=is_sdxl)


def sample_with(model, model_wrap, label, schedule, steps, seeds, shape, *, eta=None, is_sdxl=False,
                init_latent=None, strength=1.0):
    """The latents A1111 (CPU RNG source, no ENSD) draws with k-diffusion's sampler of `label`:
    `model` is what the sampler calls (the CFG denoiser, or the bare wrap), `model_wrap` the
    k-diffusion denoiser whose sigmas the schedule reads. Per-image CPU generators: the first
    draw the start (times sigmas[0]), later draws the ancestral noise; the SDE samplers' noise
    from BrownianTreeNoiseSampler over the image seeds. init_latent: img2img (A1111's
    sample_img2img), the image's latents noised to the first sigma of the kept tail."""
    sampling, _ = load()
    sigmas = get_sigmas(model_wrap, label, schedule, steps, is_sdxl)
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def draw():
        return torch.stack([torch.randn(shape, generator=g) for g in generators])

    if init_latent is None:
        x = draw() * sigmas[0]
    else:  # KDiffusionSampler.sample_img2img: t_enc = int(min(strength, 0.999) * steps), the tail of the sigmas
        t_enc = int(min(strength, 0.999) * steps)
        sigmas = sigmas[steps - t_enc - 1:]
        x = init_latent + draw() * sigmas[0]
    funcname, options = A1111_K_SAMPLERS[label]
    func = {"restart": restart_sample, "lcm": lcm_sample}.get(funcname) or getattr(sampling, funcname)
    parameters = inspect.signature(func).parameters
    kwargs = {}
    if "eta" in parameters:
        kwargs["eta"] = 1.0 if eta is None else eta
    if "sigma_min" in parameters:  # DPM fast / adaptive: the model's range (and steps), not the sigmas
        kwargs.update(sigma_min=model_wrap.sigmas[0].item(), sigma_max=model_wrap.sigmas[-1].item())
        if "n" in parameters:
            kwargs["n"] = steps
    else:
        kwargs["sigmas"] = sigmas
    if options.get("brownian_noise"):
        kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                                    seed=list(seeds))
    if "solver_type" in options:
        kwargs["solver_type"] = options["solver_type"]
    saved = sampling.torch
    sampling.torch = _TorchHijack(draw)
    try:
        with torch.no_grad():
            return func(model, x, extra_args={"cond": None}, disable=True, **kwargs)
    finally:
        sampling.torch = saved


# ---------------------------------------------------------------------------
# A1111's own samplers, written from its modules' description (not shared with sdengine's code)
# ---------------------------------------------------------------------------

def restart_sample(model, x, sigmas, extra_args=None, disable=None):
    """A1111's Restart (sd_samplers_extra.restart_sampler; Xu et al. 2023) from k-diffusion's parts:
    Heun steps with k-diffusion's to_d; from 20 steps the sigmas are a Karras
    schedule of steps - K*R over the same range, and after the step nearest sigma 0.1 the run goes
    back R times to the sigma nearest 2, adding noise of std sqrt(high^2 - low^2), and takes K
    Karras steps down (K, R = 9, 1; from 36 steps steps // 4, 2)."""
    sampling, _ = load()
    steps = len(sigmas) - 1
    segments = [sigmas]
    if steps >= 20:
        k, r = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = sampling.get_sigmas_karras(steps - k * r, sigmas[-2].item(), sigmas[0].item())
        low = int(torch.argmin((sigmas - 0.1).abs()))
        high = int(torch.argmin((sigmas - 2).abs()))
        segments = [sigmas[:low + 1]]
        if high < low:
            down = sampling.get_sigmas_karras(k + 1, sigmas[low].item(), sigmas[high].item())[:-1]
            segments += [down] * r
        segments.append(sigmas[low:])
    ones = x.new_ones([x.shape[0]])
    last = None
    for segment in segments:
        if last is not None and last < segment[0]:
            x = x + sampling.torch.randn_like(x) * (segment[0] ** 2 - last ** 2) ** 0.5
        for sigma, sigma_next in zip(segment[:-1], segment[1:]):
            # Heun's step (Euler into 0); not sample_heun, which draws (unused) churn noise every step
            d = sampling.to_d(x, sigma, model(x, sigma * ones, **(extra_args or {})))
            x_next = x + d * (sigma_next - sigma)
            if sigma_next > 0:
                d_next = sampling.to_d(x_next, sigma_next, model(x_next, sigma_next * ones, **(extra_args or {})))
                x_next = x + (d + d_next) / 2 * (sigma_next - sigma)
            x = x_next
        last = segment[-1]
    return x


def lcm_denoiser(model_fn, alphas_cumprod):
    """A1111's LCMCompVisDenoiser: k-diffusion's DiscreteEpsDDPMDenoiser over the 50 timesteps
    19, 39, ..., 999; sigma -> t snaps to the nearest of them, the output is read as eps and goes
    through LCM's boundary condition (sigma_data 0.5, timestep scaled by 10)."""
    _, external = load()

    class LCMDenoiser(external.DiscreteEpsDDPMDenoiser):
        skip = 20

        def sigma_to_t(self, sigma, quantize=None):
            index = (sigma.log() - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)
            return index * self.skip + (self.skip - 1)

        def t_to_sigma(self, t):
            index = ((t - (self.skip - 1)) / self.skip).float().clamp(0, len(self.sigmas) - 1)
            return super().t_to_sigma(index)

        def get_sigmas(self, n=None):
            start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
            return torch.cat([self.t_to_sigma(torch.linspace(start, end, n)), torch.zeros(1)])

        def forward(self, input, sigma, **kwargs):
            sigma = sigma.reshape(-1)
            c_in = ((sigma ** 2 + 1) ** -0.5)[:, None, None, None]
            t = self.sigma_to_t(sigma)
            eps = self.inner_model(input * c_in, t, **kwargs)
            scaled = (t * 10.0)[:, None, None, None]
            c_skip, c_out = 0.25 / (scaled ** 2 + 0.25), scaled / (scaled ** 2 + 0.25) ** 0.5
            return c_out * (input - sigma[:, None, None, None] * eps) + c_skip * input

    kept = alphas_cumprod[19::20]
    return LCMDenoiser(model_fn, kept, quantize=None)


def lcm_sample(model, x, sigmas, extra_args=None, disable=None):
    """A1111's sample_lcm: x <- the model's x0, plus sigma_next times fresh noise (k-diffusion's torch)."""
    sampling, _ = load()
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **extra_args)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * sampling.torch.randn_like(x)
    return x


class TimestepCFG:
    """A1111's CFGDenoiserTimesteps over a model_fn(x, t, cond) -> raw output: eps per row (a v
    output through ldm's sqrt_alphas_cumprod at int(t)), cond and uncond rows combined with
    cond_scale * cond_scale_multiplier; the unconditional eps kept for CFG++. With cond None, no
    guidance (the stand-in models)."""

    def __init__(self, model_fn, alphas_cumprod64, cond=None, uncond=None, cond_scale=1.0, v_prediction=False):
        self.model_fn, self.cond, self.uncond, self.cond_scale = model_fn, cond, uncond, cond_scale
        self.sqrt_a = alphas_cumprod64.sqrt().float()
        self.sqrt_1m_a = (1 - alphas_cumprod64).sqrt().float()
        self.v_prediction = v_prediction
        self.cond_scale_multiplier, self.last_noise_uncond = 1.0, None

    def _eps(self, x, t):
        cond = None if self.cond is None else torch.cat([self.cond, self.uncond])
        rows = x if cond is None else torch.cat([x, x])
        t_rows = t if cond is None else torch.cat([t, t])
        out = self.model_fn(rows, t_rows, cond)
        if self.v_prediction:
            index = t_rows.to(torch.int)
            out = self.sqrt_a[index][:, None, None, None] * out + self.sqrt_1m_a[index][:, None, None, None] * rows
        return out

    def __call__(self, x, t):
        eps = self._eps(x, t)
        if self.cond is None:
            self.last_noise_uncond = eps
            return eps
        eps_cond, eps_uncond = eps.chunk(2)
        self.last_noise_uncond = eps_uncond
        return eps_uncond + (eps_cond - eps_uncond) * (self.cond_scale * self.cond_scale_multiplier)


def timestep_sample(model, alphas_cumprod, label, steps, seeds, shape, eta=0.0, init_latent=None, strength=1.0):
    """A1111's DDIM / PLMS / DDIM CFG++ (sd_samplers_timesteps_impl.py) for these seeds (CPU
    source): timesteps 1, 1 + 1000 // steps, ... (clipped to 999), x the images' first draws, and
    the loop from the last timestep down, index i stepping to timesteps[i - 1], i >= 1; img2img
    (init_latent) as sample_img2img."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def draw():
        return torch.stack([torch.randn(shape, generator=g) for g in generators])

    x = draw()
    ts = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
    if init_latent is not None:  # CompVisSampler.sample_img2img: noised to ts[t_enc], the loop over ts[:t_enc]
        t_enc = int(min(strength, 0.999) * steps)
        a_enc = alphas_cumprod[ts[t_enc]]
        x = init_latent * a_enc.sqrt() + x * (1 - a_enc).sqrt()
        ts = ts[:t_enc]
    a = alphas_cumprod[ts]
    a_prev = alphas_cumprod[torch.nn.functional.pad(ts[:-1], (1, 0))].double()
    sigma = eta * ((1 - a_prev) / (1 - a.double()) * (1 - a.double() / a_prev)) ** 0.5
    ones = torch.ones(len(seeds))
    if label == "DDIM CFG++":
        model.cond_scale_multiplier = 1 / 12.5
    history = []
    with torch.no_grad():
        for index in range(len(ts) - 1, 0, -1):
            eps = model(x, ts[index] * ones)

            def to_prev(e, direction):
                x0 = (x - (1 - a[index]).sqrt() * e) / a[index].sqrt()
                return a_prev[index].sqrt().float() * x0 + (1 - a_prev[index] - sigma[index] ** 2).sqrt().float() * direction

            if label == "PLMS":
                if not history:
                    eps_next = model(to_prev(eps, eps), ts[index - 1] * ones)
                    prime = (eps + eps_next) / 2
                else:
                    coefficients = {1: (3 / 2, -1 / 2), 2: (23 / 12, -16 / 12, 5 / 12),
                                    3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}[len(history)]
                    prime = sum(c * e for c, e in zip(coefficients, [eps] + history[::-1]))
                history = (history + [eps])[-3:]
                x = to_prev(prime, prime)
            else:
                direction = model.last_noise_uncond if label == "DDIM CFG++" else eps
                x = to_prev(eps, direction) + sigma[index].float() * draw()
    return x


__all__ = ["load", "ldm_alphas_cumprod", "denoiser", "diffusers_denoiser", "CFGDenoiser", "get_sigmas", "sample",
           "sample_with", "restart_sample", "lcm_denoiser", "lcm_sample", "TimestepCFG", "timestep_sample",
           "TIMESTEP_LABELS", "A1111_K_SAMPLERS", "SCHEDULE_LABELS"]
