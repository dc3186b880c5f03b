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

# The test networks are tiny: one intra-op thread is fastest (with 2 threads, a tiny UNet
# forward was ~50x slower on a loaded 2-core machine).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
