"""The CPU defaults (sdengine/device.py): bf16 where the CPU multiplies bf16 in hardware, fp32
elsewhere, and threads on the physical cores.

References: torch's own CPU probe (cpuinfo) and /proc/cpuinfo's flags for the capability; the
kernel's CPU topology (/sys) for the cores. The fidelity of bf16 against fp32 is checked on the
demo model's digits (tests/test_demo.py) and per benchmark run (the fidelity MAE of every row).
"""

import os
from pathlib import Path

import pytest
import torch

import sdengine
from sdengine import api, device
from sdengine.errors import InvalidArgumentError


@pytest.fixture
def cpu(monkeypatch):
    """No SDE_CPU_DTYPE (tests/conftest.py sets fp32 for the suite), and a CPU of our choosing."""
    monkeypatch.delenv("SDE_CPU_DTYPE", raising=False)

    def with_features(*names):
        monkeypatch.setattr(device, "cpu_features", lambda: frozenset(names))

    return with_features


def test_bf16_by_default_only_where_the_cpu_multiplies_bf16(cpu):
    cpu("avx512", "avx512_bf16", "avx512_vnni")  # e.g. AMD Zen 4, Intel Cooper Lake
    assert device.resolve_device_dtype("cpu") == (torch.device("cpu"), torch.bfloat16)
    cpu("amx_bf16", "amx_int8", "avx512")  # Sapphire Rapids and later
    assert device.default_dtype(torch.device("cpu")) == torch.bfloat16
    cpu("avx512", "avx512_vnni")  # AVX-512 without bf16 dot products: bf16 would be emulated, slower
    assert device.default_dtype(torch.device("cpu")) == torch.float32
    cpu()
    assert device.default_dtype(torch.device("cpu")) == torch.float32
    assert device.resolve_device_dtype("cpu", "fp32")[1] == torch.float32  # asked for: kept


def test_sde_cpu_dtype_overrides_the_choice(cpu, monkeypatch):
    cpu("avx512_bf16")
    monkeypatch.setenv("SDE_CPU_DTYPE", "fp32")
    assert device.default_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setenv("SDE_CPU_DTYPE", "fp16")
    with pytest.raises(InvalidArgumentError, match="SDE_CPU_DTYPE"):
        device.default_dtype(torch.device("cpu"))


def test_features_agree_with_proc_cpuinfo():
    """torch's probe and the kernel's flags name the same bf16 capability on this machine."""
    device.cpu_features.cache_clear()
    found = device.cpu_features()
    flags = next(line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags"))
    assert ("avx512_bf16" in found) == ("avx512_bf16" in flags)
    assert ("amx_bf16" in found) == ("amx_bf16" in flags)


def test_load_picks_bf16_for_torch_backends_and_fp32_for_fp32_exports(cpu):
    cpu("avx512_bf16")
    pipe = sdengine.load(device="cpu")  # the demo model, eager
    assert pipe.backend.dtype == torch.bfloat16
    assert api._device_dtype(None, None, "onnx")[1] == torch.float32  # its exports are fp32 / fp16
    assert api._device_dtype(None, None, "native")[1] == torch.float32
    assert api._device_dtype(None, "bf16", "native")[1] == torch.bfloat16  # asked for: kept
    cpu()
    assert sdengine.load(device="cpu").backend.dtype == torch.float32


def test_physical_cores():
    cores = device.physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    siblings = {Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
                for c in os.sched_getaffinity(0)}
    assert cores == len(siblings)  # one per set of SMT siblings


FAULTS_SCRIPT = """
import resource, torch
from sdengine.device import keep_freed_memory
kept = keep_freed_memory()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB: above glibc's largest default mmap threshold (32 MiB)
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # what a UNet step does with its large activations, every call
    x = torch.ones(64 * 2**20 // 4)
    del x
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_value):
    import subprocess
    import sys

    env = dict(os.environ, SDE_KEEP_FREED_MEMORY=env_value)
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="glibc/Linux page-fault counts")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """glibc maps each allocation over its mmap threshold fresh and returns it at free: every
    call page-faults its buffers in again. keep_freed_memory() (sdengine.load on the CPU) keeps
    them: the same ten 64 MiB allocations then fault in once, not ten times."""
    kept, faults_kept = _faults("1")
    default, faults_default = _faults("0")
    assert kept and not default
    assert faults_default >= 10 * 16384 * 0.9  # each 64 MiB (16384 pages of 4 KiB) faulted in again
    assert faults_kept <= faults_default / 4
