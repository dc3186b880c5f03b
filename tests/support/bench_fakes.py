"""Runners that misbehave, for the harness's robustness tests (tests/test_bench.py). The
harness builds them in a backend's own process through BenchOptions.runner_factories."""

import os
import time

from sdengine.bench.runners import EngineRunner


class _Eager(EngineRunner):
    def __init__(self, source, config, workload, device):
        super().__init__("eager", source, config, workload, device)


class Crashing(_Eager):
    """Measures the text encoder, then dies outright in the UNet step (no Python cleanup, as a
    segfault in native code or the OOM killer would)."""

    def unet_step(self, inputs):
        os._exit(9)


class Hanging(_Eager):
    """Never finishes preparing (a compile that never ends)."""

    def prepare(self):
        while True:
            time.sleep(1)


def crashing(source, config, workload, device):
    return Crashing(source, config, workload, device)


def hanging(source, config, workload, device):
    return Hanging(source, config, workload, device)


def raising(source, config, workload, device):
    raise RuntimeError("the engine failed to build: no kernel image for this device")
