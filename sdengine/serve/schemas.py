"""AUTOMATIC1111's `/sdapi/v1` request and response bodies, as pydantic models.

Field names and defaults are A1111's (modules/processing.py's StableDiffusionProcessing*
dataclasses and modules/api/models.py), so that its clients (the `webuiapi` package,
extensions, bots) work unchanged. As in A1111 every field may be null (= its default),
and unknown fields are ignored. Type errors are pydantic's: FastAPI answers them with 422
and the field's location (`{"detail": [{"loc": ["body", "steps"], ...}]}`).

Two deliberate differences:
- `width` / `height` default to the loaded model's native size (512 for SD1.5, as in A1111;
  32 for the bundled demo model) instead of always 512.
- Fields for features sdengine does not have (hires fix, face restoration, tiling, variation
  seeds, scripts, styles) are accepted at their defaults and refused with a 422 naming the
  field otherwise, rather than silently producing a different image than asked for.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

# Limits that hold for every server; the configurable ones (pixels, images per request)
# are checked against ServeSettings in requests.py.
MAX_STEPS = 1000
MAX_PROMPT_CHARS = 20_000


class _Request(BaseModel):
    """Fields shared by txt2img and img2img (A1111's StableDiffusionProcessing)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    prompt: Optional[str] = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: Optional[str] = Field("", max_length=MAX_PROMPT_CHARS)
    styles: Optional[list[str]] = None
    seed: Optional[int] = -1
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = Field(0.0, allow_inf_nan=False)
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = "Euler"  # A1111's deprecated alias of sampler_name, and its default
    scheduler: Optional[str] = None
    batch_size: Optional[int] = Field(1, ge=1)
    n_iter: Optional[int] = Field(1, ge=1)
    steps: Optional[int] = Field(50, ge=1, le=MAX_STEPS)
    cfg_scale: Optional[float] = Field(7.0, ge=0.0, allow_inf_nan=False)
    width: Optional[int] = Field(None, ge=8, multiple_of=8)
    height: Optional[int] = Field(None, ge=8, multiple_of=8)
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: Optional[bool] = False
    do_not_save_grid: Optional[bool] = False
    eta: Optional[float] = Field(None, ge=0.0, allow_inf_nan=False)
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: Optional[bool] = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: Optional[bool] = False
    comments: Optional[dict] = None
    script_name: Optional[str] = None
    script_args: Optional[list] = []
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False
    alwayson_scripts: Optional[dict] = {}
    force_task_id: Optional[str] = None
    infotext: Optional[str] = None


class Txt2ImgRequest(_Request):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionProcessingTxt2Img)."""

    enable_hr: Optional[bool] = False
    denoising_strength: Optional[float] = Field(0.75, ge=0.0, le=1.0, allow_inf_nan=False)  # hires fix only
    firstphase_width: Optional[int] = 0
    firstphase_height: Optional[int] = 0
    hr_scale: Optional[float] = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: Optional[int] = 0
    hr_resize_x: Optional[int] = 0
    hr_resize_y: Optional[int] = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: Optional[str] = ""
    hr_negative_prompt: Optional[str] = ""
    firstpass_image: Optional[str] = None


class Img2ImgRequest(_Request):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionProcessingImg2Img); `mask` makes it inpainting."""

    init_images: Optional[list[str]] = None
    resize_mode: Optional[int] = 0
    denoising_strength: Optional[float] = Field(0.75, ge=0.0, le=1.0, allow_inf_nan=False)
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: Optional[int] = 4
    mask_blur_y: Optional[int] = 4
    mask_blur: Optional[int] = None
    mask_round: Optional[bool] = True
    inpainting_fill: Optional[int] = 0
    inpaint_full_res: Optional[bool] = True
    inpaint_full_res_padding: Optional[int] = 0
    inpainting_mask_invert: Optional[int] = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
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
