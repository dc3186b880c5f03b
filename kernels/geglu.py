"""GEGLU activation: a · gelu(gate) for h = [a, gate] split on the last dim.

GLU variants (Shazeer, "GLU Variants Improve Transformer", 2020), as diffusers' GEGLU applies
it after its projection: `a, gate = h.chunk(2, dim=-1); return a * F.gelu(gate)`, with the
exact (erf) GELU of Hendrycks & Gimpel (2016): gelu(g) = g · ½(1 + erf(g/√2)).
One read of h and one write of the half-width output; the arithmetic runs in fp32 and is
rounded once (diffusers rounds gelu(gate) to the input dtype before the product).
"""

import torch

from ._triton import cast_out, check_launch, gpu_path, launcher, tl, triton

# Block sizes on the GPU, by rule (memory-bound: no autotuning, so no compile per config and
# shape at the first call). SD's GEGLU widths F = 4·dim (1280, 2560, 5120) are multiples of
# 256, so no lane idles; 8 rows x 256 = 2048 elements a program, 16 a thread.
_GPU_BLOCKS = {"BLOCK_M": 8, "BLOCK_F": 256, "num_warps": 4}


@triton.jit
def _geglu_kernel(H, Out,
                  stride_hm, stride_om,
                  M, F,
                  BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    h_ptrs = H + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    a = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)  # first half
    gate = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)  # second half
    gelu = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))  # 1/√2
    tl.store(Out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :],
             cast_out(a * gelu, Out.dtype.element_ty), mask=mask)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def geglu(h, *, out=None):
    """a · gelu(gate) where h = [a, gate] on the last dim (even length 2F); returns (..., F)."""
    if h.dim() == 0 or h.shape[-1] % 2 or h.dtype not in _DTYPES:
        raise ValueError(f"geglu: h must have an even last dim and a dtype in {_DTYPES}; "
                         f"got {tuple(h.shape)} {h.dtype}")
    check_launch("geglu", h)
    F = h.shape[-1] // 2
    h2 = h.reshape(-1, 2 * F)  # (rows, 2F)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    shape = (*h.shape[:-1], F)
    if out is None:
        out = torch.empty(shape, device=h.device, dtype=h.dtype)
    elif out.shape != shape or out.dtype != h.dtype or not out.is_contiguous():
        raise ValueError(f"geglu: out must be contiguous {shape} {h.dtype}")
    M = h2.shape[0]
    if M == 0 or F == 0:
        return out
    meta = dict(_GPU_BLOCKS) if gpu_path(h) else {"BLOCK_M": max(1, min(64, 16384 // triton.next_power_of_2(F))),
                                 "BLOCK_F": min(4096, triton.next_power_of_2(F))}

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(F, m["BLOCK_F"]))

    launcher(_geglu_kernel, h)[grid](h2, out, h2.stride(0), F, M, F, **meta)
    return out


def geglu_ref(h):
    """Plain-torch reference in fp32: chunk, exact gelu, product; cast back to h's dtype."""
    a, gate = h.float().chunk(2, dim=-1)
    return (a * torch.nn.functional.gelu(gate)).to(h.dtype)
