"""Import triton if it is installed, and say how kernels can run here: the interpreter, whether the
ops can be registered, reference mode (which kernels/ops.py's rule, `uses_triton`, reads), and
what the wrappers need to launch (`check_launch`, `gpu_path`, `launcher`).

sdengine installs without triton (`pip install sdengine` without the `triton` extra):
then every op falls back to its plain-torch reference. The kernel modules still
import, because `triton.jit`, `triton.autotune`, `triton.Config` and `tl.constexpr`
are replaced by inert stand-ins that only let the module-level definitions run.
"""

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # sdengine without the triton extra
    HAS_TRITON = False

    class _Inert:
        """Stands in for `triton` and `triton.language`: decorators return the function."""

        constexpr = object
        float32 = float16 = bfloat16 = uint8 = int32 = int64 = None

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_args, **_kwargs):
            return lambda f: f

        @staticmethod
        def Config(*args, **kwargs):  # noqa: N802 (mirrors triton.Config)
            return (args, kwargs)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(int(n) - 1, 0).bit_length()

    triton = tl = _Inert()

# Set by tests/conftest.py when there is no CUDA device; read when triton is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Whether kernels/ops.py registers the kernels as torch.ops.sdengine.* (torch 2.6+ with triton).
CAN_REGISTER = HAS_TRITON and hasattr(torch.library, "triton_op")

# Reference mode: the public ops run their plain-torch references (SDENGINE_KERNELS=reference).
_reference_mode = os.environ.get("SDENGINE_KERNELS", "").lower() in ("ref", "reference")


class _ReferenceMode(contextlib.AbstractContextManager):
    def __init__(self, previous):
        self.previous = previous

    def __exit__(self, *exc):
        global _reference_mode
        _reference_mode = self.previous
        return False


def use_reference(enabled=True):
    """Make the public ops run their plain-torch references (enabled=True) or not.

    Takes effect at once; used as `with use_reference(): ...` the previous mode comes back
    at the end of the block."""
    global _reference_mode
    previous, _reference_mode = _reference_mode, bool(enabled)
    return _ReferenceMode(previous)


def reference_mode():
    """Whether reference mode is on (see use_reference)."""
    return _reference_mode


# While `record_launches()` is active: the launches the wrappers made (kernels/precompile.py).
_recording = None


def autotune(configs, key):
    """`triton.autotune(configs, key=key)`, with the winners cached on disk where this Triton
    has `cache_results` (3.2 and later): the first call at a new shape benchmarks every config
    (and compiles each one) once per machine, not once per process; later processes compile
    only the winner."""
    import inspect

    kwargs = {}
    if HAS_TRITON and "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs["cache_results"] = True
    return triton.autotune(configs, key=key, **kwargs)


def can_launch(t) -> bool:
    """Whether a Triton kernel can run on tensor `t`: on CUDA, on CPU under the interpreter, or
    on the meta device while launches are recorded."""
    return HAS_TRITON and (gpu_path(t) or (INTERPRET and t.device.type == "cpu"))


def gpu_path(t) -> bool:
    """Whether a wrapper takes its GPU configuration (block sizes, autotuned kernels) for `t`:
    a CUDA tensor, or a meta tensor while launches are recorded (a shape-only dry run of what
    the GPU would launch)."""
    return t.is_cuda or (_recording is not None and t.is_meta)


def check_launch(name: str, t) -> None:
    """Raise a clear error when the Triton kernel `name` cannot run on `t`'s device."""
    if not HAS_TRITON:
        raise RuntimeError(f"sdengine.kernels.{name}: triton is not installed; use {name}_ref "
                           f"or sdengine.kernels.{name.replace('.', '_')} (which falls back to the reference)")
    if not can_launch(t):
        raise RuntimeError(f"sdengine.kernels.{name}: Triton kernels need a CUDA tensor (got device "
                           f"{t.device}); on CPU set TRITON_INTERPRET=1 before importing triton, "
                           f"or call {name}_ref")


def launcher(kernel, t):
    """The kernel to index with a grid.

    While torch.compile / torch.export trace a `triton_op` (the tensors are then Fake or
    Functional subclasses), the kernel is wrapped with torch.library.wrap_triton, so the
    launch shows up in the graph and AOTInductor compiles it into its package. A plain
    eager call gets the bare kernel: wrap_triton's eager dispatch costs ~1 ms a launch.
    """
    import torch

    if _recording is not None:
        return _Recorder(kernel, launch=not t.is_meta)
    if t.is_cuda and (type(t) is not torch.Tensor or torch.compiler.is_compiling()):
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel


def pick(kernel, autotuned, t):
    """The autotuned kernel on CUDA; the plain one under the interpreter, where benchmarking
    every config would only cost time."""
    return autotuned if gpu_path(t) else kernel


class _Recorder:
    """Stands in for `kernel[grid]` while launches are recorded (kernels/precompile.py): notes
    the call, and launches it only on real tensors (a dry run on meta tensors launches nothing)."""

    def __init__(self, kernel, launch: bool):
        self.kernel, self.launch = kernel, launch

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            _recording.append((self.kernel, args, kwargs))
            if self.launch:
                return self.kernel[grid](*args, **kwargs)
        return record


# The interpreter (triton ≤ 3.9) truncates fp32 → bf16 casts where the GPU rounds to nearest
# even; there `cast_out` rounds by hand, so CPU tests see the GPU's rounding. Chosen once at
# import (TRITON_INTERPRET is fixed then), so compiled kernels reference no global.
if INTERPRET:

    @triton.jit
    def cast_out(y, DTYPE: tl.constexpr):
        """y (fp32) cast to the output dtype, rounding to nearest even."""
        if DTYPE == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
            y = bits.to(tl.float32, bitcast=True)
        return y.to(DTYPE)

else:

    @triton.jit
    def cast_out(y, DTYPE: tl.constexpr):
        """y (fp32) cast to the output dtype, rounding to nearest even."""
        return y.to(DTYPE)
