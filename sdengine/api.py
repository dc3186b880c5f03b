"""The public entry points: load(), from_diffusers() and generate()."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig
from .errors import InvalidArgumentError
from .pipeline import Pipeline

log = logging.getLogger("sdengine")

DEMO_MODEL = Path(__file__).parent / "data" / "demo-digits"
BACKENDS = ("eager", "graph", "triton", "compile", "native", "aoti", "onnx")

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA when available; fp16 on CUDA, fp32 on the CPU."""
    try:
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                              else "cpu")
    except (RuntimeError, TypeError):
        raise InvalidArgumentError("device", f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device", "device='cuda' was requested but torch sees no CUDA device")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(set(_DTYPES))}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return device, dtype


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
    dtype:   torch dtype or "fp32" / "fp16" / "bf16"; default fp16 on CUDA, fp32 on CPU.
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
    device, dtype = resolve_device_dtype(device, dtype)
    if backend is None:
        backend = "onnx" if (path / "sdengine_onnx.json").exists() else _default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")

    if backend == "onnx":
        from .backends.onnx import load_pipeline

        pipe = load_pipeline(path, device=device, dtype=dtype)
    else:
        from .loading import load_model

        loaded = load_model(path, device=device, dtype=dtype, config=config, prediction_type=prediction_type)
        pipe = _pipeline_from_modules(
            loaded.config, loaded.text_encoder, loaded.unet, loaded.vae, loaded.text_encoder_2,
            loaded.tokenizer, loaded.tokenizer_2, backend=backend, name=path.stem if path.is_file() else path.name,
            options=backend_options,
        )
    if loras:
        pipe.set_loras(loras)
    return pipe


def from_diffusers(pipe, backend: str = "eager", backend_options: Optional[dict] = None) -> Pipeline:
    """A Pipeline from a loaded diffusers pipeline object, sharing its weights (no copy).

    Works for StableDiffusionPipeline, StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline and StableDiffusionXLPipeline. The networks keep
    the device and dtype the diffusers pipeline has.
    """
    import tempfile

    from .models.clip import CLIPTextModel, add_text_model_prefix
    from .models.unet import UNet2DConditionModel
    from .models.vae import AutoencoderKL
    from .tokenizer import CLIPTokenizer

    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    config = ModelConfig.from_component_dicts(
        name=type(pipe).__name__,
        text_encoder=_text_config(pipe.text_encoder),
        text_encoder_2=_text_config(text_encoder_2) if text_encoder_2 is not None else None,
        unet=dict(pipe.unet.config),
        vae=dict(pipe.vae.config),
        scheduler=dict(pipe.scheduler.config, _class_name=type(pipe.scheduler).__name__),
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
    return _pipeline_from_modules(
        config,
        adopt(CLIPTextModel, config.text_encoder, pipe.text_encoder),
        adopt(UNet2DConditionModel, config.unet, pipe.unet),
        adopt(AutoencoderKL, config.vae, pipe.vae),
        adopt(CLIPTextModel, config.text_encoder_2, text_encoder_2) if text_encoder_2 is not None else None,
        tokenizers[0], tokenizers[1], backend=backend, name=config.name, options=backend_options,
    )


def _text_config(model) -> dict:
    """A transformers text model's config dict, naming its class (with or without projection)."""
    return dict(model.config.to_dict(), architectures=[type(model).__name__])


def _pipeline_from_modules(config, text_encoder, unet, vae, text_encoder_2, tokenizer, tokenizer_2, *,
                           backend: str, name: str, options: Optional[dict] = None) -> Pipeline:
    options = dict(options or {})
    if backend == "eager":
        from .backends.eager import EagerBackend

        impl = _build(EagerBackend, backend, options, config, text_encoder, unet, vae, text_encoder_2)
    elif backend == "graph":
        from .backends.graph import GraphBackend

        impl = _build(GraphBackend, backend, options, config, text_encoder, unet, vae, text_encoder_2)
    elif backend == "triton":
        from .backends.triton import TritonBackend

        impl = _build(TritonBackend, backend, options, config, text_encoder, unet, vae, text_encoder_2)
    elif backend == "compile":
        from .backends.compiled import CompileBackend

        impl = _build(CompileBackend, backend, options, config, text_encoder, unet, vae, text_encoder_2)
    elif backend == "native":
        from .backends.native import NativeBackend

        impl = _build(NativeBackend, backend, options, config, text_encoder, unet, vae, text_encoder_2)
    elif backend == "aoti":
        from .backends.aoti import AOTIBackend

        impl = _build(AOTIBackend, backend, options, config, text_encoder, unet, vae, text_encoder_2)
    else:
        raise ValueError(f"backend {backend!r} cannot be built from torch modules")
    return Pipeline(impl, tokenizer, tokenizer_2, name=name)


def _build(cls, backend: str, options: dict, *modules):
    """cls(*modules, **options), with an unknown option named as such."""
    import inspect

    accepted = {name for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.kind == inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"backend_options: {', '.join(unknown)} not accepted by backend {backend!r} "
                         f"(it takes: {', '.join(sorted(accepted)) or 'no options'})")
    return cls(*modules, **options)


# generate() keeps the last pipeline it loaded, so repeated calls don't reload.
_cache_lock = threading.Lock()
_cache: dict = {}


def generate(prompt, model=None, device=None, dtype=None, backend: Optional[str] = None, **kwargs):
    """Generate images in one call; the loaded pipeline is cached for the next call.

    model: a path (see load()); None is the bundled demo model. Other keyword
    arguments are those of Pipeline.__call__. Returns a GenerationResult.
    """
    device, dtype = resolve_device_dtype(device, dtype)
    key = (str(Path(model).resolve()) if model is not None else None, str(device), dtype, backend)
    with _cache_lock:
        pipe = _cache.get(key)
        if pipe is None:
            _cache.clear()  # keep one model in memory
            pipe = _cache[key] = load(model, device=device, dtype=dtype, backend=backend)
    return pipe(prompt, **kwargs)
