"""What the tests of the native runtime (libsdengine, csrc/) share: the tiny SD1 model folder, its
engine, the pipelines on it and the helpers that compare their images.

The runtime is tested in tests/test_native_*.py, one file a subject: the tables it shares with
Python (tokenizer, sampler names, schedules), images against the eager pipeline, engine builds,
the C API from C, graphs, single-file checkpoints, and the model families (inpainting, SDXL,
`backend="native"` requests); tests/test_native_cuda.py repeats them on CUDA.

References: the eager Python pipeline (sdengine.api.from_diffusers on the tiny diffusers
pipeline of tests/support/tiny.py, same weights) for images; sdengine.tokenizer for token ids;
sdengine.samplers.make_plan for schedules; sdengine/samplers/names.py for the name table.

The C programs (examples/c/generate.c, tests/c/test_capi.c) are compiled with the system C
compiler against sdengine.h and libsdengine only, as an embedding app would.

Budget: one AOTInductor compile of the tiny SD1 engine (2-4 min on 2 cores; cached in
$SDE_CACHE_DIR, default ~/.cache/sdengine, for later runs), then about 1-2 min of tests.
The fixtures are module-scoped: a test file imports those it uses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import sdengine

from .tiny import save_tiny_pipeline, tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = Path(sdengine.__file__).parent
HEADER_DIR = ROOT / "csrc" / "include"
PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 16  # pixels: the tiny model's VAE halves once and its UNet once, so 4-pixel cells


# ---------------------------------------------------------------------------
# Fixtures: one tiny model folder and one engine for the whole module
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread per request: on a shared 2-core machine OpenMP's spinning teams make
    the tiny model 10x slower, and the tests check results, not speed."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cache_dir():
    """The engine cache ($SDE_CACHE_DIR, default ~/.cache/sdengine): the tiny engine is built
    once and reused by later runs and by tests/c/run_asan.sh (CI's AddressSanitizer step)."""
    from sdengine.export.aoti import cache_root

    return cache_root().parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="module")
def native(cache_dir, model_dir):
    """sdengine.load(..., backend="native") on the tiny folder: builds (or finds) the engine."""
    return sdengine.load(model_dir, backend="native")


@pytest.fixture(scope="module")
def eager():
    return sdengine.from_diffusers(tiny_pipeline("sd15"), backend="eager")


@pytest.fixture(scope="module")
def aoti(native, model_dir):
    """sdengine.load(..., backend="aoti"): the same engine, driven from the Python loop."""
    return sdengine.load(model_dir, backend="aoti")


@pytest.fixture(scope="module")
def engine_dir(native):
    return native.backend.engine_dir


# ---------------------------------------------------------------------------
# Helpers: reference images, C programs, inputs
# ---------------------------------------------------------------------------

def eager_uint8(eager, sampler, schedule, seed, steps=3, guidance=7.5, negative=None, batch_size=1):
    result = eager(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                   height=SIZE, width=SIZE, seed=seed, sampler=sampler, schedule=schedule, output_type="np",
                   progress=False, batch_size=batch_size)
    return [(im * 255).round().astype(np.uint8) for im in result.images]


def compile_c(source: Path, out: Path, extra=()):
    """Compile a C program against sdengine.h and libsdengine only (as an embedding app)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.fail("no C compiler found (cc, gcc or clang)")
    cmd = [cc, "-std=c11", "-O1", "-Wall", "-Werror", str(source), "-I", str(HEADER_DIR), "-L", str(PACKAGE_DIR),
           "-lsdengine", f"-Wl,-rpath,{PACKAGE_DIR}", "-o", str(out), *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def assert_cpp_loop_matches_eager(native, eager, sampler, schedule):
    """Two images (seeds 7 and 8) of the whole request in C++ within 2/255 of the eager pipeline."""
    ours = native.backend.generate(native.tokenizer, PROMPT, "blurry", width=SIZE, height=SIZE, steps=3, seed=7,
                                   sampler=sampler, schedule=schedule, batch_size=2)
    ref = eager_uint8(eager, sampler, schedule, seed=7, negative="blurry", batch_size=2)
    for i in range(2):
        diff = np.abs(ours[i].astype(int) - ref[i].astype(int)).max()
        assert diff <= 2, f"image {i}: max difference {diff}/255"
    assert not np.array_equal(ours[0], ours[1]), "seed + 1 gave the same image"


def smooth_image(seed=0):
    """A smooth random RGB image, uint8 (SIZE, SIZE, 3)."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, 4, 4, generator=gen)
    image = torch.nn.functional.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def run_program(args, timeout=600):
    """Run a compiled program (one OpenMP thread): (exit status, stdout + stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def corrupt_copy(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    weights = dest / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"{not json!!!"  # the header's opening bytes
    weights.write_bytes(bytes(data))
    return dest


def native_image(model, sampler="euler", seed=5, steps=3):
    data, width, height, _ = model.generate(PROMPT, None, SIZE, SIZE, steps, 7.5, seed, 1, sampler, None, 0.0, None)[0]
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)


def inpaint_mask():
    """Repaint the right half and a square in the lower left (uint8 (SIZE, SIZE), 255 = repaint)."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, SIZE // 2:] = 255
    mask[SIZE - 6:, 2:6] = 200
    mask[0, 0] = 127  # below the threshold: kept
    return mask
