"""Building blocks shared by the UNet, the VAE and the text encoder.

The few ops that a fast backend replaces with fused kernels -- attention, GroupNorm
(optionally followed by SiLU), LayerNorm and GEGLU's gate -- are plain functions collected in
an `Ops` table. Every module that uses one of them calls it through `self.ops`, which is
`EAGER_OPS` unless a backend installs its own table on that model with `set_ops(model,
ops)`. The swap is per model instance, so an eager model and a Triton model can live
side by side in one process (e.g. in a parity test).

`triton_ops()` is the table of sdengine.kernels: GroupNorm, LayerNorm and GEGLU call the
kernels with the eager functions' signatures (kernels/ops.py `layer_op` picks the kernel's
path), attention reshapes to the kernel's (B, heads, L, d) first. From a layer to its
@triton.jit kernel: this file -> kernels/ops.py -> kernels/<op>.py. The eager functions are
not the kernels' `<op>_ref`: they are the fast reference that the eager backend runs (SDPA,
GroupNorm and LayerNorm in the input's dtype), while `<op>_ref` computes in fp32 as the oracle
of the kernel tests.

Module and parameter names follow diffusers (`to_q`, `norm1`, `time_emb_proj`, ...), so
`state_dict()` keys equal those of the diffusers classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------
# The swappable ops, eager versions
# ---------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
              causal: bool = False, upcast: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v.

    q: (B, Lq, heads * d); k, v: (B, Lk, heads * d). Returns (B, Lq, heads * d).
    `upcast` computes the whole attention in fp32 (SD2's upcast_attention: fp16 scores
    of the 768-px v-model overflow) on the CPU. On CUDA SDPA's fused kernels (flash,
    memory-efficient) keep the scores and the softmax in fp32 registers, as diffusers' SDPA
    processor relies on (it ignores upcast_attention); fp32 q, k, v would only push SDPA off
    its flash kernel. `causal` masks future tokens (CLIP's text encoder).
    """
    batch, q_len, inner = q.shape
    head_dim = inner // heads
    dtype = q.dtype
    q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
    if upcast and not q.is_cuda:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, Lq, d)
    return out.to(dtype).transpose(1, 2).reshape(batch, q_len, inner)  # (B, Lq, heads * d)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               silu: bool = False) -> torch.Tensor:
    """GroupNorm over (B, C, ...) with a per-channel affine, optionally followed by SiLU."""
    x = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(x) if silu else x


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension."""
    return F.layer_norm(x, weight.shape, weight, bias, eps)  # static shape: exportable by every ONNX exporter


def geglu(h: torch.Tensor) -> torch.Tensor:
    """GEGLU's gate (Shazeer 2020, "GLU Variants Improve Transformer"): a * gelu(b) for h = [a, b]
    on the last dim, h = x W^T + bias the projection. (..., 2 * inner) -> (..., inner); gelu is the
    exact (erf) one."""
    hidden, gate = h.chunk(2, dim=-1)  # 2 x (..., inner)
    return hidden * F.gelu(gate)


@dataclass(frozen=True)
class Ops:
    """The ops a backend may replace; each field has the signature of the eager function."""

    attention: Callable = attention
    group_norm: Callable = group_norm
    layer_norm: Callable = layer_norm
    geglu: Callable = geglu


EAGER_OPS = Ops()

# ---------------------------------------------------------------------------
# The same ops on sdengine's Triton kernels (the triton layer; the compile layer's custom_ops)
# ---------------------------------------------------------------------------

_MAX_HEAD_DIM = 256  # kernels/attention.py's limit (BLOCK_D ≤ 256)


def triton_attention(q, k, v, heads: int, *, causal: bool = False, upcast: bool = False):
    """(B, L, heads·d) projections -> (B, Lq, heads·d) through the flash-attention kernel.

    The kernel accumulates in fp32 whatever the input dtype, which is what SD2's
    `upcast_attention` asks for. CLIP's causal attention (77 tokens, 0.1 ms) and the VAE's
    single 512-wide head (beyond the kernel's head dims) stay eager.
    """
    batch, q_len, inner = q.shape
    head_dim = inner // heads
    if causal or head_dim > _MAX_HEAD_DIM:  # the VAE's one 512-wide head: SDPA's memory-efficient kernel
        return attention(q, k, v, heads, causal=causal, upcast=upcast)
    # (B, L, heads, d) -> (B, heads, L, d) as strided views: no copy
    q4, k4, v4 = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = _kernel("attention")(q4, k4, v4)  # (B, heads, Lq, d), stored as (B, Lq, heads, d)
    return out.transpose(1, 2).reshape(batch, q_len, inner)  # (B, Lq, heads·d), free


def triton_ops() -> Ops:
    """The Ops table of sdengine.kernels: GroupNorm, LayerNorm and GEGLU's gate call the kernels
    with the eager functions' signatures as they are; attention reshapes first (triton_attention)."""
    return Ops(attention=triton_attention, group_norm=_kernel("group_norm"), layer_norm=_kernel("layer_norm"),
               geglu=_kernel("geglu"))


def _kernel(name: str) -> Callable:
    """kernels/ops.py `layer_op(name)`; sdengine.kernels (and triton) is imported on first use only."""
    from ..kernels.ops import layer_op

    return layer_op(name)


class UsesOps(nn.Module):
    """Base of the modules that call a swappable op through `self.ops`."""

    ops: Ops = EAGER_OPS


def set_ops(model: nn.Module, ops: Ops) -> nn.Module:
    """Make every submodule of model call `ops` (e.g. `replace(EAGER_OPS, attention=flash)`)."""
    for module in model.modules():
        if isinstance(module, UsesOps):
            module.ops = ops
    return model


def prepare_network(model: nn.Module, ops: Ops, channels_last: bool) -> nn.Module:
    """A fast backend's load-time rewrite of one network (never in forward): self-attention Q, K, V
    fused into one matmul (`Attention.fuse_qkv`), `ops` installed, convolution weights channels_last."""
    for module in model.modules():
        if isinstance(module, Attention) and not module.is_cross and module.to_qkv is None:
            module.fuse_qkv()
    set_ops(model, ops)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------------------
# Normalisation and feed-forward modules
# ---------------------------------------------------------------------------


class GroupNorm(UsesOps):
    """nn.GroupNorm's parameters (weight, bias); `silu=True` applies SiLU after it."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, silu: bool = False):
        super().__init__()
        self.num_groups, self.eps, self.silu = num_groups, eps, silu
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.weight.shape[0]}, eps={self.eps}, silu={self.silu}"


class LayerNorm(UsesOps):
    """nn.LayerNorm's parameters (weight, bias) over the last dimension."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GEGLU(UsesOps):
    """Projection to 2 * inner features and the gated GELU (diffusers' `ff.net.0`)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.geglu(F.linear(x, self.proj.weight, self.proj.bias))  # (..., 2 * inner) -> (..., inner)


class FeedForward(nn.Module):
    """GEGLU MLP of the transformer blocks; `net` indices match diffusers (1 is dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


class IPContext(NamedTuple):
    """A cross-attention's context with IP-Adapter's image tokens (the UNet makes it from
    added_cond's ip_tokens_i and ip_scales): text (B, L, D); tokens, one (B, T, D) per adapter;
    scales (B, adapters), a device tensor, so that a new scale recaptures nothing. Every tensor has
    a row per batch row, as all of added_cond has, so that whatever takes some of the rows (T-GATE's
    unconditional rows, a ControlNet's guess mode) takes them all alike."""

    text: torch.Tensor
    tokens: tuple
    scales: torch.Tensor


class Attention(UsesOps):
    """Multi-head attention with diffusers' names: to_q, to_k, to_v, to_out.0.

    Self-attention when `context_dim` is None, cross-attention over a context otherwise.
    `fuse_qkv()` (called by a backend at load time, never in forward) replaces the three
    self-attention projections by one `to_qkv` with the same result. `ip_layers` holds the
    IP-Adapters' key / value projections (models/ip_adapter.py IPAttention, one per adapter,
    added by Pipeline.load_ip_adapter): given an IPContext, each adapter's attention of the same
    queries over its image tokens is added, times its scale, before to_out (diffusers'
    IPAdapterAttnProcessor2_0, the paper's decoupled cross-attention).
    """

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None, *,
                 qkv_bias: bool = False, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast, self.is_cross = heads, upcast, context_dim is not None
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_qkv: Optional[nn.Linear] = None
        self.ip_layers = nn.ModuleList()  # empty: no parameters, no state_dict keys

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """x: (B, L, dim); context: (B, Lc, context_dim) for cross-attention, or an IPContext.
        Returns (B, L, dim)."""
        image = None
        if isinstance(context, IPContext):
            context, image = context.text, context
        if self.to_qkv is not None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)  # 3 x (B, L, dim)
        else:
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        out = self.ops.attention(q, k, v, self.heads, upcast=self.upcast)
        if image is not None:
            for j, (layer, tokens) in enumerate(zip(self.ip_layers, image.tokens)):
                ip_out = self.ops.attention(q, layer.to_k_ip(tokens), layer.to_v_ip(tokens), self.heads,
                                            upcast=self.upcast)
                out = out + image.scales[:, j, None, None].to(out.dtype) * ip_out  # (B, 1, 1) per row
        return self.to_out[0](out)

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Concatenate to_q, to_k, to_v into one projection (self-attention only)."""
        if self.is_cross:
            raise ValueError("fuse_qkv applies to self-attention; this is cross-attention")
        parts = (self.to_q, self.to_k, self.to_v)
        has_bias = self.to_q.bias is not None
        fused = nn.Linear(self.to_q.in_features, 3 * self.to_q.out_features, bias=has_bias,
                          device=self.to_q.weight.device, dtype=self.to_q.weight.dtype)
        fused.weight.copy_(torch.cat([p.weight for p in parts]))  # (3 * dim, dim)
        if has_bias:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
        self.to_qkv = fused
        del self.to_q, self.to_k, self.to_v


# ---------------------------------------------------------------------------
# Convolutional blocks (UNet and VAE)
# ---------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with an optional timestep bias between (diffusers' ResnetBlock2D).

    `time_channels=None` (the VAE) drops the timestep projection. A 1x1 `conv_shortcut`
    matches channels when they change.
    """

    def __init__(self, in_channels: int, out_channels: int, time_channels: Optional[int], groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_channels, out_channels) if time_channels is not None else None
        self.norm2 = GroupNorm(groups, out_channels, eps, silu=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, time_act: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, C_in, H, W); time_act: SiLU of the timestep embedding, (B, T). Returns (B, C_out, H, W)."""
        h = self.conv1(self.norm1(x))
        if time_act is not None:
            h = h + self.time_emb_proj(time_act)[:, :, None, None]  # (B, C_out, 1, 1) broadcast
        h = self.conv2(self.norm2(h))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `asymmetric_pad` (the VAE) pads right/bottom by one instead of all sides."""

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv.

    `size` (the skip connection's H, W) lets odd sizes round-trip through Downsample2D;
    by default the resolution doubles.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Optional[tuple] = None) -> torch.Tensor:
        if size is None:
            size = (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


__all__ = [
    "Ops", "EAGER_OPS", "triton_ops", "set_ops", "prepare_network", "attention", "group_norm", "layer_norm", "geglu",
    "GroupNorm", "LayerNorm", "GEGLU", "FeedForward", "Attention", "ResnetBlock2D", "Downsample2D", "Upsample2D",
]
