"""A1111's hires fix: draw at the requested size, upscale, then denoise again at the larger size.

    result = pipe("a castle", width=512, height=512, steps=20, seed=1,
                  hires=sdengine.Hires(scale=2.0, upscaler="Latent", steps=10, denoising_strength=0.5))

The procedure is A1111's `StableDiffusionProcessingTxt2Img.sample` / `sample_hr_pass`
(modules/processing.py in AUTOMATIC1111/stable-diffusion-webui), step for step:

1. the first pass: txt2img at width x height;
2. the target size (`calculate_target_resolution`): `int(width * scale)` x `int(height * scale)`,
   or `resize_x` / `resize_y` (one of them: the other follows the aspect ratio; both: the image is
   scaled to cover them, then the latents are cropped to them, centred);
3. the upscale: a latent upscaler interpolates the latents (`torch.nn.functional.interpolate` with
   A1111's mode and antialias for each name); a pixel upscaler decodes, turns each image into
   8-bit RGB, resizes it as A1111's `images.resize_image` with its Lanczos / Nearest upscaler does,
   and encodes it again;
4. the second pass: img2img on those latents with fresh noise from the same seeds at the larger
   shape, and A1111's `setup_img2img_steps` (modules/sd_samplers_common.py): `steps` second-pass
   steps (0: the first pass's count) are the last steps of a schedule of
   `int(steps / min(denoising_strength, 0.999))`, started from `latents + noise * sigma` at the
   first of them (the sampler's own img2img start for timestep samplers);
5. the decode, in tiles when the image is large (the pipeline's automatic VAE tiling).

Where sdengine differs: a pixel upscaler's re-encode takes the VAE posterior's mean, where A1111
draws a sample from torch's global generator (the posterior's spread is tiny for SD's VAEs);
sizes that are not multiples of 8 are rounded down to them (A1111 rounds the latents the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

# A1111's shared.latent_upscale_modes: name -> (torch.nn.functional.interpolate mode, antialias).
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111's built-in pixel upscalers (modules/upscaler.py): "None" is a plain Lanczos resize.
PIXEL_UPSCALERS = ("Lanczos", "Nearest", "None")
UPSCALERS = tuple(LATENT_UPSCALERS) + PIXEL_UPSCALERS


def _fail(parameter: str, message: str):
    from .errors import InvalidArgumentError

    raise InvalidArgumentError(parameter, f"{parameter} {message}")


@dataclass(frozen=True)
class Target:
    """The second pass's size: the upscale target (upscale_x, upscale_y) in pixels, and how many
    latent cells are cropped from it (truncate_x, truncate_y) to give width x height."""

    upscale_x: int
    upscale_y: int
    truncate_x: int
    truncate_y: int
    width: int
    height: int


@dataclass(frozen=True)
class Hires:
    """A1111's hires fix in a request (`pipe(..., hires=Hires(...))`); fields as A1111's API names them.

    scale:              upscale factor (hr_scale), used when resize_x and resize_y are both 0.
    upscaler:           one of UPSCALERS (hr_upscaler): "Latent" (bilinear), "Latent (antialiased)",
                        "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
                        "Latent (nearest-exact)", or the pixel upscalers "Lanczos", "Nearest", "None".
    steps:              second-pass steps actually run (hr_second_pass_steps); 0: the first pass's.
    denoising_strength: in (0, 1]: the second pass runs the last `steps` of a schedule of
                        int(steps / min(denoising_strength, 0.999)) steps.
    resize_x, resize_y: the target size in pixels (hr_resize_x / hr_resize_y) instead of scale.
    sampler:            the second pass's sampler (hr_sampler_name); None: the first pass's.
    prompt, negative_prompt: the second pass's prompts (hr_prompt, hr_negative_prompt); None: the
                        first pass's.
    """

    scale: float = 2.0
    upscaler: str = "Latent"
    steps: int = 0
    denoising_strength: float = 0.7
    resize_x: int = 0
    resize_y: int = 0
    sampler: Optional[str] = None
    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None

    def check(self) -> None:
        """InvalidArgumentError (a ValueError) naming the field, for a value out of range."""
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) \
                or not 1.0 <= self.scale <= 8.0:
            _fail("hires.scale", f"must be a number in [1, 8], got {self.scale!r}")
        if self.upscaler not in UPSCALERS:
            _fail("hires.upscaler", f"must be one of {', '.join(map(repr, UPSCALERS))}, got {self.upscaler!r}")
        for name in ("steps", "resize_x", "resize_y"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 8192:
                _fail(f"hires.{name}", f"must be an integer in [0, 8192], got {value!r}")
        strength = self.denoising_strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            _fail("hires.denoising_strength", f"must be a number in (0, 1], got {strength!r}")
        for name in ("sampler", "prompt", "negative_prompt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                _fail(f"hires.{name}", f"must be a string or None, got {type(value).__name__}")

    @property
    def latent(self) -> bool:
        """A latent upscaler (no decode and re-encode)."""
        return self.upscaler in LATENT_UPSCALERS

    def target(self, width: int, height: int, cell: int = 8) -> Target:
        """The second pass's size for a first pass of width x height (A1111's
        calculate_target_resolution). cell: pixels per latent cell. Each side of the upscale target
        is floored to a multiple of 8 and of the cell, at least one (A1111's latents are target // 8
        cells: a 12-pixel side gives one cell, 8 pixels)."""
        rx, ry = self.resize_x, self.resize_y
        step = math.lcm(cell, 8)

        def floored(side: int) -> int:
            return max(step, side // step * step)

        truncate_x = truncate_y = 0
        if rx == 0 and ry == 0:
            x, y = floored(int(width * self.scale)), floored(int(height * self.scale))
        elif ry == 0:
            x, y = floored(rx), floored(rx * height // width)
        elif rx == 0:
            x, y = floored(ry * width // height), floored(ry)
        else:  # scaled to cover resize_x x resize_y, then cropped to it
            rx, ry = floored(rx), floored(ry)
            if width / height < rx / ry:
                x, y = rx, floored(rx * height // width)
            else:
                x, y = floored(ry * width // height), ry
            truncate_x, truncate_y = max(0, (x - rx) // cell), max(0, (y - ry) // cell)
        final_x, final_y = (x // cell - truncate_x) * cell, (y // cell - truncate_y) * cell
        return Target(x, y, truncate_x, truncate_y, final_x, final_y)

    def schedule(self, first_pass_steps: int) -> tuple:
        """(steps of the whole schedule, steps run: its last ones), A1111's setup_img2img_steps
        with the steps given (as sample_hr_pass always gives them)."""
        run = self.steps or first_pass_steps
        return int(run / min(self.denoising_strength, 0.999)), run


def upscale_latents(latents: torch.Tensor, target: Target, upscaler: str, cell: int = 8) -> torch.Tensor:
    """Latents (N, C, h, w) -> (N, C, target.upscale_y // cell, target.upscale_x // cell) with a
    latent upscaler's interpolation, then cropped to the target (crop_latents)."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    size = (target.upscale_y // cell, target.upscale_x // cell)
    upscaled = torch.nn.functional.interpolate(latents, size=size, mode=mode, antialias=antialias)
    return crop_latents(upscaled, target)


def crop_latents(latents: torch.Tensor, target: Target) -> torch.Tensor:
    """The centre of latents that resize_x x resize_y keeps (A1111 crops truncate // 2 cells
    before and (truncate + 1) // 2 after)."""
    ty, tx = target.truncate_y, target.truncate_x
    return latents[:, :, ty // 2:latents.shape[2] - (ty + 1) // 2, tx // 2:latents.shape[3] - (tx + 1) // 2]


def upscale_image(image, width: int, height: int, upscaler: str):
    """A PIL image resized to width x height as A1111's `images.resize_image(0, ...)` does with
    its built-in upscaler: "None" is one Lanczos resize; "Lanczos" / "Nearest" scale by
    max(width / w, height / h) (up to three times, each to int(side * scale)), to that scale's
    size rounded down to 8, then Lanczos to the exact size where it differs."""
    from PIL import Image

    lanczos, nearest = Image.Resampling.LANCZOS, Image.Resampling.NEAREST
    if upscaler == "None":
        return image.resize((width, height), resample=lanczos)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        resample = lanczos if upscaler == "Lanczos" else nearest
        dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
        for i in range(3):
            if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
                break
            before = image.size
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
            if image.size == before:
                break
        if image.size != (dest_w, dest_h):
            image = image.resize((dest_w, dest_h), resample=lanczos)
    if image.size != (width, height):
        image = image.resize((width, height), resample=lanczos)
    return image


def upscale_pixels(decoded: torch.Tensor, target: Target, upscaler: str) -> torch.Tensor:
    """Decoded images (N, 3, h, w) in [-1, 1] -> (N, 3, H, W) in [-1, 1] at the upscale target
    (rounded down to 8), through 8-bit images as A1111 makes them (255 * clamp((x + 1) / 2),
    truncated to uint8)."""
    from PIL import Image

    width, height = target.upscale_x // 8 * 8, target.upscale_y // 8 * 8
    pixels = (255.0 * torch.clamp((decoded.float().cpu() + 1.0) / 2.0, 0.0, 1.0)).permute(0, 2, 3, 1).numpy()
    out = []
    for array in pixels.astype(np.uint8):
        image = upscale_image(Image.fromarray(array), width, height, upscaler)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out) * 2.0 - 1.0


def infotext_fields(hires: Hires, params: dict) -> list:
    """A1111's infotext fields of a hires fix (as its StableDiffusionProcessingTxt2Img writes them:
    "Hires upscale" or "Hires resize", "Hires steps" when given, "Hires upscaler", and the second
    pass's sampler and prompts where they differ from the first's)."""
    fields = [("Hires upscale", _number(hires.scale)) if not (hires.resize_x or hires.resize_y)
              else ("Hires resize", f"{hires.resize_x}x{hires.resize_y}")]
    if hires.steps:
        fields.append(("Hires steps", hires.steps))
    fields.append(("Hires upscaler", hires.upscaler))
    if params.get("hires_sampler") and params["hires_sampler"] != params["sampler"]:
        fields.append(("Hires sampler", params["hires_sampler_label"]))
    if hires.prompt is not None:
        fields.append(("Hires prompt", hires.prompt))
    if hires.negative_prompt is not None:
        fields.append(("Hires negative prompt", hires.negative_prompt))
    return fields


def _number(value: float):
    """2.0 -> 2 (A1111 writes the float it got: the JSON API's 2 is 2, the UI's 2.0 is 2.0)."""
    return int(value) if float(value).is_integer() else value
