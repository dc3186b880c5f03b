"""Timing, memory and environment probes for the benchmark.

Timing method (METHOD.md of the device notes): warm up first; on CUDA, synchronise,
then time each call between two CUDA events, so that every sample is the latency of
one isolated call, launch overhead included; on the CPU, `time.perf_counter`.
Every call gets its own freshly drawn inputs, prepared before the clock starts.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import shlex
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from sdengine.device import DTYPES, dtype_name  # noqa: F401 (DTYPES: the benchmark's --dtype names)

# Dense fp16/bf16 matmul rate measured on the lent machines, TFLOP/s (ANCHORS.md: 790-798 on
# an H100 SXM; 769-798 on an H200). The floor in ANCHORS.md (2.03 ms per SD1.5 UNet step
# with CFG) divides by 790; so do we, so that records and anchors agree.
MEASURED_PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

@dataclass
class Timing:
    warmup_ms: list  # each warm-up call (the first one includes compilation / autotuning)
    samples_ms: list  # each timed call: its latency (device time on CUDA, between two events)
    stopped_early: bool = False  # the time budget ran out before all repeats were done
    host_ms: list = None  # each timed call: CPU time until it returned (on CUDA: launches issued, no sync)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable, inputs: Sequence, warmup: int, device: torch.device,
               budget_s: Optional[float] = None, on_sample: Optional[Callable] = None) -> Timing:
    """Call fn(inputs[i]) for each input: the first `warmup` calls are warm-up, the rest timed.

    Each timed call starts on an idle device (synchronised). On CUDA its latency is the time
    between a CUDA event recorded before it and one after it (launch overhead included), and
    its host time is the CPU time until fn returned (what a launch-bound call spends issuing
    work); on the CPU both are the wall time. budget_s stops the timed calls once that much
    wall time has passed (at least 3 are always taken, or as many as there are). on_sample()
    is called after each call.
    """
    warmup_ms, samples_ms, host_ms = [], [], []
    cuda = device.type == "cuda"
    started = time.perf_counter()
    stopped_early = False
    events = []
    for i, args in enumerate(inputs):
        timed = i >= warmup
        if timed and budget_s is not None and len(samples_ms) + len(events) >= 3 \
                and time.perf_counter() - started > budget_s:
            stopped_early = True
            break
        synchronize(device)
        if cuda and timed:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            fn(args)
            host_ms.append((time.perf_counter() - t0) * 1e3)
            end.record()
            events.append((start, end))
        else:
            t0 = time.perf_counter()
            fn(args)
            synchronize(device)
            elapsed = (time.perf_counter() - t0) * 1e3
            (samples_ms if timed else warmup_ms).append(elapsed)
            if timed:
                host_ms.append(elapsed)
        if not timed:
            started = time.perf_counter()  # the budget counts timed calls only
        if on_sample is not None:
            on_sample()
    synchronize(device)
    samples_ms += [start.elapsed_time(end) for start, end in events]
    return Timing(warmup_ms, samples_ms, stopped_early, host_ms)


def summarize(samples_ms: Sequence[float]) -> dict:
    """p50, p90, min, mean and standard deviation of a list of milliseconds."""
    values = np.asarray(samples_ms, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p90_ms": float(np.percentile(values, 90)),
        "min_ms": float(values.min()),
        "mean_ms": float(values.mean()),
        "std_ms": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
    }


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------

def reset_peak_memory(device: torch.device) -> bool:
    """Reset the device's and the process's peak-memory counters.

    Returns whether the process peak (VmHWM) could be reset: Linux resets it when "5" is
    written to /proc/self/clear_refs; elsewhere the process peak is the lifetime peak.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_device_memory(device: torch.device) -> Optional[int]:
    """torch.cuda.max_memory_allocated since the last reset; None on the CPU."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def device_memory_in_use(device: torch.device) -> Optional[int]:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def process_peak_rss() -> int:
    """Peak resident set size of this process in bytes (VmHWM, else getrusage's ru_maxrss)."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kB on Linux


def free_device_memory(device: torch.device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Peak arithmetic rate
# ---------------------------------------------------------------------------

def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """This device's best dense rate in dtype, at the current thread count, on random data.

    CUDA: one 8192-cube matmul, the median of 10. The CPU: the fastest of 1024- and 1536-cube
    matmuls (a CPU's GEMM rate still grows past 1024) and a 3x3 convolution at the VAE decoder's
    shape (512 channels, 64x64, channels_last), each the fastest of 4 calls: a peak is a best case,
    and other work on a shared CPU only slows calls down. (The median of 1024-cube products, in
    the run's dtype only, put CPU rows at 98-248% of "peak"; matmuls alone left the fp32 VAE
    decode, whose oneDNN convolutions run faster than a 1536-cube GEMM, at 104%.)"""
    generator = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        cases, calls, pick = [(8192,)], 13, np.median
    else:
        cases, calls, pick = [(1024,), (1536,), (512, 64, 3)], 6, np.min
    best = 0.0
    for case in cases:
        if len(case) == 1:  # (n,): an n-cube matmul
            n = case[0]
            a = torch.randn(n, n, device=device, generator=generator).to(dtype)
            b = torch.randn(n, n, device=device, generator=generator).to(dtype)
            fn, flop = (lambda _: torch.mm(a, b)), 2 * n ** 3
        else:  # (channels, size, kernel): a same-padded convolution, batch 1
            channels, size, kernel = case
            x = torch.randn(1, channels, size, size, device=device, generator=generator).to(dtype)
            w = torch.randn(channels, channels, kernel, kernel, device=device, generator=generator).to(dtype)
            x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
            fn = lambda _: torch.nn.functional.conv2d(x, w, padding=kernel // 2)  # noqa: E731
            flop = 2 * channels * channels * kernel * kernel * size * size
        timing = time_calls(fn, [None] * calls, warmup=2, device=device)
        best = max(best, flop / (float(pick(timing.samples_ms)) * 1e-3) / 1e12)
    return best


def peak_tflops(device: torch.device, dtype: torch.dtype, override: Optional[float] = None) -> tuple[float, str]:
    """The arithmetic ceiling used for the floor and the % of peak, and where it came from."""
    if override is not None:
        return override, "--peak-tflops"
    name = device_name(device)
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        for key, tflops in MEASURED_PEAK_TFLOPS.items():
            if key in name:
                return tflops, f"ANCHORS.md: {key} dense fp16/bf16 matmul measured on random data"
    if device.type == "cuda":
        return measure_peak_tflops(device, dtype), f"measured now: 8192x8192x8192 matmul in {dtype_name(dtype)}"
    return measure_peak_tflops(device, dtype), (f"measured now: the best of 1024/1536-cube matmuls and a "
                                                  f"512-channel 3x3 convolution at 64x64 in {dtype_name(dtype)} "
                                                  f"on {torch.get_num_threads()} threads")


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if match:
            return f"CPU: {match.group(1).strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def _run(command: list, cwd=None) -> Optional[str]:
    try:
        out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> tuple[str, Optional[bool]]:
    """The commit of the sdengine checkout and whether tracked files differ from it.

    The SDENGINE_COMMIT environment variable, when set, names the commit (a copied working
    tree, whose .git may be stale or absent: the GPU machine's); then whether files differ is
    not known (None). Without it and without a git checkout: "unknown".
    """
    if os.environ.get("SDENGINE_COMMIT"):
        return os.environ["SDENGINE_COMMIT"], None
    root = Path(__file__).resolve().parents[2]
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if commit is None:
        return os.environ.get("SDENGINE_COMMIT", "unknown"), None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return commit, bool(status) if status is not None else None


def environment(device: torch.device) -> dict:
    """Device, driver and software versions for the record."""
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "driver": None,
        "cpu_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "triton": package_version("triton"),
            "diffusers": package_version("diffusers"),
            "transformers": package_version("transformers"),
            "onnxruntime": package_version("onnxruntime") or package_version("onnxruntime-gpu"),
            "sdengine": package_version("sdengine"),
        },
        "host": platform.node(),
    }
    if device.type == "cuda":
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                              f"--id={device.index or 0}"])
        props = torch.cuda.get_device_properties(device)
        env["device_memory_bytes"] = int(props.total_memory)
        env["multiprocessors"] = int(props.multi_processor_count)
    return env


def shell_command(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
