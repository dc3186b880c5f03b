"""attention kernel (FlashAttention-2) against its fp32 reference.

CPU: runs under TRITON_INTERPRET=1. fp32 covers the whole grid Nq × Nk × D; fp16/bf16 a
diagonal that still visits every size and head dim. fp32 uses no TF32 (ieee dot): ≤ 1e-4
relative. fp16/bf16: STYLE.md's three-way rule against unfused torch math in that dtype.
"""

import itertools
import math

import pytest
import torch

from sdengine.kernels.attention import attention, attention_ref
from sdengine.kernels.testing import DEVICE, assert_three_way, fresh_seed, poisoned

SIZES = [1, 77, 100, 257]
HEAD_DIMS = [40, 64, 80, 160]
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _torch_same_dtype(q, k, v, scale):
    """Unfused attention in q's dtype (diffusers' AttnProcessor without SDPA)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(scores.softmax(dim=-1), v)


def _check(nq, nk, d, dtype, batch=1, heads=2, scale=None, layout="bhnd"):
    seed = fresh_seed()
    if layout == "bnhd":  # views of (B, N, H, D), as the UNet's projections produce them
        q = torch.randn(batch, nq, heads, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(batch, nk, heads, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        v = torch.randn(batch, nk, heads, d, device=DEVICE, dtype=dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(batch, heads, n, d, device=DEVICE, dtype=dtype) for n in (nq, nk, nk))
    # Raise the logits' spread so the softmax is not nearly uniform.
    q = q * 2
    out = poisoned((batch, heads, nq, d), dtype)
    result = attention(q, k, v, scale, out=out)
    assert result.data_ptr() == out.data_ptr()
    ref32 = attention_ref(q.float(), k.float(), v.float(), scale)
    same = _torch_same_dtype(q, k, v, scale if scale is not None else 1 / math.sqrt(d))
    assert_three_way(out, ref32, same, ATOL.get(dtype, 0),
                     what=f"attention Nq={nq} Nk={nk} D={d} {dtype} {layout} seed={seed}")


@pytest.mark.parametrize("nq,nk,d", list(itertools.product(SIZES, SIZES, HEAD_DIMS)))
def test_attention_fp32_grid(nq, nk, d):
    _check(nq, nk, d, torch.float32, heads=1)


# Diagonals: each dtype meets every Nq, Nk and D, in two different pairings.
_DIAG = [(SIZES[i], SIZES[(i + s) % 4], HEAD_DIMS[(i + 2 * s) % 4]) for s in (1, 2) for i in range(4)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("nq,nk,d", _DIAG)
def test_attention_half_diagonal(nq, nk, d, dtype):
    _check(nq, nk, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_strided_batched_scaled(dtype):
    """(B, N, H, D) views, batch 2, an explicit scale, head dim 128."""
    _check(77, 100, 128, dtype, batch=2, heads=3, scale=0.3, layout="bnhd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_full_key_tiles_and_a_ragged_tail(dtype):
    """300 keys in 256-key tiles (the interpreter's tile for this length): one whole tile with
    no key mask, then a masked tail of 44, in one kernel."""
    _check(40, 300, 40, dtype)


def test_attention_default_output_layout():
    q = torch.randn(2, 3, 5, 40, device=DEVICE)
    out = attention(q, q, q)
    assert out.shape == (2, 3, 5, 40)
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, D) in memory: free reshape to (B, N, H·D)


def test_attention_rejects_bad_shapes():
    q = torch.randn(1, 2, 5, 40, device=DEVICE)
    with pytest.raises(ValueError, match="k and v"):
        attention(q, torch.randn(1, 2, 5, 64, device=DEVICE), q)
    with pytest.raises(TypeError, match="dtype"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], q[0], q[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("nq,nk,d", [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (1024, 77, 80),
                                     (256, 256, 160), (4096, 4096, 64), (1024, 77, 128), (16384, 77, 40)])
def test_attention_sd_shapes_gpu(nq, nk, d, dtype):
    """The SD1.x / SD2.x / SDXL shapes, natively on the GPU (batch 2 as with CFG, 8 heads or fewer)."""
    _check(nq, nk, d, dtype, batch=2, heads=8 if nq * nk <= 4096 * 4096 else 2, layout="bnhd")


def test_gpu_config_sets_fit_shared_memory_and_registers():
    """The GPU configs of each padded head dim stay within what a Hopper SM gives one program
    (see the comment over _CONFIG_SETS): q tile + num_stages k and v tiles in shared memory,
    the fp32 accumulator in registers; at most two configs a set, one of which fits fp32 inputs."""
    from sdengine.kernels.attention import _CONFIG_SETS, HAS_TRITON, _config_set

    if not HAS_TRITON:
        pytest.skip("triton is not installed")

    def smem_bytes(config, block_d, elem_bytes):
        m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        return (m * block_d + config.num_stages * 2 * n * block_d) * elem_bytes

    for block_d, configs in _CONFIG_SETS.items():
        assert 1 <= len(configs) <= 2  # a bounded cold start: at most 2 compiles per shape
        for c in configs:
            assert smem_bytes(c, block_d, 2) <= 160 * 1024, (block_d, c)
            assert c.kwargs["BLOCK_M"] * block_d // (32 * c.num_warps) <= 128, (block_d, c)
        assert min(smem_bytes(c, block_d, 4) for c in configs) <= 227 * 1024, block_d
    assert [_config_set(d) for d in (16, 32, 64, 128, 256)] == [64, 64, 64, 128, 256]
