"""Live previews (sdengine/serve/preview.py): A1111's "Approx cheap" factors, fitted factors for
other VAEs, and when a preview is kept and made."""

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import sdengine
from sdengine.config import ModelConfig
from sdengine.serve.preview import LatentPreview, Previews

# A1111's modules/sd_vae_approx.py cheap_approximation, rows = latent channels, columns = R, G, B
A1111_SD = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
A1111_SDXL = [[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163],
              [-0.3730, -0.2499, -0.2088]]


@pytest.mark.parametrize("preset,table,source", [("sd15", A1111_SD, "a1111-sd"), ("sdxl", A1111_SDXL, "a1111-sdxl")])
def test_a1111_factors_for_sd_and_sdxl(preset, table, source):
    preview = LatentPreview.for_pipeline(SimpleNamespace(config=ModelConfig.from_name(preset)))
    assert preview.source == source
    latents = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0))
    # A1111: einsum("lxy,lr -> rxy"), then x * 0.5 + 0.5 clamped, times 255, as uint8
    expected = torch.einsum("lxy,lr->rxy", latents, torch.tensor(table)) * 0.5 + 0.5
    expected = (expected.clamp(0, 1) * 255).permute(1, 2, 0).numpy()
    got = preview.rgb(latents).numpy().astype(np.float64)
    assert np.abs(got - expected).max() <= 0.5 + 1e-4  # rounding to uint8 (A1111 truncates; we round)
    png = Image.open(io.BytesIO(preview.png(latents)))
    assert png.format == "PNG" and png.size == (5, 6)  # latent resolution: (w, h)


@pytest.fixture(scope="module")
def demo():
    return sdengine.load(None)


def test_fitted_factors_approximate_the_demo_vae(demo):
    """The demo VAE has no published factors: the fitted ones follow its decoder, far closer than
    the mean colour does (on the model's own generations, pooled to latent size)."""
    preview = LatentPreview.for_pipeline(demo)
    assert preview.source == "fitted"
    errors, baseline = [], []
    for seed, digit in enumerate(["zero", "three", "seven"]):
        latents = demo(f"a handwritten digit {digit}", seed=seed, steps=12, output_type="latent", progress=False).images
        decoded = demo.decode_latents(latents).float()                       # (1, 3, 32, 32) in [-1, 1]
        target = torch.nn.functional.avg_pool2d(decoded, 4)[0].permute(1, 2, 0) * 0.5 + 0.5
        target = target.clamp(0, 1)
        errors.append((preview.rgb(latents[0]).float() / 255 - target).abs().mean().item())
        baseline.append((target - target.mean((0, 1))).abs().mean().item())
    assert np.mean(errors) < 0.6 * np.mean(baseline), (errors, baseline)


def test_previews_keeps_every_n_steps_and_makes_each_png_once():
    made = []

    class Counting(LatentPreview):
        def png(self, latents):
            made.append(latents)
            return super().png(latents)

    previews = Previews(Counting(A1111_SD), every=3)
    previews.start_job()
    assert previews.png_b64() is None  # nothing kept yet
    latents = [torch.full((2, 4, 3, 3), float(step)) for step in range(8)]
    kept = []
    for step in range(1, 8):  # steps 1..7 of 7: kept after 3, 6 and the last
        previews.keep(step, 7, latents[step])
        first = previews.png_b64()
        if first is not None and (not kept or kept[-1][1] != first):
            kept.append((step, first))
        assert previews.png_b64() == first
    assert [step for step, _ in kept] == [3, 6, 7]
    assert len(made) == 3 and all(m.shape == (4, 3, 3) for m in made)  # the first image of the batch, once each
    assert base64.b64decode(kept[-1][1]).startswith(b"\x89PNG")
    previews.start_job()
    assert previews.png_b64() is None  # a new job shows no old preview
    assert Previews(None, every=0).png_b64() is None
