"""One generation request, built and checked in one place.

    request = Request.from_args(prompt, steps=20, seed=7, ...)   # what needs no model
    request = request.for_model(pipe.config)                     # what does; defaults resolved

The argument list is written once, in `Request.from_args` (its signature, defaults and
meanings); `Pipeline.__call__(prompt, **options)` hands its arguments over by keyword and
shows that signature and those docs (`takes_request_arguments`).

`Pipeline.__call__` (so `sdengine.generate` and the CLI too), the native backend's
`generate` (the C API's Python bindings) and the server build their requests here, so a
bad argument is refused with the same words everywhere: an `InvalidArgumentError` (a
ValueError) whose message starts with the parameter's name and says what it must be. The C
API (`sde_generate`, csrc/src/sdengine.cpp) refuses the same values with the same words;
tests/test_validation.py holds the one table that checks them all.

Caps, documented here and in sdengine.h: batch_size at most MAX_BATCH (the C API's cap),
at most MAX_IMAGES images per request (prompts x batch_size), MAX_STEPS steps, sides of 8
to MAX_SIDE pixels (multiples of 8) and MAX_PIXELS pixels per image (a 512 x 512-cell
latent with an 8x VAE).
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .errors import InvalidArgumentError

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.5
MAX_BATCH = 64
MAX_IMAGES = 1024
MAX_STEPS = 1000
MAX_SIDE = 8192
MAX_PIXELS = 4096 * 4096
MAX_SEED = 2**64 - 1
OUTPUT_TYPES = ("pil", "np", "latent")
# Whose rules a sampler name follows (README "Same seed, same image"): None picks by the name's
# vocabulary (A1111's labels: A1111; sdengine's snake_case names: diffusers).
CONVENTIONS = ("a1111", "diffusers")
# A1111's sources of random numbers (modules/rng.py): torch's CPU generator, A1111's Philox port
# of CUDA's torch.randn ("NV"), or CUDA's own generator.
RNG_SOURCES = ("cpu", "nv", "gpu")


def _fail(parameter: str, message: str):
    raise InvalidArgumentError(parameter, f"{parameter} {message}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_int(value, name: str, lo: int, hi: int) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        _fail(name, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _check_text(value, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _fail(name, f"must be valid UTF-8 text (it holds a lone surrogate), got {value!r}")
    return value


def _prompts(value, name: str) -> list:
    if isinstance(value, str):
        return [_check_text(value, name)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return [_check_text(v, name) for v in value]
    if not isinstance(value, (list, tuple)):
        got = type(value).__name__
    elif not value:
        got = "an empty list"
    else:
        got = "a list holding " + ", ".join(sorted({type(v).__name__ for v in value if not isinstance(v, str)}))
    _fail(name, f"must be a string or a non-empty list of strings, got {got}")


def _seeds(seed, n_images: int) -> list:
    """Image i gets seed + i, or its own entry of a list of n_images seeds."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    if _is_int(seed):
        if not 0 <= seed <= MAX_SEED - (n_images - 1):
            _fail("seed", f"must be an integer in [0, 2**64 - 1] (image i gets seed + i, so at most "
                          f"2**64 - {n_images} for {n_images} image(s)), got {seed!r}")
        return [int(seed) + i for i in range(n_images)]
    if isinstance(seed, (list, tuple)) and len(seed) == n_images and all(_is_int(s) for s in seed):
        for s in seed:
            if not 0 <= s <= MAX_SEED:
                _fail("seed", f"must be an integer in [0, 2**64 - 1] (image i gets seed + i), got {s!r} in the list")
        return [int(s) for s in seed]
    _fail("seed", f"must be an integer in [0, 2**64 - 1] (image i gets seed + i) or a list of {n_images} such "
                  f"integers (one per image), got {seed!r}")


def _subseeds(subseed, n_images: int, strength: float) -> tuple:
    """A1111's variation seeds: image i gets subseed + i (or its own entry of a list); () when unused."""
    if strength == 0:
        return ()
    if subseed is None:
        subseed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    if _is_int(subseed) and 0 <= subseed <= MAX_SEED - (n_images - 1):
        return tuple(int(subseed) + i for i in range(n_images))
    if isinstance(subseed, (list, tuple)) and len(subseed) == n_images and \
            all(_is_int(s) and 0 <= s <= MAX_SEED for s in subseed):
        return tuple(int(s) for s in subseed)
    _fail("subseed", f"must be an integer in [0, 2**64 - 1] (image i gets subseed + i) or a list of {n_images} such "
                     f"integers, got {subseed!r}")


def check_size(width: int, height: int) -> None:
    """The sides (multiples of 8 in [8, MAX_SIDE]) and the pixel cap."""
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or not 8 <= value <= MAX_SIDE or value % 8:
            _fail(name, f"must be a multiple of 8 in [8, {MAX_SIDE}], got {value!r}")
    if width * height > MAX_PIXELS:
        _fail("width x height", f"must be at most {MAX_PIXELS} pixels (4096 x 4096), got {width}x{height}")


# ---------------------------------------------------------------------------
# Images: PIL images, arrays or tensors -> float32 arrays (N, H, W, C) in [0, 1]
# ---------------------------------------------------------------------------

def _to_float_hwc(image, name: str) -> np.ndarray:
    """One image -> float32 array (H, W, C) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if not (np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer)):
            _fail(name, f"must hold numbers, got an array of {image.dtype}")
        arr = image.astype(np.float32)
        if image.dtype == np.uint8:
            arr = arr / 255.0
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or 0 in arr.shape:
            _fail(name, f"must be an array (H, W[, C]), got shape {image.shape}")
        if not np.isfinite(arr).all():
            _fail(name, "must hold finite values")
        return arr
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    _fail(name, f"must be a PIL image, an array (H, W[, C]) or a list of them, got {type(image).__name__}")


def image_batch(image, name: str, n_images: int) -> np.ndarray:
    """A single image, a list of images, or an (N, H, W, C) array -> (N, H, W, C) float32."""
    if isinstance(image, (list, tuple)):
        if not image:
            _fail(name, "must not be an empty list")
        arrs = [_to_float_hwc(im, name) for im in image]
    elif isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        arrs = [_to_float_hwc(im, name) for im in image]
    else:
        arrs = [_to_float_hwc(image, name)]
    if len({a.shape for a in arrs}) != 1:
        _fail(name, "must hold images of one size")
    if len(arrs) == 1:
        arrs = arrs * n_images
    if len(arrs) != n_images:
        _fail(name, f"must hold one image or one per generated image ({n_images}), got {len(arrs)}")
    return np.stack(arrs)


def _ip_adapter_inputs(images, scales) -> tuple:
    """(RGB PIL images, scales) of ip_adapter_image / ip_adapter_scale, checked."""
    from PIL import Image

    if images is None:
        if scales is not None:
            _fail("ip_adapter_scale", "needs ip_adapter_image: the image prompt it scales")
        return (), ()
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        _fail("ip_adapter_image", "must not be an empty list")
    pil = []
    for i, item in enumerate(items):
        name = f"ip_adapter_image[{i}]" if isinstance(images, (list, tuple)) else "ip_adapter_image"
        if isinstance(item, Image.Image):
            pil.append(item.convert("RGB"))
            continue
        array = _to_float_hwc(item, name)
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        if array.shape[-1] != 3:
            _fail(name, f"must have 1 or 3 channels, got {array.shape[-1]}")
        pil.append(Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)))
    listed = [] if scales is None else list(scales) if isinstance(scales, (list, tuple)) else [scales]
    for value in listed:
        if not _is_real(value) or not math.isfinite(value):
            _fail("ip_adapter_scale", f"must be a finite number or a list of them, got {scales!r}")
    if len(listed) not in (0, 1, len(pil)):
        _fail("ip_adapter_scale", f"must be one number or one per image prompt ({len(pil)}), got {len(listed)}")
    return tuple(pil), tuple(float(v) for v in listed)


# ---------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Request:
    """Everything one call generates from, checked. Images are float32 arrays (N, H, W, C) in
    [0, 1] (mask: C = 1 or 3); width and height are None until for_model() resolves them."""

    prompts: tuple             # one per image (each prompt repeated batch_size times)
    negative_prompts: tuple    # one per image ("" when none was given)
    negative_prompt_given: bool
    batch_size: int
    seeds: tuple               # one per image
    steps: int
    guidance_scale: float
    width: Optional[int]
    height: Optional[int]
    sampler: Optional[str]
    schedule: Optional[str]
    mode: str                  # "txt2img", "img2img" or "inpaint"
    strength: Optional[float]  # None: the mode's default (for_model resolves it)
    eta: Optional[float]       # None: the sampler's default (0 for DDIM; 1 for A1111's ancestral samplers)
    clip_skip: Optional[int]
    init_image: Optional[np.ndarray]
    mask_image: Optional[np.ndarray]
    latents: Optional[torch.Tensor]
    output_type: str
    callback: Optional[Callable]
    progress: bool
    vae_tiling: Optional[bool]
    prompt_syntax: Optional[str] = None  # None (plain text) or "a1111" (sdengine/prompt_syntax.py)
    lora_dir: Any = None                 # where <lora:name> tags find their files
    controls: tuple = ()                 # sdengine.controlnet.Control, checked
    conventions: Optional[str] = None    # CONVENTIONS, or None: by the sampler name's vocabulary
    subseeds: tuple = ()                 # A1111 variation seeds, one per image (() when subseed_strength is 0)
    subseed_strength: float = 0.0
    seed_resize_from: Optional[tuple] = None  # (width, height) whose noise the seed draws, centred; None: off
    eta_noise_seed_delta: int = 0        # A1111's ENSD: the sampler's noise comes from seed + this
    rng: str = "cpu"                     # RNG_SOURCES
    acceleration: Any = None             # sdengine.acceleration.Acceleration: DeepCache, T-GATE, ToMe (or none)
    refiner: Any = None                  # SDXL refiner Pipeline the latents are handed to, or None
    refiner_switch_at: float = 0.8       # the fraction of the denoising the refiner takes over at
    aesthetic_score: float = 6.0         # SDXL refiner's added conditioning (diffusers' defaults)
    negative_aesthetic_score: float = 2.5
    hires: Any = None                    # sdengine.hires.Hires (A1111's hires fix), checked, or None
    ip_adapter_image: tuple = ()         # one RGB PIL image per loaded IP-Adapter
    ip_adapter_scale: tuple = ()         # () (1.0 each), one scale for all, or one per adapter

    @property
    def n_images(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_args(
        cls,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        height: Optional[int] = None,
        width: Optional[int] = None,
        seed: int | Sequence[int] | None = None,
        batch_size: int = 1,
        sampler: Optional[str] = None,
        schedule: Optional[str] = None,
        init_image: Any = None,
        strength: Optional[float] = None,
        mask_image: Any = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        callback: Optional[Callable[[int, int, torch.Tensor], Optional[bool]]] = None,
        progress: bool = True,
        eta: Optional[float] = None,
        clip_skip: Optional[int] = None,
        steps: Optional[int] = None,
        vae_tiling: Optional[bool] = None,
        prompt_syntax: Optional[str] = None,
        lora_dir: Any = None,
        control: Any = None,
        conventions: Optional[str] = None,
        subseed: int | Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from_w: Optional[int] = None,
        seed_resize_from_h: Optional[int] = None,
        eta_noise_seed_delta: int = 0,
        rng: Optional[str] = None,
        deepcache: Any = None,
        tgate: Any = None,
        tome: Any = None,
        refiner: Any = None,
        refiner_switch_at: Optional[float] = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        hires: Any = None,
        ip_adapter_image: Any = None,
        ip_adapter_scale: Any = None,
    ) -> "Request":
        """Check every argument that does not depend on the model. Raises InvalidArgumentError
        naming the parameter.

        prompt:              a prompt, or a list of prompts (each gets `batch_size` images).
        negative_prompt:     what to steer away from; None is the empty prompt (SDXL: zeros).
        num_inference_steps: denoising steps (alias `steps`); default 30.
        guidance_scale:      classifier-free guidance scale; <= 1 disables guidance.
        height, width:       image size in pixels, positive multiples of 8; default: the
                             model's native size, or the init image's size.
        seed:                an int (image i gets seed + i) or one seed per image; None picks one.
        batch_size:          images per prompt.
        sampler, schedule:   A1111/ComfyUI names ("euler_a", "DPM++ 2M Karras", ...); None
                             is the checkpoint's scheduler.
        init_image:          img2img source (PIL image, or float array (H, W, 3) in [0, 1]).
        strength:            how much of the schedule img2img / inpainting re-runs, in [0, 1];
                             default 0.8 for img2img, 1.0 for inpainting.
        mask_image:          inpainting mask, white = repaint; needs init_image and a
                             9-channel inpainting model.
        latents:             explicit initial noise (N, C, h, w), unit variance.
        output_type:         "pil", "np" (float in [0, 1]) or "latent".
        callback:            callback(step, total, latents) after each sampler step (total is
                             steps + 1 for PLMS, fewer for img2img); return False to cancel.
        progress:            show a tqdm progress bar.
        eta:                 the sampler's eta: DDIM's (default 0, deterministic), or under A1111's
                             rules its ancestral and SDE samplers' (default 1).
        clip_skip:           skip this many final text-encoder layers (diffusers' meaning:
                             1 here is A1111's "Clip skip: 2").
        vae_tiling:          decode in blended tiles: True, False, or None = automatically for
                             large images (over 128x128 latent cells) or when memory runs out.
        prompt_syntax:       None (the prompt is plain text; over 75 tokens it is truncated, as
                             diffusers does) or "a1111": (emphasis:1.2), [less], BREAK, prompts of
                             any length in 75-token windows, and <lora:name:scale> tags, which add
                             LoRAs from `lora_dir` to the pipeline's set for this call
                             (sdengine/prompt_syntax.py).
        lora_dir:            the folder where <lora:name> finds name.safetensors (searched recursively).
        control:             ControlNets: a sdengine.Control or a list of them (model, image, scale,
                             start, end, guess_mode, preprocess; see sdengine/controlnet.py). Without
                             height, width and init_image, the size is the first control image's.
        conventions:         whose rules the sampler follows: "a1111" (A1111's sigmas, start and
                             noise: its image for the same seed), "diffusers" (diffusers' scheduler
                             of that name), or None: A1111's labels ("Euler a", "DPM++ 2M") follow
                             A1111, sdengine's names ("euler_a", "dpmpp_2m") diffusers (README,
                             "Same seed, same image").
        subseed, subseed_strength: A1111's variation seed: the noise is the slerp of the seed's and
                             the subseed's by subseed_strength (every image keeps the seed; image
                             i gets subseed + i).
        seed_resize_from_w, seed_resize_from_h: A1111's "resize seed from": the seed's noise drawn at
                             that size and centred in this one.
        eta_noise_seed_delta: A1111's ENSD: the sampler's own noise comes from seed + this.
        rng:                 where the noise comes from: "cpu" (torch's CPU generator; default),
                             "nv" (A1111's Philox port of CUDA's torch.randn, on any device) or
                             "gpu" (CUDA's generator; needs a CUDA device): A1111's RNG setting.
        deepcache, tgate, tome: training-free acceleration (sdengine/acceleration.py), with the
                             authors' meanings: sdengine.DeepCache(interval=3, branch=0),
                             sdengine.TGate(gate_step=10), sdengine.ToMe(ratio=0.5), or a number
                             for the main setting (deepcache=3, tgate=10, tome=0.5). Any combination;
                             tgate does not combine with control. A backend that cannot run them
                             (native, aoti, onnx) refuses them before any work.
        refiner:             an SDXL refiner Pipeline (sdengine.load(refiner_folder)): the pipeline
                             denoises the first `refiner_switch_at` of the schedule and hands its
                             latents, undecoded, to the refiner for the rest (diffusers' denoising_end
                             on the base, denoising_start on the refiner: one schedule cut at the
                             timestep cutoff). The refiner decodes.
        refiner_switch_at:   in (0, 1); default 0.8.
        aesthetic_score, negative_aesthetic_score: an SDXL refiner's added conditioning for the
                             prompt and the negative prompt (diffusers' defaults 6.0 and 2.5).
        hires:               A1111's hires fix, a sdengine.Hires (scale or resize_x / resize_y,
                             upscaler, steps, denoising_strength, sampler, prompts; sdengine/hires.py).
        ip_adapter_image:    the image prompt of each IP-Adapter the pipeline loaded
                             (pipe.load_ip_adapter): an image, or a list of one per adapter.
        ip_adapter_scale:    how strongly the image prompts count (diffusers' set_ip_adapter_scale):
                             one number for every adapter or a list of one per adapter; default 1.0.
        """
        if steps is not None:
            if num_inference_steps is not None and num_inference_steps != steps:
                _fail("num_inference_steps", f"and steps disagree ({num_inference_steps!r} and {steps!r}): give one")
            num_inference_steps = steps
        num_inference_steps = DEFAULT_STEPS if num_inference_steps is None else num_inference_steps
        prompts = _prompts(prompt, "prompt")
        batch_size = _check_int(batch_size, "batch_size", 1, MAX_BATCH)
        if len(prompts) * batch_size > MAX_IMAGES:
            _fail("batch_size x prompts", f"must be at most {MAX_IMAGES} images per request, got "
                                          f"{batch_size} x {len(prompts)}")
        num_inference_steps = _check_int(num_inference_steps, "num_inference_steps", 1, MAX_STEPS)
        if not _is_real(guidance_scale) or not math.isfinite(guidance_scale):
            _fail("guidance_scale", f"must be a finite number, got {guidance_scale!r}")
        if eta is not None and (not _is_real(eta) or not math.isfinite(eta) or eta < 0):
            _fail("eta", f"must be a finite number >= 0 or None (the sampler's default), got {eta!r}")
        if output_type not in OUTPUT_TYPES:
            _fail("output_type", f"must be 'pil', 'np' or 'latent', got {output_type!r}")
        if clip_skip is not None:
            clip_skip = _check_int(clip_skip, "clip_skip", 0, 1000)
        for name, value in (("sampler", sampler), ("schedule", schedule)):
            if value is not None and not isinstance(value, str):
                _fail(name, f"must be a name (a string) or None, got {type(value).__name__}")
        if callback is not None and not callable(callback):
            _fail("callback", f"must be callable or None, got {type(callback).__name__}")
        if not isinstance(progress, (bool, np.bool_)):
            _fail("progress", f"must be True or False, got {progress!r}")
        if vae_tiling is not None and not isinstance(vae_tiling, (bool, np.bool_)):
            _fail("vae_tiling", f"must be True, False or None, got {vae_tiling!r}")
        if prompt_syntax not in (None, "a1111"):
            _fail("prompt_syntax", f"must be None or 'a1111', got {prompt_syntax!r}")
        if lora_dir is not None and not isinstance(lora_dir, (str, os.PathLike)):
            _fail("lora_dir", f"must be a folder path or None, got {type(lora_dir).__name__}")
        from .controlnet import as_controls

        controls = tuple(as_controls(control))
        from .acceleration import Acceleration, as_option, check_request

        acceleration = Acceleration(as_option(deepcache, "deepcache"), as_option(tgate, "tgate"),
                                    as_option(tome, "tome"))
        check_request(acceleration, controls)
        for name, value in (("aesthetic_score", aesthetic_score), ("negative_aesthetic_score", negative_aesthetic_score)):
            if not _is_real(value) or not math.isfinite(value):
                _fail(name, f"must be a finite number, got {value!r}")
        if refiner is not None and not (hasattr(refiner, "config") and hasattr(refiner, "decode_latents")):
            _fail("refiner", f"must be a sdengine Pipeline (sdengine.load(path)) or None, got {type(refiner).__name__}")
        if refiner_switch_at is not None:
            if refiner is None:
                _fail("refiner_switch_at", "needs refiner: the model to hand the latents to")
            if not _is_real(refiner_switch_at) or not 0.0 < refiner_switch_at < 1.0:
                _fail("refiner_switch_at", f"must be a number in (0, 1) (the fraction of the denoising the base "
                                           f"does), got {refiner_switch_at!r}")
        ip_images, ip_scales = _ip_adapter_inputs(ip_adapter_image, ip_adapter_scale)
        if hires is not None:
            from .hires import Hires

            if not isinstance(hires, Hires):
                _fail("hires", f"must be a sdengine.Hires or None, got {type(hires).__name__}")
            hires.check()

        n_images = len(prompts) * batch_size
        images_prompts = tuple(p for p in prompts for _ in range(batch_size))
        if negative_prompt is None:
            negatives = [""] * n_images
        elif isinstance(negative_prompt, str):
            negatives = [_check_text(negative_prompt, "negative_prompt")] * n_images
        else:
            listed = _prompts(negative_prompt, "negative_prompt")
            if len(listed) != len(prompts):
                _fail("negative_prompt", f"must have one entry per prompt ({len(prompts)}), got {len(listed)}")
            negatives = [n for n in listed for _ in range(batch_size)]
        if conventions not in (None, *CONVENTIONS):
            _fail("conventions", f"must be None, 'a1111' or 'diffusers', got {conventions!r}")
        rng = "cpu" if rng is None else str(rng).lower() if isinstance(rng, str) else rng
        if rng not in RNG_SOURCES:
            _fail("rng", f"must be 'cpu', 'nv' or 'gpu' (A1111's RNG sources), got {rng!r}")
        if not _is_real(subseed_strength) or not 0.0 <= subseed_strength <= 1.0:
            _fail("subseed_strength", f"must be a number in [0, 1], got {subseed_strength!r}")
        subseeds = _subseeds(subseed, n_images, float(subseed_strength))
        resize = None
        if seed_resize_from_w or seed_resize_from_h:  # A1111: 0 or -1 is off
            for name, value in (("seed_resize_from_w", seed_resize_from_w), ("seed_resize_from_h", seed_resize_from_h)):
                if not _is_int(value) or not 8 <= value <= MAX_SIDE:
                    _fail(name, f"must be an integer in [8, {MAX_SIDE}] when seed resizing is on, got {value!r}")
            resize = (int(seed_resize_from_w), int(seed_resize_from_h))
        if not _is_int(eta_noise_seed_delta) or not 0 <= eta_noise_seed_delta <= MAX_SEED:
            _fail("eta_noise_seed_delta", f"must be an integer in [0, 2**64 - 1], got {eta_noise_seed_delta!r}")
        seeds = _seeds(seed, n_images)
        if subseeds and not isinstance(seed, (list, tuple)):
            seeds = [seeds[0]] * n_images  # A1111: with variation seeds every image keeps the seed; the subseed varies
        if eta_noise_seed_delta and max(seeds) + eta_noise_seed_delta > MAX_SEED:
            _fail("eta_noise_seed_delta", f"plus the seed must be at most 2**64 - 1, got {eta_noise_seed_delta!r}")

        mode = "inpaint" if mask_image is not None else "img2img" if init_image is not None else "txt2img"
        if mode == "inpaint" and init_image is None:
            _fail("mask_image", "needs init_image: the image to inpaint")
        if hires is not None and mode != "txt2img":
            _fail("hires", "applies to txt2img (A1111's hires fix): give no init_image")
        if hires is not None and refiner is not None:
            _fail("hires", "and refiner cannot be combined yet: run the refiner on the hires result as img2img")
        if refiner is not None and mode == "inpaint":
            _fail("refiner", "applies to txt2img and img2img, not inpainting")
        if mode == "txt2img" and strength is not None:
            _fail("strength", "applies to img2img and inpainting: give init_image")
        if strength is not None and (not _is_real(strength) or not 0.0 <= strength <= 1.0):
            _fail("strength", f"must be a number in [0, 1], got {strength!r}")
        image = mask = None
        if init_image is not None:
            image = image_batch(init_image, "init_image", n_images)
            if image.shape[-1] == 1:
                image = np.repeat(image, 3, axis=-1)
            if image.shape[-1] != 3:
                _fail("init_image", f"must have 1 or 3 channels, got {image.shape[-1]}")
        if mask_image is not None:
            mask = image_batch(mask_image, "mask_image", n_images)
            if mask.shape[-1] not in (1, 3):
                _fail("mask_image", f"must have 1 or 3 channels, got {mask.shape[-1]}")
            if mask.shape[1:3] != image.shape[1:3]:
                _fail("mask_image", f"size {(mask.shape[2], mask.shape[1])} does not match init_image size "
                                    f"{(image.shape[2], image.shape[1])} (width, height)")
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not _is_int(value) or not 8 <= value <= MAX_SIDE or value % 8):
                _fail(name, f"must be a multiple of 8 in [8, {MAX_SIDE}], got {value!r}")
        if height is not None and width is not None:
            check_size(int(width), int(height))
        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                _fail("latents", f"must be a torch.Tensor, got {type(latents).__name__}")
            if not latents.is_floating_point():
                _fail("latents", f"must be a floating-point tensor, got {latents.dtype}")
            if not torch.isfinite(latents).all():
                _fail("latents", "must hold finite values")
        return cls(
            prompts=images_prompts, negative_prompts=tuple(negatives),
            negative_prompt_given=negative_prompt is not None, batch_size=batch_size, seeds=tuple(seeds),
            steps=num_inference_steps, guidance_scale=float(guidance_scale),
            width=None if width is None else int(width), height=None if height is None else int(height),
            sampler=sampler, schedule=schedule, mode=mode,
            strength=None if strength is None else float(strength), eta=None if eta is None else float(eta),
            clip_skip=clip_skip,
            init_image=image, mask_image=mask, latents=latents, output_type=output_type, callback=callback,
            progress=bool(progress), vae_tiling=None if vae_tiling is None else bool(vae_tiling),
            prompt_syntax=prompt_syntax, lora_dir=lora_dir, controls=controls, conventions=conventions,
            subseeds=subseeds, subseed_strength=float(subseed_strength), seed_resize_from=resize,
            eta_noise_seed_delta=int(eta_noise_seed_delta), rng=rng, acceleration=acceleration, refiner=refiner,
            refiner_switch_at=0.8 if refiner_switch_at is None else float(refiner_switch_at),
            aesthetic_score=float(aesthetic_score), negative_aesthetic_score=float(negative_aesthetic_score),
            hires=hires, ip_adapter_image=ip_images, ip_adapter_scale=ip_scales,
        )

    @classmethod
    def from_infotext(cls, text: str, **overrides) -> "Request":
        """The request that draws the image an A1111 `parameters` text describes (a PNG's text chunk,
        the `info` of A1111's API): its prompts (A1111 prompt syntax, <lora:> tags), Steps, Sampler,
        Schedule type, CFG scale, Seed, Size, Clip skip, ENSD, Variation seed and strength, Seed
        resize from, RNG, Eta and Denoising strength, under A1111's rules (sdengine.infotext).

        overrides: Request.from_args keywords that win over the text, e.g. init_image (needed with
        "Denoising strength"), lora_dir, or rng="nv" to draw an A1111 GPU image's noise on a CPU.
        Raises InvalidArgumentError naming each field sdengine cannot honour (sdengine.infotext)."""
        from .infotext import parse_infotext, request_arguments

        args = request_arguments(parse_infotext(text))
        if "strength" in args and overrides.get("init_image") is None:
            _fail("init_image", "is needed: the infotext has 'Denoising strength' (an img2img or inpainting "
                                "run); pass init_image= (and mask_image= for inpainting)")
        if "refiner_switch_at" in args and overrides.get("refiner") is None:
            _fail("refiner", "is needed: the infotext names a refiner ('Refiner'); pass refiner= (a loaded Pipeline)")
        args.update(overrides)
        return cls.from_args(**args)

    def for_model(self, config) -> "Request":
        """Check what depends on the model (a sdengine.config.ModelConfig): inpainting or not,
        clip_skip within the text encoders, the latents' shape; resolve the size (the init
        image's, rounded down to 8, else the model's) and strength (0.8 img2img, 1.0 inpainting)."""
        name = config.name
        if self.acceleration:
            self.acceleration.check_model(config.unet)
        if self.mode == "inpaint" and not config.is_inpaint:
            _fail("mask_image", f"needs an inpainting model (9-channel UNet); {name} has "
                                f"{config.unet.in_channels} input channels")
        if self.mode == "txt2img" and config.is_inpaint:
            _fail("init_image", f"is required: {name} is an inpainting model: give init_image and mask_image")
        if self.clip_skip is not None:
            encoders = [e for e in (config.text_encoder, config.text_encoder_2) if e is not None]
            most = min(e.num_hidden_layers - 1 - (e.output_layer == "penultimate") for e in encoders)
            if self.clip_skip > most:
                _fail("clip_skip", f"must be an integer in [0, {most}] (the text encoder has "
                                   f"{encoders[0].num_hidden_layers} layers), got {self.clip_skip}")
        height, width = self.height, self.width
        if self.controls and self.init_image is None and height is None and width is None:
            from .controlnet import image_size  # diffusers' ControlNet pipelines: the control image's size

            control_width, control_height = image_size(self.controls[0].image, "control[0].image")
            height, width = control_height // 8 * 8, control_width // 8 * 8
            if not (height and width):
                _fail("control[0].image", f"must be at least 8x8 pixels, got {control_width}x{control_height}")
        if self.init_image is not None and height is None and width is None:
            height, width = self.init_image.shape[1] // 8 * 8, self.init_image.shape[2] // 8 * 8
            if not (height and width):
                _fail("init_image", f"must be at least 8x8 pixels, got {self.init_image.shape[2]}x"
                                    f"{self.init_image.shape[1]}")
        height = config.default_size if height is None else height
        width = config.default_size if width is None else width
        check_size(width, height)
        if self.latents is not None:
            shape = (self.n_images, config.vae.latent_channels, height // config.vae.downscale,
                     width // config.vae.downscale)
            if tuple(self.latents.shape) != shape:
                _fail("latents", f"must have shape {shape} for {self.n_images} image(s) at {width}x{height}, "
                                 f"got {tuple(self.latents.shape)}")
        strength = self.strength
        if strength is None:
            strength = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 1.0}[self.mode]
        if self.refiner is not None:
            refiner = self.refiner.config
            if not refiner.is_sdxl or refiner.is_inpaint or refiner.vae.latent_channels != config.vae.latent_channels:
                _fail("refiner", f"must be an SDXL model with {config.vae.latent_channels}-channel latents, not an "
                                 f"inpainting model; {refiner.name} is not")
        if self.hires is not None:  # the second pass's size
            target = self.hires.target(width, height, config.vae.downscale)
            try:
                check_size(target.width, target.height)
            except InvalidArgumentError as e:
                _fail("hires", f"gives a second pass of {target.width}x{target.height} from {width}x{height}: {e}")
        return replace(self, height=height, width=width, strength=strength)


def takes_request_arguments(method):
    """Decorator for `method(self, prompt, **options)` that hands its arguments to
    Request.from_args: the method shows from_args's signature and argument docs (help(),
    inspect.signature, IDEs), so that the argument list is written once, in from_args."""
    from_args = inspect.signature(Request.from_args)  # bound to the class: no `cls`
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = from_args.replace(parameters=[self_parameter, *from_args.parameters.values()],
                                             return_annotation=inspect.signature(method).return_annotation)
    arguments = inspect.getdoc(Request.from_args).split("\n\n", 1)[1]
    method.__doc__ = f"{inspect.getdoc(method)}\n\n{arguments}"
    return method
