"""The C API from C: the example program and tests/c/test_capi.c, test_lora.c against the Python
pipeline."""

from __future__ import annotations

import numpy as np
import pytest

import sdengine
from support.native import (PROMPT, ROOT, SIZE, cache_dir, compile_c, corrupt_copy, eager, eager_uint8, engine_dir,
                            model_dir, native, one_thread, run_program)
from support.tiny import tiny_pipeline

_C = pytest.importorskip("sdengine._C")


# ---------------------------------------------------------------------------
# The C API, from C
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def capi_test(tmp_path_factory):
    return compile_c(ROOT / "tests" / "c" / "test_capi.c", tmp_path_factory.mktemp("c") / "sde_capi_test",
                     extra=["-pthread"])


def test_c_example_matches_eager_pipeline(tmp_path, model_dir, engine_dir, eager):
    exe = compile_c(ROOT / "examples" / "c" / "generate.c", tmp_path / "sde_generate")
    out = tmp_path / "out.ppm"
    rc, log = run_program([exe, model_dir, out, "-e", engine_dir, "-s", "Euler a", "-t", "3", "-S", "42",
                           "-W", SIZE, "-H", SIZE, "-p", PROMPT])
    assert rc == 0, log
    data = out.read_bytes()
    assert data.startswith(f"P6\n{SIZE} {SIZE}\n255\n".encode())
    image = np.frombuffer(data[-SIZE * SIZE * 3:], dtype=np.uint8).reshape(SIZE, SIZE, 3)
    ref = eager_uint8(eager, "euler_a", None, seed=42)[0]
    assert np.abs(image.astype(int) - ref.astype(int)).max() <= 2


def test_c_example_finds_engine_in_cache(tmp_path, model_dir, engine_dir, cache_dir):
    """Without -e the runtime searches $SDE_CACHE_DIR/aoti for an engine that fits the weights."""
    exe = compile_c(ROOT / "examples" / "c" / "generate.c", tmp_path / "sde_generate")
    rc, log = run_program([exe, model_dir, tmp_path / "out.ppm", "-s", "ddim", "-t", "2", "-W", SIZE, "-H", SIZE])
    assert rc == 0, log
    rc, log = run_program(["env", f"SDE_CACHE_DIR={tmp_path / 'empty'}", exe, model_dir, tmp_path / "out.ppm"])
    assert rc == 1 and "no compiled engine" in log, log


@pytest.fixture(scope="module")
def lora_test(tmp_path_factory):
    """tests/c/test_lora.c compiled, and its inputs: two LoRAs (kohya with LoCon, PEFT) and an embedding."""
    from safetensors.torch import save_file

    from support.lora_files import embedding_vectors, kohya_lora, peft_lora

    folder = tmp_path_factory.mktemp("lora-c")
    files = {"a": kohya_lora(tiny_pipeline("sd15"), folder / "a.safetensors", rank=4, alpha=2.0, locon=True),
             "b": peft_lora(tiny_pipeline("sd15"), folder / "b", rank=4, alpha=8.0),
             "emb": folder / "emb.safetensors"}
    save_file({"emb_params": embedding_vectors(32, 2)}, str(files["emb"]))
    files["exe"] = compile_c(ROOT / "tests" / "c" / "test_lora.c", folder / "sde_lora_test", extra=("-lpthread",))
    return files


def test_capi_set_loras_and_load_embedding_match_python(lora_test, model_dir, engine_dir, tmp_path):
    """sde_model_set_loras / sde_model_load_embedding against the Python pipeline with the same
    LoRAs and embedding (within 2/255); count 0 restores the base image byte for byte; bad input
    changes nothing (the C program checks those itself)."""
    import copy

    rc, log = run_program([lora_test["exe"], "images", model_dir, engine_dir, lora_test["a"], lora_test["b"],
                           lora_test["emb"], tmp_path])
    assert rc == 0, log
    assert "FAIL" not in log and log.count("ok ") >= 15, log

    def image(name):
        return np.frombuffer((tmp_path / f"{name}.rgb").read_bytes(), dtype=np.uint8).reshape(SIZE, SIZE, 3)

    python = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")))
    run = dict(num_inference_steps=3, height=SIZE, width=SIZE, seed=3, sampler="euler", output_type="np",
               progress=False)
    cases = {"base": ([], PROMPT), "a": ([(lora_test["a"], 0.8)], PROMPT),
             "ab": ([(lora_test["a"], 0.7), (lora_test["b"], 0.4)], PROMPT)}
    for name, (loras, prompt) in cases.items():
        python.set_loras(loras)
        ref = (python(prompt, **run).images[0] * 255).round().astype(int)
        assert np.abs(image(name).astype(int) - ref).max() <= 2, name
    python.set_loras([])
    python.load_embedding(lora_test["emb"], token="<tinycat>")
    ref = (python("a photo of <tinycat>", **run).images[0] * 255).round().astype(int)
    assert np.abs(image("emb").astype(int) - ref).max() <= 2
    assert np.abs(image("emb").astype(int) - image("base").astype(int)).max() > 2


def test_capi_lora_swaps_while_threads_generate(lora_test, model_dir, engine_dir):
    """4 threads generate while a fifth merges 20 sets in turn: no crash, and every image is the
    serial image of a whole set (tests/c/run_asan.sh runs the same under AddressSanitizer)."""
    rc, log = run_program([lora_test["exe"], "threads", model_dir, engine_dir, lora_test["a"], lora_test["b"], 4, 20])
    assert rc == 0 and "FAIL" not in log, log


def test_capi_bad_arguments(capi_test, model_dir, engine_dir, tmp_path):
    corrupt = corrupt_copy(model_dir, tmp_path / "corrupt")
    rc, log = run_program([capi_test, "args", model_dir, engine_dir, corrupt])
    assert rc == 0 and "FAIL" not in log, log
    assert log.count("ok ") >= 30


def test_capi_threads_share_one_model(capi_test, model_dir, engine_dir):
    """8 threads x 10 generations on ONE model, identical to the same requests run serially."""
    rc, log = run_program([capi_test, "threads", model_dir, engine_dir, 8, 10])
    assert rc == 0 and "ok threads_equal_serial" in log, log


def test_capi_every_sampler_and_threads_mixing_them(capi_test, model_dir, engine_dir):
    """Every sampler under both rules (diffusers' 15, A1111's 20), one request each through the C
    API, then 8 threads mixing them on ONE model: identical to the same requests run serially."""
    rc, log = run_program([capi_test, "samplers", model_dir, engine_dir, 8])
    assert rc == 0 and "FAIL" not in log and "ok sampler_threads_equal_serial" in log, log
    assert log.count("ok sampler_") >= 35, log


def test_capi_no_memory_growth(capi_test, model_dir, engine_dir):
    """200 sequential generations: RSS within 2% of its value after warm-up."""
    rc, log = run_program([capi_test, "rss", model_dir, engine_dir, 200])
    assert rc == 0 and "ok rss_stable" in log, log
