"""A1111's random numbers: its seeds, variation seeds, seed resizing, ENSD and RNG sources.

Written from AUTOMATIC1111/stable-diffusion-webui modules/rng.py, modules/rng_philox.py and
modules/sd_samplers_kdiffusion.py (create_noise_sampler), and k-diffusion's sampling.py
(BrownianTreeNoiseSampler):

- every image has its own generator, seeded with its seed; its first draw is the image's
  starting noise (C, h, w), and each later draw (`ImageNoise.next`) is the noise of one step of
  an ancestral sampler, all images stacked;
- a variation seed mixes the first draw of the subseed into the start by spherical
  interpolation (`slerp`) with weight subseed_strength;
- "resize seed from" draws the seed's noise at another size and pastes it centred into a
  fresh draw at this size;
- ENSD (eta noise seed delta): after the start, each image's generator restarts from
  seed + ENSD;
- sources: "cpu" (torch's CPU generator, moved to the device), "gpu" (CUDA's generator on a CUDA
  device) and "nv" (Philox 4x32-10 with a Box-Muller transform: the numbers CUDA's torch.randn
  draws, computed with numpy on any device);
- the SDE samplers draw their noise from one Brownian tree per image seed (torchsde), queried
  over each step's sigma interval, instead of from the generators.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np
import torch

SOURCES = ("cpu", "nv", "gpu")


# ---------------------------------------------------------------------------
# "NV": CUDA's torch.randn on any device (Salmon et al., "Parallel Random Numbers: As Easy as
# 1, 2, 3", SC 2011: Philox 4x32 with 10 rounds)
# ---------------------------------------------------------------------------

_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))   # round multipliers
_PHILOX_W = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))   # key increments (golden ratio, sqrt(3) - 1)
_TWO_POW32_INV = np.float32(2.3283064e-10)                    # 2^-32 as CUDA's curand writes it
_TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)


def _mulhilo(a: np.ndarray, m: np.uint64):
    """(high, low) 32-bit halves of the 64-bit products a * m."""
    product = a.astype(np.uint64) * m
    return (product >> np.uint64(32)).astype(np.uint32), (product & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox 4x32: counter (4, N) uint32 and key (2, N) uint32 -> 4 x N random uint32."""
    c0, c1, c2, c3 = (counter[i].copy() for i in range(4))
    k0, k1 = key[0].copy(), key[1].copy()
    with np.errstate(over="ignore"):
        for r in range(rounds):
            hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
            hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            if r < rounds - 1:
                k0, k1 = k0 + _PHILOX_W[0], k1 + _PHILOX_W[1]
    return np.stack([c0, c1, c2, c3])


class PhiloxGenerator:
    """A1111's "NV" generator: element i of the k-th draw of a seed is the Box-Muller normal of
    the first two words of Philox(counter = (k, 0, i, 0), key = the seed's two 32-bit halves)."""

    def __init__(self, seed: int):
        self.seed, self.offset = int(seed), 0

    def randn(self, shape) -> np.ndarray:
        n = int(np.prod(shape))
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        key = np.array([[self.seed & 0xFFFFFFFF], [(self.seed >> 32) & 0xFFFFFFFF]], dtype=np.uint32).repeat(n, 1)
        words = philox4x32(counter, key)
        u = words[0] * _TWO_POW32_INV + _TWO_POW32_INV / 2      # in (0, 1)
        v = words[1] * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2  # in (0, 2 pi)
        return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(shape)


# ---------------------------------------------------------------------------
# Draws from a source
# ---------------------------------------------------------------------------

def check_source(source: str, device) -> None:
    if source not in SOURCES:
        raise ValueError(f"rng must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "gpu" and torch.device(device).type != "cuda":
        raise ValueError(f"rng='gpu' (A1111's default, what an infotext without an RNG field means) is CUDA's "
                         f"generator and needs a CUDA device, not {torch.device(device).type}; rng='nv' draws "
                         f"the same numbers as CUDA's torch.randn on any device")


class _Generator:
    """One seed's stream of draws from a source."""

    def __init__(self, seed: int, source: str, device):
        self.source, self.device = source, torch.device(device)
        if source == "nv":
            self.generator = PhiloxGenerator(seed)
        else:
            self.generator = torch.Generator("cuda" if source == "gpu" else "cpu").manual_seed(int(seed))

    def randn(self, shape) -> torch.Tensor:
        if self.source == "nv":
            return torch.from_numpy(self.generator.randn(shape)).to(self.device)
        if self.source == "gpu":
            return torch.randn(shape, generator=self.generator, device=self.generator.device).to(self.device)
        return torch.randn(shape, generator=self.generator).to(self.device)


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two noise tensors (C, h, w) by `strength`, over the norms of
    dim 1 as A1111 takes them; a plain lerp when they are nearly parallel."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - strength) * omega) / so).unsqueeze(1) * low + \
        (torch.sin(strength * omega) / so).unsqueeze(1) * high


class ImageNoise:
    """A1111's ImageRNG: per-image generators for a batch of images of latent shape (C, h, w).

    first(): the starting noise (N, C, h, w), with variation seeds and seed resizing applied;
    next(): one more draw per image (an ancestral step's noise), from seed + ENSD when ENSD is set.
    """

    def __init__(self, shape, seeds: Sequence[int], *, subseeds: Sequence[int] = (), subseed_strength: float = 0.0,
                 seed_resize_from: Optional[tuple] = None, eta_noise_seed_delta: int = 0, source: str = "cpu",
                 device="cpu", downscale: int = 8):
        check_source(source, device)
        self.shape, self.seeds, self.subseeds = tuple(int(s) for s in shape), list(seeds), list(subseeds)
        self.subseed_strength, self.ensd, self.source, self.device = subseed_strength, eta_noise_seed_delta, source, device
        self.resized = None if not seed_resize_from else \
            (self.shape[0], seed_resize_from[1] // downscale, seed_resize_from[0] // downscale)
        self.generators = [_Generator(seed, source, device) for seed in self.seeds]
        self.started = False

    def _fresh(self, seed: int, shape) -> torch.Tensor:
        return _Generator(seed, self.source, self.device).randn(shape)

    def first(self) -> torch.Tensor:
        noise_shape = self.resized or self.shape
        images = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            noise = self._fresh(seed, noise_shape) if self.resized else generator.randn(self.shape)
            if self.subseed_strength:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                noise = slerp(self.subseed_strength, noise, self._fresh(subseed, noise_shape))
            if self.resized:
                noise = _paste_centred(noise, generator.randn(self.shape))
            images.append(noise)
        if self.ensd:
            self.generators = [_Generator(seed + self.ensd, self.source, self.device) for seed in self.seeds]
        self.started = True
        return torch.stack(images)

    def next(self) -> torch.Tensor:
        if not self.started:
            return self.first()
        return torch.stack([generator.randn(self.shape) for generator in self.generators])


def _paste_centred(noise: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """`noise` (C, h', w') centred on `canvas` (C, h, w): cropped where it is larger."""
    dx, dy = (canvas.shape[2] - noise.shape[2]) // 2, (canvas.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    canvas[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
    return canvas


class BrownianNoise:
    """The noise of A1111's SDE samplers: one Brownian tree per image seed over
    [sigma_min, sigma_max] (torchsde.BrownianTree on x's device), normalised per interval:
    noise(sigma, sigma_next) = W(sigma, sigma_next) / sqrt(|sigma_next - sigma|)."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds: Sequence[int]):
        try:
            import torchsde
        except ImportError:
            raise ImportError("A1111's SDE samplers (DPM++ SDE, 2M SDE, 3M SDE) draw their noise from a Brownian "
                              "tree: pip install 'sdengine[a1111]' (torchsde)") from None
        t0, t1 = torch.tensor(float(sigma_min)), torch.tensor(float(sigma_max))
        self.t0, self.t1 = (t0, t1) if t0 < t1 else (t1, t0)
        self.sign = 1 if t0 < t1 else -1
        w0 = torch.zeros_like(x[0])
        self.trees = [torchsde.BrownianTree(self.t0, w0, self.t1, entropy=int(seed)) for seed in seeds]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = torch.tensor(float(sigma)), torch.tensor(float(sigma_next))
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        with warnings.catch_warnings():  # torchsde warns when a query rounds past the tree's ends (A1111's too)
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * (self.sign * sign)
        return w / (b - a).abs().sqrt()
