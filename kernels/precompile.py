"""Every Triton kernel a workload launches, found by a dry run and compiled up front, in
parallel, for a GPU target: the triton layer's bounded cold start.

The first H200 session never got a Triton figure: the first full-size UNet step compiled
~70 kernels and benchmarked ~150 autotune configs one after the other, in-process, and
outlasted every cap. Three things bound it now: memory-bound kernels choose their block
sizes by rule (no autotuning); attention has at most two configs per padded head dim; and
this module compiles the whole set before the first step, in a process pool.

1. `record_launches()`: while it is active, the kernel wrappers (kernels/*.py) note each
   launch instead of (on meta tensors) or as well as (on real tensors) making it, and take
   their GPU configuration for meta tensors. Running the triton backend's own code on meta
   tensors (sdengine.backends.triton.kernel_launches) gives exactly what it would launch
   on a GPU: the list is derived from the code path, never written by hand.
2. `kernel_specs(launches)`: the distinct compilations (an autotuned kernel: one per config).
3. `compile_specs(specs, target, jobs)`: compiles each for `target` (a `GPUTarget`, e.g.
   sm_90, which works on a machine without a GPU) in `jobs` processes, through Triton's own
   JIT path (`JITFunction.warmup`) and so through Triton's disk cache (TRITON_CACHE_DIR):
   what is compiled here is what the backend later loads instead of compiling. Workers
   never touch the GPU: a compile-only driver stands in for Triton's.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import _triton


@contextlib.contextmanager
def record_launches():
    """Record the kernel launches made inside the block: yields the list of
    (kernel, args, kwargs), filled as the wrappers launch (see the module docstring)."""
    if not _triton.HAS_TRITON:
        raise RuntimeError("recording Triton launches needs the triton package (pip install triton)")
    previous, _triton._recording = _triton._recording, []
    try:
        yield _triton._recording
    finally:
        _triton._recording = previous


def recording() -> bool:
    """Whether launches are being recorded (inside record_launches())."""
    return _triton._recording is not None


@dataclass(frozen=True, eq=False)
class KernelSpec:
    """One compilation: a @triton.jit function (by module and name), its arguments as the
    compiler sees them (pointers: dtype and 16-byte alignment; scalars: values), its
    constexprs and launch options (num_warps, num_stages).

    Two specs are equal when Triton compiles them to the same kernel: integers count only by
    what Triton specializes on (equal to 1, divisible by 16, 64-bit), and not at all where the
    kernel says do_not_specialize. `args` keeps the first concrete values, to compile with."""

    module: str
    name: str
    args: tuple
    kwargs: tuple
    key: tuple = ()

    def __eq__(self, other):
        return isinstance(other, KernelSpec) and self.key == other.key

    def __hash__(self):
        return hash(self.key)

    @property
    def label(self) -> str:
        flags = ", ".join(f"{k}={v}" for k, v in self.kwargs)
        return f"{self.name}[{flags}]"


def _describe_arg(a):
    if isinstance(a, torch.Tensor):
        aligned = (a.storage_offset() * a.element_size()) % 16 == 0  # allocations are 16-byte aligned
        return ("ptr", str(a.dtype).removeprefix("torch."), aligned)
    if isinstance(a, (bool, int, float, str)) or a is None:
        return a
    raise TypeError(f"cannot describe kernel argument of type {type(a).__name__}")


def _specialization(value, do_not_specialize: bool):
    """What Triton's compiled kernel depends on of one runtime argument."""
    if isinstance(value, tuple) or value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, float):
        return "fp32"
    wide = not -2**31 <= value < 2**31
    if do_not_specialize:
        return ("int", wide)
    return ("int", wide, value == 1, value % 16 == 0)


def _unspecialized(fn) -> set:
    """The names of a kernel's do_not_specialize arguments (a JITFunction keeps their indices; the
    interpreter's function, the names as given)."""
    names = list(getattr(fn, "arg_names", []))
    given = getattr(fn, "do_not_specialize", None)
    if given is None:
        given = getattr(fn, "kwargs", {}).get("do_not_specialize", [])
    return {names[a] if isinstance(a, int) else a for a in given or ()}


def kernel_specs(launches) -> list:
    """The distinct compilations of recorded launches, in first-launch order."""
    specs, seen = [], set()
    for kernel, args, kwargs in launches:
        configs = getattr(kernel, "configs", None)  # a triton.autotune Autotuner: every config compiles
        fn = kernel.fn if configs is not None else kernel
        variants = [dict(kwargs, **c.all_kwargs()) for c in configs] if configs is not None else [dict(kwargs)]
        described = tuple(_describe_arg(a) for a in args)
        unspecialized = _unspecialized(fn)
        names = list(getattr(fn, "arg_names", [])) + [None] * len(described)  # runtime args come first
        canonical = tuple(_specialization(a, name in unspecialized) for a, name in zip(described, names))
        for kw in variants:
            kw = tuple(sorted((k, v) for k, v in kw.items() if v is not None))
            spec = KernelSpec(fn.fn.__module__, fn.fn.__name__, described, kw,
                              key=(fn.fn.__module__, fn.fn.__name__, canonical, kw))
            if spec not in seen:
                seen.add(spec)
                specs.append(spec)
    return specs


# ---------------------------------------------------------------------------
# Compiling for a target without a GPU
# ---------------------------------------------------------------------------

def parse_target(target: Optional[str]):
    """A triton GPUTarget: "sm_90" / "sm90" / "90", or None for this machine's CUDA device."""
    from triton.backends.compiler import GPUTarget

    if target is None or target == "native":
        if not torch.cuda.is_available():
            raise ValueError("target 'native' needs a CUDA device; give one such as sm_90")
        major, minor = torch.cuda.get_device_capability()
        return GPUTarget("cuda", major * 10 + minor, 32)
    digits = target.lower().removeprefix("sm_").removeprefix("sm")
    if not digits.isdigit():
        raise ValueError(f"target must look like sm_90 (or 'native'), got {target!r}")
    return GPUTarget("cuda", int(digits), 32)  # NVIDIA warps are 32 threads


class _CompileOnlyDriver:
    """Triton's driver, for compiling only: a fixed target, device 0, no streams, no GPU."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("a compile-only driver cannot benchmark")

    def is_active(self):
        return True


class _Pointer:
    """A pointer argument as the compiler needs it: its dtype and alignment."""

    def __init__(self, dtype: str, aligned: bool):
        self.dtype = getattr(torch, dtype)
        self._ptr = 16 if aligned else 8

    def data_ptr(self):
        return self._ptr


def _cache_entry(kernel_hash: str) -> Optional[Path]:
    """The directory of Triton's disk cache holding a compiled kernel (named by the base32 of
    its hash, as triton.runtime.cache does), or None."""
    import base64

    root = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    for name in (base64.b32encode(bytes.fromhex(kernel_hash)).decode().rstrip("="), kernel_hash):
        if (root / name).is_dir():
            return root / name
    return None


def _compile_one(spec: KernelSpec, target: tuple) -> dict:
    """Compile one spec for target (backend, arch, warp_size) in this process; the result is
    what the report needs. Runs in the pool's workers."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    driver.set_active(_CompileOnlyDriver(GPUTarget(*target)))
    fn = getattr(importlib.import_module(spec.module), spec.name)
    args = [_Pointer(a[1], a[2]) if isinstance(a, tuple) and a and a[0] == "ptr" else a for a in spec.args]
    started = time.time()
    try:
        kernel = fn.warmup(*args, grid=(1,), **dict(spec.kwargs))
    except Exception as e:  # reported with the kernel's name and settings, never a crash of the pool
        return {"label": spec.label, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    seconds = time.time() - started
    if kernel is None:
        return {"label": spec.label, "error": "Triton returned no kernel"}
    entry = _cache_entry(kernel.hash)
    made = [p.stat().st_mtime for p in entry.glob("*")] if entry is not None else []
    compiled = bool(made) and min(made) >= started - 1e-3
    return {"label": spec.label, "hash": kernel.hash, "seconds": seconds, "compiled": compiled}


@dataclass
class CompileReport:
    kernels: list = field(default_factory=list)  # one dict per spec: label, hash, seconds, compiled | error
    wall_s: float = 0.0
    jobs: int = 1

    def unique(self) -> list:
        """One entry per distinct kernel (the first spec that compiled to it), then the failures."""
        seen, out = set(), []
        for k in self.kernels:
            if "hash" in k and k["hash"] not in seen:
                seen.add(k["hash"])
                out.append(k)
        return out + self.failures

    @property
    def failures(self) -> list:
        return [k for k in self.kernels if "error" in k]

    @property
    def distinct(self) -> int:
        return len({k["hash"] for k in self.kernels if "hash" in k})

    @property
    def compiled(self) -> int:
        return len({k["hash"] for k in self.kernels if k.get("compiled")})

    @property
    def serial_s(self) -> float:
        """The compile time of what was compiled, summed: one process doing it all."""
        done, total = set(), 0.0
        for k in self.kernels:
            if k.get("compiled") and k["hash"] not in done:
                done.add(k["hash"])
                total += k["seconds"]
        return total

    def summary(self) -> str:
        line = (f"{self.distinct} kernels ({self.compiled} compiled), {self.serial_s:.1f} s serial, "
                f"{self.wall_s:.1f} s wall with {self.jobs} jobs")
        if self.failures:
            line += f"; {len(self.failures)} failed"
        return line


def compile_specs(specs, target, jobs: Optional[int] = None) -> CompileReport:
    """Compile every spec for `target` (a GPUTarget) into Triton's disk cache, in `jobs`
    worker processes (default: one per CPU). A failure is reported, never raised.

    Always in fresh processes (spawned): they never inherit a CUDA context or torch's thread
    pools, and they compile even where this process runs Triton's interpreter
    (TRITON_INTERPRET=1, the CPU tests), whose kernels cannot be compiled."""
    import multiprocessing

    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs) or 1))
    started = time.time()
    target_tuple = (target.backend, target.arch, target.warp_size)
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # the workers inherit the environment at start
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_compile_one, specs, [target_tuple] * len(specs)))
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return CompileReport(results, time.time() - started, jobs)
