"""The compile backend: the graph backend with its networks compiled by torch.compile
(TorchInductor), each call still replayed from our own CUDA graphs.

What changes against the graph backend:
- self-attention Q, K, V projections are fused into one matmul at load time, and on CUDA
  the networks run channels_last (NHWC convolutions, which Inductor keeps end to end);
- the text encoder(s), the UNet and the VAE decoder are each `torch.compile`d (Inductor,
  mode "default": no autotuning of matmuls, so the cold start stays bounded; no
  cudagraphs of Inductor's own: the whole step is captured by cuda_graphs.py, with the
  compiled UNet inside it). Weights stay module parameters (no freezing), so a weight
  updated in place (a LoRA merge) is seen by every compiled graph and every capture;
- our Triton kernels replace Inductor's code only for the ops listed in `custom_ops`
  (registered `torch.ops.sdengine.*` ops, which Inductor calls as they are). The default
  is none: Inductor generates its own fused GroupNorm / LayerNorm / GEGLU code and calls
  SDPA's flash kernels; the GPU session's kernel micro-benchmarks say where ours win;
- inside the graphed step, guidance and the sampler update run as our fused Triton kernel
  on CUDA (one launch), as plain torch ops elsewhere.

Inductor's and Triton's caches live under $SDE_CACHE_DIR (sdengine/compile_cache.py), and
travel between machines with `sdengine cache export / import`.

A network whose compilation fails runs uncompiled (the graph layer) with one warning that
names it and the input shapes; it is never a crash.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import torch

from .. import compile_cache, kernels
from ..models.layers import EAGER_OPS, prepare_network, triton_ops
from .graph import GraphBackend

log = logging.getLogger("sdengine")

CUSTOM_OPS = ("attention", "group_norm", "layer_norm", "geglu")  # what custom_ops may name
DEFAULT_CUSTOM_OPS: tuple = ()


class CompiledOrEager:
    """A torch.compile'd function that falls back to the uncompiled one, with one warning naming
    the network and the shapes, when compiling fails. Errors of the run itself (out of memory,
    a bad argument) are raised as they are."""

    def __init__(self, name: str, fn, **compile_options):
        self.name, self.eager = name, fn
        self.compiled = torch.compile(fn, **compile_options)
        self.failed = False

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            if not _is_compile_error(e):
                raise
            shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            log.warning("torch.compile of %s failed at %s (%s: %s); it runs uncompiled", self.name, shapes,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.failed = True
            return self.eager(*args, **kwargs)


def _is_compile_error(e: Exception) -> bool:
    """Whether e comes from Dynamo / Inductor (or a kernel compile), not from running the model."""
    import torch._dynamo.exc as dynamo_exc

    if isinstance(e, dynamo_exc.TorchDynamoException):
        return True
    module = type(e).__module__ or ""
    return module.startswith(("torch._inductor", "torch._dynamo", "triton"))


class CompileBackend(GraphBackend):
    """The graph backend with torch.compile'd networks.

    custom_ops: which of CUSTOM_OPS run our Triton kernels (CUDA) instead of Inductor's code.
    mode:       torch.compile mode ("default"; "max-autotune-no-cudagraphs" tunes matmuls and
                convolutions at a much longer first call).
    compiler:   torch.compile backend ("inductor"; "aot_eager" traces without generating
                code, for quick checks).
    freeze:     Inductor's freezing: the weights become constants of the compiled code (on the CPU,
                convolution and linear weights are prepacked into oneDNN's blocked layouts once,
                instead of being reordered at every call). A LoRA change (set_loras, <lora:> tags)
                then throws the compiled code away and compiles again (`weights_changed`), instead
                of being seen at once: off by default, so that LoRAs hot-swap.
    autotune:   Inductor's max_autotune for GEMMs and convolutions, with its C++ GEMM templates
                (AMX / AVX-512 micro-kernels) among the candidates on the CPU: a longer first call.
    quantize:   "int8": the UNet quantized to int8 per workload shape (PT2E with Inductor's x86
                recipe, calibrated on inputs of the model's own: sdengine/quantize.py), on the CPU, in
                fp32; opt-in (its fidelity is measured, not assumed); a LoRA change quantizes again.
    cuda_graphs, graph_cache, fused_steps: as GraphBackend.

    On the CPU the networks run channels_last too (oneDNN's convolutions are NHWC-native; NCHW
    activations are reordered around every convolution), and Inductor's C++ backend generates
    their fused code.
    """

    name = "compile"

    def __init__(self, config, text_encoder, unet, vae, text_encoder_2=None, *,
                 custom_ops: tuple = DEFAULT_CUSTOM_OPS, mode: Optional[str] = None, compiler: str = "inductor",
                 cuda_graphs: bool = True, graph_cache: int = 8, fused_steps: bool = True, freeze: bool = False,
                 autotune: bool = False, quantize: Optional[str] = None):
        unknown = [op for op in custom_ops if op not in CUSTOM_OPS]
        if unknown:
            raise ValueError(f"custom_ops: unknown op(s) {', '.join(unknown)}; choose from {', '.join(CUSTOM_OPS)}")
        if custom_ops and not kernels.HAS_TRITON:
            raise RuntimeError("custom_ops need the triton package (pip install triton)")
        super().__init__(config, text_encoder, unet, vae, text_encoder_2, cuda_graphs=cuda_graphs,
                         graph_cache=graph_cache, fused_steps=fused_steps)
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if quantize and (self.device.type != "cpu" or self.dtype != torch.float32 or text_encoder_2 is not None):
            raise ValueError("quantize='int8' quantizes an SD1/SD2 UNet on the CPU from fp32 weights: load with "
                             f"device='cpu', dtype='fp32' (got {self.device}, {self.dtype}"
                             f"{', an SDXL model' if text_encoder_2 is not None else ''})")
        self.quantize = quantize
        on_cuda = self.device.type == "cuda"
        self.channels_last = True
        self.step_update = "triton" if on_cuda and kernels.HAS_TRITON else "torch"
        self.custom_ops = tuple(custom_ops)
        # our kernels (through their registered ops) for the ops in custom_ops
        kernel_ops = triton_ops() if on_cuda and custom_ops else EAGER_OPS
        self.ops = replace(EAGER_OPS, **{op: getattr(kernel_ops, op) for op in custom_ops}) if on_cuda else EAGER_OPS
        for module in (self.text_encoder, self.text_encoder_2, self.unet, self.vae):
            if module is not None:
                prepare_network(module, self.ops, channels_last=True)
        compile_cache.use_cache_dirs()
        options = {"backend": compiler, "dynamic": False}
        inductor = {}
        if freeze:
            inductor["freezing"] = True
        if autotune:
            inductor.update(max_autotune=True, max_autotune_gemm_backends="ATEN,TRITON" if on_cuda else "ATEN,CPP")
        if mode is not None and inductor:
            raise ValueError("mode and freeze/autotune are exclusive (torch.compile takes mode or options): "
                             "use freeze=True, autotune=True instead of a max-autotune mode")
        if mode is not None:
            options["mode"] = mode
        if inductor and compiler == "inductor":
            options["options"] = inductor
        self.freeze, self.autotune = freeze, autotune
        self.compile_options = options
        self._text_eager = self.text_fn  # the graph layer's: the text encoder(s) themselves
        self._compile()

    def _compile(self):
        """torch.compile wrappers of the networks (compiled at their first call)."""
        options = self.compile_options
        self.text_fn = CompiledOrEager("the text encoder", self._text_eager, **options)
        self.unet_fn = Int8UNet(self) if self.quantize else CompiledOrEager("the UNet", self.unet, **options)
        self.decode_fn = CompiledOrEager("the VAE decoder", self.vae.decode, **options)

    def weights_changed(self) -> None:
        """After a LoRA merge: frozen weights are constants of the compiled code, which is thrown away
        (torch.compiler.reset: every compiled function of the process) and compiled again at the
        next call. Without freeze the compiled code reads the weights, and nothing is done."""
        if self.freeze or self.quantize:
            torch.compiler.reset()
            self._compile()
            self.release_memory()  # captures of the old code

    def prepare_controlnet(self, controlnet):
        if self.quantize:
            raise ValueError("quantize='int8' runs no ControlNets (its UNet takes no residuals): load without it")
        """The ControlNet as the UNet runs here: fused QKV, the backend's ops, channels_last on CUDA,
        torch.compile'd (uncompiled after one warning if compiling fails), on a view of its weights."""
        view = prepare_network(self.controlnet_view(controlnet), self.ops, channels_last=self.channels_last)
        return CompiledOrEager(f"the ControlNet {controlnet.name}",
                               lambda x, t, context, image, scale, guess_mode, added_cond:
                               view(x, t, context, image, scale, guess_mode, added_cond=added_cond),
                               **self.compile_options)


class Int8UNet:
    """The UNet of quantize="int8": quantized and compiled at the first call of each shape
    (sdengine/quantize.py), then called as the float UNet is."""

    def __init__(self, backend):
        self.backend = backend
        self.by_shape: dict = {}
        self.failed = False

    def __call__(self, x, t, context, added_cond=None, **residuals):
        from ..quantize import calibration_inputs, quantize_unet_int8

        key = (tuple(x.shape), tuple(context.shape))
        if key not in self.by_shape:
            b = self.backend
            calibration = calibration_inputs(b.text_encoder, b.config, tuple(x.shape), context.shape[1])
            self.by_shape[key] = quantize_unet_int8(b.unet, calibration)
        t = t.reshape(-1).expand(x.shape[0]).float()
        return self.by_shape[key](x.contiguous(), t, context)
