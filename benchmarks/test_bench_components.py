"""pytest-benchmark suite: each component of each backend, for pytest-benchmark's compare view.

    pytest benchmarks/test_bench_components.py --benchmark-only --benchmark-autosave
    pytest-benchmark compare --group-by=group        # regressions between saved runs

The workload is SD1.5 at 512x512 in fp16 on a GPU, the tiny SD1.5 config in fp32 on the
CPU. The calls are those of `sdengine bench` (sdengine.bench.runners): every backend is
built from one random-weight diffusers pipeline, every round gets fresh random inputs,
and GPU rounds synchronise the device. Each test's group is the component, so the
compare view lines the backends up against eager diffusers; extra_info carries the
analytic FLOP count of one call.
"""


import pytest
import torch

from sdengine.bench import flops
from sdengine.bench.reference import reference_pipeline
from sdengine.bench.runners import BackendUnavailable, Workload, make_inputs, make_runner
from sdengine.config import PRESETS, tiny_config

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.float16 if CUDA else torch.float32
CONFIG = PRESETS["sd15"] if CUDA else tiny_config("sd15")
SIZE = 512 if CUDA else 16
WORKLOAD = Workload("sd15" if CUDA else "tiny", SIZE, SIZE, steps=30 if CUDA else 2, batch=1,
                    dtype="fp16" if CUDA else "fp32")
FLOP = flops.workload_flop(CONFIG, SIZE, SIZE)
ROUNDS = {"text_encoder": 50, "unet_step": 30, "vae_decode": 20} if CUDA else \
    {"text_encoder": 5, "unet_step": 5, "vae_decode": 5}
WARMUP = 3 if CUDA else 1


@pytest.fixture(scope="module")
def source():
    pipe = reference_pipeline(CONFIG, device=DEVICE, dtype=DTYPE)
    return pipe.to("cpu")


@pytest.fixture(scope="module", params=["diffusers", "eager", "triton", "aoti"])
def runner(request, source):
    try:
        built = make_runner(request.param, source, CONFIG, WORKLOAD, DEVICE)
    except (BackendUnavailable, ImportError) as e:
        pytest.skip(f"{request.param} unavailable: {e}")
    yield request.param, built
    built.close()
    if CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("component", ["text_encoder", "unet_step", "vae_decode"])
def test_component(benchmark, runner, component):
    name, built = runner
    rounds = ROUNDS[component]
    inputs = iter(make_inputs(component, CONFIG, WORKLOAD, DEVICE, DTYPE, rounds + WARMUP + 1, seed=rounds))
    fn = getattr(built, component)
    with torch.inference_mode():
        fn(next(inputs))  # compilation / autotuning stays outside the rounds

        def call():
            fn(next(inputs))
            if CUDA:
                torch.cuda.synchronize()

        benchmark.group = f"{WORKLOAD.arch} {SIZE}px {WORKLOAD.dtype}: {component}"
        benchmark.extra_info.update(backend=name, flop=FLOP[component], device=str(DEVICE))
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=WARMUP, iterations=1)
