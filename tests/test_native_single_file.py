"""Single-file checkpoints (LDM / A1111 layout) read in C++."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sdengine
from support.native import (PROMPT, ROOT, SIZE, cache_dir, compile_c, eager, eager_uint8, engine_dir, model_dir, native,
                            native_image, one_thread, run_program, smooth_image)
from support.tiny import save_tiny_pipeline, tiny_pipeline

_C = pytest.importorskip("sdengine._C")


# ---------------------------------------------------------------------------
# Single-file checkpoints (LDM / A1111 layout), read in C++
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    """The tiny sd15 pipeline (the weights of model_dir) as an LDM single file, written by
    tests/support/ldm_keys.py (independent of sdengine.ldm_layout), in fp16 as most published files are."""
    from support.ldm_keys import save_ldm_single_file

    return save_ldm_single_file("sd15", tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors",
                                dtype=torch.float16)


def test_cpp_reads_single_file(sd15_file, model_dir, engine_dir, eager):
    """An A1111-layout file, read and mapped onto the engine in C++, gives the image of the
    same weights read from the diffusers folder (fp16 file -> fp32 engine: within 2/255), under a
    sampler whose schedule both scheduler configs fix alike: DDIM. (The folder's saved config
    states timestep_spacing="leading"; the file has SD1's published config, which lacks it, so
    Euler a takes diffusers' class default there, linspace, as diffusers' from_single_file does.)"""
    tokenizer = str(model_dir / "tokenizer")
    file_model = _C.Model(str(sd15_file), str(engine_dir), tokenizer_dir=tokenizer)
    from_file = native_image(file_model, "ddim")
    from_folder = native_image(_C.Model(str(model_dir), str(engine_dir)), "ddim")
    assert np.abs(from_file.astype(int) - from_folder.astype(int)).max() <= 2
    ref = eager_uint8(eager, "ddim", None, seed=5)[0]
    assert np.abs(from_file.astype(int) - ref.astype(int)).max() <= 2
    from_file = native_image(file_model, "euler_a")
    # Without engine_dir the runtime finds the engine in the cache by the file's keys and
    # shapes; without tokenizer_dir it uses the engine's CLIP tokenizer (the tiny model's
    # vocabulary is CLIP's).
    found = native_image(_C.Model(str(sd15_file)), "euler_a")
    assert np.array_equal(found, from_file)


def test_cpp_reads_oldest_sd1_layout(sd15_file, model_dir, engine_dir, tmp_path):
    """The first SD1 files have no `text_model.` level under cond_stage_model.transformer."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(sd15_file))
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in state.items()}
    assert old.keys() != state.keys()
    save_file(old, str(tmp_path / "old.safetensors"))
    tokenizer = str(model_dir / "tokenizer")
    ours = native_image(_C.Model(str(tmp_path / "old.safetensors"), str(engine_dir), tokenizer_dir=tokenizer))
    ref = native_image(_C.Model(str(sd15_file), str(engine_dir), tokenizer_dir=tokenizer))
    assert np.array_equal(ours, ref)


def test_cpp_single_file_errors(sd15_file, model_dir, engine_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tokenizer = str(model_dir / "tokenizer")
    state = load_file(str(sd15_file))
    missing = "model.diffusion_model.out.2.weight"
    del state[missing]
    save_file(state, str(tmp_path / "no-out.safetensors"))
    with pytest.raises(ValueError, match=f"no-out.safetensors does not fit.*no '{missing}'"):
        _C.Model(str(tmp_path / "no-out.safetensors"), str(engine_dir), tokenizer_dir=tokenizer)
    with pytest.raises(ValueError, match="no compiled engine .* fits .*no-out.safetensors"):
        _C.Model(str(tmp_path / "no-out.safetensors"), tokenizer_dir=tokenizer)
    # A tokenizer whose ids overflow the text encoder's embedding is refused.
    big = tmp_path / "big-vocab"
    big.mkdir()
    (big / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 60000}))
    (big / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="ids up to 60000 but the text_encoder embeds 49408"):
        _C.Model(str(sd15_file), str(engine_dir), tokenizer_dir=str(big))
    # An engine whose text encoder does not use CLIP's vocabulary carries no tokenizer: the
    # caller must give one.
    no_tokenizer = tmp_path / "engine-without-tokenizer"
    no_tokenizer.mkdir()
    for item in Path(engine_dir).iterdir():
        if item.suffix in (".pt2", ".safetensors"):
            (no_tokenizer / item.name).symlink_to(item)
    meta = json.loads((Path(engine_dir) / "engine.json").read_text())
    del meta["single_file"]["tokenizer"]
    (no_tokenizer / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="set tokenizer_dir"):
        _C.Model(str(sd15_file), str(no_tokenizer))
    native_image(_C.Model(str(sd15_file), str(no_tokenizer), tokenizer_dir=tokenizer))
    with pytest.raises(ValueError, match="prediction_type"):
        _C.Model(str(sd15_file), str(engine_dir), tokenizer_dir=tokenizer, prediction_type="x0")
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"\.ckpt"):
        _C.Model(str(tmp_path / "model.ckpt"), str(engine_dir))
    with pytest.raises(OSError, match="model not found"):
        _C.Model(str(tmp_path / "absent.safetensors"), str(engine_dir))


def test_cpp_reads_sd2_single_file(tmp_path_factory):
    """SD2: OpenCLIP's fused in_proj split into q, k, v, its unused last layer skipped, and
    v-prediction by default (overridable, or set by the header's modelspec.prediction_type).
    Builds the tiny sd21-v engine (one more AOTInductor compile, cached)."""
    from support.ldm_keys import save_ldm_single_file
    from safetensors.torch import load_file, save_file

    folder = save_tiny_pipeline("sd21-v", tmp_path_factory.mktemp("tiny-sd21"))
    engine = sdengine.load(folder, backend="native").backend.engine_dir
    path = save_ldm_single_file("sd21-v", tmp_path_factory.mktemp("single-sd21") / "tiny-sd21.safetensors")
    tokenizer = str(folder / "tokenizer")
    v_model = _C.Model(str(path), str(engine), tokenizer_dir=tokenizer)
    ours = native_image(v_model, "ddim")
    ref = eager_uint8(sdengine.from_diffusers(tiny_pipeline("sd21-v")), "ddim", None, seed=5)[0]
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2
    epsilon = native_image(_C.Model(str(path), str(engine), tokenizer_dir=tokenizer, prediction_type="epsilon"), "ddim")
    assert np.abs(epsilon.astype(int) - ours.astype(int)).max() > 2, "prediction_type made no difference"
    declared = path.with_name("declared-eps.safetensors")
    save_file(load_file(str(path)), str(declared), metadata={"modelspec.prediction_type": "epsilon"})
    assert np.array_equal(native_image(_C.Model(str(declared), str(engine), tokenizer_dir=tokenizer), "ddim"), epsilon)


def test_c_example_reads_single_file(tmp_path, sd15_file, eager):
    """The embedding app, given a single file: engine from the cache, tokenizer from the engine."""
    exe = compile_c(ROOT / "examples" / "c" / "generate.c", tmp_path / "sde_generate")
    out = tmp_path / "out.ppm"
    rc, log = run_program([exe, sd15_file, out, "-s", "ddim", "-t", "3", "-S", "9", "-W", SIZE, "-H", SIZE, "-p",
                           PROMPT])
    assert rc == 0, log
    image = np.frombuffer(out.read_bytes()[-SIZE * SIZE * 3:], dtype=np.uint8).reshape(SIZE, SIZE, 3)
    ref = eager_uint8(eager, "ddim", None, seed=9)[0]
    assert np.abs(image.astype(int) - ref.astype(int)).max() <= 2


def test_c_example_img2img(tmp_path, model_dir, engine_dir, eager):
    """-i INIT.ppm -r STRENGTH: the embedding app's img2img, matching the eager pipeline."""
    exe = compile_c(ROOT / "examples" / "c" / "generate.c", tmp_path / "sde_generate")
    init = smooth_image(2)
    (tmp_path / "init.ppm").write_bytes(f"P6\n{SIZE} {SIZE}\n255\n".encode() + init.tobytes())
    out = tmp_path / "out.ppm"
    rc, log = run_program([exe, model_dir, out, "-e", engine_dir, "-s", "dpmpp_2m", "-t", "4", "-S", "3", "-p", PROMPT,
                           "-i", tmp_path / "init.ppm", "-r", "0.5"])
    assert rc == 0, log
    image = np.frombuffer(out.read_bytes()[-SIZE * SIZE * 3:], dtype=np.uint8).reshape(SIZE, SIZE, 3)
    ref = eager(PROMPT, init_image=init, strength=0.5, num_inference_steps=4, seed=3, sampler="dpmpp_2m",
                output_type="np", progress=False).images[0]
    assert np.abs(image.astype(int) - (ref * 255).round().astype(int)).max() <= 2
