"""The native runtime on CUDA (issue 6's GPU acceptance): the same checks as tests/test_native.py
with an engine compiled for CUDA. Skipped without a CUDA device.

One AOTInductor compile of the tiny SD1 engine for CUDA (fp32, cached in $SDE_CACHE_DIR),
then: the C++ loop (tokenizer, noise, sampler, decode) and the step path against the eager
pipeline on the same device and weights; the C example and the C API test program (bad
arguments, 8 threads x 10 generations on one model) against that engine.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

_C = pytest.importorskip("sdengine._C")

import sdengine  # noqa: E402
from test_native import (PROMPT, ROOT, SIZE, _compile_c, _corrupt_copy, _eager_uint8, _run,  # noqa: E402
                         assert_cpp_loop_matches_eager)
from tiny import save_tiny_pipeline, tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def cuda_pipes():
    """(native, eager) on CUDA from the same tiny weights."""
    pipe = copy.deepcopy(tiny_pipeline("sd15")).to("cuda")  # the cached pipeline stays on the CPU
    native = sdengine.from_diffusers(pipe, backend="native")
    eager = sdengine.from_diffusers(copy.deepcopy(tiny_pipeline("sd15")).to("cuda"), backend="eager")
    return native, eager


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny-sd15-cuda"))


def test_engine_is_a_cuda_engine(cuda_pipes):
    native, _ = cuda_pipes
    assert native.backend.engine["device"] == "cuda"
    assert native.backend.device.type == "cuda"


@pytest.mark.parametrize("sampler,schedule", [("euler", None), ("euler_a", None), ("dpmpp_2m", "karras")])
def test_cpp_loop_on_cuda_matches_eager(cuda_pipes, sampler, schedule):
    assert_cpp_loop_matches_eager(*cuda_pipes, sampler, schedule)


def test_step_path_on_cuda_matches_eager(cuda_pipes):
    native, eager = cuda_pipes
    ours = native(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, seed=3, sampler="dpmpp_2m",
                  output_type="np", progress=False).images[0]
    ref = _eager_uint8(eager, "dpmpp_2m", None, seed=3)[0]
    assert np.abs((ours * 255).round().astype(int) - ref.astype(int)).max() <= 2


def test_c_example_and_capi_on_cuda_engine(tmp_path, cuda_pipes, model_dir):
    """The C programs read the weights in C++ onto the CUDA device the engine names."""
    native, eager = cuda_pipes
    engine_dir = native.backend.engine_dir
    exe = _compile_c(ROOT / "examples" / "c" / "generate.c", tmp_path / "sde_generate")
    out = tmp_path / "out.ppm"
    rc, log = _run([exe, model_dir, out, "-e", engine_dir, "-s", "Euler a", "-t", "3", "-S", "42",
                    "-W", SIZE, "-H", SIZE, "-p", PROMPT])
    assert rc == 0, log
    image = np.frombuffer(out.read_bytes()[-SIZE * SIZE * 3:], dtype=np.uint8).reshape(SIZE, SIZE, 3)
    ref = _eager_uint8(eager, "euler_a", None, seed=42)[0]
    assert np.abs(image.astype(int) - ref.astype(int)).max() <= 2
    capi = _compile_c(ROOT / "tests" / "c" / "test_capi.c", tmp_path / "sde_capi_test", extra=["-pthread"])
    rc, log = _run([capi, "threads", model_dir, engine_dir, 8, 10])
    assert rc == 0 and "ok threads_equal_serial" in log, log
    corrupt = tmp_path / "corrupt"
    _corrupt_copy(model_dir, corrupt)
    rc, log = _run([capi, "args", model_dir, engine_dir, corrupt])
    assert rc == 0 and "FAIL" not in log, log
