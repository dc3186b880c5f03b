"""Shared test setup.

On a machine without CUDA, Triton kernels run through Triton's interpreter
(TRITON_INTERPRET=1). It must be set before triton is first imported, hence here.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Most tests compare with fp32 references at fp32 tolerances: they run in fp32 unless they ask for
# another dtype, whatever the CPU (sdengine picks bf16 by default on CPUs with bf16 dot products:
# tests/test_cpu.py checks that choice with this variable removed).
os.environ.setdefault("SDE_CPU_DTYPE", "fp32")

# The test networks are tiny: one intra-op thread is fastest (with 2 threads, a tiny UNet
# forward was ~50x slower on a loaded 2-core machine).
torch.set_num_threads(1)


# What pip resolved, printed first in every run (also under -q): a fresh clone takes that
# day's versions, and a failing run should show at once what moved.
REPORTED_DISTRIBUTIONS = ("torch", "triton", "transformers", "diffusers", "kernels", "huggingface_hub", "peft",
                          "accelerate", "onnx", "onnxruntime", "safetensors", "tokenizers", "numpy")


def resolved_versions() -> str:
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return ", ".join(f"{name} {version(name)}" for name in REPORTED_DISTRIBUTIONS)


def pytest_sessionstart(session):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"resolved versions: {resolved_versions()}")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
