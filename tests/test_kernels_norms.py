"""group_norm and layer_norm kernels against their fp32 references.

group_norm: NCHW and channels_last, 32 groups, C ∈ {64, 320, 640}, odd H×W (7×9), every
combination of the SiLU and residual epilogues in fp32; fp16/bf16 on a diagonal. Outputs
start as NaN (poisoned) and must keep x's memory format. The GPU's split reduction (many
chunks and channel blocks per group) is forced on the CPU too (`_split`).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from sdengine.kernels.group_norm import group_norm, group_norm_ref
from sdengine.kernels.layer_norm import layer_norm, layer_norm_ref
from sdengine.kernels.testing import DEVICE, assert_three_way, fresh_seed, poisoned

ATOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
CL = torch.channels_last


def _gn_case(n, c, h, w, dtype, channels_last, silu, residual, split=None, groups=32):
    seed = fresh_seed()
    fmt = CL if channels_last else torch.contiguous_format
    # An offset and a spread per channel: statistics that a naive Σx² − (Σx)² would get wrong.
    x = (torch.randn(n, c, h, w, device=DEVICE) * 3 + torch.randn(1, c, 1, 1, device=DEVICE) * 4 + 10)
    x = x.to(dtype).contiguous(memory_format=fmt)
    weight = torch.randn(c, device=DEVICE, dtype=dtype)
    bias = torch.randn(c, device=DEVICE, dtype=dtype)
    res = torch.randn(n, c, h, w, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt) if residual else None
    out = poisoned((n, c, h, w), dtype, memory_format=fmt)
    result = group_norm(x, groups, weight, bias, 1e-5, silu, res, out=out, _split=split)
    assert result.data_ptr() == out.data_ptr()
    ref32 = group_norm_ref(x.float(), groups, weight.float(), bias.float(), 1e-5, silu, res.float() if residual else None)
    same = F.group_norm(x, groups, weight, bias, 1e-5)
    if silu:
        same = F.silu(same)
    if residual:
        same = same + res
    assert_three_way(out, ref32, same, ATOL.get(dtype, 0),
                     what=f"group_norm {tuple(x.shape)} cl={channels_last} silu={silu} res={residual} {dtype} seed={seed}")


@pytest.mark.parametrize("silu,residual", list(itertools.product([False, True], [False, True])))
@pytest.mark.parametrize("c", [64, 320, 640])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_fp32(channels_last, c, silu, residual):
    _gn_case(2, c, 7, 9, torch.float32, channels_last, silu, residual)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("c,channels_last,silu,residual", [(64, False, True, False), (320, True, True, True),
                                                           (640, True, False, False), (320, False, False, True)])
def test_group_norm_half(dtype, c, channels_last, silu, residual):
    _gn_case(2, c, 9, 7, dtype, channels_last, silu, residual)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_split_reduction(channels_last):
    """The GPU's decomposition: 3 chunks of H·W (ragged last) × 5 channel blocks per sample,
    partials merged by 4 finalize programs per sample (the GPU uses one per group)."""
    _gn_case(2, 320, 9, 7, torch.float32, channels_last, True, True, split=(16, 64, 3, 8))


def test_group_norm_split_reduction_walks_chunk_and_channel_tiles():
    """The GPU's finalize loops: 40 channels a group (three 16-channel tiles, the last ragged)
    and 32 chunks (two 16-chunk tiles)."""
    _gn_case(1, 320, 32, 32, torch.float32, True, True, False, split=(16, 64, 40, 2), groups=8)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_keeps_memory_format(channels_last):
    fmt = CL if channels_last else torch.contiguous_format
    x = torch.randn(1, 64, 5, 3, device=DEVICE).contiguous(memory_format=fmt)
    y = group_norm(x, 32, None, None, silu=True)
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, group_norm_ref(x, 32, None, None, silu=True), rtol=1e-5, atol=1e-5)


def test_group_norm_no_affine_and_other_groups():
    fresh_seed()
    x = torch.randn(1, 12, 5, 3, device=DEVICE)
    torch.testing.assert_close(group_norm(x, 4, None, None), group_norm_ref(x, 4, None, None), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_groups"):
        group_norm(x, 5, None, None)
    with pytest.raises(ValueError, match="residual"):
        group_norm(x, 4, None, None, residual=x[:, :6])


LN_DIMS = [77, 320, 768, 1280]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("d", LN_DIMS)
def test_layer_norm(d, dtype):
    seed = fresh_seed()
    x = (torch.randn(2, 37, d, device=DEVICE) * 2 + 5).to(dtype)
    weight, bias = (torch.randn(d, device=DEVICE, dtype=dtype) for _ in range(2))
    out = poisoned(x.shape, dtype)
    layer_norm(x, weight, bias, 1e-5, out=out)
    ref32 = layer_norm_ref(x.float(), weight.float(), bias.float(), 1e-5)
    same = F.layer_norm(x, (d,), weight, bias, 1e-5)
    assert_three_way(out, ref32, same, ATOL.get(dtype, 0), what=f"layer_norm D={d} {dtype} seed={seed}")


def test_layer_norm_no_affine_strided():
    fresh_seed()
    x = torch.randn(40, 3, 320, device=DEVICE).transpose(0, 1)  # rows not contiguous as a whole
    torch.testing.assert_close(layer_norm(x, None, None), layer_norm_ref(x, None, None), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 8, 8), (1, 128, 512, 512),
                                   (1, 512, 64, 64)])
def test_group_norm_sd_shapes_gpu(shape, dtype):
    _gn_case(*shape, dtype, True, True, False)
    _gn_case(*shape, dtype, False, True, True)
