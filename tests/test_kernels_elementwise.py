"""geglu and decode_to_uint8 kernels against their references (and diffusers)."""

import pytest
import torch
import torch.nn.functional as F

from sdengine.kernels.decode import decode_to_uint8, decode_to_uint8_ref
from sdengine.kernels.geglu import geglu, geglu_ref
from sdengine.kernels.testing import DEVICE, assert_three_way, fresh_seed, poisoned

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("f", [40, 640, 1280])
def test_geglu(f, dtype):
    seed = fresh_seed()
    h = (torch.randn(2, 37, 2 * f, device=DEVICE) * 2).to(dtype)
    out = poisoned((2, 37, f), dtype)
    geglu(h, out=out)
    a, gate = h.chunk(2, dim=-1)
    same = a * F.gelu(gate)  # diffusers GEGLU.forward after the projection
    assert_three_way(out, geglu_ref(h.float()), same, {torch.float16: 4e-3, torch.bfloat16: 3e-2}.get(dtype, 0),
                     what=f"geglu F={f} {dtype} seed={seed}")


def test_geglu_matches_diffusers_module():
    """diffusers' GEGLU = proj then our op: same result as the module in fp32."""
    from diffusers.models.activations import GEGLU

    fresh_seed()
    module = GEGLU(32, 48).to(DEVICE)
    x = torch.randn(3, 5, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(geglu(module.proj(x)), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_decode_to_uint8_matches_diffusers(dtype, channels_last):
    """Byte-exact against diffusers' VaeImageProcessor.postprocess (denormalize, ·255, round)."""
    from diffusers.image_processor import VaeImageProcessor

    seed = fresh_seed()
    x = torch.randn(2, 3, 37, 65, device=DEVICE) * 0.7
    # Exact .5 ties after ·255 (round half to even) and the clamp edges.
    x[0, 1] = (torch.arange(37 * 65, device=DEVICE).reshape(37, 65) % 511 / 510 * 2 - 1) * 1.1
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = (VaeImageProcessor(do_resize=False).postprocess(x.cpu(), output_type="np") * 255).round().astype("uint8")
    for poison in (0, 255):  # every byte is written: both poisons give the same, exact image
        out = torch.full((2, 37, 65, 3), poison, dtype=torch.uint8, device=DEVICE)
        decode_to_uint8(x, out=out)
        assert (out.cpu().numpy() == expected).all(), f"decode_to_uint8 {dtype} seed={seed}"
    assert torch.equal(decode_to_uint8_ref(x).cpu(), torch.from_numpy(expected))


def test_decode_to_uint8_rejects_bad_input():
    with pytest.raises(ValueError, match="float"):
        decode_to_uint8(torch.zeros(1, 3, 4, 4, dtype=torch.uint8, device=DEVICE))
