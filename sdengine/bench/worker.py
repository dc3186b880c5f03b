"""One backend of a benchmark run, in a process of its own (the harness's child).

    python -m sdengine.bench.worker SPEC.json

The harness (sdengine/bench/harness.py) writes SPEC.json and reads what this process
appends to the events file it names, one JSON object a line, written and flushed as soon as
it is known:

    {"event": "loaded", "load_s": ...}                      the shared weights, read
    {"event": "unavailable", "reason": ...}                 the backend cannot run here
    {"event": "prepared", "prepare_s": ..., "prepare": {...}}  built, compiled, captured
    {"event": "result", "result": {...}}                    one component measured
    {"event": "skip", "component": ..., "reason": ..., "error": ...}
    {"event": "image", "path": ...}                         the fidelity image, saved (.npy)
    {"event": "done"}

A crash, a hang or an out-of-memory here costs only this backend: the harness records what
arrived, and why the rest did not, and goes on with the next backend. The process exits if
its parent dies (it must never outlive the run).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Optional

import torch

from sdengine.bench import flops, measure
from sdengine.bench.harness import FIDELITY_PROMPT, FIDELITY_SEED, resolve_config
from sdengine.bench.runners import (COMPONENTS, BackendUnavailable, Workload, first_line, hires_of, make_inputs,
                                    make_runner, needs_pipeline, split_backend)

INPUT_SEED_OFFSET = {c: 1000 * (i + 1) for i, c in enumerate(COMPONENTS)}


class Events:
    """Appends one JSON line per event to the harness's events file, flushed at once."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)

    def __call__(self, event: str, **fields):
        self.file.write(json.dumps({"event": event, **fields}) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())


def _exit_with_parent(parent_pid: int):
    """A thread that ends this process when the harness that started it is gone."""
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def run(spec: dict) -> int:
    _exit_with_parent(spec["parent_pid"])
    for path in spec.get("sys_path", []):
        sys.path.insert(0, path)
    emit = Events(spec["events"])
    backend, device = spec["backend"], torch.device(spec["device"])
    dtype = measure.DTYPES[spec["workload"]["dtype"]]
    workload = Workload(**spec["workload"])
    config, _ = resolve_config(spec["arch"], spec["model"])
    torch.manual_seed(0)

    started = time.perf_counter()
    factory = spec.get("runner_factory")
    source = spec["source"]  # the weights folder: the peers and onnx build from it themselves
    if factory or needs_pipeline(split_backend(backend)[0]):
        from sdengine.bench.reference import load_pipeline

        try:
            source = load_pipeline(spec["source"], dtype)  # as a user's from_pretrained(torch_dtype=...)
        except ImportError as e:  # diffusers is not installed in this interpreter (--peer-python)
            emit("unavailable", reason=f"missing package: {e}")
            return 0
    emit("loaded", load_s=round(time.perf_counter() - started, 3))

    started = time.perf_counter()
    try:
        if factory:  # a test's or a plugin's runner: "module:function"
            import importlib

            module, _, name = factory.partition(":")
            runner = getattr(importlib.import_module(module), name)(source, config, workload, device)
        else:
            runner = make_runner(backend, source, config, workload, device, spec["compile_mode"],
                                 threads=spec.get("threads"))
            runner.acceleration = dict(spec.get("acceleration") or {})  # DeepCache, T-GATE, ToMe: end to end
        del source
        measure.free_device_memory(device)
        info = runner.prepare()
    except BackendUnavailable as e:
        emit("unavailable", reason=str(e))
        return 0
    except ImportError as e:
        emit("unavailable", reason=f"missing package: {e}")
        return 0
    measure.synchronize(device)
    emit("prepared", prepare_s=round(time.perf_counter() - started, 3), prepare=info or {})

    measurer = Measurer(spec, config, workload, device, dtype)
    label = spec.get("label", backend)  # "eager+deepcache=3": the backend with an acceleration method on
    for component in spec["components"]:
        try:
            result = measurer.measure(runner, label, component)
        except BackendUnavailable as e:  # e.g. no diffusers scheduler for the sampler
            emit("skip", component=component, reason=str(e), error=False)
            continue
        except Exception as e:  # e.g. torch.cuda.OutOfMemoryError: report it, free what we can, go on
            emit("skip", component=component, reason=f"failed: {type(e).__name__}: {first_line(e)}", error=True)
            measure.free_device_memory(device)
            continue
        emit("result", result=result)
    fidelity = spec.get("fidelity_image")
    if fidelity:  # one image at a fixed prompt and seed, compared with the fp32 reference by the harness
        try:
            import numpy as np

            with torch.inference_mode():
                image = runner.image(FIDELITY_PROMPT, FIDELITY_SEED)
            np.save(fidelity, np.asarray(image, dtype=np.float32))
            emit("image", path=fidelity)
        except Exception as e:  # noqa: BLE001 (the timings stand without it)
            emit("image", error=f"{type(e).__name__}: {first_line(e)}")
    runner.close()
    emit("done")
    return 0


class Measurer:
    """Times one component of a runner: warm-up calls, then timed calls on fresh inputs."""

    def _end_to_end_flop(self, unet_calls) -> int:
        """A whole generation's FLOP; with the hires fix, its second pass's UNet steps and decode at
        the larger size in place of the first decode (runner.unet_calls counts both passes)."""
        w = self.workload
        hires = hires_of(w)
        if hires is None:
            return flops.end_to_end_flop(self.flop, unet_calls or w.steps)
        target = hires.target(w.width, w.height, self.config.vae.downscale)
        second = flops.workload_flop(self.config, target.height, target.width, w.batch)
        steps = hires.schedule(w.steps)[1]
        first_calls = (unet_calls or w.steps + steps) - steps
        return (self.flop["text_encoder"] + first_calls * self.flop["unet_step"] + steps * second["unet_step"]
                + second["vae_decode"])

    def __init__(self, spec: dict, config, workload: Workload, device: torch.device, dtype):
        self.spec, self.config, self.workload, self.device, self.dtype = spec, config, workload, device, dtype
        self.flop = spec["flop"]
        self.peak_tflops = spec["peak_tflops"]

    def calls(self, component: str) -> tuple:
        s = self.spec["settings"]
        return (s["e2e_warmup"], s["e2e_repeats"]) if component == "end_to_end" else (s["warmup"], s["repeats"])

    def measure(self, runner, backend: str, component: str) -> dict:
        warmup, repeats = self.calls(component)
        inputs = make_inputs(component, self.config, self.workload, self.device, self.dtype, warmup + repeats,
                             seed=self.spec["settings"]["seed"] + INPUT_SEED_OFFSET[component])
        fn = getattr(runner, component)
        last_output = []

        def call(args):
            last_output[:] = [fn(args)]

        measure.free_device_memory(self.device)
        memory_before = measure.device_memory_in_use(self.device)
        rss_scope = "component" if measure.reset_peak_memory(self.device) else "process"
        with torch.inference_mode():
            timing = measure.time_calls(call, inputs, warmup, self.device, self.spec["settings"]["budget_s"])
        samples_ms = [round(s, 4) for s in timing.samples_ms]  # 0.1 us: finer than any timer here
        host_ms = [round(s, 4) for s in timing.host_ms]
        result = {"backend": backend, "component": component, "dtype": self.workload.dtype,
                  "threads": torch.get_num_threads(), **measure.summarize(samples_ms),
                  "samples_ms": samples_ms, "host_samples_ms": host_ms,
                  "host_p50_ms": measure.summarize(host_ms)["p50_ms"] if host_ms else None,
                  "warmup_ms": [round(s, 3) for s in timing.warmup_ms],
                  "first_call_ms": round(timing.warmup_ms[0], 3) if timing.warmup_ms else None,
                  "stopped_early": timing.stopped_early}
        flop = self.flop.get(component)
        if component == "end_to_end":
            loop_ms = getattr(runner, "loop_ms", [])[-len(samples_ms):]  # the timed runs' denoising loops
            if len(loop_ms) == len(samples_ms):
                result.update(loop_samples_ms=[round(s, 4) for s in loop_ms],
                              loop_p50_ms=measure.summarize(loop_ms)["p50_ms"])
            if getattr(runner, "acceleration", None):
                result["acceleration"] = dict(runner.acceleration)
            result["unet_calls"] = runner.unet_calls
            result.update(runner.ran())  # the sampler / scheduler that ran; whether the fused step ran it
            flop = self._end_to_end_flop(runner.unet_calls)
            result["it_per_s"] = self.workload.steps / (result["p50_ms"] * 1e-3)  # denoising steps per second
        else:
            result["it_per_s"] = 1e3 / result["p50_ms"]
        tflops = flop / (result["p50_ms"] * 1e-3) / 1e12
        peak = self.peak_tflops
        result.update(
            flop=int(flop), tflops=tflops, pct_of_peak=100 * tflops / peak if peak else None,
            floor_ms=flop / (peak * 1e12) * 1e3 if peak else None,
            peak_mem_bytes=measure.peak_device_memory(self.device), mem_before_bytes=memory_before,
            process_peak_rss_bytes=measure.process_peak_rss(), process_rss_scope=rss_scope,
            nonfinite_output=_nonfinite(last_output[0] if last_output else None),
        )
        return result


def _nonfinite(output) -> Optional[bool]:
    """Whether a component's output holds NaN or inf (None when it is not tensors, e.g. images)."""
    tensors = [t for t in (output if isinstance(output, (tuple, list)) else [output]) if isinstance(t, torch.Tensor)]
    if not tensors:
        return None
    return any(not bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sdengine.bench.worker SPEC.json (written by sdengine bench)", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    return run(spec)


if __name__ == "__main__":
    sys.exit(main())
