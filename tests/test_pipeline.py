"""The eager pipeline against diffusers' pipelines on the same tiny random weights.

Acceptance of the core engine issue: with the same scheduler, latents and prompt,
`generate(..., output_type="np")` is within 1/255 (max abs) of diffusers, for txt2img,
img2img and inpainting; every bad argument is a clear error naming the parameter.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import sdengine
from sdengine.config import tiny_config
from support.compare import max_diff
from support.tiny import tiny_pipeline

PROMPT = "a photo of an astronaut riding a horse, 4k"
NEGATIVE = "blurry, low quality"
TOL = 1 / 255
H, W = 32, 24  # not square, so a transposed height/width would show


@pytest.fixture(scope="module")
def sd15():
    return tiny_pipeline("sd15"), sdengine.from_diffusers(tiny_pipeline("sd15"))


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _latents(kind, n, h=H, w=W, seed=1234):
    cfg = tiny_config(kind)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.vae.latent_channels, h // cfg.vae.downscale, w // cfg.vae.downscale, generator=g)


@pytest.mark.parametrize("kind", ["sd15", "sd21-v"])
def test_txt2img_matches_diffusers(kind):
    ref_pipe = tiny_pipeline(kind)
    ours = sdengine.from_diffusers(ref_pipe)
    latents = _latents(kind, 2)
    ref = ref_pipe([PROMPT, "a cat"], negative_prompt=[NEGATIVE, ""], num_inference_steps=6, guidance_scale=6.0,
                   height=H, width=W, latents=latents.clone(), output_type="np").images
    got = ours([PROMPT, "a cat"], negative_prompt=[NEGATIVE, ""], steps=6, guidance_scale=6.0, height=H, width=W,
               latents=latents.clone(), output_type="np", progress=False).images
    assert got.shape == ref.shape == (2, H, W, 3)
    assert max_diff(got, ref) <= TOL
    assert got.std() > 0.01  # a real image, not a constant


def test_txt2img_without_guidance_matches_diffusers(sd15):
    ref_pipe, ours = sd15
    latents = _latents("sd15", 1)
    ref = ref_pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=H, width=W, latents=latents.clone(),
                   output_type="np").images
    got = ours(PROMPT, steps=4, guidance_scale=1.0, height=H, width=W, latents=latents.clone(), output_type="np",
               progress=False).images
    assert max_diff(got, ref) <= TOL


def test_seeded_noise_matches_diffusers_generators(sd15):
    """seed=[...] draws each image's noise from its own generator, as diffusers does with a list."""
    from diffusers import EulerAncestralDiscreteScheduler

    ref_pipe, ours = sd15
    sched = EulerAncestralDiscreteScheduler.from_config(ref_pipe.scheduler.config)
    from diffusers import StableDiffusionPipeline

    ref_pipe = StableDiffusionPipeline(**{**ref_pipe.components, "scheduler": sched})
    ref = ref_pipe([PROMPT] * 2, num_inference_steps=5, height=H, width=W, generator=_generators([3, 11]),
                   output_type="np").images
    got = ours(PROMPT, batch_size=2, steps=5, height=H, width=W, seed=[3, 11], sampler="euler_a",
               output_type="np", progress=False).images
    assert max_diff(got, ref) <= TOL


def test_image_depends_only_on_its_seed(sd15):
    _, ours = sd15
    kwargs = dict(steps=4, height=H, width=W, sampler="euler_a", output_type="np", progress=False)
    batch = ours(PROMPT, batch_size=3, seed=[7, 8, 9], **kwargs).images
    alone = ours(PROMPT, seed=8, **kwargs).images
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)
    assert max_diff(batch[0], batch[1]) > 0.01  # different seeds, different images


def _rgb(seed, h=H, w=W):
    rng = np.random.default_rng(seed)
    smooth = np.kron(rng.random((h // 4, w // 4, 3)), np.ones((4, 4, 1)))
    return (smooth * 0.8 + 0.1 * rng.random((h, w, 3))).astype(np.float32)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(sd15, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref_pipe, ours = sd15
    ref_pipe = StableDiffusionImg2ImgPipeline(**ref_pipe.components)
    image = _rgb(0)
    ref = ref_pipe(PROMPT, image=image[None], strength=strength, num_inference_steps=8, guidance_scale=5.0,
                   generator=_generators([21]), output_type="np").images
    got = ours(PROMPT, init_image=image, strength=strength, steps=8, guidance_scale=5.0, seed=21, output_type="np",
               progress=False).images
    assert got.shape == (1, H, W, 3)
    assert max_diff(got, ref) <= TOL


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_matches_diffusers(strength):
    ref_pipe = tiny_pipeline("sd15-inpaint")
    ours = sdengine.from_diffusers(ref_pipe)
    image = Image.fromarray((_rgb(1) * 255).round().astype(np.uint8))
    mask = np.zeros((H, W), np.uint8)
    mask[8:24, 4:16] = 255
    mask = Image.fromarray(mask, mode="L")
    ref = ref_pipe(PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=6, height=H, width=W,
                   generator=_generators([5]), output_type="np").images
    got = ours(PROMPT, init_image=image, mask_image=mask, strength=strength, steps=6, seed=5, output_type="np",
               progress=False).images
    assert max_diff(got, ref) <= TOL


def test_sdxl_txt2img_matches_diffusers():
    ref_pipe = tiny_pipeline("sdxl")
    ours = sdengine.from_diffusers(ref_pipe)
    latents = _latents("sdxl", 1)
    ref = ref_pipe(PROMPT, num_inference_steps=5, guidance_scale=5.0, height=H, width=W, latents=latents.clone(),
                   output_type="np").images
    got = ours(PROMPT, steps=5, guidance_scale=5.0, height=H, width=W, latents=latents.clone(), output_type="np",
               progress=False).images
    assert max_diff(got, ref) <= TOL


def test_output_types_and_infotext(sd15):
    _, ours = sd15
    result = ours(PROMPT, negative_prompt=NEGATIVE, steps=3, height=H, width=W, seed=42, progress=False)
    assert len(result.images) == 1 and result.images[0].size == (W, H)
    text = result.infotext(0)
    assert text.startswith(PROMPT) and f"Negative prompt: {NEGATIVE}" in text
    assert "Seed: 42" in text and f"Size: {W}x{H}" in text and "Steps: 3" in text
    # A1111's labels and counts: its sampler and schedule names, and its clip skip (diffusers' + 1)
    text = ours(PROMPT, steps=2, height=H, width=W, seed=1, sampler="DPM++ 2M Karras", clip_skip=1,
                progress=False).infotext(0)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text and "Clip skip: 2" in text
    latent = ours(PROMPT, steps=3, height=H, width=W, seed=42, output_type="latent", progress=False).images
    assert latent.shape == (1, 4, H // 2, W // 2)


def test_callback_sees_every_step_and_can_cancel(sd15):
    _, ours = sd15
    seen = []
    ours(PROMPT, steps=4, height=H, width=W, seed=0, progress=False, sampler="euler",
         callback=lambda step, total, x: seen.append((step, total, tuple(x.shape))))
    assert [s for s, _, _ in seen] == [0, 1, 2, 3] and all(t == 4 for _, t, _ in seen)
    seen.clear()  # PLMS (the tiny model's default) evaluates steps + 1 times
    ours(PROMPT, steps=4, height=H, width=W, seed=0, progress=False,
         callback=lambda step, total, x: seen.append((step, total, tuple(x.shape))))
    assert [s for s, _, _ in seen] == [0, 1, 2, 3, 4] and all(t == 5 for _, t, _ in seen)
    with pytest.raises(sdengine.GenerationCancelled):
        ours(PROMPT, steps=4, height=H, width=W, seed=0, progress=False, callback=lambda step, total, x: step < 1)


@pytest.mark.parametrize("kwargs, names", [
    (dict(height=30), "height"),
    (dict(width=0), "width"),
    (dict(height=-8), "height"),
    (dict(steps=0), "num_inference_steps"),
    (dict(num_inference_steps=2.5), "num_inference_steps"),
    (dict(guidance_scale=math.inf), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(batch_size=0), "batch_size"),
    (dict(init_image=np.zeros((H, W, 3), np.float32) + 0.5, strength=1.5), "strength"),
    (dict(init_image=np.zeros((H, W, 3), np.float32) + 0.5, strength=-0.1), "strength"),
    (dict(strength=0.5), "strength"),
    (dict(latents=torch.randn(1, 4, 5, 5)), "latents"),
    (dict(seed=[1, 2]), "seed"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(sampler="no-such-sampler"), "sampler"),
    (dict(mask_image=np.ones((H, W), np.float32)), "init_image"),
])
def test_bad_arguments_name_the_parameter(sd15, kwargs, names):
    _, ours = sd15
    called = []
    with pytest.raises(ValueError, match=names):
        ours(PROMPT, height=kwargs.pop("height", H), width=kwargs.pop("width", W), progress=False,
             callback=lambda *a: called.append(1), **kwargs)
    assert not called  # refused before any work


def test_mask_size_mismatch_is_refused():
    ours = sdengine.from_diffusers(tiny_pipeline("sd15-inpaint"))
    image = _rgb(2)
    with pytest.raises(ValueError, match="mask_image size"):
        ours(PROMPT, init_image=image, mask_image=np.ones((H // 2, W), np.float32), progress=False)


def test_missing_model_path_names_it(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        sdengine.load(missing)
