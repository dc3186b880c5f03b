"""Reference models for tests: diffusers / transformers built from sdengine's tiny configs.

Every builder is deterministic (fixed seed) and perturbs every parameter after the
library's own initialisation, so that no weight is trivially zero or one: a parity test
that passes on these weights exercises every norm scale and bias too.

    unet = diffusers_unet(tiny_config("sd21-v").unet)
    pipe = tiny_pipeline("sd15")              # StableDiffusionPipeline, safety checker off
    folder = save_tiny_pipeline("sdxl", tmp)  # save_pretrained(..., safe_serialization=True)

Builders are cached: treat what they return as read-only (copy.deepcopy it to modify).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from sdengine.config import SchedulerConfig, TextEncoderConfig, UNetConfig, VAEConfig, tiny_config

TINY_KINDS = ("sd15", "sd15-inpaint", "sd21-v", "sdxl")
NOISE_SCALE = 0.05  # std of the noise added to every parameter after initialisation

# sdengine sampler name -> diffusers scheduler class name (the inverse of config.SCHEDULER_CLASS_TO_SAMPLER).
SAMPLER_TO_SCHEDULER_CLASS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_sde": "DPMSolverSDEScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
}


def _seeded(build, seed: int):
    """Run build() under a fixed global seed without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * NOISE_SCALE)
    return model.eval()


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------

def diffusers_unet_kwargs(cfg: UNetConfig) -> dict:
    """UNet2DConditionModel keyword arguments for a UNetConfig.

    diffusers refuses `num_attention_heads` (its naming quirk: `attention_head_dim` is the
    number of heads in SD configs), so the per-level head counts travel as attention_head_dim.
    """
    kwargs = dict(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=list(cfg.block_out_channels),
        down_block_types=list(cfg.down_block_types),
        up_block_types=list(cfg.up_block_types),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=list(cfg.num_attention_heads),
        cross_attention_dim=cfg.cross_attention_dim,
        transformer_layers_per_block=list(cfg.transformer_layers_per_block),
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
        norm_num_groups=cfg.norm_num_groups,
        norm_eps=cfg.norm_eps,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift,
    )
    if cfg.addition_embed_type is not None:
        kwargs.update(
            addition_embed_type=cfg.addition_embed_type,
            addition_time_embed_dim=cfg.addition_time_embed_dim,
            projection_class_embeddings_input_dim=cfg.projection_class_embeddings_input_dim,
        )
    return kwargs


@functools.lru_cache(maxsize=None)
def diffusers_unet(cfg: UNetConfig, seed: int = 0):
    """A diffusers UNet2DConditionModel with deterministic random weights (fp32, eval)."""
    from diffusers import UNet2DConditionModel

    return _seeded(lambda: UNet2DConditionModel(**diffusers_unet_kwargs(cfg)), seed)


def diffusers_vae_kwargs(cfg: VAEConfig) -> dict:
    levels = len(cfg.block_out_channels)
    return dict(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        latent_channels=cfg.latent_channels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor,
        force_upcast=cfg.force_upcast,
    )


@functools.lru_cache(maxsize=None)
def diffusers_vae(cfg: VAEConfig, seed: int = 0):
    """A diffusers AutoencoderKL with deterministic random weights (fp32, eval)."""
    from diffusers import AutoencoderKL

    return _seeded(lambda: AutoencoderKL(**diffusers_vae_kwargs(cfg)), seed)


def transformers_text_config(cfg: TextEncoderConfig):
    from transformers import CLIPTextConfig

    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        eos_token_id=cfg.eos_token_id,  # 2: transformers' legacy "pool at argmax(input_ids)" rule
        pad_token_id=cfg.pad_token_id,
        bos_token_id=0,
    )
    if cfg.projection_dim is not None:
        kwargs["projection_dim"] = cfg.projection_dim
    return CLIPTextConfig(**kwargs)


@functools.lru_cache(maxsize=None)
def transformers_text_encoder(cfg: TextEncoderConfig, seed: int = 0):
    """transformers' CLIPTextModel (CLIPTextModelWithProjection when cfg.projection_dim is set)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_cls = CLIPTextModelWithProjection if cfg.projection_dim is not None else CLIPTextModel
    config = transformers_text_config(cfg)
    config._attn_implementation = "eager"  # the plain-math reference, not SDPA
    return _seeded(lambda: model_cls(config), seed)


# ---------------------------------------------------------------------------
# Tokenizer, scheduler, pipeline
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _vocab_dir() -> Path:
    from sdengine.tokenizer import save_vocab_files

    folder = Path(tempfile.mkdtemp(prefix="sdengine-tiny-vocab-"))
    save_vocab_files(folder)
    return folder


def transformers_tokenizer(pad_token: str = "<|endoftext|>"):
    """transformers' CLIPTokenizer on sdengine's bundled vocabulary.

    SD1 (and SDXL's first tokenizer) pad with "<|endoftext|>"; the OpenCLIP tokenizers
    of SD2 and SDXL's tokenizer_2 pad with "!".
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(_vocab_dir()), pad_token=pad_token, model_max_length=77)


def diffusers_scheduler(cfg: SchedulerConfig):
    """The diffusers scheduler that cfg.sampler names, with cfg's schedule parameters."""
    import inspect

    import diffusers

    cls = getattr(diffusers, SAMPLER_TO_SCHEDULER_CLASS[cfg.sampler])
    accepted = inspect.signature(cls.__init__).parameters
    values = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if f not in ("sampler", "extra")}
    values.update(dict(cfg.extra))
    # None means "the scheduler's own default" (e.g. final_sigmas_type): leave those out.
    return cls(**{k: v for k, v in values.items() if k in accepted and v is not None})


@functools.lru_cache(maxsize=None)
def tiny_pipeline(kind: str, seed: int = 0):
    """A full diffusers pipeline of the tiny config `kind` (one of TINY_KINDS), fp32 on CPU.

    sd15 / sd21-v: StableDiffusionPipeline; sd15-inpaint: StableDiffusionInpaintPipeline;
    sdxl: StableDiffusionXLPipeline. No safety checker, no feature extractor.
    """
    import diffusers

    cfg = tiny_config(kind)
    sd2_style = kind == "sd21-v"
    parts = dict(
        unet=diffusers_unet(cfg.unet, seed),
        vae=diffusers_vae(cfg.vae, seed),
        text_encoder=transformers_text_encoder(cfg.text_encoder, seed),
        tokenizer=transformers_tokenizer("!" if sd2_style else "<|endoftext|>"),
        scheduler=diffusers_scheduler(cfg.scheduler),
    )
    if kind == "sdxl":
        parts.update(
            text_encoder_2=transformers_text_encoder(cfg.text_encoder_2, seed + 10),
            tokenizer_2=transformers_tokenizer("!"),
        )
        return diffusers.StableDiffusionXLPipeline(**parts)
    pipeline_cls = (diffusers.StableDiffusionInpaintPipeline if kind == "sd15-inpaint"
                    else diffusers.StableDiffusionPipeline)
    return pipeline_cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_pipeline(kind: str, folder, seed: int = 0) -> Path:
    """save_pretrained the tiny pipeline `kind` into folder (safetensors); returns folder."""
    folder = Path(folder)
    tiny_pipeline(kind, seed).save_pretrained(folder, safe_serialization=True)
    return folder
