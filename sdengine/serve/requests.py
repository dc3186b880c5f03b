"""From an A1111 request to a batching Spec, and from an Output back to A1111's response.

Everything that can be refused is refused here, before the request is queued, as a
`FieldError` naming the A1111 field (the app answers 422 with FastAPI's error shape), so
that a bad request never reaches, and never fails, a batch of good ones.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
import random
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from .. import samplers
from ..request import Request
from ..samplers.names import A1111_SAMPLER_LIST, A1111_SCHEDULE_TABLE, SAMPLER_TABLE, SCHEDULE_TABLE
from .batching import Output, Spec, control_of
from .schemas import MAX_STEPS, Img2ImgRequest, Txt2ImgRequest

# sdengine's parameter names (as its ValueErrors name them) -> A1111's field names.
PIPELINE_TO_A1111 = {
    "num_inference_steps": "steps", "steps": "steps", "guidance_scale": "cfg_scale", "height": "height",
    "width": "width", "seed": "seed", "batch_size": "batch_size", "sampler": "sampler_name",
    "schedule": "scheduler", "strength": "denoising_strength", "init_image": "init_images",
    "mask_image": "mask", "clip_skip": "override_settings.CLIP_stop_at_last_layers", "eta": "eta",
    "negative_prompt": "negative_prompt", "prompt": "prompt",
    "deepcache.branch": "override_settings.deepcache_branch", "deepcache": "override_settings.deepcache_interval",
    "tgate": "override_settings.tgate_gate_step", "tome": "override_settings.token_merging_ratio",
}

# override_settings that switch on sdengine's acceleration (sdengine/acceleration.py): A1111's own
# token_merging_ratio (and token_merging_ratio_img2img), and sdengine's deepcache_* and tgate_gate_step.
ACCELERATION_SETTINGS = ("deepcache_interval", "deepcache_branch", "tgate_gate_step", "token_merging_ratio",
                         "token_merging_ratio_img2img")


class FieldError(ValueError):
    """A request field that cannot be served; `field` is its A1111 name (dotted for nesting)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def detail(self) -> list:
        """FastAPI's validation error shape, so clients parse every 422 the same way."""
        return [{"loc": ["body", *self.field.split(".")], "msg": self.message, "type": "value_error"}]


def field_of(error: ValueError, default: str = "prompt") -> str:
    """The A1111 field a pipeline ValueError is about (its messages start with the parameter name)."""
    text = str(error)
    best = None
    for name, a1111 in PIPELINE_TO_A1111.items():
        pos = text.find(name)
        if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and len(name) > len(best[1]))):
            best = (pos, name, a1111)
    return best[2] if best else default


@dataclass(frozen=True)
class ModelInfo:
    """What the front end needs to know of the loaded model (plain data: it crosses to Ray)."""

    title: str
    filename: str
    default_size: int
    is_inpaint: bool
    scheduler_config: object     # sdengine.config.SchedulerConfig: the checkpoint's sampler and schedule
    config: object = None        # sdengine.config.ModelConfig: Request.for_model's checks, before the queue
    device: str = "cpu"          # where it runs ("cuda:0", "cpu"): A1111's GPU noise needs CUDA
    refiners: tuple = ()         # the names refiner_checkpoint may give: the loaded refiner's title and path
    ip_adapters: tuple = ()      # the loaded IP-Adapters' names, in load order (a ControlNet unit's "model")
    controlnets: tuple = ()      # the loaded ControlNets as (name, A1111 short hash or None), in load order

    @classmethod
    def of(cls, pipe, source: Optional[str] = None, refiner=None, refiner_source: Optional[str] = None,
           controlnets=()) -> "ModelInfo":
        cfg = pipe.config
        refiners = () if refiner is None else tuple(dict.fromkeys((refiner.name, str(refiner_source or refiner.name))))
        return cls(title=pipe.name, filename=str(source or pipe.name), default_size=cfg.default_size,
                   is_inpaint=cfg.is_inpaint, scheduler_config=cfg.scheduler, config=cfg,
                   device=str(pipe.backend.device), refiners=refiners,
                   ip_adapters=tuple(getattr(pipe, "ip_adapter_names", ())),
                   controlnets=tuple((c.name, c.shorthash) for c in controlnets))

    @property
    def controlnet_titles(self) -> list:
        """The ControlNets as A1111's extension lists them: "name [hash]" (the name alone without a hash)."""
        return [f"{name} [{short}]" if short else name for name, short in self.controlnets]


@dataclass
class Limits:
    """The server's caps (ServeSettings), each on one field so that the OpenAPI schema states it."""

    max_size: int = 2048          # width and height, each
    max_steps: int = MAX_STEPS
    max_batch_size: int = 8
    max_batch_count: int = 4      # n_iter: a request makes at most max_batch_size x max_batch_count images


# A1111 features that sdengine does not have: refused unless at their "off" value.
_UNSUPPORTED = {
    "restore_faces": lambda v: not v, "tiling": lambda v: not v,
    "script_name": lambda v: not v, "styles": lambda v: not v,
    "alwayson_scripts": lambda v: not set(v or {}) - set(CONTROLNET_SCRIPT),
    "resize_mode": lambda v: v in (None, 0), "latent_mask": lambda v: not v,
    "firstphase_width": lambda v: not v, "firstphase_height": lambda v: not v, "firstpass_image": lambda v: not v,
    "hr_scheduler": lambda v: v in (None, "", "Use same scheduler"),
}
# The keys of A1111's ControlNet extension in alwayson_scripts (its title, as webuiapi sends it, and lower case)
CONTROLNET_SCRIPT = ("ControlNet", "controlnet")
# The extension's modules (preprocessors) a ControlNet unit may name: "none", the image is the control map.
CONTROLNET_MODULES = ("none", "None")
# IP-Adapter units' modules that /controlnet/module_list lists (any "ip-adapter*" runs the adapter's own encoder)
IP_ADAPTER_MODULES = ("ip-adapter_clip_sd15", "ip-adapter_clip_sdxl", "ip-adapter_clip_sdxl_plus_vith")
# The extension's resize modes, by index: "Just Resize" (also when unset), "Crop and Resize", "Resize and Fill"
RESIZE_MODES = ((None, "", 0, "Just Resize"), (1, "Crop and Resize"), (2, "Resize and Fill"))
# sdengine.Hires's fields (as its errors name them) -> A1111's.
HIRES_FIELDS = {"hires.scale": "hr_scale", "hires.upscaler": "hr_upscaler", "hires.steps": "hr_second_pass_steps",
                "hires.denoising_strength": "denoising_strength", "hires.resize_x": "hr_resize_x",
                "hires.resize_y": "hr_resize_y", "hires.sampler": "hr_sampler_name", "hires.prompt": "hr_prompt",
                "hires.negative_prompt": "hr_negative_prompt", "hires": "hr_scale"}


def hires_of(req, prompt: str, negative: str, info: ModelInfo, limits: Limits, width: int, height: int):
    """The sdengine.Hires of an A1111 txt2img request with enable_hr (None without), checked:
    A1111's defaults (upscaler "Latent", denoising 0.75; an empty hr_prompt is the prompt), the
    second pass within the server's pixel cap, its sampler known. Raises FieldError."""
    from ..errors import InvalidArgumentError
    from ..hires import Hires

    # the names are checked whether the hires fix is on or not (the schema states them as enums)
    if req.hr_checkpoint_name and req.hr_checkpoint_name not in (info.title, info.filename):
        raise FieldError("hr_checkpoint_name", f"model {req.hr_checkpoint_name!r} is not loaded; the hires pass runs "
                                               f"on {info.title!r}")
    if req.hr_sampler_name:
        try:
            samplers.resolve(req.hr_sampler_name, None, info.scheduler_config)
        except ValueError as e:
            raise FieldError("hr_sampler_name", str(e)) from None
    if not req.enable_hr:
        return None
    hires = Hires(scale=req.hr_scale if req.hr_scale is not None else 2.0, upscaler=req.hr_upscaler or "Latent",
                  steps=req.hr_second_pass_steps or 0,
                  denoising_strength=req.denoising_strength if req.denoising_strength is not None else 0.75,
                  resize_x=req.hr_resize_x or 0, resize_y=req.hr_resize_y or 0, sampler=req.hr_sampler_name or None,
                  prompt=req.hr_prompt if req.hr_prompt and req.hr_prompt != prompt else None,
                  negative_prompt=req.hr_negative_prompt if req.hr_negative_prompt and req.hr_negative_prompt != negative
                  else None)
    try:
        hires.check()
    except InvalidArgumentError as e:
        raise FieldError(HIRES_FIELDS.get(e.parameter, "enable_hr"), str(e)) from None
    target = hires.target(width, height)
    if max(target.width, target.height) > limits.max_size:
        raise FieldError("hr_resize_x" if hires.resize_x or hires.resize_y else "hr_scale",
                         f"the hires pass of {target.width}x{target.height} is over this server's cap of "
                         f"{limits.max_size} a side (--max-size)")
    return hires


def extension_units(req, info: ModelInfo, limits: Limits, size: tuple) -> tuple:
    """The enabled units with an image that an A1111 request sends as its ControlNet extension sends
    them (alwayson_scripts.ControlNet.args), checked: ((IP-Adapter images, scales), ControlNet units).
    Units that are disabled or have no image are ignored, as the extension ignores them in txt2img.

    A unit whose module is "ip-adapter_*" is an IP-Adapter unit (ip_adapter_unit); any other is a
    ControlNet unit (controlnet_unit). The IP-Adapters get one image per loaded adapter (an adapter no
    unit names runs at scale 0), each as (width, height, RGB bytes) so that specs stay plain data;
    ((), ()) when no IP-Adapter unit is enabled. size: the request's (width, height), which a
    ControlNet unit's resize mode fits its image to. Raises FieldError naming the unit by its index in args."""
    scripts = req.alwayson_scripts or {}
    key = next((k for k in CONTROLNET_SCRIPT if k in scripts), None)
    script = scripts[key] if key is not None else {}
    if not isinstance(script, dict) or not isinstance(script.get("args", []), (list, type(None))):
        raise FieldError(f"alwayson_scripts.{key}", "must be {\"args\": [unit, ...]} (A1111's ControlNet extension)")
    ip_images, ip_scales = [None] * len(info.ip_adapters), [0.0] * len(info.ip_adapters)
    controls = []
    for i, unit in enumerate(script.get("args") or []):
        where = f"alwayson_scripts.{key}.args.{i}"
        if not isinstance(unit, dict) or unit.get("enabled", True) is False or unit.get("enabled", True) is None:
            continue  # ignored, as the extension ignores them
        image = unit_image(unit, where)
        if image is None:
            continue
        if unit.get("enabled", True) is not True:
            raise FieldError(f"{where}.enabled", f"must be true or false, got {unit['enabled']!r}")
        if str(unit.get("module") or "").startswith("ip-adapter"):
            index, scale, decoded = ip_adapter_unit(unit, where, image, info, limits)
            ip_images[index], ip_scales[index] = decoded, scale
        else:
            controls.append((where, controlnet_unit(unit, where, image, info, limits, size)))
    if all(im is None for im in ip_images):
        return ((), ()), tuple(controls)
    first = next(im for im in ip_images if im is not None)
    return (tuple(im if im is not None else first for im in ip_images), tuple(ip_scales)), tuple(controls)


def unit_image(unit: dict, where: str):
    """A unit's base64 image (None without one): `image` (or the older `input_image`) as a string,
    or as {"image": ..., "mask": ...} (A1111's ControlNet API). A mask is refused: sdengine serve
    runs no ControlNet masks (inpainting ControlNets)."""
    for name in ("image", "input_image"):
        value = unit.get(name)
        if isinstance(value, dict):
            if value.get("mask") not in (None, ""):
                raise FieldError(f"{where}.{name}.mask", "ControlNet masks are not supported by sdengine serve")
            value = value.get("image")
            if value not in (None, "") and not isinstance(value, str):
                raise FieldError(f"{where}.{name}.image", "must be a base64 image or empty")
        elif value not in (None, "") and not isinstance(value, str):
            raise FieldError(f"{where}.{name}", "must be a base64 image, {\"image\": base64, \"mask\": null} "
                                                "or empty")
        if value:
            if unit.get("mask") not in (None, ""):
                raise FieldError(f"{where}.mask", "ControlNet masks are not supported by sdengine serve")
            return value
    return None


def _weight(unit: dict, where: str) -> float:
    weight = unit.get("weight", 1.0)
    weight = 1.0 if weight is None else weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise FieldError(f"{where}.weight", f"must be a finite number, got {weight!r}")
    return float(weight)


def ip_adapter_unit(unit: dict, where: str, image: str, info: ModelInfo, limits: Limits) -> tuple:
    """(the adapter's index in load order, its scale, its image as (width, height, RGB bytes)) of an
    IP-Adapter unit: model naming a loaded adapter as "name" or "name [hash]", weight. Raises FieldError."""
    model = str(unit.get("model") or "")
    name = model.split(" [")[0]
    if name not in info.ip_adapters:
        loaded = ", ".join(map(repr, info.ip_adapters)) or "none (sdengine serve MODEL --ip-adapter FILE)"
        raise FieldError(f"{where}.model", f"IP-Adapter {model!r} is not loaded; loaded: {loaded}")
    if (unit.get("guidance_start") or 0) != 0 or unit.get("guidance_end", 1) not in (None, 1):
        raise FieldError(f"{where}.guidance_start", "an IP-Adapter runs at every step here (0 to 1)")
    weight = _weight(unit, where)
    decoded = decode_image(image, f"{where}.image", limits).convert("RGB")
    return info.ip_adapters.index(name), weight, (decoded.width, decoded.height, decoded.tobytes())


def _one_of(value, options) -> bool:
    """value in options, where JSON's true / false are not 1 / 0."""
    return not isinstance(value, bool) and value in options


def controlnet_unit(unit: dict, where: str, image: str, info: ModelInfo, limits: Limits, size: tuple) -> tuple:
    """A ControlNet unit as plain data for batching.ServedPipeline, which makes it a sdengine.Control:
    (model name, (width, height, RGB bytes), scale, start, end, guess_mode).

    module: "none" (the image is the control map as sent; the server runs no preprocessor, so
    processor_res and the thresholds play no part). model: a loaded ControlNet as "name" or A1111's
    "name [hash]". weight: the residual scale; guidance_start / guidance_end: the part of the run it
    is active in (sdengine.Control's start / end, checked by Request.from_args). control_mode:
    "Balanced" (0), or "ControlNet is more important" (2: diffusers' guess mode, as sdengine's
    infotext names it). resize_mode: how the control image meets size = (width, height), as the
    extension does it: "Just Resize" (0: stretched), "Crop and Resize" (1: scaled to cover, then
    centre-cropped) or "Resize and Fill" (2: scaled to fit, centred on its border's median colour;
    webuiapi's default). hr_option: "Both" (the hires pass runs the ControlNet too). Raises FieldError."""
    module = unit.get("module")
    if module not in (None, "", *CONTROLNET_MODULES):
        raise FieldError(f"{where}.module", f"ControlNet units take module 'none' (the control image is used as "
                                            f"sent; sdengine serve runs no preprocessors), got {module!r}")
    model = str(unit.get("model") or "")
    name = model.split(" [")[0]
    names = [n for n, _ in info.controlnets]
    if name not in names:
        loaded = ", ".join(map(repr, names)) or "none (sdengine serve MODEL --controlnet PATH)"
        raise FieldError(f"{where}.model", f"ControlNet {model!r} is not loaded; loaded: {loaded} "
                                           f"(GET /controlnet/model_list)")
    weight = _weight(unit, where)
    bounds = {}
    for field, default in (("guidance_start", 0.0), ("guidance_end", 1.0)):
        value = unit.get(field, default)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FieldError(f"{where}.{field}", f"must be a number in [0, 1], got {value!r}")
        bounds[field] = float(value)
    mode = unit.get("control_mode", 0)
    if _one_of(mode, (None, 0, "Balanced")):
        guess_mode = False
    elif _one_of(mode, (2, "ControlNet is more important")):
        guess_mode = True
    else:
        raise FieldError(f"{where}.control_mode", f"must be 'Balanced' (0) or 'ControlNet is more important' (2), "
                                                  f"got {mode!r}")
    if not _one_of(unit.get("hr_option"), (None, "", "Both")):
        raise FieldError(f"{where}.hr_option", f"the hires pass runs every ControlNet here: 'Both', got "
                                               f"{unit.get('hr_option')!r}")
    resize = next((m for m, spellings in enumerate(RESIZE_MODES) if _one_of(unit.get("resize_mode"), spellings)), None)
    if resize is None:
        raise FieldError(f"{where}.resize_mode", f"must be 'Just Resize' (0), 'Crop and Resize' (1) or 'Resize and "
                                                 f"Fill' (2), got {unit.get('resize_mode')!r}")
    decoded = fit_control_image(decode_image(image, f"{where}.image", limits).convert("RGB"), resize, *size)
    return (name, (decoded.width, decoded.height, decoded.tobytes()), weight, bounds["guidance_start"],
            bounds["guidance_end"], guess_mode)


def refiner_of(req, info: ModelInfo) -> Optional[str]:
    """The loaded refiner an A1111 request names (refiner_checkpoint: its title, path, or A1111's
    "name [hash]" title), or None. Raises FieldError."""
    name = req.refiner_checkpoint
    if not name or name in ("None", "none"):
        return None
    for candidate in (name, name.split(" [")[0]):
        if candidate in info.refiners:
            break
    else:
        loaded = f"this server's refiner is {info.refiners[0]!r}" if info.refiners else \
            "this server has no refiner (sdengine serve MODEL --refiner PATH)"
        raise FieldError("refiner_checkpoint", f"refiner {name!r} is not loaded; {loaded}")
    switch = req.refiner_switch_at if req.refiner_switch_at is not None else 0.8
    if not 0.0 < switch < 1.0:
        raise FieldError("refiner_switch_at", f"must be in (0, 1), got {switch!r}")
    return info.refiners[0]


def make_spec(req, info: ModelInfo, limits: Limits, *, img2img: bool, prompt_syntax: Optional[str] = "a1111",
              lora_dir=None) -> Spec:
    """Validate an A1111 request and turn it into a Spec. Raises FieldError.

    prompt_syntax "a1111" (A1111's API): emphasis, 75-token windows and <lora:name:weight> tags,
    resolved in lora_dir now, so an unknown LoRA is a 422 naming the prompt before any work."""
    for name, is_off in _UNSUPPORTED.items():
        if name in type(req).model_fields and not is_off(getattr(req, name)):
            raise FieldError(name, f"not supported by sdengine serve (got {getattr(req, name)!r})")
    settings = req.override_settings.model_dump() if req.override_settings is not None else {}
    wanted_model = settings.get("sd_model_checkpoint")
    if wanted_model and wanted_model not in (info.title, info.filename):
        raise FieldError("override_settings.sd_model_checkpoint",
                         f"model {wanted_model!r} is not loaded; this server serves {info.title!r}")

    width = info.default_size if req.width is None else req.width
    height = info.default_size if req.height is None else req.height
    steps = req.steps or default_steps(limits)
    batch_size = req.batch_size or 1
    n_iter = req.n_iter or 1
    for field, value, cap, flag in (("width", width, limits.max_size, "--max-size"),
                                    ("height", height, limits.max_size, "--max-size"),
                                    ("steps", steps, limits.max_steps, "--max-steps"),
                                    ("hr_second_pass_steps", getattr(req, "hr_second_pass_steps", 0) or 0,
                                     limits.max_steps, "--max-steps"),
                                    ("hr_resize_x", getattr(req, "hr_resize_x", 0) or 0, limits.max_size, "--max-size"),
                                    ("hr_resize_y", getattr(req, "hr_resize_y", 0) or 0, limits.max_size, "--max-size"),
                                    ("batch_size", batch_size, limits.max_batch_size, "--max-batch-size"),
                                    ("n_iter", n_iter, limits.max_batch_count, "--max-batch-count")):
        if value > cap:
            raise FieldError(field, f"{value} is over this server's cap of {cap} ({flag})")
    n_images = batch_size * n_iter

    sampler, schedule_name, conventions = sampler_and_schedule(req, info.scheduler_config)
    sampler_name = req.sampler_name or req.sampler_index or "Euler"
    clip_stop = settings.get("CLIP_stop_at_last_layers") or 1

    branches = 3 * len(info.config.unet.block_out_channels) if info.config is not None else None
    if branches is not None and (settings.get("deepcache_branch") or 0) >= branches:
        raise FieldError("override_settings.deepcache_branch", f"must be below {branches} for this UNet, got "
                                                                f"{settings['deepcache_branch']}")
    acceleration = _acceleration(settings, img2img)
    seed = _fixed_seed(req.seed)
    seeds = [seed + i for i in range(n_images)]
    prompt = req.prompt or ""
    negative = req.negative_prompt or ""
    if conventions == "a1111":  # eta: the ancestral / SDE samplers' (None: A1111's default)
        eta = None if req.eta is None else float(req.eta)
    else:
        eta = float(req.eta or 0.0) if sampler == "ddim" else 0.0  # diffusers: eta is DDIM's; others have none
    shared = dict(num_inference_steps=steps, guidance_scale=float(req.cfg_scale if req.cfg_scale is not None else 7.0),
                  height=height, width=width, sampler=sampler, schedule=schedule_name, eta=eta,
                  clip_skip=clip_stop - 1 if clip_stop > 1 else None, conventions=conventions, **acceleration)
    subseeds = None
    if conventions == "a1111":  # A1111's seed options (rng.py): variation seeds, resize, ENSD, RNG source
        if req.subseed_strength:
            subseed = _fixed_seed(req.subseed)
            seeds, subseeds = [seed] * n_images, [subseed + i for i in range(n_images)]
            shared["subseed_strength"] = float(req.subseed_strength)
        if (req.seed_resize_from_w or 0) > 0 and (req.seed_resize_from_h or 0) > 0:  # each in [8, MAX_SIDE]
            shared.update(seed_resize_from_w=req.seed_resize_from_w, seed_resize_from_h=req.seed_resize_from_h)
        if settings.get("eta_noise_seed_delta"):
            shared["eta_noise_seed_delta"] = settings["eta_noise_seed_delta"]
        if settings.get("randn_source"):
            shared["rng"] = str(settings["randn_source"]).lower()
            if shared["rng"] == "gpu" and not info.device.startswith("cuda"):
                raise FieldError("override_settings.randn_source", f"GPU is CUDA's generator and this server runs on "
                                                                   f"{info.device}; NV draws the same numbers anywhere")
    elif req.subseed_strength:
        raise FieldError("subseed_strength", f"variation seeds follow A1111's rules, which sdengine does not reproduce "
                                             f"for sampler {sampler_name!r}")
    mode = "txt2img"
    init_images = masks = None
    if img2img:
        if not req.init_images:
            raise FieldError("init_images", "img2img needs at least one init image")
        most = limits.max_batch_size * limits.max_batch_count
        if len(req.init_images) > most:
            raise FieldError("init_images", f"{len(req.init_images)} images, over the {most} a request can use "
                                            f"(--max-batch-size x --max-batch-count)")
        decoded = [decode_image(s, f"init_images.{i}", limits) for i, s in enumerate(req.init_images)]
        resized = [_resize(im.convert("RGB"), width, height) for im in decoded]
        init_images = [resized[i % len(resized)] for i in range(n_images)]  # one image serves the whole batch
        strength = req.denoising_strength if req.denoising_strength is not None else 0.75
        # A1111 runs at least one step, however low the strength: the last one of the schedule
        strength = max(strength, min(1.0, (1 + 1e-6) / steps))
        mode = "img2img"
        if req.mask:
            mode = "inpaint"
            mask = _binary_mask(decode_image(req.mask, "mask", limits), invert=bool(req.inpainting_mask_invert))
            masks = [_resize(mask, width, height)] * n_images
            if not info.is_inpaint:
                raise FieldError("mask", f"inpainting needs an inpainting model (9-channel UNet); {info.title} is not "
                                         "one")
        elif info.is_inpaint:
            raise FieldError("mask", f"{info.title} is an inpainting model: img2img needs a mask")
        shared["strength"] = float(strength)
    elif info.is_inpaint:
        raise FieldError("init_images", f"{info.title} is an inpainting model: use img2img with init_images and mask")
    hires = hires_of(req, prompt, negative, info, limits, width, height) if not img2img else None
    refiner = refiner_of(req, info)
    (ip_images, ip_scales), controls = extension_units(req, info, limits, (width, height))
    if hires is not None and refiner is not None:
        raise FieldError("refiner_checkpoint", "the refiner and the hires fix cannot be combined yet")
    try:  # the checks every front end shares (sdengine.request: generate, the CLI, the C API's bindings)
        request = Request.from_args(prompt, negative_prompt=negative, seed=seeds, batch_size=n_images,
                                    init_image=init_images[0] if init_images else None,
                                    mask_image=masks[0] if masks else None, progress=False, subseed=subseeds,
                                    hires=hires, control=[control_of(unit) for _, unit in controls] or None, **shared)
        if info.config is not None:
            request.for_model(info.config)
    except ValueError as e:
        raise FieldError(_control_field(e, [where for where, _ in controls]) or field_of(e), str(e)) from None
    check_plan(sampler, schedule_name, steps, info.scheduler_config, conventions,
               strength=shared.get("strength", 1.0) if mode == "img2img" else 1.0, eta=shared["eta"])
    if hires is not None:
        shared["hires"] = hires
    if ip_images:  # as plain data; batching.ServedPipeline makes them images again
        shared.update(ip_adapter_image=ip_images, ip_adapter_scale=ip_scales)
    if controls:  # as plain data too: ServedPipeline makes them sdengine.Controls of the loaded ControlNets
        shared["control"] = tuple(unit for _, unit in controls)
    if refiner is not None:
        shared.update(refiner=refiner, refiner_switch_at=float(req.refiner_switch_at or 0.8))
    loras = ()
    if prompt_syntax is not None:
        from .. import prompt_syntax as a1111

        try:
            _, _, tagged = a1111.lora_tags([prompt], [negative], lora_dir)
        except (ValueError, FileNotFoundError) as e:
            raise FieldError("prompt", str(e)) from None
        loras = tuple((str(t.path), t.scale, t.text_scale) for t in tagged)  # requests of one set batch together
        shared.update(prompt_syntax=prompt_syntax, lora_dir=str(lora_dir) if lora_dir is not None else None)
    return Spec(mode=mode, prompts=[prompt] * n_images, negatives=[negative] * n_images, seeds=seeds,
                shared=shared, init_images=init_images, masks=masks, request_id=uuid.uuid4().hex, loras=loras,
                subseeds=subseeds, task_id=req.force_task_id or "")


# sdengine.Control's fields (as Request.from_args's errors name them: control[i].start) -> the unit's.
CONTROL_FIELDS = {"scale": "weight", "start": "guidance_start", "end": "guidance_end", "image": "image",
                  "model": "model", "guess_mode": "control_mode"}


def _control_field(error: ValueError, wheres: list) -> Optional[str]:
    """The unit field a Request.from_args error about control[i] names, or None."""
    import re

    match = re.match(r"control\[(\d+)\](?:\.(\w+))?", getattr(error, "parameter", "") or "")
    if match is None or int(match.group(1)) >= len(wheres):
        return None
    field = CONTROL_FIELDS.get(match.group(2) or "", "model")
    return f"{wheres[int(match.group(1))]}.{field}"


@functools.cache
def accepted_names() -> tuple:
    """(sampler names, scheduler names) that the server takes, exactly as spelled: what
    /sdapi/v1/samplers and /schedulers list (A1111's labels and aliases) and sdengine's own
    names; "" means the default."""
    sampler_names = {""}
    for label, aliases, _ in A1111_SAMPLER_LIST:
        sampler_names.update((label, *aliases))
    for name, label, aliases in SAMPLER_TABLE:
        sampler_names.update((name, label, *aliases))
    schedule_names = {""}
    for name, label, aliases, _, _ in A1111_SCHEDULE_TABLE:
        schedule_names.update((name, label, *(aliases or ())))
    for name, label, api_name, _ in SCHEDULE_TABLE:
        schedule_names.update((name, label, api_name))
    return frozenset(sampler_names), frozenset(schedule_names)


def default_steps(limits: Limits) -> int:
    """A1111's API default, 50, within --max-steps."""
    return min(50, limits.max_steps)


def sampler_and_schedule(req, scheduler_config) -> tuple:
    """(sampler, schedule, conventions) of a request (samplers.conventions_for); FieldError for a name the server does not
    take (the OpenAPI schema lists them: accepted_names) or a pair that does not go together."""
    sampler_names, schedule_names = accepted_names()
    for field in ("sampler_name", "sampler_index"):
        value = getattr(req, field)
        if value and value not in sampler_names:
            raise FieldError(field, f"unknown sampler {value!r}; GET /sdapi/v1/samplers lists them")
    if req.scheduler is not None and req.scheduler not in schedule_names:
        raise FieldError("scheduler", f"unknown schedule {req.scheduler!r}; GET /sdapi/v1/schedulers lists them")
    sampler_name = req.sampler_name or req.sampler_index or "Euler"
    schedule = None if req.scheduler in (None, "", "automatic", "Automatic") else req.scheduler
    # A1111's clients send A1111's labels: those run under A1111's rules where sdengine reproduces
    # them (samplers.conventions_for), and the infotext says when a run followed diffusers' instead
    conventions = samplers.conventions_for(sampler_name)
    resolve = samplers.resolve_a1111 if conventions == "a1111" else samplers.resolve
    try:
        return (*resolve(sampler_name, schedule, scheduler_config), conventions)
    except ValueError as e:
        raise FieldError("sampler_name" if str(e).startswith("unknown sampler") else "scheduler", str(e)) from None


def _acceleration(settings: dict, img2img: bool) -> dict:
    """deepcache / tgate / tome from override_settings (0 or absent: off), checked: FieldError."""
    from ..acceleration import DeepCache, TGate, ToMe

    def number(name, kind, default=0):
        value = settings.get(name, default)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
            raise FieldError(f"override_settings.{name}", f"must be a {'number' if kind is not int else 'integer'} "
                                                          f">= 0 (0: off), got {value!r}")
        return value

    out = {}
    try:
        interval, branch = number("deepcache_interval", int), number("deepcache_branch", int)
        if interval:
            out["deepcache"] = DeepCache(interval=interval, branch=branch)
        gate = number("tgate_gate_step", int)
        if gate:
            out["tgate"] = TGate(gate_step=gate)
        ratio = number("token_merging_ratio", (int, float))
        if img2img and number("token_merging_ratio_img2img", (int, float)):  # A1111: its own ratio for img2img
            ratio = settings["token_merging_ratio_img2img"]
        if ratio:
            out["tome"] = ToMe(ratio=float(ratio))
    except ValueError as e:
        if isinstance(e, FieldError):
            raise
        raise FieldError(field_of(e), str(e)) from None
    return out


def check_plan(sampler: str, schedule, steps: int, scheduler_config, conventions: str, strength: float = 1.0,
               eta=None) -> None:
    """The sampler's own checks (steps, strength, eta) of sampler_and_schedule's answer, before
    the request is queued; FieldError naming the field."""
    try:
        samplers.plan_for(sampler, schedule, steps, scheduler_config, conventions=conventions, strength=strength,
                          eta=eta)
    except ValueError as e:
        raise FieldError(field_of(e, default="steps"), str(e)) from None


def _fixed_seed(seed) -> int:
    """A1111's get_fixed_seed: -1 (or none) is a random seed."""
    if seed is None or seed == -1:
        return random.randrange(4294967294)
    if seed < 0:
        raise FieldError("seed", f"must be -1 (random) or >= 0, got {seed}")
    if seed >= 2 ** 63:
        raise FieldError("seed", f"must be below 2**63, got {seed}")
    return seed


# ---------------------------------------------------------------------------
# Images in and out
# ---------------------------------------------------------------------------

def decode_image(data: str, field: str, limits: Limits):
    """A base64 image (optionally a data: URL) -> a loaded PIL image. Raises FieldError."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str) or not data:
        raise FieldError(field, "must be a base64-encoded image")
    if data.startswith(("http://", "https://")):
        raise FieldError(field, "image URLs are not fetched: send the image as base64")
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if ";base64" not in head:
            raise FieldError(field, "a data: URL must be base64-encoded")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > 4 * limits.max_size ** 2:
            raise FieldError(field, f"image of {image.width}x{image.height} is too large")
        image.load()
    except FieldError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise FieldError(field, "is not an image PIL can read (PNG, JPEG, WebP, ...)") from None
    return image


def _resize(image, width: int, height: int):
    """A1111's resize_mode 0, "Just resize" (LANCZOS)."""
    from PIL import Image

    return image if image.size == (width, height) else image.resize((width, height), resample=Image.LANCZOS)


def fit_control_image(image, mode: int, width: int, height: int):
    """The ControlNet extension's resize modes 1 and 2 on an RGB image, to width x height (its
    INNER_FIT / OUTER_FIT: scale by the larger / smaller of the two ratios, rounded sizes, then crop
    the centre / centre it on a canvas of the median colour of its border pixels, offsets floored).
    Mode 0 ("Just Resize") returns the image as it is: the pipeline stretches it (Lanczos)."""
    import numpy as np
    from PIL import Image

    if mode == 0 or image.size == (width, height):
        return image
    scale = (max if mode == 1 else min)(width / image.width, height / image.height)
    fitted = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                          resample=Image.LANCZOS)
    if mode == 1:
        left, top = max(0, (fitted.width - width) // 2), max(0, (fitted.height - height) // 2)
        return fitted.crop((left, top, left + width, top + height))
    pixels = np.asarray(image)  # (H, W, 3)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (2W + 2H, 3)
    canvas = Image.new("RGB", (width, height), tuple(int(v) for v in np.median(border, axis=0).astype(np.uint8)))
    canvas.paste(fitted, (max(0, (width - fitted.width) // 2), max(0, (height - fitted.height) // 2)))
    return canvas


def _binary_mask(image, invert: bool):
    """A1111's create_binary_mask: an RGBA mask with real transparency uses its alpha channel."""
    from PIL import ImageOps

    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        mask = image.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
    else:
        mask = image.convert("L")
    return ImageOps.invert(mask) if invert else mask


def encode_png(image, infotext: str) -> str:
    """Base64 PNG with the A1111 `parameters` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def response_body(req, spec: Spec, out: Output, info: ModelInfo) -> dict:
    """A1111's TextToImageResponse / ImageToImageResponse."""
    sampler_label = req.sampler_name or req.sampler_index or "Euler"
    first_neg = spec.negatives[0] if spec.negatives else ""
    js = {
        "prompt": spec.prompts[0], "all_prompts": spec.prompts[:len(out.images)] or spec.prompts,
        "negative_prompt": first_neg, "all_negative_prompts": spec.negatives[:len(out.images)] or spec.negatives,
        "seed": spec.seeds[0], "all_seeds": out.seeds or spec.seeds,
        "subseed": spec.subseeds[0] if spec.subseeds else -1,
        "all_subseeds": spec.subseeds or [-1] * len(out.seeds or spec.seeds),
        "subseed_strength": spec.shared.get("subseed_strength", 0),
        "width": spec.shared["width"], "height": spec.shared["height"], "sampler_name": sampler_label,
        "scheduler": req.scheduler or "automatic",
        "cfg_scale": spec.shared["guidance_scale"], "steps": spec.shared["num_inference_steps"],
        "batch_size": req.batch_size or 1, "restore_faces": None, "face_restoration_model": None,
        "sd_model_name": info.title, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": spec.shared.get("strength"), "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": out.infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": (spec.shared.get("clip_skip") or 0) + 1,
        "is_using_inpainting_conditioning": spec.mode == "inpaint",
        "interrupted": out.interrupted,
    }
    images = [encode_png(im, text) for im, text in zip(out.images, out.infotexts)] if req.send_images is not False else []
    parameters = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"] = None
        parameters["mask"] = None
    parameters.update(width=spec.shared["width"], height=spec.shared["height"], seed=spec.seeds[0])
    return {"images": images, "parameters": parameters, "info": json.dumps(js)}


__all__ = ["FieldError", "ModelInfo", "Limits", "make_spec", "decode_image", "encode_png", "response_body",
           "field_of", "Txt2ImgRequest", "Img2ImgRequest"]
