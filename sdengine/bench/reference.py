"""Reference diffusers pipelines built from sdengine configs, with random weights.

The benchmark times sdengine's backends against diffusers on the SAME weights: it builds
one diffusers pipeline here, at the real architecture size of a preset (no download),
and hands that pipeline both to the diffusers anchors and to `sdengine.from_diffusers`.

    pipe = reference_pipeline(PRESETS["sd15"], device="cuda", dtype=torch.float16)

The config -> diffusers keyword mapping lives only here (tests build their tiny
reference models with it too).
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path
from typing import Optional

import torch

from sdengine.config import ModelConfig, SchedulerConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sdengine.diffusers_format import model_kwargs, text_encoder_json, unet_json, vae_json

# sdengine sampler -> (diffusers scheduler class, the config values that make that class run the
# same algorithm). The one such table: the benchmark, the reference pipelines and the sampler tests
# use it. dpmpp_3m_sde has no diffusers counterpart (see sdengine/samplers/__init__.py).
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS: the only PNDM variant sdengine runs
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),  # needs torchsde; its Brownian-tree noise differs
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
# sdengine sampler name -> diffusers scheduler class name.
SAMPLER_TO_SCHEDULER_CLASS = {sampler: cls for sampler, (cls, _) in DIFFUSERS_SCHEDULERS.items()}
# sdengine schedule -> the diffusers config values that select it; the other schedules have no
# diffusers spelling that tests/test_samplers_pipeline.py checks.
DIFFUSERS_SCHEDULES = {
    "default": {},  # what the scheduler config says
    "karras": {"use_karras_sigmas": True},
}
WEIGHT_NOISE = 0.02  # std of the noise added to every parameter, so that no norm scale is exactly 1 nor bias 0


def diffusers_unet_kwargs(cfg: UNetConfig) -> dict:
    """UNet2DConditionModel keyword arguments for a UNetConfig (sdengine/diffusers_format.py)."""
    return model_kwargs(unet_json(cfg))


def diffusers_vae_kwargs(cfg: VAEConfig) -> dict:
    """AutoencoderKL keyword arguments for a VAEConfig (sdengine/diffusers_format.py)."""
    return model_kwargs(vae_json(cfg))


def transformers_text_config(cfg: TextEncoderConfig):
    """transformers' CLIPTextConfig for a TextEncoderConfig (sdengine/diffusers_format.py)."""
    from transformers import CLIPTextConfig

    kwargs = model_kwargs(text_encoder_json(cfg))
    del kwargs["architectures"], kwargs["model_type"], kwargs["dtype"]  # the file's, not the constructor's
    return CLIPTextConfig(**kwargs)


def _scheduler_class(sampler: str):
    import diffusers

    if sampler not in DIFFUSERS_SCHEDULERS:
        raise ValueError(f"sampler {sampler!r} has no diffusers scheduler; "
                         f"choose one of: {', '.join(sorted(DIFFUSERS_SCHEDULERS))}")
    cls_name, algorithm = DIFFUSERS_SCHEDULERS[sampler]
    return getattr(diffusers, cls_name), algorithm


def diffusers_scheduler(cfg: SchedulerConfig):
    """The diffusers scheduler that cfg.sampler names, with cfg's schedule parameters."""
    cls, algorithm = _scheduler_class(cfg.sampler)
    values = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if f not in ("sampler", "extra", "given")}
    values.update(dict(cfg.extra))
    values.update(algorithm)
    # None means "the class default" in our config (e.g. final_sigmas_type), not an explicit None.
    # from_config keeps the keys the class does not take (skip_prk_steps under Euler, ...) in its
    # config, as the published scheduler_config.json files hold them: another class made
    # from_config of it reads them.
    return cls.from_config({k: v for k, v in values.items() if v is not None})


def scheduler_for_sampler(sampler: str, schedule: str, base_config: dict):
    """The diffusers scheduler that runs sdengine's `sampler` following `schedule` (canonical
    names, as `sdengine.samplers.resolve` returns them), built `from_config` of `base_config`
    (a pipeline's `scheduler.config`: the model's training schedule and spacing).

        pipe.scheduler = scheduler_for_sampler("euler", "default", pipe.scheduler.config)

    Raises ValueError, naming the sampler or schedule, where diffusers has no counterpart."""
    cls, algorithm = _scheduler_class(sampler)
    if schedule not in DIFFUSERS_SCHEDULES:
        raise ValueError(f"schedule {schedule!r} has no diffusers counterpart here; "
                         f"choose one of: {', '.join(DIFFUSERS_SCHEDULES)}")
    return cls.from_config({**base_config, **algorithm, **DIFFUSERS_SCHEDULES[schedule]})


@functools.lru_cache(maxsize=1)
def _vocab_dir() -> Path:
    from sdengine.tokenizer import save_vocab_files

    folder = Path(tempfile.mkdtemp(prefix="sdengine-vocab-"))
    save_vocab_files(folder)
    return folder


def transformers_tokenizer(pad_token: str = "<|endoftext|>"):
    """transformers' CLIPTokenizer on sdengine's bundled vocabulary (no download).

    SD1 (and SDXL's first tokenizer) pad with "<|endoftext|>"; the OpenCLIP tokenizers
    of SD2 and SDXL's tokenizer_2 pad with "!".
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(_vocab_dir()), pad_token=pad_token, model_max_length=77)


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Perturb every parameter of a freshly initialised model (see WEIGHT_NOISE)."""
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32, device=generator.device)
            p.add_(noise.to(p.device, p.dtype) * WEIGHT_NOISE)
    return model.eval().requires_grad_(False)


def reference_networks(config: ModelConfig, device="cpu", dtype=torch.float32, seed: int = 0) -> dict:
    """diffusers / transformers networks of `config` with random weights, built on `device`.

    Built directly on the device (fast random initialisation on a GPU), in float32, then
    cast to dtype. Returns the keyword arguments of the pipeline's networks.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed + 1)

    def text_encoder(cfg: TextEncoderConfig):
        model_cls = CLIPTextModelWithProjection if cfg.projection_dim is not None else CLIPTextModel
        text_config = transformers_text_config(cfg)
        text_config._attn_implementation = "sdpa"
        text_config.architectures = [model_cls.__name__]  # as save_pretrained / from_pretrained have it
        return model_cls(text_config)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        networks = {
            "unet": UNet2DConditionModel(**diffusers_unet_kwargs(config.unet)),
            "vae": AutoencoderKL(**diffusers_vae_kwargs(config.vae)),
            "text_encoder": text_encoder(config.text_encoder),
        }
        if config.text_encoder_2 is not None:
            networks["text_encoder_2"] = text_encoder(config.text_encoder_2)
    with _quiet_diffusers():  # .to(dtype) warns about fp32-kept modules, of which these have none
        return {name: _randomize(model, generator).to(dtype) for name, model in networks.items()}


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def reference_pipeline(config: ModelConfig, device="cpu", dtype=torch.float32, seed: int = 0):
    """A diffusers pipeline of `config` with random weights: StableDiffusionXLPipeline for
    SDXL-style configs (two text encoders), else StableDiffusionPipeline (or the inpainting
    one for 9-channel UNets). No safety checker, no progress bar; attention through SDPA
    (diffusers' default processor on torch 2)."""
    import diffusers

    parts = reference_networks(config, device, dtype, seed)
    openclip_pad = "!" if config.text_encoder.hidden_act == "gelu" else "<|endoftext|>"
    parts.update(tokenizer=transformers_tokenizer(openclip_pad), scheduler=diffusers_scheduler(config.scheduler))
    if config.is_sdxl:
        parts["tokenizer_2"] = transformers_tokenizer("!")
        pipe = diffusers.StableDiffusionXLPipeline(**parts)
    else:
        cls = diffusers.StableDiffusionInpaintPipeline if config.is_inpaint else diffusers.StableDiffusionPipeline
        pipe = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path, dtype: Optional[torch.dtype] = None):
    """A diffusers pipeline read from a diffusers folder (model_index.json), on the CPU."""
    import diffusers

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"--model {path}: not a diffusers folder (no model_index.json); "
                                "the benchmark's diffusers anchor needs one")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False,
                                                       **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
