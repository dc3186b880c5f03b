"""The Triton backend: the graph backend (sdengine/backends/graph.py) with our fused
Triton kernels, fp16 + channels_last.

What changes against the graph backend, all of it at load time (never in forward):
- the four swappable ops of every network (`sdengine.models.layers.Ops`) become the
  Triton kernels of `sdengine.kernels`: FlashAttention-2 attention, GroupNorm(+SiLU),
  LayerNorm, GEGLU;
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

import importlib
import logging
from dataclasses import replace

import torch
import torch.nn.functional as F

from .. import kernels
from ..models.layers import EAGER_OPS, Attention, set_ops
from .graph import GraphBackend

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
        self.channels_last = self.device.type == "cuda"
        for module in (self.text_encoder, self.text_encoder_2, self.unet, self.vae):
            if module is not None:
                prepare_for_triton(module, channels_last=self.channels_last)

    def fused_unsupported(self, plan):
        if kernels.reference_mode():
            return "the kernels are in reference mode"
        if not (self.device.type == "cuda" or kernels.INTERPRET):  # CPU without the interpreter: no kernels
            return "the fused Triton kernels need CUDA (or TRITON_INTERPRET=1 on the CPU)"
        return super().fused_unsupported(plan)
