"""LayerNorm over the last dimension, statistics in fp32.

Layer Normalization (Ba, Kiros & Hinton, "Layer Normalization", 2016):
y = (x − mean) / sqrt(var + eps) · weight + bias over the last dim (biased variance).
Each program normalises BLOCK_M whole rows held in registers (two-pass mean/variance, so no
cancellation); the row length is padded to a power of two (BLOCK_D) and masked. SD uses
D = 320, 640, 1280 (UNet transformer blocks) and 768/1024/1280 (CLIP).
"""

import torch

from ._triton import cast_out, check_launch, gpu_path, launcher, tl, triton


def _configs(block_d):
    """GPU tiles: about 4K–8K elements a program."""
    rows = max(1, min(16, 4096 // block_d))
    return {"BLOCK_M": rows, "num_warps": 4 if block_d * rows <= 4096 else 8}


# Sizes are not specialized (Triton would compile a variant per size divisible by 16 or
# equal to 1): one kernel per BLOCK_D serves every shape (kernels/precompile.py counts them).
@triton.jit(do_not_specialize=["M", "D"])
def _layer_norm_kernel(X, Y, W, B,
                       stride_xm, stride_ym,
                       M, D, eps,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    mask = (rows[:, None] < M) & mask_d[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    mean = tl.sum(x, 1) / D
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / D + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], cast_out(y, Y.dtype.element_ty), mask=mask)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def layer_norm(x, weight, bias, eps=1e-5, *, out=None):
    """LayerNorm of x over its last dim D, fp32 statistics; returns x's shape and dtype.

    weight, bias: (D,) or None. D ≤ 65536. `out`, if given (contiguous), is written and returned.
    """
    if x.dim() == 0 or x.dtype not in _DTYPES:
        raise ValueError(f"layer_norm: x must be ≥ 1-D and one of {_DTYPES}; got {tuple(x.shape)} {x.dtype}")
    D = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (D,):
            raise ValueError(f"layer_norm: {name} must be ({D},); got {tuple(p.shape)}")
    if D > 65536:
        raise ValueError(f"layer_norm: last dim {D} > 65536 does not fit one program")
    check_launch("layer_norm", x)
    x2 = x.reshape(-1, D)  # (rows, D): a view when x's rows are contiguous
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"layer_norm: out must be contiguous {tuple(x.shape)} {x.dtype}")
    M = x2.shape[0]
    if M == 0 or D == 0:
        return out
    block_d = triton.next_power_of_2(D)
    if gpu_path(x):
        meta = _configs(block_d)
    else:  # interpreter: many rows per program
        meta = {"BLOCK_M": max(1, min(64, 32768 // block_d))}
    grid = (triton.cdiv(M, meta["BLOCK_M"]),)
    launcher(_layer_norm_kernel, x)[grid](
        x2, out, weight if weight is not None else x2, bias if bias is not None else x2,
        x2.stride(0), D, M, D, eps,
        BLOCK_D=block_d, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **meta)
    return out


def layer_norm_ref(x, weight, bias, eps=1e-5):
    """Plain-torch reference: F.layer_norm in fp32, cast back to x's dtype."""
    return torch.nn.functional.layer_norm(
        x.float(), x.shape[-1:], weight.float() if weight is not None else None,
        bias.float() if bias is not None else None, eps).to(x.dtype)
