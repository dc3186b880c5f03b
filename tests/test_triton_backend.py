"""The Triton backend against the eager backend, and the decode safeguards.

On the CPU the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1,
set by conftest.py), so these tests prove that the fast path's model code (fused QKV,
the kernel ops in every network) computes what the eager models compute. CUDA graph
capture is GPU-only and skips cleanly here; the fused denoising step (UNet + guidance +
sampler update) is tested in test_fused_step.py.
"""

import copy
import logging

import numpy as np
import pytest
import torch

import sdengine
from sdengine import kernels, samplers
from sdengine.backends.eager import EagerBackend
from sdengine.config import tiny_config
from sdengine.vae_tiling import tiled_decode
from support.tiny import tiny_pipeline

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")

H, W = 16, 24
PROMPT = "a watercolor painting of a lighthouse"


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=["sd15", "sd15-inpaint", "sd21-v", "sdxl"])
def backends(request):
    pipe = tiny_pipeline(request.param)
    eager = sdengine.from_diffusers(pipe)
    fast = sdengine.from_diffusers(pipe, backend="triton")
    return request.param, eager, fast


def test_triton_backend_prepares_weights_at_load_time(backends):
    _, _, fast = backends
    unet = fast.backend.unet
    self_attn = [m for m in unet.modules() if isinstance(m, sdengine.models.layers.Attention) and not m.is_cross]
    assert self_attn and all(m.to_qkv is not None and not hasattr(m, "to_q") for m in self_attn)
    assert all(m.ops.attention.__name__ == "triton_attention" for m in self_attn)


def test_triton_unet_matches_eager(backends):
    kind, eager, fast = backends
    cfg = tiny_config(kind)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.unet.in_channels, H // 2, W // 2, generator=g)
    t = torch.tensor([801.0, 801.0])
    context = torch.randn(2, 77, cfg.unet.cross_attention_dim, generator=g)
    added = None
    if cfg.unet.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(2, cfg.text_encoder_2.projection_dim, generator=g),
                 "time_ids": torch.tensor([[H, W, 0, 0, H, W]] * 2, dtype=torch.float32)}
    ref = eager.backend.denoise(x, t, context, added)
    got = fast.backend.denoise(x, t, context, added)
    assert _rel(got, ref) < 1e-4


def test_triton_text_encoder_and_vae_match_eager(backends):
    _, eager, fast = backends
    ids = eager.tokenizer([PROMPT, ""])
    ids_2 = eager.tokenizer_2([PROMPT, ""]) if eager.tokenizer_2 is not None else None
    ctx_ref, pooled_ref = eager.backend.encode_text(ids, ids_2)
    ctx, pooled = fast.backend.encode_text(ids, ids_2)
    assert _rel(ctx, ctx_ref) < 1e-4 and _rel(pooled, pooled_ref) < 1e-4
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, H // 2, W // 2, generator=g)
    assert _rel(fast.backend.decode(z), eager.backend.decode(z)) < 1e-4
    images = torch.rand(1, 3, H, W, generator=g) * 2 - 1
    for got, ref in zip(fast.backend.encode_image(images), eager.backend.encode_image(images)):
        assert _rel(got, ref) < 1e-4


def test_triton_pipeline_matches_eager_pipeline(backends):
    kind, eager, fast = backends
    kwargs = dict(steps=3, guidance_scale=5.0, height=H, width=W, seed=3, sampler="euler", output_type="np",
                  progress=False)
    if kind == "sd15-inpaint":  # the whole step with the mask and masked-image channels
        mask = np.zeros((H, W), dtype=np.float32)
        mask[4:12, 6:18] = 1.0
        kwargs.update(init_image=torch.rand(H, W, 3, generator=torch.Generator().manual_seed(7)).numpy(),
                      mask_image=mask)
    ref = eager(PROMPT, **kwargs).images
    got = fast(PROMPT, **kwargs).images
    assert np.abs(got - ref).max() <= 1 / 255


# ---------------------------------------------------------------------------
# NaN guard and VAE tiling (every backend inherits them)
# ---------------------------------------------------------------------------

def _eager_backend_fp16():
    pipe = sdengine.from_diffusers(tiny_pipeline("sd15"))
    b = pipe.backend
    half = EagerBackend(b.config, copy.deepcopy(b.text_encoder).half(), copy.deepcopy(b.unet).half(),
                        copy.deepcopy(b.vae).half())
    return half


def test_fp16_decode_overflow_is_redone_in_fp32(caplog):
    backend = _eager_backend_fp16()
    with torch.no_grad():  # push the last conv past fp16's range (65504): inf in fp16, fine in fp32
        backend.vae.decoder.conv_out.weight.mul_(3e4)
        backend.vae.decoder.conv_out.bias.fill_(6e4)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    raw = backend.vae.decode(z.half())
    assert not torch.isfinite(raw).all()  # the failure the guard exists for
    with caplog.at_level(logging.WARNING, logger="sdengine"):
        images = backend.decode(z)
    assert torch.isfinite(images).all()
    expected = copy.deepcopy(backend.vae).float().decode(z)
    assert _rel(images, expected) < 1e-5
    assert sum("non-finite" in r.message for r in caplog.records) == 1


def test_fp16_decode_without_overflow_keeps_fp16_result():
    backend = _eager_backend_fp16()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(backend.decode(z), backend.vae.decode(z.half()).float())
    assert getattr(backend, "_vae_fp32_copy", None) is None  # no fp32 copy made when not needed


def test_tiled_decode_places_and_blends_tiles_exactly():
    """With a local "decoder" (nearest upsampling), tiles agree where they overlap, so the
    blended result must equal the one-piece decode exactly: placement and weights are right."""
    def local_decode(z):
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest")

    z = torch.randn(2, 4, 37, 50, generator=torch.Generator().manual_seed(5))  # sizes not multiples of the stride
    tiled = tiled_decode(local_decode, z, scale=8, tile=16, overlap=5)
    torch.testing.assert_close(tiled, local_decode(z), rtol=1e-6, atol=1e-6)


def test_tiled_vae_decode_has_no_visible_seams():
    pipe = sdengine.from_diffusers(tiny_pipeline("sd15"))
    decode = pipe.backend.decode
    g = torch.Generator().manual_seed(4)
    # smooth latents, as real ones are: upsampled low-frequency noise
    z = torch.nn.functional.interpolate(torch.randn(1, 4, 6, 6, generator=g), size=(40, 40), mode="bicubic")
    tiled = tiled_decode(decode, z, scale=2, tile=16, overlap=6)
    assert tiled.shape == (1, 3, 80, 80) and torch.isfinite(tiled).all()
    # No seam: no column (row) of the interior jumps much more than the typical one. Tiles
    # of this random VAE disagree a lot (GroupNorm statistics differ per tile), so cutting
    # them hard, mid-overlap, gives jumps of 3.3x the median here; the blend stays < 2x.
    for jump in ((tiled[..., 1:] - tiled[..., :-1]).abs().mean(dim=(0, 1, 2)),
                 (tiled[..., 1:, :] - tiled[..., :-1, :]).abs().mean(dim=(0, 1, 3))):
        assert jump[4:-4].max() < 2.5 * jump.median()


def test_pipeline_decodes_in_tiles_on_request(monkeypatch):
    import sdengine.vae_tiling as vae_tiling

    monkeypatch.setattr(vae_tiling, "TILE", 12)  # 32x32 latents: tiles start at 0, 8, 16, 20 on each axis
    monkeypatch.setattr(vae_tiling, "OVERLAP", 4)
    pipe = sdengine.from_diffusers(tiny_pipeline("sd15"))
    tiles = []
    decode = pipe.backend.decode
    monkeypatch.setattr(pipe.backend, "decode", lambda z: tiles.append(tuple(z.shape)) or decode(z))
    kwargs = dict(steps=2, height=64, width=64, seed=1, output_type="np", progress=False)
    plain = pipe(PROMPT, vae_tiling=False, **kwargs).images
    assert tiles == [(1, 4, 32, 32)]
    tiled = pipe(PROMPT, vae_tiling=True, **kwargs).images
    assert len(tiles) == 1 + 16 and all(t[-2:] == (12, 12) for t in tiles[1:])
    assert plain.shape == tiled.shape and np.isfinite(tiled).all() and tiled.std() > 0.01


# ---------------------------------------------------------------------------
# GPU: CUDA graphs and the engine cache
# ---------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_graph_replay_matches_direct_call_and_cache_is_bounded():
    pipe = copy.deepcopy(tiny_pipeline("sd15"))  # the cached pipeline stays on the CPU for other tests
    fast = sdengine.from_diffusers(pipe.to("cuda"), backend="triton")
    graphs = fast.backend.graphs
    assert graphs is not None
    graphs.capacity = 2
    cfg = tiny_config("sd15")
    for size in (8, 12, 16):
        x = torch.randn(2, 4, size, size, device="cuda")
        t = torch.tensor([500.0, 500.0], device="cuda")
        ctx = torch.randn(2, 77, cfg.unet.cross_attention_dim, device="cuda")
        direct = fast.backend.unet(x, t, ctx).float()
        replayed = fast.backend.denoise(x, t, ctx)
        assert _rel(replayed, direct) < 1e-3
    assert len(graphs.entries) == 2
    # Whole fused steps (tests/test_fused_step.py) live in the same bounded cache.
    ctx = torch.randn(4, 77, cfg.unet.cross_attention_dim, device="cuda")
    for sampler in ("euler", "dpmpp_2m"):
        plan = samplers.make_plan(sampler, "default", 3, cfg.scheduler)
        step = fast.backend.fused_step(plan, ctx, 5.0)
        x = step(torch.randn(2, 4, 8, 8, device="cuda") * float(plan.sigmas[0]), 0)
        assert torch.isfinite(x).all()
    assert [k[0] for k in graphs.entries] == ["step", "step"]
