"""pytest-benchmark suite for sdengine.kernels: each kernel and its torch counterpart.

    python -m pytest benchmarks/test_kernels_bench.py --benchmark-json out.json

The cases (SD1.5 shapes on a GPU, tiny smoke shapes on a CPU under the Triton interpreter)
come from `sdengine.kernels.bench.cases`, so both benchmarks time the same work. Each GPU
round synchronises the device. `python -m sdengine.kernels.bench` additionally prints
GB/s, TFLOP/s and % of the measured peaks.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sdengine.kernels import bench  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {case.name: case for case in bench.cases(DEVICE, tiny=DEVICE == "cpu")}


@pytest.mark.parametrize("impl", ["sdengine", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_bench(benchmark, name, impl):
    case = CASES[name]
    fn = case.ours if impl == "sdengine" else case.theirs
    fn()  # compile / autotune outside the timing

    def call():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = name
    benchmark.extra_info.update(shape=case.shape, flops=case.flops, bytes=case.bytes,
                                torch_counterpart=case.theirs_label, device=DEVICE)
    if DEVICE == "cpu":
        benchmark.pedantic(call, rounds=2, iterations=1)
    else:
        benchmark(call)
