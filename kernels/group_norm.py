"""GroupNorm with fused affine, SiLU and residual-add epilogues, for NCHW and channels_last.

Group Normalization (Wu & He, "Group Normalization", ECCV 2018):
y = (x − mean_g) / sqrt(var_g + eps) · weight_c + bias_c, with mean and (biased) variance
over the C/G channels and H·W positions of each (sample, group).

The epilogue order is fixed:  y = GN(x)·weight + bias;  y = silu(y) if silu;  y = y + residual.
In the SD UNet and VAE every GroupNorm except the ones that feed attention blocks is
followed by SiLU (diffusers ResnetBlock2D: norm1 → silu → conv1 → norm2 → silu → conv2),
so `silu=True` is the fusion that matters. ResnetBlock2D's residual add comes after conv2,
not after a norm, so `residual` is an add onto the *final* output of this op (it never
feeds the normalisation); it is there for callers whose add follows the norm directly.

Statistics are computed in fp32 in three launches, so that a single large group (the
VAE's 512×512×128 activation at batch 1 has 32 groups of 1M elements) is still spread
over the whole GPU:
1. `_group_norm_stats_kernel`: each program reduces one chunk of H·W positions for a
   block of channels to a per-channel (mean, M2), combining its tiles with Chan et al.'s
   parallel update (1979), which does not cancel catastrophically like Σx² − (Σx)²/n.
2. `_group_norm_finalize_kernel`: one program per (sample, group) on the GPU merges the partials of
   its channels and chunks (the same update) into mean and 1/sqrt(var + eps).
3. `_group_norm_apply_kernel`: normalises, applies weight/bias, SiLU and residual, writes.
x is read twice (stats, apply) and y written once; at SD1.5's 64×64×320 the second read
comes from L2.

Layout: x is viewed as (N, C, H·W) with strides (s_n, s_c, s_w), which covers NCHW
contiguous (s_w = 1) and channels_last (s_c = 1) alike; the output is allocated with
x's memory format.
"""

import torch

from ._triton import cast_out, check_launch, gpu_path, launcher, tl, triton

# Block sizes on the GPU, chosen by rule rather than autotuned: every kernel here is
# memory-bound (x read twice, y written once), and autotuning per exact shape cost a compile
# and a benchmark per config per shape on the first call (the cold start that never finished
# on the H200). 64 channels x 64 positions is 128-byte rows whichever axis is contiguous
# (channels_last: C; NCHW: H·W), and 4096 elements a program.
_GPU_APPLY_BLOCKS = {"BLOCK_HW": 64, "BLOCK_C": 64, "num_warps": 4}
# Stats tiles on the GPU (the chunk length is chosen by the wrapper to fill the device).
_GPU_STATS_BLOCKS = {"BLOCK_HW": 64, "BLOCK_C": 64}
_GPU_PROGRAMS = 1024  # aim for this many stats programs: ~8 per SM on an H100
# Finalize on the GPU: a program per (sample, group) walks its chunks and channels in fixed
# 16 x 16 tiles, so one compiled kernel serves every channel count and chunking.
_GPU_FINALIZE_BLOCKS = {"BLOCK_G": 1, "BLOCK_K": 16, "BLOCK_CPG": 16}


# Sizes and loop bounds are not specialized (Triton would compile a variant per value equal
# to 1 or divisible by 16): one kernel of each kind serves every shape. The unit strides are
# (channels_last: stride_xc = 1), which is what lets the loads vectorize.
@triton.jit(do_not_specialize=["stride_xn", "C", "HW", "HW_PER_CHUNK", "N_CHUNKS"])
def _group_norm_stats_kernel(X, Mean_part, M2_part,
                             stride_xn, stride_xc, stride_xhw,
                             C, HW, HW_PER_CHUNK, N_CHUNKS,
                             BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    hw_start = chunk * HW_PER_CHUNK
    hw_end = tl.minimum(hw_start + HW_PER_CHUNK, HW)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    x_base = X + n.to(tl.int64) * stride_xn + offs_c[None, :] * stride_xc
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = (offs_hw[:, None] < hw_end) & mask_c[None, :]
        x = tl.load(x_base + offs_hw[:, None] * stride_xhw, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_HW, BLOCK_C)
        n_tile = tl.minimum(hw_end - hw0, BLOCK_HW).to(tl.float32)
        n_seen = (hw0 - hw_start).to(tl.float32)
        tile_mean = tl.sum(x, 0) / n_tile
        centred = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(centred * centred, 0)
        # Chan et al.: merge (n_seen, mean, m2) with (n_tile, tile_mean, tile_m2).
        n_total = n_seen + n_tile
        delta = tile_mean - mean
        mean = mean + delta * (n_tile / n_total)
        m2 = m2 + tile_m2 + delta * delta * (n_seen * n_tile / n_total)
    part = (n * N_CHUNKS + chunk) * C + offs_c  # partials are (N, N_CHUNKS, C) fp32
    tl.store(Mean_part + part, mean, mask=mask_c)
    tl.store(M2_part + part, m2, mask=mask_c)


@triton.jit(do_not_specialize=["C", "HW", "HW_PER_CHUNK", "N_CHUNKS", "CPG", "G"])
def _group_norm_finalize_kernel(Mean_part, M2_part, Mean, Rstd,
                                C, HW, HW_PER_CHUNK, N_CHUNKS, CPG, G, eps,
                                BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CPG: tl.constexpr):
    n = tl.program_id(0)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)  # BLOCK_G groups of sample n
    total = (HW * CPG) * 1.0  # fp32
    # Pass 1: group mean = Σ_k Σ_c count_k · mean_kc / total, over tiles of chunks and channels.
    acc = tl.zeros([BLOCK_G, BLOCK_K, BLOCK_CPG], dtype=tl.float32)
    for j0 in range(0, CPG, BLOCK_CPG):
        offs_j = j0 + tl.arange(0, BLOCK_CPG)
        mask_gj = (offs_g[:, None, None] < G) & (offs_j[None, None, :] < CPG)
        offs_c = offs_g[:, None, None] * CPG + offs_j[None, None, :]  # (BLOCK_G, 1, BLOCK_CPG)
        for k0 in range(0, N_CHUNKS, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)[None, :, None]
            mask = (ks < N_CHUNKS) & mask_gj
            count = tl.minimum(HW - ks * HW_PER_CHUNK, HW_PER_CHUNK).to(tl.float32)
            part = (n * N_CHUNKS + ks) * C + offs_c  # partials are (N, N_CHUNKS, C)
            acc += tl.load(Mean_part + part, mask=mask, other=0.0) * count
    mean = tl.sum(tl.sum(acc, 2), 1) / total  # (BLOCK_G,)
    # Pass 2: M2 = Σ M2_kc + count_k · (mean_kc − mean)² (Chan et al., all parts at once).
    acc = tl.zeros([BLOCK_G, BLOCK_K, BLOCK_CPG], dtype=tl.float32)
    for j0 in range(0, CPG, BLOCK_CPG):
        offs_j = j0 + tl.arange(0, BLOCK_CPG)
        mask_gj = (offs_g[:, None, None] < G) & (offs_j[None, None, :] < CPG)
        offs_c = offs_g[:, None, None] * CPG + offs_j[None, None, :]
        for k0 in range(0, N_CHUNKS, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)[None, :, None]
            mask = (ks < N_CHUNKS) & mask_gj
            count = tl.minimum(HW - ks * HW_PER_CHUNK, HW_PER_CHUNK).to(tl.float32)
            part = (n * N_CHUNKS + ks) * C + offs_c
            delta = tl.load(Mean_part + part, mask=mask, other=0.0) - mean[:, None, None]
            m2 = tl.load(M2_part + part, mask=mask, other=0.0)
            acc += tl.where(mask, m2 + count * delta * delta, 0.0)
    var = tl.sum(tl.sum(acc, 2), 1) / total
    mask_g = offs_g < G
    tl.store(Mean + n * G + offs_g, mean, mask=mask_g)
    tl.store(Rstd + n * G + offs_g, 1.0 / tl.sqrt(var + eps), mask=mask_g)


@triton.jit(do_not_specialize=["stride_xn", "stride_yn", "stride_rn", "C", "HW", "CPG", "G"])
def _group_norm_apply_kernel(X, Y, R, W, B, Mean, Rstd,
                             stride_xn, stride_xc, stride_xhw,
                             stride_yn, stride_yc, stride_yhw,
                             stride_rn, stride_rc, stride_rhw,
                             C, HW, CPG, G,
                             BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
                             HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                             APPLY_SILU: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    n = tl.program_id(0)
    offs_hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_hw[:, None] < HW) & mask_c[None, :]
    group = n * G + offs_c // CPG
    mean = tl.load(Mean + group, mask=mask_c, other=0.0)
    scale = tl.load(Rstd + group, mask=mask_c, other=0.0)
    if HAS_WEIGHT:
        scale = scale * tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    shift = -mean * scale  # y = x·scale + shift = (x − mean)·rstd·w (+ b)
    if HAS_BIAS:
        shift = shift + tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)

    n64 = n.to(tl.int64)
    x = tl.load(X + n64 * stride_xn + offs_hw[:, None] * stride_xhw + offs_c[None, :] * stride_xc,
                mask=mask, other=0.0).to(tl.float32)  # (BLOCK_HW, BLOCK_C)
    y = x * scale[None, :] + shift[None, :]
    if APPLY_SILU:
        y = y / (1.0 + tl.exp(-y))
    if HAS_RESIDUAL:
        y += tl.load(R + n64 * stride_rn + offs_hw[:, None] * stride_rhw + offs_c[None, :] * stride_rc,
                     mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + n64 * stride_yn + offs_hw[:, None] * stride_yhw + offs_c[None, :] * stride_yc,
             cast_out(y, Y.dtype.element_ty), mask=mask)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _strides_nchw(t):
    """Strides (s_n, s_c, s_hw) of t viewed as (N, C, H·W), or None if H and W do not merge."""
    n, c, h, w = t.shape
    if h > 1 and t.stride(2) != w * t.stride(3):
        return None
    return t.stride(0), t.stride(1), t.stride(3)


def _dense(t):
    """t itself when its H and W merge, else a channels_last or contiguous copy."""
    if _strides_nchw(t) is not None:
        return t
    fmt = torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, residual=None, *, out=None, _split=None):
    """y = silu?(GroupNorm(x)·weight + bias) + residual, statistics in fp32.

    x: (N, C, H, W) fp16/bf16/fp32, NCHW contiguous or channels_last (other strides are
    copied first); the output has x's memory format and dtype. weight, bias: (C,) or None.
    residual: None or a tensor of x's shape, added last (see the module docstring).
    `out`, if given, is written in place and returned. `_split=(BLOCK_HW, BLOCK_C, n_chunks, BLOCK_G)`
    forces the GPU's split reduction (tests use it to cover that path under the interpreter).
    """
    if x.dim() != 4:
        raise ValueError(f"group_norm: x must be (N, C, H, W); got shape {tuple(x.shape)}")
    N, C, H, W = x.shape
    if num_groups <= 0 or C % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups} must divide the {C} channels")
    if x.dtype not in _DTYPES:
        raise TypeError(f"group_norm: x.dtype must be one of {_DTYPES}; got {x.dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (C,):
            raise ValueError(f"group_norm: {name} must be ({C},); got {tuple(p.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"group_norm: residual must be {tuple(x.shape)}; got {tuple(residual.shape)}")
    check_launch("group_norm", x)
    x = _dense(x)
    if out is None:
        out = torch.empty_like(x)  # keeps channels_last
    elif out.shape != x.shape or out.dtype != x.dtype or _strides_nchw(out) is None:
        raise ValueError(f"group_norm: out must be {tuple(x.shape)} {x.dtype} with mergeable H, W strides")
    if x.numel() == 0:
        return out
    residual = _dense(residual) if residual is not None else None

    G, HW, cpg = num_groups, H * W, C // num_groups
    if _split is not None:
        stats_blocks = {"BLOCK_HW": _split[0], "BLOCK_C": _split[1]}
        c_blocks, n_chunks = triton.cdiv(C, _split[1]), _split[2]
        apply_kernel, apply_meta = _group_norm_apply_kernel, dict(stats_blocks)
    elif gpu_path(x):
        stats_blocks = dict(_GPU_STATS_BLOCKS)
        c_blocks = triton.cdiv(C, stats_blocks["BLOCK_C"])
        n_chunks = max(1, min(triton.cdiv(_GPU_PROGRAMS, N * c_blocks), triton.cdiv(HW, stats_blocks["BLOCK_HW"])))
        apply_kernel, apply_meta = _group_norm_apply_kernel, dict(_GPU_APPLY_BLOCKS)
    else:  # interpreter: few, large programs
        stats_blocks = {"BLOCK_HW": min(64, triton.next_power_of_2(HW)), "BLOCK_C": triton.next_power_of_2(C)}
        c_blocks, n_chunks = 1, 1
        apply_kernel, apply_meta = _group_norm_apply_kernel, dict(stats_blocks)
    hw_per_chunk = triton.cdiv(triton.cdiv(HW, n_chunks), stats_blocks["BLOCK_HW"]) * stats_blocks["BLOCK_HW"]
    n_chunks = triton.cdiv(HW, hw_per_chunk)

    mean_part = torch.empty(N, n_chunks, C, device=x.device, dtype=torch.float32)
    m2_part = torch.empty_like(mean_part)
    mean = torch.empty(N * G, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    sx = _strides_nchw(x)
    launcher(_group_norm_stats_kernel, x)[(N, n_chunks, c_blocks)](
        x, mean_part, m2_part, *sx, C, HW, hw_per_chunk, n_chunks, **stats_blocks)
    if _split is not None:  # the GPU's fixed tiles (their loops), BLOCK_G groups a program
        finalize_blocks = dict(_GPU_FINALIZE_BLOCKS, BLOCK_G=_split[3])
    elif gpu_path(x):  # a program per group, fixed tiles: one kernel for every shape
        finalize_blocks = _GPU_FINALIZE_BLOCKS
    else:  # interpreter: one program, whole tiles
        finalize_blocks = {"BLOCK_G": triton.next_power_of_2(G), "BLOCK_K": min(64, triton.next_power_of_2(n_chunks)),
                           "BLOCK_CPG": triton.next_power_of_2(cpg)}
    launcher(_group_norm_finalize_kernel, x)[(N, triton.cdiv(G, finalize_blocks["BLOCK_G"]))](
        mean_part, m2_part, mean, rstd, C, HW, hw_per_chunk, n_chunks, cpg, G, eps, **finalize_blocks)

    def grid(m):
        return (N, triton.cdiv(HW, m["BLOCK_HW"]), triton.cdiv(C, m["BLOCK_C"]))

    sr = _strides_nchw(residual) if residual is not None else (0, 0, 0)
    launcher(apply_kernel, x)[grid](
        x, out, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, mean, rstd,
        *sx, *_strides_nchw(out), *sr, C, HW, cpg, G,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, APPLY_SILU=bool(silu),
        HAS_RESIDUAL=residual is not None, **apply_meta)
    return out


def group_norm_ref(x, num_groups, weight, bias, eps=1e-5, silu=False, residual=None):
    """Plain-torch reference in fp32 (F.group_norm, F.silu, add), cast back to x's dtype and format."""
    fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last)
                                  and not x.is_contiguous()) else torch.contiguous_format
    y = torch.nn.functional.group_norm(x.float(), num_groups, weight.float() if weight is not None else None,
                                       bias.float() if bias is not None else None, eps)
    if silu:
        y = torch.nn.functional.silu(y)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype).contiguous(memory_format=fmt)
