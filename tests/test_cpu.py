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
