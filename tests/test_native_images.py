"""The native runtime's images against the eager Python pipeline: `backend="native"` (whole requests in
the C++ loop) and `backend="aoti"` (the same compiled networks from the Python loop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdengine
from support.native import (PROMPT, SIZE, aoti, assert_cpp_loop_matches_eager, cache_dir, eager, eager_uint8,
                            engine_dir, model_dir, native, one_thread, smooth_image)
from support.tiny import save_tiny_pipeline, tiny_pipeline

_C = pytest.importorskip("sdengine._C")
NATIVE_SAMPLERS = [("euler", None), ("euler_a", None), ("ddim", None), ("dpmpp_2m", "karras"), ("euler", "karras"),
                   ("pndm", None)]


# ---------------------------------------------------------------------------
# Images: native vs the eager Python pipeline
# ---------------------------------------------------------------------------

def test_one_engine_serves_other_checkpoints(engine_dir, tmp_path):
    """The packages hold no weights: a checkpoint with other weights, read from its folder by
    the C++ runtime, runs on the same engine and matches the eager pipeline on those weights."""
    other = save_tiny_pipeline("sd15", tmp_path / "other", seed=1)
    model = _C.Model(str(other), str(engine_dir))
    data, width, height, seed = model.generate(PROMPT, None, SIZE, SIZE, 3, 7.5, 5, 1, "ddim", None, 0.0, None)[0]
    ours = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    ref = eager_uint8(sdengine.from_diffusers(tiny_pipeline("sd15", seed=1)), "ddim", None, seed=5)[0]
    assert (width, height, seed) == (SIZE, SIZE, 5)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2


@pytest.mark.parametrize("sampler,schedule", NATIVE_SAMPLERS)
def test_cpp_loop_matches_eager_pipeline(native, eager, sampler, schedule):
    """The whole request in C++ (tokenizer, noise, loop, decode) from Python-loaded weights."""
    assert_cpp_loop_matches_eager(native, eager, sampler, schedule)


def test_engine_runs_any_latent_size_in_its_steps(aoti):
    """Batch, height and width are dynamic: non-square latents of any multiple of the UNet's
    downsampling run through the compiled UNet and decoder as through the eager ones."""
    gen = torch.Generator().manual_seed(0)
    for batch, h, w in ((2, 6, 10), (1, 2, 4), (3, 4, 2)):
        x = torch.randn(batch, aoti.config.unet.in_channels, h, w, generator=gen)
        t = torch.full((batch,), 321.0)
        context = torch.randn(batch, 77, aoti.config.unet.cross_attention_dim, generator=gen)
        with torch.inference_mode():
            ref = aoti.backend.unet(x, t[0], context)
            ref_image = aoti.backend.vae.decode(x)
        torch.testing.assert_close(aoti.backend.denoise(x, t, context), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(aoti.backend.decode(x), ref_image, rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("sampler,strength", [("euler_a", 0.6), ("ddim", 0.5), ("dpmpp_2m", 0.75), ("pndm", 0.6)])
def test_cpp_img2img_matches_eager_pipeline(native, eager, sampler, strength):
    """img2img in C++: the compiled VAE encoder, a posterior sample per image seed drawn before
    the noise, and the schedule's tail from `strength`; same images as the eager pipeline."""
    init = smooth_image()
    ours = native.backend.generate(native.tokenizer, PROMPT, "blurry", steps=4, seed=13, sampler=sampler,
                                   batch_size=2, init_image=init, strength=strength)
    ref = eager(PROMPT, negative_prompt="blurry", init_image=init, strength=strength, num_inference_steps=4,
                seed=13, sampler=sampler, batch_size=2, output_type="np", progress=False).images
    for i in range(2):
        diff = np.abs(ours[i].astype(int) - (ref[i] * 255).round().astype(int)).max()
        assert diff <= 2, f"image {i}: max difference {diff}/255"
    txt2img = native.backend.generate(native.tokenizer, PROMPT, "blurry", width=SIZE, height=SIZE, steps=4, seed=13,
                                      sampler=sampler)[0]
    assert np.abs(ours[0].astype(int) - txt2img.astype(int)).max() > 2, "init_image made no difference"
    calls = []
    native.backend.generate(native.tokenizer, PROMPT, steps=10, sampler="euler", init_image=init, strength=0.3,
                            callback=lambda step, total: calls.append(total))
    assert calls == [3, 3, 3], "strength 0.3 of 10 steps runs 3"
    with pytest.raises(ValueError, match="init_image is 16x16 but the request is 24x16"):
        native.backend.generate(native.tokenizer, PROMPT, width=24, steps=2, init_image=init)


def test_aoti_step_path_img2img_uses_compiled_encoder(aoti, eager):
    init = smooth_image(1)
    images = torch.from_numpy(init).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    mean, logvar = aoti.backend.encode_image(images)
    with torch.inference_mode():
        ref_mean, ref_logvar = aoti.backend.vae.encode(images)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logvar, ref_logvar, rtol=1e-4, atol=1e-4)
    ours = aoti(PROMPT, init_image=init, strength=0.7, num_inference_steps=3, seed=4, sampler="euler",
                  output_type="np", progress=False).images[0]
    ref = eager(PROMPT, init_image=init, strength=0.7, num_inference_steps=3, seed=4, sampler="euler",
                output_type="np", progress=False).images[0]
    assert np.abs((ours - ref) * 255).max() <= 2


def test_aoti_step_path_matches_eager(aoti, eager):
    """The pipeline driving the compiled packages step by step (the backend interface)."""
    assert aoti.backend.name == "aoti" and not aoti.backend.runs_whole_requests
    ours = aoti(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, seed=3, sampler="dpmpp_2m",
                  output_type="np", progress=False).images[0]
    ref = eager_uint8(eager, "dpmpp_2m", None, seed=3)[0]
    assert np.abs((ours * 255).round().astype(int) - ref.astype(int)).max() <= 2


def test_native_loras_merge_into_the_engine_weights_and_embeddings(native, aoti, model_dir, tmp_path):
    """A LoRA merged in place reaches the C++ loop (its captured steps included) and the compiled
    packages of the Python loop with no reload; set_loras([]) restores the engine's weights bit
    for bit. A textual-inversion token runs the eager text encoders on aoti (the engine's token
    table is the checkpoint's); on native its vectors are written into the added-token tables the
    C++ loop reads and the C++ tokenizer learns it (sde_model_add_token)."""
    import copy

    from support.lora_files import embedding_vectors, kohya_lora

    path = kohya_lora(tiny_pipeline("sd15"), tmp_path / "k.safetensors", rank=4, alpha=2.0, locon=True)
    reference = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")))
    reference.set_loras([(path, 0.8)])
    before = {k: v.clone() for k, v in native.backend._weights.items()}
    run = dict(num_inference_steps=3, height=SIZE, width=SIZE, seed=3, sampler="euler", output_type="np",
               progress=False)
    base = native(PROMPT, **run).images[0]
    native.set_loras([(path, 0.8)])
    try:
        ref = reference(PROMPT, **run).images[0]
        step = native(PROMPT, **run).images[0]
        assert np.abs((step - ref) * 255).max() <= 2 and np.abs((step - base) * 255).max() > 10
        cpp = native.backend.generate(native.tokenizer, PROMPT, width=SIZE, height=SIZE, steps=3, seed=3,
                                      sampler="euler")[0]
        assert np.abs(cpp.astype(int) - (ref * 255).round().astype(int)).max() <= 2
    finally:
        native.set_loras([])
    changed = [k for k in before if not torch.equal(before[k], native.backend._weights[k])]
    assert not changed, changed[:3]
    aoti.set_loras([(path, 0.8)])
    try:
        assert np.abs((aoti(PROMPT, **run).images[0] - ref) * 255).max() <= 2
    finally:
        aoti.set_loras([])

    fresh = sdengine.load(model_dir, backend="aoti")
    embedding = tmp_path / "tinycat.safetensors"
    from safetensors.torch import save_file

    save_file({"emb_params": embedding_vectors(32, 2)}, str(embedding))
    fresh.load_embedding(embedding)
    reference.set_loras([])
    reference.load_embedding(embedding)
    prompt = "a photo of tinycat"
    assert np.abs((fresh(prompt, **run).images[0] - reference(prompt, **run).images[0]) * 255).max() <= 2
    cpp = sdengine.load(model_dir, backend="native")
    cpp.load_embedding(embedding)  # its vectors go into the tables the C++ loop reads; the C++ tokenizer learns the token
    assert np.abs((cpp(prompt, **run).images[0] - reference(prompt, **run).images[0]) * 255).max() <= 2
    assert np.abs((cpp(PROMPT, **run).images[0] - base) * 255).max() <= 2  # other prompts still run


def test_cpp_loop_without_guidance_and_cancel(native, eager):
    ours = native.backend.generate(native.tokenizer, PROMPT, width=SIZE, height=SIZE, steps=2, seed=11,
                                   sampler="euler", guidance_scale=1.0)[0]
    ref = eager_uint8(eager, "euler", None, seed=11, steps=2, guidance=1.0)[0]
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2
    steps_seen = []
    with pytest.raises(_C.Cancelled, match="step 2"):
        native.backend.generate(native.tokenizer, PROMPT, width=SIZE, height=SIZE, steps=4, sampler="euler",
                                callback=lambda step, total: steps_seen.append(step) or step < 2)
    assert steps_seen == [1, 2]
    with pytest.raises(ValueError, match="multiple of 8"):
        native.backend.generate(native.tokenizer, PROMPT, width=12, height=SIZE, steps=2, sampler="euler")
    calls = []  # diffusers' PNDM evaluates the model steps + 1 times; progress counts its loop steps
    native.backend.generate(native.tokenizer, PROMPT, width=SIZE, height=SIZE, steps=3, sampler="pndm",
                            callback=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    calls = []  # "PLMS" is A1111's name, read as the Python API reads it: A1111's PLMS, one step per step
    native.backend.generate(native.tokenizer, PROMPT, width=SIZE, height=SIZE, steps=3, sampler="PLMS",
                            callback=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
