"""The Triton backend: the graph backend (sdengine/backends/graph.py) with our fused
Triton kernels, fp16 + channels_last.

What changes against the graph backend, all of it at load time (never in forward):
- the four swappable ops of every network (`sdengine.models.layers.Ops`) become the
  Triton kernels of `sdengine.kernels` (`layers.triton_ops()`): FlashAttention-2 attention,
  GroupNorm(+SiLU), LayerNorm, GEGLU;
- self-attention Q, K, V projections are fused into one matmul (`Attention.fuse_qkv`);
- on CUDA, convolution weights go channels_last, so cuDNN runs NHWC convolutions with
  no transposes, and the GroupNorm kernel reads and writes NHWC directly;
- inside the graphed whole step, guidance and the sampler update are one fused kernel
  (kernels/sampler_step.py) instead of a dozen torch ops.

Everything else is the graph backend's: every call (whole step, UNet alone, text encoder,
VAE decode) is captured once per shape as a CUDA graph and replayed.

On the CPU the same kernels run through Triton's interpreter (TRITON_INTERPRET=1): far
too slow for real use, but it is how CI proves that these code paths match eager.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import kernels
from ..models.layers import EAGER_OPS, prepare_network, set_ops, triton_ops
from .graph import GraphBackend

log = logging.getLogger("sdengine")


def prepare_for_triton(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """Load-time rewrite of one network: fused QKV, the kernel ops (layers.triton_ops), NHWC conv weights."""
    return prepare_network(module, triton_ops(), channels_last)


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------

class TritonBackend(GraphBackend):
    """The graph backend with our Triton kernels: fused QKV, kernel ops, channels_last on
    CUDA, and the guidance + sampler update as one fused kernel inside the graphed step.

    cuda_graphs, graph_cache, fused_steps: as GraphBackend.
    """

    name = "triton"
    step_update = "triton"

    def __init__(self, config, text_encoder, unet, vae, text_encoder_2=None, *, cuda_graphs: bool = True,
                 graph_cache: int = 8, fused_steps: bool = True):
        if not kernels.HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        super().__init__(config, text_encoder, unet, vae, text_encoder_2, cuda_graphs=cuda_graphs,
                         graph_cache=graph_cache, fused_steps=fused_steps)
        self.channels_last = self.device.type in ("cuda", "meta")  # meta: a dry run of what CUDA launches
        self._prepared = {}  # workload -> what prepare() did for it
        self._compiled = set()  # the KernelSpecs this process compiled (or found in Triton's cache)
        for module in (self.text_encoder, self.text_encoder_2, self.unet, self.vae):
            if module is not None:
                prepare_for_triton(module, channels_last=self.channels_last)

    def prepare(self, height: int, width: int, batch_size: int = 1, sampler: Optional[str] = None,
                schedule: Optional[str] = None, *, ip_tokens: tuple = (), target: Optional[str] = None,
                jobs: Optional[int] = None) -> dict:
        """Compile every kernel a generation of this workload launches, up front and in parallel
        (kernels/precompile.py), so that the first step only loads them from Triton's disk cache
        ($SDE_CACHE_DIR/triton). The pipeline calls it before every request: a workload already
        prepared costs nothing, and a new one compiles only the kernels not compiled before
        (sizes are mostly not specialized, so a new size seldom needs any).

        ip_tokens: the image-token count of each IP-Adapter the workload runs: the dry run's
        cross-attentions attend to image tokens of those lengths too (the attention kernel is not
        specialized on lengths, so they seldom add a kernel; tests/test_compile_cost.py).
        target: the GPU to compile for ("sm_90"); default this machine's CUDA device, and on the
        CPU nothing (the interpreter compiles nothing). A kernel that fails to compile is named
        with the workload in a warning, and the backend falls back to the graph layer's ops (no
        custom kernel); it is never a crash. Returns what was done, for the benchmark record.
        """
        from ..kernels import precompile
        from .. import compile_cache, samplers

        if (target is None and self.device.type != "cuda") or self.fallback is not None:
            return {}
        sampler_name, schedule_name = samplers.resolve(sampler, schedule, self.config.scheduler)
        key = (height, width, batch_size, sampler_name, schedule_name, tuple(ip_tokens), target)
        if key in self._prepared:  # the pipeline asks before every request: once per workload
            return dict(self._prepared[key], prepared_before=True)
        compile_cache.use_cache_dirs()
        launches = kernel_launches(self.config, height, width, batch=batch_size, sampler=sampler_name,
                                   schedule=schedule_name, dtype=self.dtype, ip_tokens=ip_tokens)
        specs = precompile.kernel_specs(launches)
        new = [spec for spec in specs if spec not in self._compiled]  # sizes are mostly not specialized
        info = {"kernels": len(specs), "compiled": 0, "compile_serial_s": 0.0, "compile_wall_s": 0.0,
                "compile_jobs": 0}
        if new:
            report = precompile.compile_specs(new, precompile.parse_target(target), jobs=jobs)
            info.update(compiled=report.compiled, compile_serial_s=round(report.serial_s, 3),
                        compile_wall_s=round(report.wall_s, 3), compile_jobs=report.jobs)
            log.info("triton: %s for %dx%d, batch %d, %s", report.summary(), width, height, batch_size, sampler_name)
            if report.failures:
                failure = report.failures[0]
                self.fall_back(f"kernel {failure['label']} failed to compile for {width}x{height}, "
                               f"batch {batch_size}, {sampler_name} ({failure['error']})")
                info["fallback"] = self.fallback
                return info
            self._compiled.update(new)
        self._prepared[key] = info
        return info

    def fall_back(self, reason: str):
        """Run on the graph layer's ops from now on (eager networks, torch sampler update), with
        one warning giving the reason."""
        log.warning("triton backend: %s; falling back to the graph layer (no custom kernels)", reason)
        for module in (self.text_encoder, self.text_encoder_2, self.unet, self.vae,
                       *self.__dict__.get("_controlnet_views", [])):
            if module is not None:
                set_ops(module, EAGER_OPS)
        self.step_update = "torch"
        self.fallback = reason

    fallback: Optional[str] = None  # why the backend runs without its kernels (None: it does not)

    def prepare_controlnet(self, controlnet):
        """The ControlNet as the UNet runs here: fused QKV, kernel ops, channels_last on CUDA, on
        a view of its weights (the caller's network is not rewritten)."""
        view = prepare_for_triton(self.controlnet_view(controlnet), channels_last=self.channels_last)
        if self.fallback is not None:
            set_ops(view, EAGER_OPS)
        self.__dict__.setdefault("_controlnet_views", []).append(view)

        def run(x, t, context, image, scale, guess_mode, added_cond):
            if self.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            return view(x, t, context, image, scale, guess_mode, added_cond=added_cond)

        return run

    def fused_unsupported(self, plan):
        if kernels.reference_mode():
            return "the kernels are in reference mode"
        if not (self.device.type in ("cuda", "meta") or kernels.INTERPRET):  # CPU without the interpreter: no kernels
            return "the fused Triton kernels need CUDA (or TRITON_INTERPRET=1 on the CPU)"
        return super().fused_unsupported(plan)


# ---------------------------------------------------------------------------
# What the backend launches: a shape-only dry run, for compiling up front
# ---------------------------------------------------------------------------

def kernel_launches(config, height: int, width: int, batch: int = 1, sampler: str = "euler",
                    schedule: Optional[str] = None, dtype: torch.dtype = torch.float16, guidance_scale: float = 7.5,
                    steps: int = 2, ip_tokens: tuple = ()) -> list:
    """Every Triton launch the triton backend makes on a GPU for one generation of this
    workload (txt2img, then the decode), as (kernel, args, kwargs), in launch order.

    It runs the backend's and the pipeline's own code on meta tensors (shapes only, no data,
    no GPU) with `kernels.precompile.record_launches()` active, so the list follows whatever
    path the code really takes (fused step or not, attention shapes, GroupNorm flags).
    ip_tokens: one image-token count per IP-Adapter: the UNet's cross-attentions get their key /
    value projections, and the step the image tokens the pipeline would give it (the image
    encoder and the adapters' projections run outside the step, on torch's ops)."""
    from ..kernels.precompile import record_launches
    from ..models.clip import CLIPTextModel
    from ..models.unet import UNet2DConditionModel
    from ..models.vae import AutoencoderKL
    from ..pipeline import Pipeline
    from ..tokenizer import CLIPTokenizer

    with torch.device("meta"):
        text_encoder = CLIPTextModel(config.text_encoder).to(dtype) if config.text_encoder else None  # None: refiner
        text_encoder_2 = CLIPTextModel(config.text_encoder_2).to(dtype) if config.text_encoder_2 else None
        unet = UNet2DConditionModel(config.unet).to(dtype)
        vae = AutoencoderKL(config.vae).to(dtype)
        if ip_tokens:
            _add_ip_layers(unet, len(ip_tokens), config.unet.cross_attention_dim, dtype)
    backend = TritonBackend(config, text_encoder, unet, vae, text_encoder_2)
    tokenizer = CLIPTokenizer.default()
    pipe = Pipeline(backend, tokenizer if text_encoder is not None else None,
                    tokenizer if text_encoder_2 is not None else None)
    if ip_tokens:
        encode = pipe._encode

        def encode_with_image_tokens(run):  # what ip_adapter.image_tokens adds, as shapes
            context, added_cond = encode(run)
            rows, width = context.shape[0], config.unet.cross_attention_dim
            image = {f"ip_tokens_{i}": torch.empty(rows, count, width, device="meta")
                     for i, count in enumerate(ip_tokens)}
            image["ip_scales"] = torch.empty(rows, len(ip_tokens), device="meta")
            return context, {**(added_cond or {}), **image}

        pipe._encode = encode_with_image_tokens
    with record_launches() as launches:
        latents = pipe("a dry run", height=height, width=width, batch_size=batch, steps=steps, sampler=sampler,
                       schedule=schedule, guidance_scale=guidance_scale, seed=0, output_type="latent",
                       progress=False).images
        pipe.decode_latents(latents)
    return list(launches)


def _add_ip_layers(unet: torch.nn.Module, adapters: int, context_dim: int, dtype: torch.dtype) -> None:
    """IP-Adapter key / value projections (meta) in every cross-attention, as load_ip_adapter adds them."""
    from ..models.ip_adapter import IPAttention
    from ..models.layers import Attention

    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross:
            module.ip_layers.extend(IPAttention(context_dim, module.to_out[0].in_features).to(dtype)
                                    for _ in range(adapters))
