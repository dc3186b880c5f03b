"""Setup of the pytest-benchmark suites in benchmarks/ (run explicitly:
`pytest benchmarks/ --benchmark-only`; the repository's `testpaths` keeps them out of a
plain `pytest`). Without CUDA, Triton kernels run through its interpreter, which must be
chosen before triton is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(min(torch.get_num_threads(), 2))  # CI: 2 shared cores
