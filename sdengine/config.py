"""Model configurations: frozen dataclasses with named presets.

Field names follow the diffusers / transformers config.json keys, so that
`ModelConfig.from_diffusers(folder)` is a plain key copy. Derived fields are
filled in `__post_init__` (the pattern of gpt-fast's model.py).

Presets describe the real architectures (used for timing with random weights
and for detecting single-file checkpoints); `tiny` presets are for tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional


def _per_level(value, levels: int, name: str) -> tuple:
    """Broadcast an int to one entry per UNet level, or check a sequence's length."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"{name} has {len(value)} entries but the UNet has {levels} levels")
        return tuple(value)
    return (value,) * levels


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer (transformers' CLIPTextConfig keys)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5
    projection_dim: Optional[int] = None  # a text_projection layer exists (SDXL's second encoder)
    # Which hidden state conditions the UNet: "last" = final layer + final LayerNorm
    # (SD1, and SD2 whose diffusers folder already dropped the last layer);
    # "penultimate" = hidden_states[-2] without the final LayerNorm (SDXL).
    output_layer: str = "last"
    # transformers' legacy rule: eos_token_id == 2 means "pool at argmax(input_ids)".
    eos_token_id: int = 2
    pad_token_id: int = 1

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("text encoder hidden_size must be divisible by num_attention_heads")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported text encoder hidden_act {self.hidden_act!r}")
        if self.output_layer not in ("last", "penultimate"):
            raise ValueError(f"text encoder output_layer must be 'last' or 'penultimate', got {self.output_layer!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel (diffusers config.json keys)."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    layers_per_block: int = 2
    # diffusers' historical naming: `attention_head_dim` in SD configs is really the
    # number of heads, and is used as such when num_attention_heads is None. After
    # __post_init__, num_attention_heads holds the per-level head counts: to change
    # the heads with dataclasses.replace, pass num_attention_heads (or None with a new
    # attention_head_dim).
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    cross_attention_dim: int = 768
    transformer_layers_per_block: Any = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # SDXL micro-conditioning: addition_embed_type="text_time".
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    def __post_init__(self):
        levels = len(self.block_out_channels)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("block_out_channels", tuple(self.block_out_channels))
        set_("down_block_types", tuple(self.down_block_types))
        set_("up_block_types", tuple(self.up_block_types))
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError("UNet down_block_types/up_block_types must have one entry per block_out_channels")
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        set_("num_attention_heads", _per_level(heads, levels, "num_attention_heads"))
        set_("attention_head_dim", _per_level(self.attention_head_dim, levels, "attention_head_dim"))
        set_("transformer_layers_per_block",
             _per_level(self.transformer_layers_per_block, levels, "transformer_layers_per_block"))
        for c, h in zip(self.block_out_channels, self.num_attention_heads):
            if c % h:
                raise ValueError(f"UNet level with {c} channels is not divisible into {h} heads")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"unsupported UNet addition_embed_type {self.addition_embed_type!r}")

    @property
    def head_dims(self) -> tuple:
        """Per-level attention head dimension: channels / heads."""
        return tuple(c // h for c, h in zip(self.block_out_channels, self.num_attention_heads))


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (diffusers config.json keys)."""

    sample_size: int = 512
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    force_upcast: bool = False

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along one axis (8 for every SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class SchedulerConfig:
    """The noise schedule of training, plus the checkpoint's default sampler.

    Keys follow diffusers' scheduler_config.json; `sampler` is the sdengine name of
    the scheduler class that config names (e.g. PNDMScheduler -> "pndm").
    """

    sampler: str = "pndm"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False
    rescale_betas_zero_snr: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    final_sigmas_type: Optional[str] = None
    skip_prk_steps: bool = True
    # Everything else the scheduler_config.json held, kept so that a sampler can
    # honour keys this dataclass does not name (e.g. solver_order, lower_order_final).
    extra: tuple = ()
    # The keys the source config held (scheduler_config_from_dict, the presets of published
    # configs); None: every value counts (a config built in code). for_sampler() gives each
    # sampling key the source lacked the default of the scheduler class that runs, as diffusers'
    # <Class>.from_config does.
    given: Optional[tuple] = None

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"unsupported timestep_spacing {self.timestep_spacing!r}")

    def get(self, key: str, default=None):
        """A key of the original scheduler config, named field or extra."""
        if key in {f.name for f in fields(self)}:
            return getattr(self, key)
        return dict(self.extra).get(key, default)

    def for_sampler(self, sampler: str) -> "SchedulerConfig":
        """The config as the diffusers scheduler class of `sampler` reads it (<Class>.from_config):
        each sampling key the source config lacked takes that class's default
        (SCHEDULER_CLASS_DEFAULTS: timestep_spacing, final_sigmas_type, ...; clip_sample and
        steps_offset take the values diffusers' SD pipelines force, SD_PIPELINE_VALUES), and a
        key the class does not take has no effect (NEUTRAL_SAMPLING_VALUES). The model's training
        schedule (num_train_timesteps, betas, prediction_type) is the model's, whatever the class.
        A config built in code (given None) is returned as it is."""
        if self.given is None:
            return self
        class_name = next((name for name, s in SCHEDULER_CLASS_TO_SAMPLER.items() if s == sampler),
                          "DPMSolverMultistepScheduler")  # dpmpp_2m_sde, dpmpp_3m_sde: DPM-Solver's variants
        defaults = SCHEDULER_CLASS_DEFAULTS[class_name]
        named = {f.name for f in fields(self)}
        values, extra = {}, dict(self.extra)
        for key, neutral in NEUTRAL_SAMPLING_VALUES.items():
            default = SD_PIPELINE_VALUES.get(key, defaults.get(key))
            value = neutral if key not in defaults else self.get(key) if key in self.given else default
            if key in named:
                values[key] = value
            elif value is None:
                extra.pop(key, None)
            else:
                extra[key] = value
        return replace(self, extra=tuple(sorted(extra.items())), given=None, **values)

    def to_dict(self) -> dict:
        """Its fields and extra keys in one object, as diffusers' scheduler_config.json holds them
        (plus `sampler`, and `given`, the keys of the source when it is known): what engine.json,
        the ONNX manifest and the C++ runtime read."""
        fields_ = dataclasses.asdict(self)
        extra = dict(fields_.pop("extra", ()) or ())
        if fields_["given"] is None:
            fields_.pop("given")
        return _json_ready({**extra, **fields_})

    @classmethod
    def from_dict(cls, data: dict) -> "SchedulerConfig":
        """The inverse of to_dict: named fields, and the other keys back into `extra`. Also reads
        the older form that kept `extra` as a list of [key, value] pairs (ONNX manifest format 1)."""
        names = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: _tuples(v) for k, v in data.items() if k not in names and k != "extra"}
        extra.update((k, _tuples(v)) for k, v in data.get("extra", ()))
        return cls(extra=tuple(sorted(extra.items())),
                   **{k: _tuples(v) for k, v in data.items() if k in names})


# diffusers' defaults (0.42, each class's __init__) of the sampling keys sdengine reads, per
# scheduler class: what a config that lacks the key gets (SchedulerConfig.for_sampler).
# tests/test_samplers.py checks them against diffusers' signatures.
SCHEDULER_CLASS_DEFAULTS = {
    "DDIMScheduler": {"timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True, "clip_sample_range": 1.0,
                      "set_alpha_to_one": True},
    "DDPMScheduler": {"timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True, "clip_sample_range": 1.0,
                      "variance_type": "fixed_small"},
    "PNDMScheduler": {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": False,
                      "skip_prk_steps": False},
    "LMSDiscreteScheduler": {"timestep_spacing": "linspace", "steps_offset": 0, "use_karras_sigmas": False,
                             "use_exponential_sigmas": False},
    "EulerDiscreteScheduler": {"timestep_spacing": "linspace", "steps_offset": 0, "use_karras_sigmas": False,
                               "use_exponential_sigmas": False, "final_sigmas_type": "zero", "sigma_min": None,
                               "sigma_max": None},
    "EulerAncestralDiscreteScheduler": {"timestep_spacing": "linspace", "steps_offset": 0},
    "HeunDiscreteScheduler": {"timestep_spacing": "linspace", "steps_offset": 0, "clip_sample": False,
                              "clip_sample_range": 1.0, "use_karras_sigmas": False, "use_exponential_sigmas": False},
    "KDPM2DiscreteScheduler": {"timestep_spacing": "linspace", "steps_offset": 0, "use_karras_sigmas": False,
                               "use_exponential_sigmas": False},
    "KDPM2AncestralDiscreteScheduler": {"timestep_spacing": "linspace", "steps_offset": 0, "use_karras_sigmas": False,
                                        "use_exponential_sigmas": False},
    "DPMSolverMultistepScheduler": {"timestep_spacing": "linspace", "steps_offset": 0, "use_karras_sigmas": False,
                                    "use_exponential_sigmas": False, "final_sigmas_type": "zero", "solver_order": 2,
                                    "lower_order_final": True, "euler_at_final": False, "solver_type": "midpoint",
                                    "variance_type": None},
    "DPMSolverSDEScheduler": {"timestep_spacing": "linspace", "steps_offset": 0, "use_karras_sigmas": False,
                              "use_exponential_sigmas": False},
    "UniPCMultistepScheduler": {"timestep_spacing": "linspace", "steps_offset": 0, "use_karras_sigmas": False,
                                "use_exponential_sigmas": False, "final_sigmas_type": "zero", "solver_order": 2,
                                "lower_order_final": True, "solver_type": "bh2", "sigma_min": None, "sigma_max": None,
                                "disable_corrector": ()},
    "LCMScheduler": {"timestep_spacing": "leading", "steps_offset": 0, "clip_sample": False, "clip_sample_range": 1.0,
                     "set_alpha_to_one": True, "original_inference_steps": 50, "timestep_scaling": 10.0},
}
# Where diffusers' Stable Diffusion pipelines override the class default whatever the config
# says (StableDiffusionPipeline.__init__ sets clip_sample False and steps_offset 1, with a
# deprecation warning): what a config that lacks the key gets in sdengine too.
SD_PIPELINE_VALUES = {"clip_sample": False, "steps_offset": 1}
# Every sampling key of the table, with the value that has no effect: what a key gets under a
# class that does not take it (diffusers' from_config leaves such keys unused).
NEUTRAL_SAMPLING_VALUES = {
    "timestep_spacing": "leading", "steps_offset": 0, "clip_sample": False, "clip_sample_range": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "final_sigmas_type": "zero", "sigma_min": None, "sigma_max": None, "variance_type": None, "solver_order": None,
    "lower_order_final": None, "euler_at_final": None, "solver_type": None, "disable_corrector": None,
    "original_inference_steps": None, "timestep_scaling": None,
}


@dataclass(frozen=True)
class ControlNetConfig:
    """ControlNetModel (diffusers' config.json keys): the encoder half of a UNet, `unet` (its
    up_block_types and out_channels are unused), plus the conditioning embedding that turns
    the control image into conv_in's feature map.

    conditioning_embedding_out_channels: channels of the embedding's convolutions; each step
    after the first halves the resolution, so len - 1 halvings must equal the VAE's
    (3 for every SD VAE: 512 px -> 64 latent cells).
    global_pool_conditions: the residuals are averaged over H, W (shuffle-style ControlNets),
    and the pipeline runs the ControlNet in guess mode.
    """

    unet: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    controlnet_conditioning_channel_order: str = "rgb"

    def __post_init__(self):
        object.__setattr__(self, "conditioning_embedding_out_channels",
                           tuple(self.conditioning_embedding_out_channels))
        if not self.conditioning_embedding_out_channels:
            raise ValueError("ControlNet conditioning_embedding_out_channels must not be empty")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError("ControlNet controlnet_conditioning_channel_order must be 'rgb' or 'bgr', got "
                             f"{self.controlnet_conditioning_channel_order!r}")

    @property
    def downscale(self) -> int:
        """Pixels of the control image per latent cell."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> "ControlNetConfig":
        """From a diffusers ControlNetModel config dict; refuses options we do not implement."""
        down = tuple(data.get("down_block_types", UNetConfig.down_block_types))
        up = tuple("CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in reversed(down))
        unet = component_config_from_dict(UNetConfig, {**data, "up_block_types": up,
                                                       "out_channels": data.get("in_channels", 4)}, source)
        names = {f.name for f in fields(cls)} - {"unet"}
        return cls(unet=unet, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names})


@dataclass(frozen=True)
class VisionEncoderConfig:
    """CLIP's vision tower with its projection (transformers' CLIPVisionConfig keys): the image
    encoder of IP-Adapter (OpenCLIP ViT-H/14 for most; ViT-bigG/14 for some SDXL adapters)."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    projection_dim: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vision encoder hidden_size must be divisible by num_attention_heads")
        if self.image_size % self.patch_size:
            raise ValueError("vision encoder image_size must be a multiple of patch_size")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported vision encoder hidden_act {self.hidden_act!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "VisionEncoderConfig":
        """From a transformers CLIPVisionConfig (or a CLIPConfig's vision_config) dict."""
        data = data.get("vision_config", data)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# diffusers scheduler class -> sdengine sampler name (the default sampler of a checkpoint).
SCHEDULER_CLASS_TO_SAMPLER = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "PNDMScheduler": "pndm",
    "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "KDPM2DiscreteScheduler": "dpm_2",
    "KDPM2AncestralDiscreteScheduler": "dpm_2_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DPMSolverSDEScheduler": "dpmpp_sde",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
}


@dataclass(frozen=True)
class ModelConfig:
    """A whole text-to-image model: text encoder(s), UNet, VAE and noise schedule."""

    name: str
    text_encoder: Optional[TextEncoderConfig]  # None: SDXL's refiner, which has only text_encoder_2
    unet: UNetConfig
    vae: VAEConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    text_encoder_2: Optional[TextEncoderConfig] = None  # SDXL's OpenCLIP bigG encoder
    # SDXL pipeline options (diffusers' model_index.json): the refiner conditions on an aesthetic
    # score where the base has the target size, and encodes an empty negative prompt where the
    # base uses zeros.
    requires_aesthetics_score: bool = False
    force_zeros_for_empty_prompt: bool = True

    def __post_init__(self):
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        if not encoders:
            raise ValueError(f"{self.name}: a model needs a text encoder")
        context = sum(e.hidden_size for e in encoders)
        if context != self.unet.cross_attention_dim:
            raise ValueError(f"{self.name}: text encoder width {context} does not match "
                             f"UNet cross_attention_dim {self.unet.cross_attention_dim}")
        if self.vae.latent_channels != self.unet.out_channels:
            raise ValueError(f"{self.name}: VAE latent_channels {self.vae.latent_channels} does not match "
                             f"UNet out_channels {self.unet.out_channels}")

    # Derived properties -------------------------------------------------------

    @property
    def is_inpaint(self) -> bool:
        """9-channel inpainting UNet: latents + mask + masked-image latents."""
        return self.unet.in_channels == 2 * self.vae.latent_channels + 1

    @property
    def is_sdxl(self) -> bool:
        """SDXL's conditioning (the base, and the refiner)."""
        return self.text_encoder_2 is not None

    @property
    def is_refiner(self) -> bool:
        """SDXL's refiner: text_encoder_2 only, an aesthetic score in its added conditioning."""
        return self.text_encoder is None

    @property
    def default_size(self) -> int:
        """Native image size in pixels (512 for SD1.5, 768 for SD2-v, 1024 for SDXL)."""
        return self.unet.sample_size * self.vae.downscale

    @property
    def prediction_type(self) -> str:
        return self.scheduler.prediction_type

    # (De)serialization ----------------------------------------------------------

    def to_dict(self) -> dict:
        """The config as JSON-ready data: each component's fields, the scheduler flattened with
        its extra keys (SchedulerConfig.to_dict). The one form that engine.json (read by the C++
        runtime), the ONNX manifest and `sdengine info --json` hold; from_dict reads it back."""
        out = _json_ready(dataclasses.asdict(self))
        out["scheduler"] = self.scheduler.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """The inverse of to_dict (lists back to tuples). ValueError for incomplete or malformed data."""
        def component(kind, values):
            return None if values is None else kind(**{k: _tuples(v) for k, v in values.items()})

        try:
            return cls(name=data["name"], text_encoder=component(TextEncoderConfig, data["text_encoder"]),
                       unet=component(UNetConfig, data["unet"]), vae=component(VAEConfig, data["vae"]),
                       scheduler=SchedulerConfig.from_dict(data["scheduler"]),
                       text_encoder_2=component(TextEncoderConfig, data.get("text_encoder_2")),
                       requires_aesthetics_score=bool(data.get("requires_aesthetics_score", False)),
                       force_zeros_for_empty_prompt=bool(data.get("force_zeros_for_empty_prompt", True)))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"model config is incomplete or malformed: {e}") from None

    # Construction -------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A named preset: one of PRESETS."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None

    @classmethod
    def from_diffusers(cls, folder) -> "ModelConfig":
        """Read the component config.json files of a diffusers folder."""
        folder = Path(folder)
        index = _read_json(folder / "model_index.json")

        def component(sub: str):
            return _read_json(folder / sub / "config.json")

        sched_path = folder / "scheduler" / "scheduler_config.json"
        present = lambda entry: bool(entry) and not (isinstance(entry, list) and entry[-1] is None)  # noqa: E731
        return cls.from_component_dicts(
            name=folder.name,
            text_encoder=component("text_encoder") if present(index.get("text_encoder")) else None,
            text_encoder_2=component("text_encoder_2") if present(index.get("text_encoder_2")) else None,
            unet=component("unet"),
            vae=component("vae"),
            scheduler=_read_json(sched_path) if sched_path.exists() else None,
            pipeline=index,
        )

    @classmethod
    def from_component_dicts(cls, name: str, text_encoder: Optional[dict], unet: dict, vae: dict,
                             scheduler: Optional[dict] = None, text_encoder_2: Optional[dict] = None,
                             pipeline: Optional[dict] = None) -> "ModelConfig":
        """Build from the config dicts of diffusers / transformers components. pipeline: the
        pipeline's own options (model_index.json: requires_aesthetics_score,
        force_zeros_for_empty_prompt; absent: diffusers' defaults, False and True)."""
        text = text_encoder_config_from_dict(text_encoder) if text_encoder is not None else None
        text_2 = None
        if text_encoder_2 is not None:  # SDXL conditions on the penultimate layers of both
            text = replace(text, output_layer="penultimate") if text is not None else None
            text_2 = replace(text_encoder_config_from_dict(text_encoder_2), output_layer="penultimate")
        pipeline = pipeline or {}
        return cls(
            name=name,
            text_encoder=text,
            text_encoder_2=text_2,
            unet=component_config_from_dict(UNetConfig, unet, "unet/config.json"),
            vae=component_config_from_dict(VAEConfig, vae, "vae/config.json"),
            scheduler=scheduler_config_from_dict(scheduler) if scheduler else SchedulerConfig(),
            requires_aesthetics_score=bool(pipeline.get("requires_aesthetics_score", False)),
            force_zeros_for_empty_prompt=bool(pipeline.get("force_zeros_for_empty_prompt", True)),
        )


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"missing config file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


# diffusers UNet/VAE keys that change the architecture and that we do not implement:
# a value other than the default listed here is refused rather than silently ignored.
_UNSUPPORTED_IF_SET = {
    "class_embed_type": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "resnet_time_scale_shift": "default",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "act_fn": "silu",
    "center_input_sample": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}


def component_config_from_dict(cls, data: dict, source: str):
    """A UNetConfig / VAEConfig from a diffusers config dict; refuses options we do not implement."""
    for key, default in _UNSUPPORTED_IF_SET.items():
        value = data.get(key)
        if isinstance(default, bool) and isinstance(value, list):
            value = any(value)
        if value is not None and value != default:
            raise ValueError(f"{source}: unsupported architecture option {key}={value!r}")
    names = {f.name for f in fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names})


def text_encoder_config_from_dict(data: dict) -> TextEncoderConfig:
    names = {f.name for f in fields(TextEncoderConfig)}
    kwargs = {k: v for k, v in data.items() if k in names}
    if "text_projection" not in data and "CLIPTextModelWithProjection" not in (data.get("architectures") or []):
        kwargs["projection_dim"] = None
    return TextEncoderConfig(**kwargs)


def scheduler_config_from_dict(data: dict) -> SchedulerConfig:
    cls_name = data.get("_class_name", "PNDMScheduler")
    names = {f.name for f in fields(SchedulerConfig)} - {"sampler", "extra", "given"}
    kwargs = {k: v for k, v in data.items() if k in names and (v is not None or k == "final_sigmas_type")}
    extra = tuple(sorted((k, v) for k, v in data.items()
                         if k not in names and k != "given" and not k.startswith("_") and _hashable(v)))
    sampler = SCHEDULER_CLASS_TO_SAMPLER.get(cls_name, "euler")
    if cls_name == "DPMSolverMultistepScheduler" and data.get("algorithm_type", "dpmsolver++").startswith("sde"):
        sampler = "dpmpp_2m_sde"
    # diffusers' loaded configs list the keys their file lacked in _use_default_values (its
    # <Class>.from_config gives those the new class's defaults too)
    defaulted = set(data.get("_use_default_values") or ())
    given = tuple(sorted({*kwargs, *(k for k, _ in extra)} - defaulted))
    return SchedulerConfig(sampler=sampler, extra=extra, given=given, **kwargs)


def _hashable(v) -> bool:
    try:
        hash(v)
        return True
    except TypeError:
        return False


def _json_ready(data):
    """data as JSON reads it back: tuples as lists, anything JSON has no type for as a string."""
    return json.loads(json.dumps(data, default=str))


def _tuples(value):
    """JSON lists back to the tuples the frozen configs hold (nested too)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

CLIP_L = TextEncoderConfig()  # OpenAI CLIP ViT-L/14 text tower (SD1.x)
OPENCLIP_H = TextEncoderConfig(  # OpenCLIP ViT-H/14 text tower, last layer dropped (SD2.x)
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    hidden_act="gelu", projection_dim=None,
)
OPENCLIP_BIGG = TextEncoderConfig(  # OpenCLIP ViT-bigG/14 text tower with projection (SDXL)
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280, output_layer="penultimate",
)

SD1_UNET = UNetConfig()
SD1_VAE = VAEConfig()
# The keys of the published scheduler_config.json files (CompVis / runwayml SD1.x, stabilityai
# SD2.x, SDXL base), which single-file checkpoints stand for: a key they lack takes the default
# of the sampler class that runs, as in diffusers (SchedulerConfig.for_sampler).
SD1_SCHEDULER_KEYS = ("beta_end", "beta_schedule", "beta_start", "clip_sample", "num_train_timesteps",
                      "set_alpha_to_one", "skip_prk_steps", "steps_offset")
SD1_SCHEDULER = SchedulerConfig(sampler="pndm", skip_prk_steps=True, given=SD1_SCHEDULER_KEYS)

SD2_UNET = UNetConfig(
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
)

SDXL_UNET = UNetConfig(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

PRESETS: dict[str, ModelConfig] = {
    "sd15": ModelConfig("sd15", CLIP_L, SD1_UNET, SD1_VAE, SD1_SCHEDULER),
    "sd15-inpaint": ModelConfig("sd15-inpaint", CLIP_L, replace(SD1_UNET, in_channels=9), SD1_VAE,
                                replace(SD1_SCHEDULER, sampler="ddim")),
    "sd21": ModelConfig("sd21", OPENCLIP_H, SD2_UNET, SD1_VAE,
                        replace(SD1_SCHEDULER, given=SD1_SCHEDULER_KEYS + ("prediction_type",))),
    "sd21-v": ModelConfig(
        "sd21-v", OPENCLIP_H, replace(SD2_UNET, sample_size=96, upcast_attention=True), replace(SD1_VAE, sample_size=768),
        SchedulerConfig(sampler="ddim", prediction_type="v_prediction", given=SD1_SCHEDULER_KEYS + ("prediction_type",)),
    ),
    "sdxl": ModelConfig(
        "sdxl", replace(CLIP_L, output_layer="penultimate"), SDXL_UNET,
        VAEConfig(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        SchedulerConfig(sampler="euler", given=SD1_SCHEDULER_KEYS + ("prediction_type", "timestep_spacing",
                                                                      "use_karras_sigmas")),
        text_encoder_2=OPENCLIP_BIGG,
    ),
    # The bundled demo model (sdengine/data/demo-digits, made by `sdengine train demo-digits`
    # from scikit-learn's digits): 32x32 images, 4x8x8 latents, a 2-layer 32-wide CLIP text
    # encoder on the real BPE vocabulary. The VAE scaling_factor here is a placeholder: the
    # trainer measures it (1 / std of the latents) and writes it into the folder's vae/config.json.
    "demo-digits": ModelConfig(
        "demo-digits",
        TextEncoderConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        UNetConfig(sample_size=8, block_out_channels=(24, 48), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=4,
                   cross_attention_dim=32, norm_num_groups=8),
        VAEConfig(sample_size=32, block_out_channels=(8, 16, 32), layers_per_block=1, norm_num_groups=4),
        SchedulerConfig(sampler="dpmpp_2m", beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
                        extra=(("algorithm_type", "dpmsolver++"), ("lower_order_final", True), ("solver_order", 2))),
    ),
}


def tiny_config(kind: str = "sd15") -> ModelConfig:
    """Tiny random-weight configs of each architecture family, for tests and smoke runs.

    kind: "sd15", "sd15-inpaint", "sd21-v", "sdxl" or "sdxl-refiner" (text_encoder_2 only, an
    aesthetic score in place of the target size: 5 added numbers, as SDXL's refiner).
    """
    text = TextEncoderConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    vae = VAEConfig(sample_size=64, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    unet = UNetConfig(
        sample_size=8, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8,
    )
    scheduler = SchedulerConfig()
    if kind == "sd15":
        return ModelConfig("tiny-sd15", text, unet, vae, scheduler)
    if kind == "sd15-inpaint":
        return ModelConfig("tiny-sd15-inpaint", text, replace(unet, in_channels=9), vae, replace(scheduler, sampler="ddim"))
    if kind == "sd21-v":
        return ModelConfig(
            "tiny-sd21-v", replace(text, hidden_act="gelu"),
            replace(unet, attention_head_dim=(2, 4), num_attention_heads=None, use_linear_projection=True,
                    upcast_attention=True),
            vae, replace(scheduler, sampler="ddim", prediction_type="v_prediction"),
        )
    if kind == "sdxl":
        return ModelConfig(
            "tiny-sdxl", replace(text, output_layer="penultimate"),
            replace(unet, cross_attention_dim=64, transformer_layers_per_block=(1, 2), use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8),
            replace(vae, scaling_factor=0.13025), replace(scheduler, sampler="euler"),
            text_encoder_2=replace(text, projection_dim=32, hidden_act="gelu", output_layer="penultimate"),
        )
    if kind == "sdxl-refiner":
        text_2 = replace(text, projection_dim=32, hidden_act="gelu", output_layer="penultimate")
        return ModelConfig(
            "tiny-sdxl-refiner", None,
            replace(unet, block_out_channels=(32, 48), cross_attention_dim=32, transformer_layers_per_block=(2, 1),
                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 5 * 8),
            replace(vae, scaling_factor=0.13025), replace(scheduler, sampler="euler"), text_encoder_2=text_2,
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        )
    raise ValueError(f"unknown tiny config {kind!r}; choose sd15, sd15-inpaint, sd21-v, sdxl or sdxl-refiner")
