"""Long runs and failures: memory over 1,000 generations, many threads with cancellations on
one C API model, and running out of memory.

- Soak (slow): 1,000 generations in one process with the demo model; RSS after 1,000 within
  2% of RSS after 100, and a repeated request gives the same image at the end as at the start.
- C API soak (slow): 16 threads x 60 requests on one model, 25% cancelled at a random step by
  their progress callback (tests/c/test_capi.c soak; tests/c/run_asan.sh runs it under
  LeakSanitizer too).
- Out of memory: a request that runs out raises sdengine.OutOfMemoryError naming the size and
  batch, frees what it allocated, and the next request succeeds: on the CPU through an
  injected failure at the backend boundary (the seam: backend.denoise) and through a real
  allocation failure under an address-space limit (Python and C API); on CUDA with a real
  oversized request (gpu).
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import sdengine
from support.tiny import save_tiny_pipeline, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a handwritten digit seven"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGESIZE")


# ---------------------------------------------------------------------------
# Soak: 1,000 generations in one process
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_thousand_generations_keep_memory_flat():
    pipe = sdengine.load(None, device="cpu")  # the demo model
    samplers = ["euler", "euler_a", "ddim", "dpmpp_2m"]
    first, rss = {}, {}
    for i in range(1000):
        sampler = samplers[i % 4]
        output_type = ("pil", "np")[(i // 4) % 2]
        steps_seen = []
        result = pipe(f"a handwritten digit {i % 10}", steps=2, seed=i % 40, sampler=sampler, output_type=output_type,
                      progress=False, callback=lambda step, total, x: steps_seen.append(step))
        image = np.asarray(result.images[0]) if output_type == "pil" else (result.images[0] * 255).round()
        digest = hashlib.sha256(image.astype(np.uint8).tobytes()).hexdigest()
        key = (i % 10, i % 40, sampler, output_type)
        assert first.setdefault(key, digest) == digest, f"generation {i} differs from the same request earlier"
        assert steps_seen == [0, 1]
        if i + 1 in (100, 1000):
            gc.collect()
            rss[i + 1] = _rss_bytes()
    growth = (rss[1000] - rss[100]) / rss[100]
    print(f"soak: RSS {rss[100] / 2**20:.1f} MiB after 100 generations, {rss[1000] / 2**20:.1f} MiB after 1,000 "
          f"({100 * growth:+.2f}%); {len(first)} distinct requests repeated identically")
    assert growth <= 0.02, f"RSS grew {100 * growth:.2f}% from 100 to 1,000 generations"


# ---------------------------------------------------------------------------
# The C API: threads, cancellation, out of memory
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("reliability") / "tiny-sd15")


@pytest.fixture(scope="module")
def engine_dir(tiny_folder):
    pytest.importorskip("sdengine._C")
    return sdengine.load(tiny_folder, backend="native").backend.engine_dir


@pytest.fixture(scope="module")
def capi_test(tmp_path_factory):
    """tests/c/test_capi.c compiled against sdengine.h and libsdengine only, as an app would."""
    pytest.importorskip("sdengine._C")
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.fail("no C compiler found (cc, gcc or clang)")
    package = Path(sdengine.__file__).parent
    out = tmp_path_factory.mktemp("c") / "sde_capi_test"
    subprocess.run([cc, "-std=c11", "-O1", "-Wall", "-Werror", str(ROOT / "tests" / "c" / "test_capi.c"), "-I",
                    str(ROOT / "csrc" / "include"), "-L", str(package), "-lsdengine", f"-Wl,-rpath,{package}",
                    "-pthread", "-o", str(out)], check=True, capture_output=True, text=True)
    return out


def _run(args, timeout=900):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_capi_threads_with_cancellations(capi_test, tiny_folder, engine_dir):
    """16 threads x 60 requests on one model, 25% cancelled at a random step: each uncancelled
    image equals its serial twin, each cancelled request returns SDE_ERR_CANCELLED."""
    rc, log = _run([capi_test, "soak", tiny_folder, engine_dir, 16, 60, 25])
    print(next((line for line in log.splitlines() if line.startswith("soak:")), log))
    assert rc == 0 and "ok soak_threads_cancel" in log, log


def test_capi_out_of_memory(capi_test, tiny_folder, engine_dir):
    rc, log = _run([capi_test, "oom", tiny_folder, engine_dir])
    assert rc == 0 and "FAIL" not in log and log.count("ok oom_") == 4, log


# ---------------------------------------------------------------------------
# Python: out of memory
# ---------------------------------------------------------------------------

class _FailingBackend:
    """The seam: a backend whose UNet call fails like CUDA's allocator at a chosen step, after
    noting (weakly) the tensors the request handed it."""

    def __init__(self, backend, fail_at: int):
        self._backend, self.fail_at, self.calls, self.released = backend, fail_at, 0, 0
        self.seen = []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def denoise(self, x_in, t, context, added_cond=None):
        self.calls += 1
        self.seen += [weakref.ref(x_in), weakref.ref(context)]
        if self.calls == self.fail_at:
            scratch = torch.empty(1 << 20)  # what the failing call itself had allocated
            self.seen.append(weakref.ref(scratch))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (stand-in)")
        return self._backend.denoise(x_in, t, context, added_cond)

    def release_memory(self):
        self.released += 1


def test_out_of_memory_names_the_request_and_frees_it():
    pipe = sdengine.from_diffusers(tiny_pipeline("sd15"))
    kwargs = dict(height=16, width=24, steps=3, seed=5, batch_size=2, sampler="euler", progress=False,
                  output_type="np")
    expected = pipe(PROMPT, **kwargs).images
    failing = _FailingBackend(pipe.backend, fail_at=2)
    pipe.backend = failing
    with pytest.raises(sdengine.OutOfMemoryError) as info:
        pipe(PROMPT, **kwargs)
    error = info.value
    assert "2 image(s) of 24x16 (batch_size 2, 3 steps)" in str(error) and "Tried to allocate 20.00 GiB" in str(error)
    assert isinstance(error, MemoryError) and isinstance(error, torch.OutOfMemoryError)
    assert isinstance(error.__cause__, torch.OutOfMemoryError) and error.__cause__.__traceback__ is None
    gc.collect()
    alive = [r for r in failing.seen if r() is not None]
    assert not alive, f"{len(alive)} tensors of the failed request are still referenced (the error holds them?)"
    assert failing.released == 1  # the backend dropped its per-request caches (CUDA graphs on the GPU)
    failing.fail_at = 0
    assert np.array_equal(pipe(PROMPT, **kwargs).images, expected)  # the next request runs, and is the same


def test_real_allocation_failure_under_an_address_space_limit(tmp_path):
    """No stand-in: the demo model in a child process whose address space is capped 512 MiB above
    its size; a 4096x4096 batch of 4 cannot be allocated, the request after it can."""
    script = textwrap.dedent("""
        import resource, sys
        import numpy as np, torch
        torch.set_num_threads(1)
        import sdengine
        pipe = sdengine.load(None, device="cpu")
        small = dict(steps=2, seed=1, progress=False, output_type="np")
        before = pipe("a handwritten digit seven", **small).images
        vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
        try:
            pipe("a handwritten digit seven", height=4096, width=4096, batch_size=4, steps=2, progress=False)
            sys.exit("no OutOfMemoryError")
        except sdengine.OutOfMemoryError as e:
            print("OOM:", e)
        after = pipe("a handwritten digit seven", **small).images
        print("same after:", bool(np.array_equal(before, after)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "OOM: out of memory on cpu generating 4 image(s) of 4096x4096 (batch_size 4, 2 steps)" in out, out
    assert "can't allocate memory" in out and "same after: True" in out, out


@pytest.mark.gpu
def test_cuda_out_of_memory_is_clean(tmp_path):
    """A real oversized request on the GPU (64 images of 4096x4096: hundreds of GiB of
    activations): OutOfMemoryError naming it, the memory it took given back, and the next
    request succeeds with the same image."""
    pipe = sdengine.load(save_tiny_pipeline("sd15", tmp_path / "tiny-sd15"), device="cuda", backend="eager")
    small = dict(height=64, width=64, steps=2, seed=1, progress=False, output_type="np")
    before = pipe(PROMPT, **small).images
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    with pytest.raises(sdengine.OutOfMemoryError, match=r"64 image\(s\) of 4096x4096 \(batch_size 64"):
        pipe(PROMPT, height=4096, width=4096, batch_size=64, steps=2, progress=False, vae_tiling=False)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= baseline + (64 << 20)
    assert np.allclose(pipe(PROMPT, **small).images, before, atol=1 / 255)
