"""The public entry points: load(), from_diffusers() and generate()."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

import torch

from .backends import base as backends
from .config import ModelConfig
from .device import keep_freed_memory, resolve_device_dtype
from .errors import InvalidArgumentError
from .pipeline import Pipeline

log = logging.getLogger("sdengine")

DEMO_MODEL = Path(__file__).parent / "data" / "demo-digits"
BACKENDS = backends.names()  # the registered backends at import (sdengine.backends.base.REGISTRY)


def _device_dtype(device, dtype, backend: Optional[str], path: Optional[Path] = None) -> tuple:
    """resolve_device_dtype, except that a backend that runs fp32 exports on the CPU (its class's
    `cpu_bf16` is False: onnx, native, aoti) keeps fp32 there when no dtype is given."""
    device, resolved = resolve_device_dtype(device, dtype)
    if dtype is None and device.type == "cpu" and resolved == torch.bfloat16:
        if backend is None and path is not None and (path / "sdengine_onnx.json").exists():
            backend = "onnx"
        if backend is not None and not getattr(backends.get(backend), "cpu_bf16", True):
            resolved = torch.float32
    return device, resolved


def _default_backend(device: torch.device) -> str:
    """The graph layer on CUDA (eager networks replayed from CUDA graphs: no compiler, so it
    starts at once); eager elsewhere. The triton and compile layers are opt-in until a
    committed GPU record shows them faster from a cold start (README, Performance)."""
    return "graph" if device.type == "cuda" else "eager"


def load(path=None, device=None, dtype=None, backend: Optional[str] = None, *,
         config: Optional[ModelConfig] = None, prediction_type: Optional[str] = None, loras=None,
         backend_options: Optional[dict] = None) -> Pipeline:
    """Load a model and return a Pipeline.

    path:    a diffusers folder, a single-file .safetensors (A1111/Civitai layout), a
             .ckpt, or an ONNX export folder; None loads the bundled demo model.
    device:  "cpu", "cuda", ...; default CUDA when available.
    dtype:   torch dtype or "fp32" / "fp16" / "bf16"; default fp16 on CUDA; on the CPU bf16 where
             it has bf16 dot products (AMX-BF16, AVX512-BF16), fp32 elsewhere and for the
             backends that run fp32 exports on the CPU (onnx, native, aoti).
    backend: a speed layer, "eager", "graph", "triton" or "compile" (README, Backends), or
             "native", "aoti" or "onnx"; default: "onnx" for an ONNX folder, "graph" on CUDA,
             "eager" on the CPU. "native" runs whole requests in the C++ runtime (libsdengine)
             on AOTInductor-compiled networks; "aoti" drives the same compiled networks from
             the Python loop.
    config:  the architecture of a single-file checkpoint, where detection from its keys
             and shapes is not enough (e.g. unusual head counts).
    prediction_type: "epsilon" or "v_prediction" for a single file that does not say
             (an SD2 768-v file is taken as v-prediction, a 512-base one needs "epsilon").
    loras:   LoRAs to merge, as for Pipeline.set_loras: [path, (path, scale), ...].
    backend_options: keyword arguments of the backend's class, e.g. {"graph_cache": 16} for the
             graph layers, {"custom_ops": ("attention",)} for "compile" (README, Backends).
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError("path", f"path must be a file or folder path (str or os.PathLike), got "
                                           f"{type(path).__name__}")
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise InvalidArgumentError("prediction_type", f"prediction_type must be 'epsilon', 'v_prediction' or None, "
                                                      f"got {prediction_type!r}")
    path = Path(DEMO_MODEL if path is None else path)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    device, dtype = _device_dtype(device, dtype, backend, path)
    if backend is None:
        backend = "onnx" if (path / "sdengine_onnx.json").exists() else _default_backend(device)
    if device.type == "cpu":
        keep_freed_memory()
    loaded = backends.get(backend).load_model(path, device=device, dtype=dtype, config=config,
                                              prediction_type=prediction_type)
    pipe = Pipeline(backends.build(backend, loaded, backend_options), loaded.tokenizer, loaded.tokenizer_2,
                    name=loaded.name)
    if loras:
        pipe.set_loras(loras)
    return pipe


def from_diffusers(pipe, backend: str = "eager", backend_options: Optional[dict] = None) -> Pipeline:
    """A Pipeline from a loaded diffusers pipeline object, sharing its weights (no copy).

    Works for StableDiffusionPipeline, StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline, StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline
    (SDXL's refiner too: no text_encoder, `requires_aesthetics_score`). The networks keep the
    device and dtype the diffusers pipeline has.
    """
    import tempfile

    from .loading import LoadedModel
    from .models.clip import CLIPTextModel, add_text_model_prefix
    from .models.unet import UNet2DConditionModel
    from .models.vae import AutoencoderKL
    from .tokenizer import CLIPTokenizer

    text_encoder, text_encoder_2 = pipe.text_encoder, getattr(pipe, "text_encoder_2", None)
    if pipe.unet.device.type == "cpu":
        keep_freed_memory()
    config = ModelConfig.from_component_dicts(
        name=type(pipe).__name__,
        text_encoder=_text_config(text_encoder) if text_encoder is not None else None,
        text_encoder_2=_text_config(text_encoder_2) if text_encoder_2 is not None else None,
        unet=dict(pipe.unet.config),
        vae=dict(pipe.vae.config),
        scheduler=dict(pipe.scheduler.config, _class_name=type(pipe.scheduler).__name__),
        pipeline=dict(pipe.config),
    )

    def adopt(ours_cls, cfg, theirs):
        with torch.device("meta"):
            module = ours_cls(cfg)
        state = theirs.state_dict()
        if ours_cls is CLIPTextModel:  # transformers 5 keeps CLIP's weights without `text_model.`
            state = add_text_model_prefix(state)
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval()

    tokenizers = []
    for tok in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)):
        if tok is None:
            tokenizers.append(None)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            tokenizers.append(CLIPTokenizer.from_folder(tmp))
    loaded = LoadedModel(
        config=config,
        text_encoder=None if text_encoder is None else adopt(CLIPTextModel, config.text_encoder, text_encoder),
        text_encoder_2=None if text_encoder_2 is None else adopt(CLIPTextModel, config.text_encoder_2, text_encoder_2),
        unet=adopt(UNet2DConditionModel, config.unet, pipe.unet), vae=adopt(AutoencoderKL, config.vae, pipe.vae),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], source="diffusers-pipeline", name=config.name)
    return Pipeline(backends.build(backend, loaded, backend_options), loaded.tokenizer, loaded.tokenizer_2,
                    name=loaded.name)


def _text_config(model) -> dict:
    """A transformers text model's config dict, naming its class (with or without projection)."""
    return dict(model.config.to_dict(), architectures=[type(model).__name__])


# generate() keeps the last pipeline it loaded, so repeated calls don't reload.
_cache_lock = threading.Lock()
_cache: dict = {}


def generate(prompt, model=None, device=None, dtype=None, backend: Optional[str] = None, **kwargs):
    """Generate images in one call; the loaded pipeline is cached for the next call.

    model: a path (see load()); None is the bundled demo model. Other keyword
    arguments are those of Pipeline.__call__. Returns a GenerationResult.
    """
    device, dtype = _device_dtype(device, dtype, backend, Path(model) if model is not None else None)
    key = (str(Path(model).resolve()) if model is not None else None, str(device), dtype, backend)
    with _cache_lock:
        pipe = _cache.get(key)
        if pipe is None:
            _cache.clear()  # keep one model in memory
            pipe = _cache[key] = load(model, device=device, dtype=dtype, backend=backend)
    return pipe(prompt, **kwargs)
