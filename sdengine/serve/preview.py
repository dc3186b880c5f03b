"""Live previews: `current_image` of /sdapi/v1/progress, a cheap RGB view of the latents.

A1111's "Approx cheap" (modules/sd_vae_approx.py, cheap_approximation): each latent cell's
channels mapped to RGB by one linear map, image = latents . factors (+ bias), in [-1, 1].
The factors are A1111's for SD 1.x/2.x (the 4-channel VAE scaled by 0.18215) and for SDXL
(scaled by 0.13025); they were fitted by least squares on latent / downscaled-image pairs
(https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204). Any other
VAE (the bundled demo model's, say) gets its factors fitted when the server loads it, on
latents decoded by the model's own VAE (`fit`).

Cost: the worker keeps a reference to the latents every `every` steps (a copy the pipeline
already made for its callback: no work, no device sync). The PNG is made when a client asks
for it (GET /sdapi/v1/progress), at most once per kept step, in the asking thread; so the
denoising loop never waits for it. benchmarks/preview_cost.py measures its cost per step.

The preview shows the first image of the running batch, the latents as the sampler holds
them after the step (diffusers' callback latents: still noisy early on), at latent resolution
(1/8 of the image's side for SD; A1111's is too): a client scales it up (the web UI does, by
whole pixels). Encoding a 64x64 PNG takes well under a millisecond; a 512x512 one, some 100 ms
on a loaded CPU.
"""

from __future__ import annotations

import base64
import io
import threading
from typing import Optional

import torch

# A1111's cheap_approximation coefficients: rows are latent channels, columns R, G, B.
SD_FACTORS = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
SDXL_FACTORS = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
                (-0.3730, -0.2499, -0.2088))
SD_SCALING, SDXL_SCALING = 0.18215, 0.13025


class LatentPreview:
    """latents (C, h, w) -> RGB preview, by a linear map (C -> 3) plus a bias."""

    def __init__(self, factors, bias=(0.0, 0.0, 0.0), source: str = ""):
        self.factors = torch.as_tensor(factors, dtype=torch.float32)  # (C, 3)
        self.bias = torch.as_tensor(bias, dtype=torch.float32)        # (3,)
        self.source = source                                          # "a1111-sd", "a1111-sdxl" or "fitted"

    @classmethod
    def for_pipeline(cls, pipe) -> "LatentPreview":
        """A1111's factors for SD 1.x/2.x and SDXL VAEs; factors fitted on this VAE otherwise."""
        cfg = pipe.config
        vae = cfg.vae
        if vae.latent_channels == 4 and vae.shift_factor is None:
            if vae.scaling_factor == SDXL_SCALING and cfg.text_encoder_2 is not None:
                return cls(SDXL_FACTORS, source="a1111-sdxl")
            if vae.scaling_factor == SD_SCALING:
                return cls(SD_FACTORS, source="a1111-sd")
        return fit(pipe)

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(C, h, w) scaled latents -> (h, w, 3) uint8."""
        x = latents.detach().float()
        image = torch.einsum("chw,cr->hwr", x, self.factors.to(x.device)) + self.bias.to(x.device)
        return ((image * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    def png(self, latents: torch.Tensor) -> bytes:
        """(C, h, w) scaled latents -> PNG bytes at latent resolution (a client scales it up)."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.rgb(latents).numpy(), "RGB").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


@torch.no_grad()
def fit(pipe, n_latents: int = 64, cells: int = 8, seed: int = 0) -> LatentPreview:
    """Factors for a VAE without published ones: least squares from latent cells to the mean
    colour of the pixels each decodes to, on unit-normal latents (the scale samplers work at)
    decoded by the model's own VAE. On the demo model this halves the error of factors fitted
    on encoded images instead (0.12 against 0.27 mean absolute error on [0, 1], its
    generations' latents against their decoded images pooled to latent size)."""
    gen = torch.Generator().manual_seed(seed)
    channels = pipe.config.vae.latent_channels
    latents = torch.randn((n_latents, channels, cells, cells), generator=gen)     # (N, C, h, w)
    backend = pipe.backend
    images = pipe.decode_latents(latents.to(backend.device, backend.dtype)).float().cpu()  # (N, 3, H, W)
    down = images.shape[-1] // cells
    target = torch.nn.functional.avg_pool2d(images, kernel_size=down)           # (N, 3, h, w)
    a = latents.permute(0, 2, 3, 1).reshape(-1, channels)                       # (cells, C)
    a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1)                        # bias column
    b = target.permute(0, 2, 3, 1).reshape(-1, 3)                               # (cells, 3)
    solution = torch.linalg.lstsq(a.double(), b.double()).solution.float()      # (C + 1, 3)
    return LatentPreview(solution[:channels], solution[channels], source="fitted")


class Previews:
    """The running job's latest preview. The worker calls keep() after each step; any thread
    calls png_b64() and gets the newest kept step's PNG, made once per step."""

    def __init__(self, preview: Optional[LatentPreview], every: int):
        self.preview = preview if every > 0 else None
        self.every = every
        self._lock = threading.Lock()
        self._kept = None          # (job, step, latents (C, h, w))
        self._made = None          # (job, step, base64 PNG)
        self._job = 0

    def start_job(self):
        with self._lock:
            self._job += 1
            self._kept = None

    def keep(self, step: int, total: int, latents) -> None:
        """After step `step` (1-based) of `total`: keep the latents every `every` steps."""
        if self.preview is None or latents is None or (step % self.every and step != total):
            return
        with self._lock:
            self._kept = (self._job, step, latents[0])

    def png_b64(self) -> Optional[str]:
        with self._lock:
            kept, made = self._kept, self._made
        if kept is None:
            return None
        if made is not None and made[:2] == kept[:2]:
            return made[2]
        encoded = base64.b64encode(self.preview.png(kept[2])).decode("ascii")
        with self._lock:
            self._made = (kept[0], kept[1], encoded)
        return encoded
