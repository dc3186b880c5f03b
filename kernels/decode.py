"""VAE output to 8-bit images in one pass: [-1, 1] NCHW float → uint8 NHWC.

The arithmetic is diffusers' `VaeImageProcessor.postprocess(output_type="pil")`, step by step:
`denormalize`: v = clamp(x·0.5 + 0.5, 0, 1), in x's own dtype (fp16 stays fp16); then
`pt_to_numpy`: v.float(); then `numpy_to_pil`: `(v * 255).round().astype("uint8")`, an fp32
product rounded half to even (numpy's and torch's `round`). The kernel does the same: it
rounds half to even explicitly (floor(v + ½), minus one on an exact tie that lands on an
odd number), so the bytes equal diffusers' for every input, not only almost all.
The read is one plane per channel; the write interleaves the channels (NHWC).
"""

import torch

from ._triton import check_launch, gpu_path, launcher, tl, triton


@triton.jit
def _decode_to_uint8_kernel(X, Out,
                            stride_xn, stride_xc, stride_xp,
                            P, C,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)  # pixel index h·W + w
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_p[:, None] < P) & (offs_c[None, :] < C)
    n64 = n.to(tl.int64)
    x = tl.load(X + n64 * stride_xn + offs_p[:, None] * stride_xp + offs_c[None, :] * stride_xc,
                mask=mask, other=0.0)  # (BLOCK_P, BLOCK_C), x's dtype
    # denormalize, rounded to x's dtype as diffusers computes it (an fp16/bf16 op is the fp32 op
    # rounded once, and x·0.5 is exact). bf16 rounds to nearest even by hand: the interpreter's
    # fp32→bf16 cast truncates.
    v = x.to(tl.float32) * 0.5 + 0.5
    if X.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        v = bits.to(tl.float32, bitcast=True)
    elif X.dtype.element_ty == tl.float16:
        v = v.to(tl.float16).to(tl.float32)
    v = tl.minimum(tl.maximum(v, 0.0), 1.0) * 255.0
    r = tl.floor(v + 0.5)
    # Round half to even: on an exact .5 tie floor(v + ½) is the upper neighbour; step down if odd.
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where(((r - v) == 0.5) & odd, r - 1.0, r)
    tl.store(Out + n64 * P * C + offs_p[:, None] * C + offs_c[None, :], r.to(tl.uint8), mask=mask)


def decode_to_uint8(x, *, out=None):
    """(N, C, H, W) float in [-1, 1] → (N, H, W, C) uint8, rounding as diffusers' postprocess.

    Any float dtype and strides in which H and W merge (NCHW or channels_last). C ≤ 16.
    `out`, if given ((N, H, W, C) uint8, contiguous), is written and returned.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"decode_to_uint8: x must be a float (N, C, H, W) tensor; got {tuple(x.shape)} {x.dtype}")
    N, C, H, W = x.shape
    if C > 16:
        raise ValueError(f"decode_to_uint8: C={C} channels; an image has at most 16 here (3 or 4 normally)")
    check_launch("decode_to_uint8", x)
    if H > 1 and x.stride(2) != W * x.stride(3):
        x = x.contiguous()
    shape = (N, H, W, C)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=torch.uint8)
    elif out.shape != shape or out.dtype != torch.uint8 or not out.is_contiguous():
        raise ValueError(f"decode_to_uint8: out must be contiguous {shape} uint8")
    P = H * W
    if out.numel() == 0:
        return out
    block_p = 1024 if gpu_path(x) else min(16384, triton.next_power_of_2(P))
    grid = (N, triton.cdiv(P, block_p))
    launcher(_decode_to_uint8_kernel, x)[grid](
        x, out, x.stride(0), x.stride(1), x.stride(3), P, C,
        BLOCK_P=block_p, BLOCK_C=triton.next_power_of_2(C))
    return out


def decode_to_uint8_ref(x):
    """Plain-torch reference: diffusers' denormalize (in x's dtype), then fp32 ·255, round, uint8, NHWC."""
    v = (x * 0.5 + 0.5).clamp(0, 1)
    return (v.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)
