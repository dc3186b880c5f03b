"""The Triton backend: our networks with fused Triton kernels, fp16 + channels_last,
and the UNet step replayed from CUDA graphs.

What changes against the eager backend, all of it at load time (never in forward):
- the four swappable ops of every network (`sdengine.models.layers.Ops`) become the
  Triton kernels of `sdengine.kernels`: FlashAttention-2 attention, GroupNorm(+SiLU),
  LayerNorm, GEGLU;
- self-attention Q, K, V projections are fused into one matmul (`Attention.fuse_qkv`);
- on CUDA, convolution weights go channels_last, so cuDNN runs NHWC convolutions with
  no transposes, and the GroupNorm kernel reads and writes NHWC directly;
- on CUDA, each UNet forward at a new shape (batch, height, width, context length) is
  captured once as a CUDA graph and replayed afterwards: at batch 2 the eager UNet is
  launch-bound (ANCHORS.md: 54.5 vs 104.6 it/s). Graphs live in a bounded LRU cache
  and share one memory pool; a new resolution captures only its own graph.

On the CPU the same kernels run through Triton's interpreter (TRITON_INTERPRET=1): far
too slow for real use, but it is how CI proves that these code paths match eager.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import replace

import torch
import torch.nn.functional as F

from .. import kernels
from ..models.layers import EAGER_OPS, Attention, set_ops
from .eager import EagerBackend

log = logging.getLogger("sdengine")


# ---------------------------------------------------------------------------
# The ops, in the signatures of sdengine.models.layers.Ops
# ---------------------------------------------------------------------------

def _kernel(name: str):
    """The op to call for kernel `name`.

    On CUDA: the public op of sdengine.kernels, which goes through the registered
    `torch.ops.sdengine.<name>` so that torch.compile / export see the Triton kernel.
    Under TRITON_INTERPRET=1 (CPU tests): the Triton wrapper itself, since the public op
    sends CPU tensors to the plain-torch reference and would prove nothing.
    """
    import importlib

    if kernels.INTERPRET:
        return getattr(importlib.import_module(f"sdengine.kernels.{name}"), name)
    return getattr(kernels, name)


_attention_kernel, _group_norm_kernel = _kernel("attention"), _kernel("group_norm")
_layer_norm_kernel, _geglu_kernel = _kernel("layer_norm"), _kernel("geglu")


def triton_attention(q, k, v, heads: int, *, causal: bool = False, upcast: bool = False):
    """(B, L, heads·d) projections -> (B, Lq, heads·d) through the flash-attention kernel.

    The kernel accumulates in fp32 whatever the input dtype, which is what SD2's
    `upcast_attention` asks for. CLIP's causal attention (77 tokens, 0.1 ms) stays eager.
    """
    if causal:
        return EAGER_OPS.attention(q, k, v, heads, causal=True, upcast=upcast)
    batch, q_len, inner = q.shape
    head_dim = inner // heads
    # (B, L, heads, d) -> (B, heads, L, d) as strided views: no copy
    q4, k4, v4 = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = _attention_kernel(q4, k4, v4)  # (B, heads, Lq, d), stored as (B, Lq, heads, d)
    return out.transpose(1, 2).reshape(batch, q_len, inner)  # (B, Lq, heads·d), free


def triton_group_norm(x, weight, bias, groups: int, eps: float, silu: bool = False):
    return _group_norm_kernel(x, groups, weight, bias, eps=eps, silu=silu)


def triton_layer_norm(x, weight, bias, eps: float):
    return _layer_norm_kernel(x, weight, bias, eps=eps)


def triton_geglu(x, weight, bias):
    return _geglu_kernel(F.linear(x, weight, bias))  # (..., 2·inner) -> (..., inner)


TRITON_OPS = replace(EAGER_OPS, attention=triton_attention, group_norm=triton_group_norm,
                     layer_norm=triton_layer_norm, geglu=triton_geglu)


def prepare_for_triton(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """Load-time rewrite of one network: fused QKV, kernel ops, NHWC conv weights."""
    for sub in module.modules():
        if isinstance(sub, Attention) and not sub.is_cross and sub.to_qkv is None:
            sub.fuse_qkv()
    set_ops(module, TRITON_OPS)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


# ---------------------------------------------------------------------------
# CUDA graphs of the UNet step
# ---------------------------------------------------------------------------

class GraphedUNet:
    """An LRU cache of CUDA graphs of one UNet, keyed by the shapes of its inputs.

    Each entry holds static input buffers, the captured graph and its static output.
    All graphs share one memory pool, so the cache costs little beyond the activations
    of the largest shape.
    """

    def __init__(self, unet, capacity: int = 8):
        self.unet = unet
        self.capacity = capacity
        self.pool = torch.cuda.graph_pool_handle()
        self.entries: OrderedDict = OrderedDict()

    @staticmethod
    def key(x, t, context, added_cond) -> tuple:
        extra = tuple(sorted((k, tuple(v.shape)) for k, v in (added_cond or {}).items()))
        return tuple(x.shape), tuple(t.shape), tuple(context.shape), extra, x.dtype

    def __call__(self, x, t, context, added_cond=None):
        key = self.key(x, t, context, added_cond)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._capture(x, t, context, added_cond)
            self.entries[key] = entry
            if len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        static_in, graph, static_out = entry
        static_in["x"].copy_(x)
        static_in["t"].copy_(t)
        static_in["context"].copy_(context)
        for k, v in (added_cond or {}).items():
            static_in[k].copy_(v)
        graph.replay()
        return static_out

    def _capture(self, x, t, context, added_cond):
        started = time.perf_counter()
        static_in = {"x": x.clone(), "t": t.clone(), "context": context.clone()}
        static_in.update({k: v.clone() for k, v in (added_cond or {}).items()})

        def run():
            cond = {k: static_in[k] for k in (added_cond or {})} or None
            return self.unet(static_in["x"], static_in["t"], static_in["context"], added_cond=cond)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: autotuning and lazy init outside the capture
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = run()
        log.info("captured a CUDA graph of the UNet for x %s, context %s in %.2f s",
                 tuple(x.shape), tuple(context.shape), time.perf_counter() - started)
        return static_in, graph, static_out


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------

class TritonBackend(EagerBackend):
    """Our networks with the Triton kernels; on CUDA, channels_last and graphed UNet steps.

    cuda_graphs: replay the UNet from CUDA graphs (CUDA only; default on).
    graph_cache: how many input shapes keep a graph (least recently used go first).
    """

    name = "triton"

    def __init__(self, config, text_encoder, unet, vae, text_encoder_2=None, *, cuda_graphs: bool = True,
                 graph_cache: int = 8):
        if not kernels.HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        super().__init__(config, text_encoder, unet, vae, text_encoder_2)
        on_cuda = self.device.type == "cuda"
        for module in (self.text_encoder, self.text_encoder_2, self.unet, self.vae):
            if module is not None:
                prepare_for_triton(module, channels_last=on_cuda)
        self.graphs = GraphedUNet(self.unet, graph_cache) if on_cuda and cuda_graphs else None

    @torch.inference_mode()
    def denoise(self, x_in, t, context, added_cond=None):
        x = x_in.to(self.device, self.dtype)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        t = t.to(self.device)
        context = context.to(self.device, self.dtype)
        if added_cond is not None:
            added_cond = {k: v.to(self.device, self.dtype) for k, v in added_cond.items()}
        if self.graphs is not None:
            return self.graphs(x, t, context, added_cond).float()  # .float() copies out of the graph's buffer
        return self.unet(x, t, context, added_cond=added_cond).float()
