"""The backend seam: what every backend implements, and the registry of backends by name.

A backend holds a model's networks on one device and dtype and runs them for the pipeline:

    loaded = get("triton").load_model(path, device=device, dtype=dtype)
    pipe = Pipeline(build("triton", loaded, {"graph_cache": 16}), loaded.tokenizer, loaded.tokenizer_2)

`Backend` below is the interface, method by method (docs/CONTRACTS.md has the tensors'
shapes and units); `BaseBackend` answers the optional parts for a backend that does not have
them (no fused step, no whole requests, nothing to prepare or release), so the pipeline never
asks which backend it holds. Adding a backend is one module with one class, and one
`register(name, "module:Class")` line in `REGISTRY` (or a `register` call at run time: the
tests register a toy backend that way).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Optional, Protocol, Union, runtime_checkable

import torch

from ..config import ModelConfig


@runtime_checkable
class Backend(Protocol):
    """What the pipeline calls. Every registered backend implements all of it (`BaseBackend`
    gives the defaults of the optional parts)."""

    name: str
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    max_prompt_windows: Optional[int]  # 77-token windows the UNet's context may hold (None: any)
    runs_whole_requests: bool  # run_request runs every request (native); the network calls are not offered

    # -- construction ------------------------------------------------------------------
    @classmethod
    def load_model(cls, path, *, device: torch.device, dtype: torch.dtype, config: Optional[ModelConfig] = None,
                   prediction_type: Optional[str] = None) -> Any:
        """Read a model for this backend (sdengine.loading.load_model's LoadedModel for torch backends;
        the onnx backend's export). What it returns has `config`, `tokenizer` and `tokenizer_2`."""

    @classmethod
    def from_loaded(cls, loaded, **options) -> "Backend":
        """The backend over what load_model (or from_diffusers) returned; options are its own."""

    # -- one request -------------------------------------------------------------------
    def prepare(self, height: int, width: int, batch_size: int = 1, sampler: Optional[str] = None,
                schedule: Optional[str] = None, *, ip_tokens: tuple = ()) -> dict:
        """Make what a workload needs before its first call (e.g. compile kernels); what was done.
        ip_tokens: the image-token count of each IP-Adapter the workload runs (its cross-attentions
        attend to those too)."""

    def run_request(self, run, tokenizer, tokenizer_2, on_step: Callable) -> Any:
        """Run a whole checked request (pipeline.Run) and return uint8 images (N, H, W, 3), or None
        when the pipeline runs it through the calls below (every backend but native)."""

    def encode_text(self, input_ids, input_ids_2=None, clip_skip=None) -> tuple: ...
    def denoise(self, x_in, t, context, added_cond=None, controls=(), step=None) -> torch.Tensor: ...
    def encode_image(self, images) -> tuple: ...
    def decode(self, latents) -> torch.Tensor: ...

    def fused_step(self, plan, context, guidance_scale: float, added_cond=None, extra_channels=None,
                   controls=(), schedule=None) -> Optional[Callable]:
        """The whole denoising step as one function step(x, i, noise) -> x_next, or None where the
        backend does not cover the run (the pipeline then calls denoise). schedule: the
        acceleration's StepKind per step (sdengine/acceleration.py), or None."""

    def check_acceleration(self, acceleration) -> None:
        """A ValueError, before any work, where the backend cannot run the request's DeepCache,
        T-GATE or ToMe (sdengine/acceleration.py); then denoise takes step= and fused_step schedule=."""

    def controlnet_fn(self, control) -> Callable:
        """How this backend runs a ControlNet; a ValueError before any work where it runs none."""

    def ip_adapter_unet(self) -> torch.nn.Module:
        """The UNet module whose cross-attentions IP-Adapters join (models.layers.Attention.ip_layers);
        a ValueError naming the backend where its UNet is no such module (compiled engines, onnx)."""

    # -- weights -----------------------------------------------------------------------
    def weight_views(self) -> dict: ...
    def add_token_embeddings(self, vectors: dict) -> dict: ...
    def release_memory(self) -> None: ...
    def weights_changed(self) -> None: ...


class BaseBackend:
    """The defaults of the optional parts of `Backend`, and construction from a LoadedModel."""

    name = "base"
    max_prompt_windows: Optional[int] = None
    runs_whole_requests = False
    cpu_bf16 = True  # sdengine.load's default dtype on a CPU with bf16 dot products is bf16 (device.py)

    @classmethod
    def load_model(cls, path, *, device, dtype, config=None, prediction_type=None):
        from ..loading import load_model

        return load_model(path, device=device, dtype=dtype, config=config, prediction_type=prediction_type)

    @classmethod
    def from_loaded(cls, loaded, **options):
        """cls(config, text_encoder, unet, vae, text_encoder_2, **options) over the loaded networks."""
        return cls(loaded.config, loaded.text_encoder, loaded.unet, loaded.vae, loaded.text_encoder_2, **options)

    def prepare(self, height: int, width: int, batch_size: int = 1, sampler=None, schedule=None, *,
                ip_tokens: tuple = ()) -> dict:
        return {}

    def run_request(self, run, tokenizer, tokenizer_2, on_step):
        return None

    def fused_step(self, plan, context, guidance_scale: float, added_cond=None, extra_channels=None, controls=(),
                   schedule=None):
        return None

    def check_acceleration(self, acceleration) -> None:
        """Refuses: the backend's UNet cannot cache, reuse or merge inside (a compiled engine, ONNX)."""
        raise ValueError(f"{acceleration.names()[0]}: backend {self.name!r} cannot run "
                         f"{', '.join(acceleration.names())} (its UNet is one compiled graph); use backend='eager', "
                         "'graph', 'triton' or 'compile'")

    def release_memory(self) -> None:
        """Drop what the backend keeps per request shape (called after a request ran out of memory)."""

    def weights_changed(self) -> None:
        """Called after the weights changed in place (a LoRA merged or removed): a backend that
        baked them into compiled code (compile with freeze=True, openvino) rebuilds it."""

    def ip_adapter_unet(self):
        raise ValueError(f"the {self.name} backend cannot run IP-Adapter: its UNet is compiled ahead of time; use "
                         "backend='eager', 'graph', 'triton' or 'compile'")


def options_of(cls) -> set:
    """The keyword options a backend class takes: its from_loaded's, or its constructor's where
    from_loaded passes them on (**options)."""
    parameters = inspect.signature(cls.from_loaded).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        parameters = inspect.signature(cls.__init__).parameters
    return {name for name, p in parameters.items() if p.kind == inspect.Parameter.KEYWORD_ONLY}


# ---------------------------------------------------------------------------
# The registry: backend name -> class, imported on first use
# ---------------------------------------------------------------------------

REGISTRY: dict[str, Union[str, type]] = {
    "eager": "sdengine.backends.eager:EagerBackend",
    "graph": "sdengine.backends.graph:GraphBackend",
    "triton": "sdengine.backends.triton:TritonBackend",
    "compile": "sdengine.backends.compiled:CompileBackend",
    "native": "sdengine.backends.native:NativeBackend",
    "aoti": "sdengine.backends.aoti:AOTIBackend",
    "onnx": "sdengine.backends.onnx:OnnxBackend",
    "openvino": "sdengine.backends.openvino:OpenVINOBackend",
}


def register(name: str, backend: Union[str, type]) -> None:
    """Make `sdengine.load(..., backend=name)` (and the CLI and the benchmark) use `backend`: a
    class implementing Backend, or "module:Class" to import on first use."""
    REGISTRY[name] = backend


def names() -> tuple:
    """The registered backend names, in registration order (the speed layers first)."""
    return tuple(REGISTRY)


def build(name: str, loaded, options: Optional[dict] = None) -> Backend:
    """Backend `name` over what its load_model (or from_diffusers) returned, with its options; an
    unknown option is a ValueError that names it and what the backend takes."""
    cls = get(name)
    options = dict(options or {})
    accepted = options_of(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"backend_options: {', '.join(unknown)} not accepted by backend {name!r} "
                         f"(it takes: {', '.join(sorted(accepted)) or 'no options'})")
    return cls.from_loaded(loaded, **options)


def get(name: str) -> type:
    """The class of backend `name`; ValueError listing the names for an unknown one."""
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {', '.join(REGISTRY)}, got {name!r}")
    target = REGISTRY[name]
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
    return target
