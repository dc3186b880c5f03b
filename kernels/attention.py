"""Fused scaled-dot-product attention with an online softmax.

FlashAttention-2 forward pass (Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", 2023; online softmax from Milakov & Gimelshein 2018):
each program owns BLOCK_M query rows of one (batch, head), streams K and V in BLOCK_N
tiles, and keeps the running row max `m`, row sum `l` and the unnormalised output in
registers. The (Nq, Nk) score matrix never reaches memory. The softmax runs in base 2
(`exp2`, with log2(e) folded into the scale) and the output is divided by `l` once at the end.

Head dims that are not powers of two (40, 80, 160 in SD1.x/SDXL) are padded to the next
power of two inside the kernel (BLOCK_D) and masked on load and store; the padding lanes
hold zeros, so they add nothing to q·k and are never written.

Precision: fp32 accumulation for both matmuls in every dtype. fp16/bf16 inputs multiply in
their own dtype on the tensor cores (p is cast to v's dtype before p·v, as in FA2). fp32
inputs use `input_precision="ieee"` (no TF32), so fp32 results are within ~1e-6 of a
float64 softmax.
"""

import math

import torch

from ._triton import HAS_TRITON, autotune, cast_out, check_launch, gpu_path, launcher, pick, tl, triton

# Configs for the GPU (the interpreter uses _interpret_blocks), by the padded head dim
# BLOCK_D: two each, so the first call at a new shape compiles and times two kernels (the
# cold start is bounded: kernels/precompile.py compiles them all up front, in parallel). SD
# self-attention is (2·8 heads, 4096 tokens, head_dim 40 → BLOCK_D 64); cross-attention has
# Nk = 77; SD1's deepest levels have head_dim 160 → BLOCK_D 256. The first config of each
# set is the large tile for long sequences, the second the small one for short sequences
# (77 keys, the 8x8 level) and for fp32 inputs: in fp16/bf16 each keeps the q tile plus
# num_stages buffers of k and v tiles under ~160 KiB of shared memory and the fp32
# accumulator under ~128 registers a thread, and the second also fits fp32 (twice the bytes).
_CONFIG_SETS = {
    block_d: [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in sizes]
    for block_d, sizes in {
        64: [(128, 64, 4, 3), (64, 64, 4, 2)],
        128: [(128, 64, 8, 3), (64, 32, 4, 2)],
        256: [(64, 64, 8, 2), (32, 32, 4, 2)],
    }.items()
}
_CONFIGS = [c for configs in _CONFIG_SETS.values() for c in configs]


def _config_set(block_d: int) -> int:
    """The key of _CONFIG_SETS for a padded head dim (16 and 32 use the 64 set)."""
    return next(d for d in sorted(_CONFIG_SETS) if block_d <= d)


# Interpreter (CPU tests): each program and each loop trip costs Python overhead per
# tl op, so the tiles grow with the problem (16 … 256), which keeps small cases small.
def _interpret_blocks(n_q, n_k):
    return {"BLOCK_M": min(256, max(16, triton.next_power_of_2(n_q))),
            "BLOCK_N": min(256, max(16, triton.next_power_of_2(n_k)))}


@triton.jit
def _attention_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n0, stride_kn, stride_vn, cols, kv_mask, N_K, qk_scale,
                    MASK_COLS: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One BLOCK_N tile of keys and values folded into the running (acc, m, l)."""
    k = tl.load(k_ptrs + n0 * stride_kn, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_ptrs + n0 * stride_vn, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    if MASK_COLS:
        scores = tl.where(cols[None, :] < N_K, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    p = tl.math.exp2(scores - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


# Sizes are not specialized: one kernel per (head dim, config) serves every sequence length,
# self- and cross-attention alike (kernels/precompile.py counts them).
@triton.jit(do_not_specialize=["stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn",
                               "stride_vb", "stride_vh", "stride_vn", "stride_ob", "stride_oh", "stride_om",
                               "H", "N_Q", "N_K"])
def _attention_kernel(Q, K, V, Out,
                      stride_qb, stride_qh, stride_qm, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      stride_ob, stride_oh, stride_om, stride_od,
                      H, N_Q, N_K, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM  # padding lanes of a non-power-of-two head dim
    q_mask = (offs_m[:, None] < N_Q) & mask_d[None, :]

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # unnormalised output
    # Whole tiles with no key mask (all of the 4096-token self-attention), then the ragged
    # tail, if any (e.g. 77 text tokens): one kernel for both.
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attention_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n0, stride_kn, stride_vn, n0 + offs_n,
                                        mask_d[None, :], N_K, qk_scale, False, DOT_FP32, INPUT_PRECISION)
    if n_full < N_K:
        cols = n_full + offs_n
        acc, m_i, l_i = _attention_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n_full, stride_kn, stride_vn, cols,
                                        (cols[:, None] < N_K) & mask_d[None, :], N_K, qk_scale, True, DOT_FP32,
                                        INPUT_PRECISION)
    acc = acc / l_i[:, None]

    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, cast_out(acc, Out.dtype.element_ty), mask=q_mask)


if HAS_TRITON:  # one autotuner per config set; each keeps its own winners
    _attention_kernel_tuned = {
        block_d: autotune(configs, key=["N_Q", "N_K", "BLOCK_D", "INPUT_PRECISION"])(_attention_kernel)
        for block_d, configs in _CONFIG_SETS.items()}
else:
    _attention_kernel_tuned = dict.fromkeys(_CONFIG_SETS, _attention_kernel)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention(q, k, v, scale=None, *, out=None):
    """softmax(q·kᵀ·scale)·v with the FlashAttention-2 kernel.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); any strides (e.g. views of (B, N, H, D)).
    D ≤ 256 (SD uses 40, 64, 80, 128, 160). fp16, bf16 or fp32; accumulates in fp32.
    scale defaults to 1/sqrt(D). Returns (B, H, Nq, D) laid out in memory as
    (B, Nq, H, D), so `out.transpose(1, 2).reshape(B, Nq, H*D)` is free.
    `out`, if given, is written in place (any strides) and returned.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D (B, H, N, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, n_q, d = q.shape
    n_k = k.shape[2]
    if k.shape != (B, H, n_k, d) or v.shape != k.shape:
        raise ValueError(f"attention: k and v must be (B={B}, H={H}, Nk, D={d}) and equal; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v must share one dtype of {_DTYPES}; "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if d > 256 or n_k == 0:
        raise ValueError(f"attention: head dim D={d} must be ≤ 256 and Nk={n_k} ≥ 1")
    check_launch("attention", q)
    if out is None:
        out = torch.empty(B, n_q, H, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"attention: out must be {tuple(q.shape)} {q.dtype}; got {tuple(out.shape)} {out.dtype}")
    if n_q == 0 or B * H == 0:
        return out

    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs every dim ≥ 16
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16/bf16
    kernel = pick(_attention_kernel, _attention_kernel_tuned[_config_set(block_d)], q)
    if gpu_path(q):
        meta = {"DOT_FP32": False}
    else:  # the interpreter multiplies bf16 tiles as raw uint16 bits (triton ≤ 3.9): upcast them
        meta = dict(_interpret_blocks(n_q, n_k), DOT_FP32=q.dtype == torch.bfloat16)

    def grid(m):
        return (triton.cdiv(n_q, m["BLOCK_M"]), B * H)

    launcher(kernel, q)[grid](
        q, k, v, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, n_q, n_k, scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        HEAD_DIM=d, BLOCK_D=block_d, INPUT_PRECISION=precision, **meta,
    )
    return out


def attention_ref(q, k, v, scale=None):
    """Plain-torch reference: softmax in fp32 of the fp32 scores, cast back to q's dtype."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)
