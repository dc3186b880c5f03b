"""Devices and dtypes: the one table of dtype names, and the defaults.

    device, dtype = resolve_device_dtype("cuda", "fp16")
    dtype_name(torch.bfloat16)   # "bf16"

Every place that reads or writes a dtype by name (the API and CLIs, export manifests,
engine.json, the benchmark record) goes through `DTYPES` / `dtype_name`.

The default dtype: fp16 on CUDA; on the CPU, bf16 where the CPU has bf16 dot-product
instructions (AMX-BF16 or AVX512-BF16: oneDNN's bf16 matmuls and convolutions then run at about
twice the fp32 rate or more: README, "On a CPU"), fp32 elsewhere (bf16 emulated in fp32 units is
slower than fp32). `SDE_CPU_DTYPE=fp32` (or bf16) overrides that choice for the process.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import torch

from .errors import InvalidArgumentError

# The short names sdengine writes (CLI flags, manifests, engine.json, benchmark records) and
# the long ones it also reads.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32", "fp16" or "bf16"; ValueError for any other dtype."""
    if dtype not in _NAMES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return _NAMES[dtype]


def to_dtype(dtype) -> torch.dtype:
    """A torch dtype from a torch dtype or a name ("fp16", "float16", ...)."""
    if isinstance(dtype, str):
        names = {**DTYPES, **_ALIASES}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
        return names[dtype]
    return dtype


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset:
    """The CPU's bf16/int8 instruction sets that matter here: a subset of {"amx_bf16", "amx_int8",
    "avx512_bf16", "avx512_vnni", "avx512"}. Read from torch's own CPU probe (cpuinfo, the same
    that picks oneDNN's kernels), else from /proc/cpuinfo's flags; never from the vendor's name."""
    probe = getattr(torch, "cpu", None)
    checks = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported",
              "avx512_vnni": "_is_vnni_supported", "avx512": "_is_avx512_supported"}
    if probe is not None and all(hasattr(probe, f) for f in checks.values()):
        found = {name for name, f in checks.items() if getattr(probe, f)()}
        if "amx_bf16" in found:
            found.add("amx_int8")  # AMX tiles come with both (Sapphire Rapids and later)
        return frozenset(found)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    names = {"amx_bf16": "amx_bf16", "amx_int8": "amx_int8", "avx512_bf16": "avx512_bf16",
             "avx512_vnni": "avx512_vnni", "avx512": "avx512f"}
    return frozenset(name for name, flag in names.items() if flag in flags)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16)."""
    return bool(cpu_features() & {"amx_bf16", "avx512_bf16"})


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; on the CPU bf16 where cpu_has_fast_bf16(), else fp32; SDE_CPU_DTYPE overrides
    the CPU's choice (fp32 or bf16)."""
    if device.type == "cuda":
        return torch.float16
    forced = os.environ.get("SDE_CPU_DTYPE")
    if forced:
        if forced not in ("fp32", "bf16"):
            raise InvalidArgumentError("SDE_CPU_DTYPE", f"SDE_CPU_DTYPE must be fp32 or bf16, got {forced!r}")
        return DTYPES[forced]
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


def physical_cores() -> int:
    """The physical cores this process may run on: its CPU affinity, one thread per core (SMT
    siblings share one core's matmul units, so a second thread on a core only adds contention)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("?", str(cpu)))  # no topology: count each CPU as a core
    return max(1, len(cores))


def set_cpu_threads(threads: Optional[int] = None, demo_model: bool = False) -> int:
    """Set torch's intra-op threads and return the count: `threads` when given (>= 1), else 1 for
    the small demo model (more threads only add synchronisation there), else physical_cores()."""
    if threads is not None and threads < 1:
        raise InvalidArgumentError("threads", f"--threads must be >= 1, got {threads}")
    count = threads if threads is not None else 1 if demo_model else physical_cores()
    torch.set_num_threads(count)
    return count


_MALLOC_KEPT: Optional[bool] = None


def keep_freed_memory() -> bool:
    """On glibc, keep freed memory in the process for reuse: no mmap of its own per large
    allocation (M_MMAP_MAX 0) and no trimming of the heap (M_TRIM_THRESHOLD), so that a
    UNet step or a VAE decode does not page-fault its working set in again at every call (with
    glibc's defaults every activation or weight reorder over its mmap threshold, at most 32 MiB,
    is mapped fresh and given back to the kernel at free). The process then keeps its peak memory. Called once by sdengine.load /
    from_diffusers for a CPU pipeline; `SDE_KEEP_FREED_MEMORY=0` leaves glibc's defaults. Returns
    whether the settings are in force."""
    global _MALLOC_KEPT
    if _MALLOC_KEPT is None:
        _MALLOC_KEPT = False
        if os.environ.get("SDE_KEEP_FREED_MEMORY", "1") != "0":
            import ctypes
            import ctypes.util

            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
                return False
            m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
            # no mmap'd chunks at all (the mmap threshold cannot exceed 32 MiB), and no trimming
            _MALLOC_KEPT = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))  # a C int: 2 GiB
    return _MALLOC_KEPT


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA when available; fp16 on CUDA; on the CPU `default_dtype` (bf16 where the CPU
    has bf16 dot products, fp32 elsewhere)."""
    try:
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                              else "cpu")
    except (RuntimeError, TypeError):
        raise InvalidArgumentError("device", f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device", "device='cuda' was requested but torch sees no CUDA device")
    dtype = default_dtype(device) if dtype is None else to_dtype(dtype)
    if dtype not in _NAMES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return device, dtype
