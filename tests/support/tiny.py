"""Reference models for tests: diffusers / transformers built from sdengine's tiny configs.

Every builder is deterministic (fixed seed) and perturbs every parameter after the
library's own initialisation, so that no weight is trivially zero or one: a parity test
that passes on these weights exercises every norm scale and bias too.

    unet = diffusers_unet(tiny_config("sd21-v").unet)
    pipe = tiny_pipeline("sd15")              # StableDiffusionPipeline, safety checker off
    deep = tiny_pipeline("sdxl", text_layers=4)  # text encoders of 4 layers (clip_skip up to 3, SDXL's 2)
    folder = save_tiny_pipeline("sdxl", tmp)  # save_pretrained(..., safe_serialization=True)

Builders are cached: treat what they return as read-only (copy.deepcopy it to modify).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from sdengine.bench.reference import (  # noqa: F401  (re-exported for the tests)
    SAMPLER_TO_SCHEDULER_CLASS, diffusers_scheduler, diffusers_unet_kwargs, diffusers_vae_kwargs,
    transformers_text_config, transformers_tokenizer,
)
from sdengine.config import TextEncoderConfig, UNetConfig, VAEConfig, tiny_config

TINY_KINDS = ("sd15", "sd15-inpaint", "sd21-v", "sdxl")
NOISE_SCALE = 0.05  # std of the noise added to every parameter after initialisation

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

@functools.lru_cache(maxsize=None)
def diffusers_unet(cfg: UNetConfig, seed: int = 0):
    """A diffusers UNet2DConditionModel with deterministic random weights (fp32, eval)."""
    from diffusers import UNet2DConditionModel

    return _seeded(lambda: UNet2DConditionModel(**diffusers_unet_kwargs(cfg)), seed)


@functools.lru_cache(maxsize=None)
def diffusers_vae(cfg: VAEConfig, seed: int = 0):
    """A diffusers AutoencoderKL with deterministic random weights (fp32, eval)."""
    from diffusers import AutoencoderKL

    return _seeded(lambda: AutoencoderKL(**diffusers_vae_kwargs(cfg)), seed)


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

def tiny_kind_config(kind: str, text_layers: Optional[int] = None):
    """tiny_config(kind), with `text_layers` layers in every text encoder when given (the tiny
    encoders have 2: too few for clip_skip 2)."""
    cfg = tiny_config(kind)
    if text_layers is None:
        return cfg
    deeper = {name: replace(encoder, num_hidden_layers=text_layers)
              for name in ("text_encoder", "text_encoder_2") if (encoder := getattr(cfg, name)) is not None}
    return replace(cfg, **deeper)


@functools.lru_cache(maxsize=None)
def tiny_pipeline(kind: str, seed: int = 0, text_layers: Optional[int] = None):
    """A full diffusers pipeline of the tiny config `kind` (one of TINY_KINDS), fp32 on CPU;
    text_layers: that many layers in every text encoder (tiny_kind_config).

    sd15 / sd21-v: StableDiffusionPipeline; sd15-inpaint: StableDiffusionInpaintPipeline;
    sdxl: StableDiffusionXLPipeline; sdxl-refiner: StableDiffusionXLImg2ImgPipeline (text_encoder_2
    only, requires_aesthetics_score, force_zeros_for_empty_prompt false). No safety checker, no
    feature extractor.
    """
    import diffusers

    cfg = tiny_kind_config(kind, text_layers)
    if kind == "sdxl-refiner":  # StableDiffusionXLImg2ImgPipeline as the published refiner's folder has it
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=diffusers_vae(cfg.vae, seed), text_encoder=None, tokenizer=None,
            text_encoder_2=transformers_text_encoder(cfg.text_encoder_2, seed + 20), tokenizer_2=transformers_tokenizer("!"),
            unet=diffusers_unet(cfg.unet, seed + 20), scheduler=diffusers_scheduler(cfg.scheduler),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
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


def save_tiny_pipeline(kind: str, folder, seed: int = 0, text_layers: Optional[int] = None) -> Path:
    """save_pretrained the tiny pipeline `kind` (text_layers: tiny_pipeline's) into folder
    (safetensors); returns folder."""
    folder = Path(folder)
    tiny_pipeline(kind, seed, text_layers).save_pretrained(folder, safe_serialization=True)
    return folder


# ---------------------------------------------------------------------------
# ControlNets
# ---------------------------------------------------------------------------

# The tiny VAEs halve the image once, so the ControlNets' conditioning embedding halves it once too
# (two channel steps: one stride-2 convolution).
CONTROLNET_EMBEDDING_CHANNELS = (8, 16)


@functools.lru_cache(maxsize=None)
def tiny_controlnet(kind: str, seed: int = 0):
    """diffusers' ControlNetModel.from_unet of the tiny UNet of `kind` (sd15-inpaint: sd15's, a
    ControlNet reads the 4 latent channels), every parameter then perturbed, the zero convolutions
    included, so that it changes the image. Different seeds give different ControlNets."""
    from diffusers import ControlNetModel

    base = "sd15" if kind == "sd15-inpaint" else kind
    unet = diffusers_unet(tiny_config(base).unet)
    return _seeded(lambda: ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING_CHANNELS),
                   100 + seed)


def tiny_controlnet_pipeline(kind: str, mode: str = "txt2img", seeds=(0,)):
    """diffusers' ControlNet pipeline over the tiny pipeline `kind`'s components and the tiny
    ControlNets of `seeds` (several: MultiControlNetModel). mode: "txt2img", "img2img" or
    "inpaint" (sd15-inpaint)."""
    import diffusers

    pipe = tiny_pipeline(kind)
    controlnets = [tiny_controlnet(kind, s) for s in seeds]
    controlnet = controlnets[0] if len(controlnets) == 1 else controlnets
    parts = {k: v for k, v in pipe.components.items() if v is not None or k in ("safety_checker", "feature_extractor")}
    parts = {k: v for k, v in parts.items() if k != "image_encoder"}
    if kind == "sdxl":
        cls = {"txt2img": diffusers.StableDiffusionXLControlNetPipeline,
               "img2img": diffusers.StableDiffusionXLControlNetImg2ImgPipeline}[mode]
        return cls(**{k: v for k, v in parts.items() if k not in ("safety_checker", "feature_extractor")},
                   controlnet=controlnet)
    cls = {"txt2img": diffusers.StableDiffusionControlNetPipeline,
           "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline}[mode]
    return cls(**{k: v for k, v in parts.items() if k not in ("safety_checker", "feature_extractor", "requires_safety_checker")},
               controlnet=controlnet, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdengine_controlnet(kind: str, seed: int = 0, dtype=torch.float32):
    """The tiny ControlNet of `kind` and `seed` as an sdengine ControlNet, sharing its weights."""
    from sdengine.config import ControlNetConfig
    from sdengine.controlnet import ControlNet
    from sdengine.loading import LoadedControlNet
    from sdengine.models.controlnet import ControlNetModel

    theirs = tiny_controlnet(kind, seed)
    config = ControlNetConfig.from_dict(dict(theirs.config))
    with torch.device("meta"):
        model = ControlNetModel(config)
    model.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ControlNet(LoadedControlNet(config, model.eval().to(dtype), "test", f"tiny-{kind}-controlnet-{seed}",
                                       Path("/nonexistent")))
