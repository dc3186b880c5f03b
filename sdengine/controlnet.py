"""ControlNet in the pipeline: loading, the `Control` request, control images, and the rules
of which ControlNet runs at which step.

    canny = sdengine.load_controlnet("control_v11p_sd15_canny.safetensors")   # reuse across calls
    result = pipe("a house", control=[sdengine.Control(canny, photo, preprocess="canny", scale=0.8),
                                      sdengine.Control("depth-controlnet/", depth_map, end=0.6)])

Semantics are diffusers' (StableDiffusionControlNetPipeline and its img2img, inpainting and
SDXL variants), so images match diffusers' on the same weights:
- the control image is resized to the output size (PIL: Lanczos; arrays: nearest) and taken in
  [0, 1] (RGB, no normalisation), one per image; with classifier-free guidance the ControlNet
  runs on both halves of the batch;
- `scale` multiplies the residuals; `start` / `end` (fractions of the run) say at which steps it
  runs: step i of n is active unless i / n < start or (i + 1) / n > end (diffusers'
  controlnet_keep; for samplers that evaluate the model several times per step, every
  evaluation of step i follows step i);
- `guess_mode`: the ControlNet sees the conditional half only (its uncond residuals are zero)
  and its residuals are scaled from 0.1 to 1.0 (see models/controlnet.py);
- several ControlNets: their residuals are summed.

A ControlNet's forward gets the UNet's latent input without inpainting's extra channels, the
UNet's timestep, text context and (SDXL) added conditioning, as in diffusers.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .config import ModelConfig
from .errors import ModelLoadError

PREPROCESSORS = ("canny",)
# A1111's ControlNet extension's defaults for its "canny" preprocessor (low, high threshold).
CANNY_THRESHOLDS = (100, 200)


class ControlNet:
    """A loaded ControlNet (`sdengine.load_controlnet`): its network, config and name. One
    ControlNet serves any number of pipelines and calls; a backend that rewrites networks at
    load time (fused QKV, channels_last) does so on its own view of the weights, never here."""

    def __init__(self, loaded):
        self.config = loaded.config
        self.model = loaded.model
        self.name = Path(loaded.name).stem if Path(loaded.name).suffix else loaded.name
        self.path = loaded.path
        self.source = loaded.source
        self._hash: Optional[str] = None
        self.lock = threading.Lock()  # guards the backends' prepared views (see EagerBackend.controlnet_fn)
        self.views: dict = {}

    def __repr__(self):
        return f"ControlNet({self.name!r}, {self.family}, device={self.device}, dtype={self.dtype})"

    @property
    def family(self) -> str:
        from .loading import controlnet_family_name

        return controlnet_family_name(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def shorthash(self) -> Optional[str]:
        """The hash A1111's ControlNet extension writes next to the model's name ("[d14c016b]"):
        A1111's legacy model hash, sha256 of 64 KiB at offset 1 MiB, 8 hex digits (of the first
        weight file for a diffusers folder)."""
        if self._hash is None:
            path = Path(self.path)
            try:
                if path.is_dir():
                    from .loading import controlnet_folder
                    from .weights import component_weight_files

                    path = component_weight_files(controlnet_folder(path))[0]
                with open(path, "rb") as f:
                    f.seek(0x100000)
                    self._hash = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
            except (OSError, ModelLoadError):  # a ControlNet made in memory: no file to hash
                return None
        return self._hash


def load_controlnet(path, device=None, dtype=None, *, base: Optional[ModelConfig] = None) -> ControlNet:
    """Load a ControlNet to reuse across calls: a diffusers ControlNetModel folder, or an A1111 /
    Civitai single file (`control_model.*` keys; .safetensors, or .pth / .ckpt through
    torch.load(weights_only=True)). SD1, SD2 and SDXL ControlNets are detected from keys and shapes.

    device, dtype: as sdengine.load (default CUDA + fp16 when available, else CPU + fp32); give
    the pipeline's. base: the config of the model it will run with (a single file's head counts
    are taken from it; see loading.load_controlnet_model).
    """
    from .loading import load_controlnet_model

    return ControlNet(load_controlnet_model(path, device, dtype, base=base))


@dataclass
class Control:
    """One ControlNet in a request (`pipe(..., control=[Control(...), ...])`).

    model:      a ControlNet (load_controlnet) or a path (loaded on first use, kept by the pipeline).
    image:      the control image: a PIL image, an array (H, W[, C]) (uint8, or float in [0, 1]),
                or a list / (N, H, W, C) batch with one per generated image.
    scale:      multiplies the ControlNet's residuals (diffusers' controlnet_conditioning_scale).
    start, end: the part of the run it is active in, fractions in [0, 1], start <= end.
    guess_mode: diffusers' guess mode (A1111's "ControlNet is more important").
    preprocess: None (the image is the control map) or "canny" (OpenCV's Canny edges of the image,
                thresholds 100 / 200 as A1111's extension; needs the `controlnet` extra).
    """

    model: Any
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    preprocess: Optional[str] = None

    def check(self, index: int) -> None:
        """InvalidArgumentError (a ValueError) naming the field, for a value out of range."""
        where = f"control[{index}]"
        for name in ("scale", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                _fail(f"{where}.{name}", f"must be a finite number, got {value!r}")
        for name in ("start", "end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(f"{where}.{name}", f"must be in [0, 1], got {getattr(self, name)!r}")
        if self.start > self.end:
            _fail(f"{where}.start", f"({self.start}) must not be after end ({self.end})")
        if not isinstance(self.guess_mode, bool):
            _fail(f"{where}.guess_mode", f"must be True or False, got {self.guess_mode!r}")
        if self.preprocess is not None and self.preprocess not in PREPROCESSORS:
            _fail(f"{where}.preprocess", f"must be None or one of {', '.join(PREPROCESSORS)}, got {self.preprocess!r}")
        if not isinstance(self.model, (ControlNet, str, Path)):
            _fail(f"{where}.model", f"must be a ControlNet (sdengine.load_controlnet) or a path, "
                                    f"got {type(self.model).__name__}")


def _fail(parameter: str, message: str):
    from .errors import InvalidArgumentError

    raise InvalidArgumentError(parameter, f"{parameter} {message}")


def as_controls(control) -> list:
    """None, one Control or a sequence of them -> a checked list."""
    if control is None:
        return []
    controls = [control] if isinstance(control, Control) else list(control) if isinstance(control, (list, tuple)) \
        else None
    if controls is None or not all(isinstance(c, Control) for c in controls):
        _fail("control", f"must be a sdengine.Control or a list of them, got {type(control).__name__}")
    for i, c in enumerate(controls):
        c.check(i)
    return controls


def check_fits(controlnet: ControlNet, config: ModelConfig, model_name: str) -> None:
    """ModelLoadError naming both models when the ControlNet's residuals cannot feed this UNet
    (another family, another width, level or layer count)."""
    cn, unet = controlnet.config.unet, config.unet
    checks = [
        ("latent channels", cn.in_channels, config.vae.latent_channels),
        ("cross-attention width", cn.cross_attention_dim, unet.cross_attention_dim),
        ("added embedding", cn.addition_embed_type, unet.addition_embed_type),
        ("channels per level", cn.block_out_channels, unet.block_out_channels),
        ("layers per level", cn.layers_per_block, unet.layers_per_block),
        ("added embedding width", cn.projection_class_embeddings_input_dim,
         unet.projection_class_embeddings_input_dim),
        ("pixels per latent cell", controlnet.config.downscale, config.vae.downscale),
    ]
    for what, theirs, ours in checks:
        if theirs != ours:
            raise ModelLoadError(
                f"the ControlNet {controlnet.name} ({controlnet.family}) does not fit the model {model_name} "
                f"({_family(config)}): its {what} is {theirs}, the model's is {ours}")


def _family(config: ModelConfig) -> str:
    from .loading import controlnet_family_name

    return controlnet_family_name(config)


# ---------------------------------------------------------------------------
# Control images
# ---------------------------------------------------------------------------

def image_size(image, where: str) -> tuple:
    """(width, height) of a control image (the first one of a list or batch)."""
    from PIL import Image

    first = image[0] if isinstance(image, (list, tuple)) and image else image
    if isinstance(first, Image.Image):
        width, height = first.size
    elif isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim in (2, 3, 4):
        shape = tuple(first.shape[1:] if first.ndim == 4 else first.shape)
        height, width = shape[0], shape[1]
    else:
        _fail(where, f"must be a PIL image, an array (H, W[, C]) or a list of them, got {type(first).__name__}")
    if width < 1 or height < 1:
        _fail(where, f"is empty ({width}x{height})")
    return width, height


def prepare_image(image, width: int, height: int, n_images: int, channels: int, preprocess: Optional[str],
                  where: str) -> torch.Tensor:
    """A control image (or one per generated image) -> (N, channels, height, width) float32 in
    [0, 1], as diffusers' control image processor makes it: RGB, resized to the output size
    (PIL images with Lanczos, arrays with nearest), not normalised."""
    from PIL import Image

    images = list(image) if isinstance(image, (list, tuple)) else \
        list(image) if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4 else [image]
    if len(images) not in (1, n_images):
        _fail(where, f"has {len(images)} images but {n_images} are generated (give one, or one each)")
    out = []
    for k, im in enumerate(images):
        name = where if len(images) == 1 else f"{where}[{k}]"
        image_size(im, name)
        if preprocess == "canny":
            im = canny(_to_uint8(im, name))
        if isinstance(im, Image.Image):
            im = im.convert("RGB" if channels == 3 else "L")
            if im.size != (width, height):
                im = im.resize((width, height), resample=Image.LANCZOS)
            arr = np.asarray(im, dtype=np.float32) / 255.0
            t = torch.from_numpy(arr.reshape(height, width, -1)).permute(2, 0, 1)
        elif isinstance(im, (np.ndarray, torch.Tensor)):
            arr = im.detach().cpu().numpy() if isinstance(im, torch.Tensor) else im
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
                _fail(name, f"must be an array (H, W) or (H, W, C) with 1, 3 or 4 channels, got shape "
                            f"{tuple(arr.shape)}")
            if arr.dtype == np.uint8:
                arr = arr.astype(np.float32) / 255.0
            elif not np.issubdtype(arr.dtype, np.floating):
                _fail(name, f"must be uint8 or float in [0, 1], got {arr.dtype}")
            arr = arr.astype(np.float32)[..., :3]
            if not np.isfinite(arr).all():
                _fail(name, "must hold finite values")
            t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (C, h, w)
            if t.shape[-2:] != (height, width):
                t = torch.nn.functional.interpolate(t[None], size=(height, width))[0]  # nearest, as diffusers
        else:
            _fail(name, f"must be a PIL image or an array, got {type(im).__name__}")
        if t.shape[0] != channels:
            t = t[:1].expand(channels, -1, -1) if t.shape[0] == 1 else \
                (t * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
        out.append(t)
    batch = torch.stack(out).float().contiguous()  # (len(images), C, H, W)
    return batch.expand(n_images, -1, -1, -1).contiguous() if batch.shape[0] == 1 else batch


def _to_uint8(image, where: str) -> np.ndarray:
    """An image as uint8 (H, W, 3), what OpenCV's Canny reads."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        _fail(where, f"must be an array (H, W[, C]), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr[..., :3])


def canny(image: np.ndarray, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]) -> np.ndarray:
    """Canny edges (Canny 1986) of a uint8 RGB image (H, W, 3) with OpenCV, as A1111's ControlNet
    extension's "canny" preprocessor: white edges on black, uint8 (H, W, 3)."""
    try:
        import cv2
    except ImportError:
        raise ImportError('preprocess="canny" needs OpenCV: pip install "sdengine[controlnet]" '
                          "(or pip install opencv-python-headless)") from None
    edges = cv2.Canny(image, int(low), int(high))  # (H, W) uint8, 0 or 255
    return cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB)


# ---------------------------------------------------------------------------
# What a backend runs
# ---------------------------------------------------------------------------

@dataclass
class ControlInput:
    """One ControlNet of one request, as a backend runs it (docs/CONTRACTS.md, Backends).

    image:     the control image on the backend's device and dtype, (2N or N, C, H, W): the
               rows of the UNet batch it conditions, or the N conditional rows when cond_only.
    scale:     the residual scale (a float).
    cond_only: guess mode with guidance: it runs on the conditional half of the batch only, and
               the unconditional half's residuals are zero.
    active:    per step of the run, whether it runs (its [start, end]); a list of bools.
    """

    controlnet: ControlNet
    image: torch.Tensor
    scale: float
    guess_mode: bool
    cond_only: bool
    active: list = field(default_factory=list)

    @property
    def key(self) -> tuple:
        """What a captured graph of it bakes in (the scale is read from a device buffer)."""
        return (id(self.controlnet.model), self.guess_mode, self.cond_only, tuple(self.image.shape))


def keep_table(controls: Sequence[Control], steps: int) -> list:
    """Per step, per ControlNet: whether it runs (diffusers' controlnet_keep)."""
    return [[not (i / steps < c.start or (i + 1) / steps > c.end) for c in controls] for i in range(steps)]


def residuals(run, controls: Sequence[ControlInput], scales, x, t, context, added_cond, latent_channels: int):
    """The summed residuals (down list, mid) of several ControlNets on one UNet batch, or None.

    run(control) -> the function computing that ControlNet's (down, mid) from (x, t, context,
    image, scale, guess_mode, added_cond) (a backend's prepared view of it). scales: one per
    control, a float or a device scalar. x: the UNet's input (inpainting's extra channels are
    dropped: a ControlNet reads the latents only)."""
    total_down = total_mid = None
    x = x[:, :latent_channels]
    for control, scale in zip(controls, scales):
        fn = run(control)
        if control.cond_only:  # guess mode with guidance: the conditional half only, zeros for the rest
            n = control.image.shape[0]
            cond = {k: v[-n:] for k, v in added_cond.items()} if added_cond else None
            down, mid = fn(x[-n:], t[-n:], context[-n:], control.image, scale, control.guess_mode, cond)
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        else:
            down, mid = fn(x, t, context, control.image, scale, control.guess_mode, added_cond)
        if total_down is None:
            total_down, total_mid = list(down), mid
        else:
            total_down = [a + b for a, b in zip(total_down, down)]
            total_mid = total_mid + mid
    return None if total_down is None else (total_down, total_mid)


# ---------------------------------------------------------------------------
# Generation parameters and A1111's infotext
# ---------------------------------------------------------------------------

def control_params(control: Control, controlnet: ControlNet, width: int, height: int) -> dict:
    """What a GenerationResult's params record of one ControlNet."""
    return dict(model=controlnet.name, hash=controlnet.shorthash, path=str(controlnet.path),
                module=control.preprocess or "none", weight=control.scale, start=control.start, end=control.end,
                guess_mode=control.guess_mode, processor_res=min(width, height) if control.preprocess else -1)


def controlnet_infotext(params: dict) -> dict:
    """One ControlNet unit as A1111's ControlNet extension writes it into the `parameters` text
    (ControlNetUnit.serialize: `ControlNet 0: "Module: canny, Model: name [hash], Weight: 1.0, ..."`).
    sdengine resizes the control image to the output size ("Just Resize") and runs the
    preprocessor at that size ("Pixel Perfect"); guess mode is the extension's "ControlNet is
    more important"."""
    bare = lambda v: str(v).replace(",", "").replace(":", "")  # noqa: E731 (the extension refuses both)
    canny = params["module"] == "canny"
    return {
        "Module": params["module"], "Model": bare(params["model"]) + (f" [{params['hash']}]" if params["hash"] else ""),
        "Weight": float(params["weight"]), "Resize Mode": "Just Resize", "Processor Res": params["processor_res"],
        "Threshold A": float(CANNY_THRESHOLDS[0]) if canny else -1.0,
        "Threshold B": float(CANNY_THRESHOLDS[1]) if canny else -1.0,
        "Guidance Start": float(params["start"]), "Guidance End": float(params["end"]),
        "Pixel Perfect": canny, "Control Mode": "ControlNet is more important" if params["guess_mode"] else "Balanced",
    }
