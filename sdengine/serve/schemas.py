"""AUTOMATIC1111's `/sdapi/v1` request and response bodies, as pydantic models.

Field names and defaults are A1111's (modules/processing.py's StableDiffusionProcessing*
dataclasses and modules/api/models.py), so that its clients (the `webuiapi` package,
extensions, bots) work unchanged. As in A1111 every field may be null (= its default),
and unknown fields are ignored. Type errors are pydantic's: FastAPI answers them with 422
and the field's location (`{"detail": [{"loc": ["body", "steps"], ...}]}`).

Types are strict, as JSON Schema reads them: `false` is not a number, `1` is not a boolean,
`"7"` is not a number. The OpenAPI schema (openapi.py) adds what depends on the server: its
caps, the loaded model's sizes, the sampler and schedule names it takes.

Two deliberate differences:
- `width` / `height` default to the loaded model's native size (512 for SD1.5, as in A1111;
  32 for the bundled demo model) instead of always 512.
- Fields for features sdengine does not have (face restoration, tiling, variation seeds,
  scripts, styles, a hires checkpoint or scheduler of its own) take only their "off" value, and
  are refused with a 422 naming the field otherwise, rather than silently producing a different
  image than asked for. The hires fix (enable_hr, hr_*) is sdengine.Hires, refiner_checkpoint
  names the refiner the server loaded (`sdengine serve MODEL --refiner PATH`), and
  alwayson_scripts takes IP-Adapter and ControlNet units of A1111's ControlNet extension.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ..hires import UPSCALERS
from ..request import MAX_SIDE

# Limits that hold for every server; the configurable ones (size, steps, images per request)
# are checked against ServeSettings in requests.py and stated in the OpenAPI schema.
MAX_STEPS = 1000
MAX_PROMPT_CHARS = 20_000
MAX_SEED = 2 ** 63 - 1


def _not_bool(value):
    """Literal[0] and Literal[False] compare equal to False and 0: keep JSON's types apart."""
    if isinstance(value, bool):
        raise ValueError("must not be a boolean")
    return value


def _json_int(value):
    """An integer as JSON Schema reads one: 3 or 3.0, not true, "3" or 3.5."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or (value is not None and not isinstance(value, int)):
        raise ValueError("must be an integer")
    return value


def _bool(value):
    if value is not None and not isinstance(value, bool):
        raise ValueError("must be a boolean")
    return value


def Int(**constraints):
    """An integer field as JSON Schema reads one (_json_int), with Field's constraints (ge, le,
    multiple_of), which pydantic writes into the schema only when they come before the validator."""
    return Annotated[int, Field(**constraints), BeforeValidator(_json_int)]


# A1111's seed resize: -1 or 0 is off, else a size in [8, MAX_SIDE] (sdengine.request's)
SeedResize = Union[Annotated[Literal[-1, 0], BeforeValidator(_not_bool)], Int(ge=8, le=MAX_SIDE)]
# A hires fix's target side: 0 (from hr_scale or the other side) or a size in [8, MAX_SIDE], a multiple of 8
HiresSide = Union[Annotated[Literal[0], BeforeValidator(_not_bool)], Int(ge=8, le=MAX_SIDE, multiple_of=8)]
Off = Annotated[Optional[Literal[False]], BeforeValidator(_bool)]   # a feature sdengine lacks: false or null
Zero = Annotated[Optional[Literal[0]], BeforeValidator(_not_bool)]
Empty = Optional[Literal[""]]


class OverrideSettings(BaseModel):
    """A1111's per-request settings. Two change the image here; the others are accepted and
    ignored, as A1111 ignores settings it does not know."""

    model_config = ConfigDict(extra="allow", strict=True, protected_namespaces=())

    sd_model_checkpoint: Optional[str] = None       # must name the loaded model (one model per server)
    CLIP_stop_at_last_layers: Optional[Int(ge=1)] = None
    # A1111's seed options, under A1111's rules (samplers.conventions_for): its "ENSD" and RNG source
    eta_noise_seed_delta: Optional[Int(ge=0, le=2 ** 63)] = None  # plus any seed stays within 2**64 - 1
    randn_source: Optional[Literal["CPU", "GPU", "NV", "cpu", "gpu", "nv"]] = None
    # sdengine's acceleration (sdengine/acceleration.py; 0 or null: off) and A1111's token merging
    deepcache_interval: Optional[Int(ge=0)] = None
    deepcache_branch: Optional[Int(ge=0)] = None   # below 3 x the UNet's levels (the schema says for the model)
    tgate_gate_step: Optional[Int(ge=0)] = None
    token_merging_ratio: Optional[float] = Field(None, ge=0.0, le=0.75)  # ToMe's 1 - 1/(2·2)
    token_merging_ratio_img2img: Optional[float] = Field(None, ge=0.0, le=0.75)


class _Request(BaseModel):
    """Fields shared by txt2img and img2img (A1111's StableDiffusionProcessing)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)

    prompt: Optional[str] = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: Optional[str] = Field("", max_length=MAX_PROMPT_CHARS)
    styles: Optional[list[str]] = Field(None, max_length=0)
    seed: Optional[Int(ge=-1, le=MAX_SEED)] = -1
    subseed: Optional[Int(ge=-1, le=MAX_SEED)] = -1
    subseed_strength: Optional[float] = Field(0.0, ge=0.0, le=1.0)  # A1111's rules only: 0 otherwise
    seed_resize_from_h: Optional[SeedResize] = -1
    seed_resize_from_w: Optional[SeedResize] = -1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = "Euler"  # A1111's deprecated alias of sampler_name, and its default
    scheduler: Optional[str] = None
    batch_size: Optional[Int(ge=1)] = 1
    n_iter: Optional[Int(ge=1)] = 1
    steps: Optional[Int(ge=1, le=MAX_STEPS)] = None  # null: A1111's 50, within --max-steps
    cfg_scale: Optional[float] = Field(7.0, ge=0.0, allow_inf_nan=False)
    width: Optional[Int(ge=8, multiple_of=8)] = None
    height: Optional[Int(ge=8, multiple_of=8)] = None
    restore_faces: Off = None
    tiling: Off = None
    do_not_save_samples: Optional[bool] = False
    do_not_save_grid: Optional[bool] = False
    eta: Optional[float] = Field(None, ge=0.0, allow_inf_nan=False)
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[OverrideSettings] = None
    override_settings_restore_afterwards: Optional[bool] = True
    refiner_checkpoint: Optional[str] = None  # the refiner the server loaded (openapi.py: its names' enum)
    refiner_switch_at: Optional[float] = Field(None, gt=0.0, lt=1.0, allow_inf_nan=False)
    disable_extra_networks: Optional[bool] = False
    comments: Optional[dict] = None
    script_name: Empty = None
    script_args: Optional[list] = []
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False
    # A1111's ControlNet extension's IP-Adapter and ControlNet units (openapi.py states them where loaded)
    alwayson_scripts: Optional[dict] = {}
    force_task_id: Optional[str] = Field(None, max_length=200)  # names the request for /internal/progress
    infotext: Optional[str] = None


class Txt2ImgRequest(_Request):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionProcessingTxt2Img)."""

    # A1111's hires fix (sdengine.Hires; its ranges)
    enable_hr: Annotated[Optional[bool], BeforeValidator(_bool)] = False
    denoising_strength: Optional[float] = Field(0.75, gt=0.0, le=1.0, allow_inf_nan=False)  # the hires pass's
    firstphase_width: Zero = 0
    firstphase_height: Zero = 0
    hr_scale: Optional[float] = Field(2.0, ge=1.0, le=8.0, allow_inf_nan=False)
    hr_upscaler: Optional[Literal[UPSCALERS]] = None  # null: "Latent"
    hr_second_pass_steps: Optional[Int(ge=0, le=MAX_STEPS)] = 0  # 0: the first pass's steps
    hr_resize_x: Optional[HiresSide] = 0
    hr_resize_y: Optional[HiresSide] = 0
    hr_checkpoint_name: Optional[str] = None  # the loaded model (openapi.py: its names' enum)
    hr_sampler_name: Optional[str] = None     # null: the first pass's (openapi.py: the samplers' enum)
    hr_scheduler: Optional[Literal["", "Use same scheduler"]] = None
    hr_prompt: Optional[str] = Field("", max_length=MAX_PROMPT_CHARS)
    hr_negative_prompt: Optional[str] = Field("", max_length=MAX_PROMPT_CHARS)
    firstpass_image: Empty = None


class Img2ImgRequest(_Request):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionProcessingImg2Img); `mask` makes it inpainting.
    Image i of the request starts from init_images[i % len(init_images)]."""

    init_images: list[str] = Field(min_length=1)
    resize_mode: Zero = 0
    denoising_strength: Optional[float] = Field(0.75, ge=0.0, le=1.0, allow_inf_nan=False)
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: Optional[Int()] = 4
    mask_blur_y: Optional[Int()] = 4
    mask_blur: Optional[Int()] = None
    mask_round: Optional[bool] = True
    inpainting_fill: Optional[Int()] = 0
    inpaint_full_res: Optional[bool] = True
    inpaint_full_res_padding: Optional[Int()] = 0
    inpainting_mask_invert: Optional[Int()] = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Empty = None
    include_init_images: Optional[bool] = False


class ImageResponse(BaseModel):
    """txt2img / img2img response: base64 PNGs (each with its `parameters` text chunk), the
    request echoed as `parameters`, and `info`, a JSON string (A1111's Processed.js())."""

    images: Optional[list[str]] = None
    parameters: dict
    info: str


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: Optional[str] = None
    textinfo: Optional[str] = None


class PngInfoRequest(BaseModel):
    """POST /sdapi/v1/png-info: a base64 image (or data: URL)."""

    model_config = ConfigDict(strict=True)

    image: str


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, str]
    parameters: dict[str, str]


class TaskProgressRequest(BaseModel):
    """POST /internal/progress (A1111's modules/progress.py ProgressRequest)."""

    model_config = ConfigDict(strict=True)

    id_task: str = Field(max_length=200)
    id_live_preview: Int(ge=-1) = -1
    live_preview: bool = True


class TaskProgressResponse(BaseModel):
    """A1111's ProgressResponse, plus queue_position (requests ahead while queued)."""

    active: bool
    queued: bool
    completed: bool
    queue_position: Optional[Int()] = None
    progress: Optional[float] = None
    eta: Optional[float] = None
    live_preview: Optional[str] = None
    id_live_preview: Optional[Int()] = None
    textinfo: Optional[str] = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: Optional[float] = None
    need_inner_model: Optional[bool] = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None
