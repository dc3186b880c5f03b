"""The model families in C++ (inpainting, SDXL) and `backend="native"` running the Pipeline's requests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import sdengine
from support.native import (PROMPT, SIZE, aoti, cache_dir, eager, eager_uint8, inpaint_mask, model_dir, native,
                            native_image, one_thread, smooth_image)
from support.tiny import save_tiny_pipeline, tiny_pipeline

_C = pytest.importorskip("sdengine._C")


# ---------------------------------------------------------------------------
# Inpainting (9-channel UNet) in C++
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inpaint_models(tmp_path_factory):
    """The tiny sd15-inpaint pipeline: native (builds its engine: one more AOTInductor
    compile, cached) and eager on the same weights."""
    folder = save_tiny_pipeline("sd15-inpaint", tmp_path_factory.mktemp("tiny-inpaint"))
    return sdengine.load(folder, backend="native"), sdengine.from_diffusers(tiny_pipeline("sd15-inpaint"))



@pytest.mark.parametrize("sampler,strength", [("euler_a", None), ("ddim", 0.7), ("dpmpp_2m", 1.0)])
def test_cpp_inpainting_matches_eager_pipeline(inpaint_models, sampler, strength):
    native, eager = inpaint_models
    init, mask = smooth_image(3), inpaint_mask()
    ours = native.backend.generate(native.tokenizer, PROMPT, "blurry", steps=4, seed=21, sampler=sampler, batch_size=2,
                                   init_image=init, mask_image=mask, strength=strength)
    ref = eager(PROMPT, negative_prompt="blurry", init_image=init, mask_image=mask, strength=strength,
                num_inference_steps=4, seed=21, sampler=sampler, batch_size=2, output_type="np", progress=False).images
    for i in range(2):
        diff = np.abs(ours[i].astype(int) - (ref[i] * 255).round().astype(int)).max()
        assert diff <= 2, f"image {i}: max difference {diff}/255"
    other_mask = native.backend.generate(native.tokenizer, PROMPT, "blurry", steps=4, seed=21, sampler=sampler,
                                         init_image=init, mask_image=255 - mask, strength=strength)[0]
    assert np.abs(other_mask.astype(int) - ours[0].astype(int)).max() > 2, "the mask made no difference"


def test_inpainting_model_errors_and_native_pipeline(inpaint_models):
    native, eager = inpaint_models
    with pytest.raises(ValueError, match="inpainting model: give init_image and mask_image"):
        native.backend.generate(native.tokenizer, PROMPT, width=SIZE, height=SIZE, steps=2)
    with pytest.raises(ValueError, match="mask_image size"):
        native.backend.generate(native.tokenizer, PROMPT, steps=2, init_image=smooth_image(),
                                mask_image=inpaint_mask()[:8])
    init, mask = smooth_image(4), inpaint_mask()
    ours = native(PROMPT, init_image=init, mask_image=mask, num_inference_steps=3, seed=6, sampler="euler",
                  output_type="np", progress=False).images[0]
    ref = eager(PROMPT, init_image=init, mask_image=mask, num_inference_steps=3, seed=6, sampler="euler",
                output_type="np", progress=False).images[0]
    assert np.abs((ours - ref) * 255).max() <= 2


# ---------------------------------------------------------------------------
# SDXL: two text encoders, pooled text embedding and size conditioning, in C++
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_models(tmp_path_factory):
    """The tiny SDXL pipeline: its folder, native (builds its engine: one more AOTInductor
    compile, cached) and eager on the same weights."""
    folder = save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny-sdxl"))
    return folder, sdengine.load(folder, backend="native"), sdengine.from_diffusers(tiny_pipeline("sdxl"))


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_cpp_sdxl_matches_eager_pipeline(sdxl_models, negative):
    """No negative prompt: zero conditioning (diffusers' force_zeros_for_empty_prompt)."""
    folder, native, eager = sdxl_models
    ours = native.backend.generate(native.tokenizer, PROMPT, negative, width=SIZE, height=SIZE, steps=3, seed=8,
                                   sampler="euler_a", batch_size=2, tokenizer_2=native.tokenizer_2)
    ref = eager_uint8(eager, "euler_a", None, seed=8, negative=negative, batch_size=2)
    for i in range(2):
        diff = np.abs(ours[i].astype(int) - ref[i].astype(int)).max()
        assert diff <= 2, f"image {i}: max difference {diff}/255"
    # The C++ runtime reading the diffusers folder itself (text_encoder_2/, tokenizer_2/).
    from_folder = _C.Model(str(folder), str(native.backend.engine_dir))
    data, width, height, _ = from_folder.generate(PROMPT, negative, SIZE, SIZE, 3, 7.5, 8, 1, "euler_a", None, 0.0,
                                                  None)[0]
    image = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    assert np.abs(image.astype(int) - ref[0].astype(int)).max() <= 2


def test_aoti_sdxl_step_path_and_single_file(sdxl_models, tmp_path):
    from support.ldm_keys import save_ldm_single_file

    folder, native, eager = sdxl_models
    ours = sdengine.load(folder, backend="aoti")(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, seed=2, sampler="dpmpp_2m",
                  output_type="np", progress=False).images[0]
    ref = eager_uint8(eager, "dpmpp_2m", None, seed=2)[0]
    assert np.abs((ours * 255).round().astype(int) - ref.astype(int)).max() <= 2
    # An SDXL single file, read in C++: CLIP-L and OpenCLIP bigG (fused in_proj, projection matrix).
    engine = native.backend.engine_dir
    path = save_ldm_single_file("sdxl", tmp_path / "tiny-sdxl.safetensors")
    model = _C.Model(str(path), str(engine), tokenizer_dir=str(folder / "tokenizer"),
                     tokenizer_2_dir=str(folder / "tokenizer_2"))
    assert np.abs(native_image(model, "dpmpp_2m", seed=2).astype(int) - ref.astype(int)).max() <= 2
    # The engine carries both SDXL tokenizers for single files; the second pads with "!".
    tokenizer_2 = json.loads((Path(engine) / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert tokenizer_2["pad_token"] == "!" and (Path(engine) / "tokenizer" / "vocab.json").is_file()


# ---------------------------------------------------------------------------
# backend="native": the Pipeline's requests in the C++ loop
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def family_pipelines(tmp_path_factory):
    """(native, eager) pipelines of a tiny family on the same weights, made on first use (the
    engines are those of the other tests, from the cache)."""
    made = {}

    def get(kind):
        if kind not in made:
            folder = save_tiny_pipeline(kind, tmp_path_factory.mktemp(f"family-{kind}"))
            made[kind] = (sdengine.load(folder, backend="native"), sdengine.from_diffusers(tiny_pipeline(kind)))
        return made[kind]
    return get


def _steps_run(native) -> int:
    step = native.backend.stats()["step"]
    return step["captures"] + step["replays"] + step["direct"] + step["failed"]


@pytest.mark.parametrize("kind", ["sd15", "sd21-v", "sd15-inpaint", "sdxl"])
@pytest.mark.parametrize("sampler,schedule", [("euler", None), ("euler_a", None), ("ddim", None),
                                              ("dpmpp_2m", "karras"), ("pndm", None)])
def test_native_pipeline_runs_cpp_loop(family_pipelines, kind, sampler, schedule):
    """sdengine.load(..., backend="native") runs the Pipeline's requests in the C++ loop (its step
    counters move by the number of model evaluations) and gives the eager pipeline's images."""
    native, eager = family_pipelines(kind)
    assert native.backend.name == "native" and native.backend.runs_whole_requests
    with pytest.raises(ValueError, match="runs whole requests in the C\\+\\+ loop"):
        native.backend.denoise(None, None, None)
    extra = dict(init_image=smooth_image(5), mask_image=inpaint_mask()) if kind == "sd15-inpaint" else \
        dict(height=SIZE, width=SIZE)
    args = dict(negative_prompt="blurry", num_inference_steps=3, seed=7, sampler=sampler, schedule=schedule,
                batch_size=2, output_type="np", progress=False, **extra)
    before = _steps_run(native) if native.backend._native is not None else 0
    ours = native(PROMPT, **args)
    ref = eager(PROMPT, **args)
    assert _steps_run(native) - before == (4 if sampler == "pndm" else 3)
    assert ours.seeds == ref.seeds == [7, 8]
    assert {k: v for k, v in ours.params.items() if k != "model"} == \
        {k: v for k, v in ref.params.items() if k != "model"}
    diff = np.abs(ours.images * 255 - (ref.images * 255).round()).max()
    assert diff <= 2, f"max difference {diff}/255"
    assert np.abs(ours.images[0] - ours.images[1]).max() > 2 / 255, "seed + 1 gave the same image"


# ---------------------------------------------------------------------------
# clip_skip: one compiled text-encoder graph serves every value (export/graphs.py)
# ---------------------------------------------------------------------------

TEXT_LAYERS = 4  # the tiny text encoders have 2: too few for clip_skip 2


@pytest.fixture(scope="module")
def deep_text_pipelines(tmp_path_factory):
    """(native, aoti, eager) pipelines of a tiny family whose text encoders have TEXT_LAYERS
    layers, on the same weights, made on first use (one more engine per family, cached)."""
    made = {}

    def get(kind):
        if kind not in made:
            folder = save_tiny_pipeline(kind, tmp_path_factory.mktemp(f"deep-{kind}"), text_layers=TEXT_LAYERS)
            made[kind] = (sdengine.load(folder, backend="native"), sdengine.load(folder, backend="aoti"),
                          sdengine.from_diffusers(tiny_pipeline(kind, text_layers=TEXT_LAYERS)))
        return made[kind]
    return get


@pytest.mark.parametrize("kind", ["sd15", "sd21-v", "sdxl"])
def test_clip_skip_in_cpp_and_aoti_matches_eager(deep_text_pipelines, kind):
    """clip_skip 0, 1, 2 and the largest (SDXL: both encoders, from their penultimate layer) in the
    C++ loop and in the aoti backend's compiled text encoders gives the eager pipeline's images,
    with no new text graph per value; its infotext reads back in C; past the largest is refused by
    name in the C API as in Python."""
    native, aoti, eager = deep_text_pipelines(kind)
    most = TEXT_LAYERS - 1 - (1 if kind == "sdxl" else 0)  # sdengine/request.py's bound
    args = dict(negative_prompt="blurry", num_inference_steps=3, seed=7, sampler="euler", height=SIZE, width=SIZE,
                batch_size=2, output_type="np", progress=False)
    images = {}
    for clip_skip in (0, 1, 2, most):
        ref = eager(PROMPT, clip_skip=clip_skip, **args)
        for pipe in (native, aoti):
            ours = pipe(PROMPT, clip_skip=clip_skip, **args)
            diff = np.abs(ours.images * 255 - (ref.images * 255).round()).max()
            assert diff <= 2, f"{pipe.backend.name}, clip_skip={clip_skip}: max difference {diff}/255"
            assert {k: v for k, v in ours.params.items() if k != "model"} == \
                {k: v for k, v in ref.params.items() if k != "model"}
        assert _C.infotext_params(ours.infotext(0))["clip_skip"] == clip_skip  # A1111's "Clip skip: clip_skip + 1"
        images[clip_skip] = ours.images
        if clip_skip == 0:
            text_captures = native.backend.stats()["text"]["captures"]
    assert native.backend.stats()["text"]["captures"] == text_captures, "a clip_skip captured a text graph of its own"
    assert np.abs(images[most] - images[0]).max() > 2 / 255, "clip_skip made no difference"
    model = native.backend.native_model(native.tokenizer, native.tokenizer_2)
    with pytest.raises(ValueError, match=re.escape(f"clip_skip must be an integer in [0, {most}] (the text encoder "
                                                   f"has {TEXT_LAYERS} layers), got {most + 1}")):
        model.generate(PROMPT, None, SIZE, SIZE, 2, clip_skip=most + 1)
    with pytest.raises(ValueError, match=re.escape("clip_skip must be an integer in [0, 1000], got -1")):
        model.generate(PROMPT, None, SIZE, SIZE, 2, clip_skip=-1)


# A1111 prompts over one 75-token window: about 130 tokens with emphasis and escapes, and BREAK
LONG_PROMPT = ", ".join(["a (red:1.3) castle on a [misty] hill", "((golden)) light over \\(old\\) towers",
                         "a river of (blue:0.8) glass", "flags in the wind"] * 5)
BREAK_PROMPT = "a (red:1.3) castle BREAK a misty hill BREAK golden light"


@pytest.mark.parametrize("kind", ["sd15", "sd21-v", "sdxl"])
def test_long_prompts_in_cpp_and_aoti_match_eager(deep_text_pipelines, kind):
    """A1111 prompts of several 75-token windows (a long prompt with emphasis, BREAK, a batch whose
    prompts need different window counts, padded to the longest) in the C++ loop and the aoti
    backend give the eager pipeline's images: the compiled UNet takes contexts of any number of
    77-token windows."""
    from sdengine import prompt_syntax

    native, aoti, eager = deep_text_pipelines(kind)
    windows = [len(prompt_syntax.chunk_prompt(eager.tokenizer, p)) for p in (LONG_PROMPT, BREAK_PROMPT)]
    assert windows == [2, 3]
    args = dict(negative_prompt="blurry, (ugly:1.2)", num_inference_steps=3, seed=7, sampler="euler", height=SIZE,
                width=SIZE, output_type="np", progress=False, prompt_syntax="a1111")
    cases = [(LONG_PROMPT, {}), (BREAK_PROMPT, {}),
             ([PROMPT, LONG_PROMPT], dict(seed=[3, 9], negative_prompt=["", "blurry BREAK dark"]))]
    for prompt, extra in cases:
        call = dict(args, **extra)
        ref = eager(prompt, **call)
        for pipe in (native, aoti):
            ours = pipe(prompt, **call)
            diff = np.abs(ours.images * 255 - (ref.images * 255).round()).max()
            assert diff <= 2, f"{pipe.backend.name}, {prompt!r}: max difference {diff}/255"
    # the second window is read: other words after BREAK change the image (by 36-91/255 in eager)
    storm, meadow = (native(f"a castle BREAK {words}", **args).images for words in ("dark stormy ocean",
                                                                                  "bright green meadow"))
    assert np.abs(storm - meadow).max() > 10 / 255, "the window after the first changed nothing"


def test_native_pipeline_callback_progress_and_cancel(native, eager, capsys):
    """The Python pipeline's callback, progress bar and cancel semantics, from the C++ loop."""
    seen = {"native": [], "eager": []}
    args = dict(num_inference_steps=3, height=SIZE, width=SIZE, seed=4, sampler="dpmpp_2m", output_type="np")
    for name, pipe in (("native", native), ("eager", eager)):
        pipe(PROMPT, progress=False, callback=lambda i, total, x, name=name: seen[name].append((i, total, x.clone())),
             **args)
    assert [(i, total) for i, total, _ in seen["native"]] == [(0, 3), (1, 3), (2, 3)]
    assert [(i, total) for i, total, _ in seen["native"]] == [(i, total) for i, total, _ in seen["eager"]]
    for (_, _, ours), (_, _, ref) in zip(seen["native"], seen["eager"]):  # diffusers' latents after each step
        torch.testing.assert_close(ours, ref.cpu().float(), rtol=1e-3, atol=1e-3)
    capsys.readouterr()
    native(PROMPT, progress=True, **args)
    assert "dpmpp_2m" in capsys.readouterr().err, "no progress bar"
    with pytest.raises(sdengine.GenerationCancelled, match="at step 2"):
        native(PROMPT, progress=False, callback=lambda i, total, x: i < 1, **args)
    with pytest.raises(KeyError, match="from the callback"):
        native(PROMPT, progress=False, callback=lambda i, total, x: (_ for _ in ()).throw(KeyError("from the callback")),
               **args)
    for bad, why in ((dict(vae_tiling=True), "tiled VAE decode"),
                     (dict(output_type="latent"), "output_type='latent'")):
        call = dict(args, progress=False, **bad)
        with pytest.raises(ValueError, match=f"(?s){re.escape(why)}.*backend='aoti'"):
            native(call.pop("prompt", PROMPT), **call)
    with pytest.raises(ValueError, match="leaves no denoising step"):  # strength 0 is a value, as in Python
        native(PROMPT, init_image=smooth_image(), strength=0.0, num_inference_steps=3, progress=False)
    # Per-image prompts and seeds (a batching server's request): one C++ request per run of
    # consecutive images, the images of the eager pipeline.
    mixed = dict(args, progress=False, seed=[1, 5], negative_prompt=["", "blurry"])
    ours, ref = native([PROMPT, "a cat"], **mixed).images, eager([PROMPT, "a cat"], **mixed).images
    assert np.abs(ours * 255 - (ref * 255).round()).max() <= 2
    plain = dict(args, progress=False, prompt_syntax="a1111")  # plain text in A1111 syntax runs as is
    assert np.array_equal(native(PROMPT, **plain).images, native(PROMPT, **dict(plain, prompt_syntax=None)).images)


def test_native_decode_for_kept_latents(native, aoti):
    """decode(): latents a callback kept (a server's interrupted request) decoded by the engine's
    decoder from Python, as aoti does."""
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(native.backend.decode(x), aoti.backend.decode(x))
