"""The benchmark run: every requested backend on one workload, into one record.

    options = BenchOptions(arch="sd15", backends=("eager", "diffusers"), steps=30, sampler="euler")
    bench = Benchmark(options)
    record = bench.run()          # KeyboardInterrupt: bench.record holds what was measured

Order of work: build the shared random-weight diffusers pipeline once (on the CPU, the
source of every backend's weights); then, for each backend in turn, copy it to the
device, build the backend, time each component (warm-up calls first, then the timed
calls, each on fresh inputs), and free the backend before the next one, so that each
backend's peak memory is its own.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from sdengine.bench import flops, measure
from sdengine.bench.output import utc_now
from sdengine.bench.runners import BACKENDS, COMPONENTS, BackendUnavailable, Workload, first_line, make_inputs, \
    make_runner
from sdengine.bench.schema import SCHEMA_VERSION
from sdengine import samplers
from sdengine.config import PRESETS, ModelConfig, SchedulerConfig, tiny_config

TINY_ARCHS = {"tiny": "sd15", "tiny-sd15": "sd15", "tiny-sd21-v": "sd21-v", "tiny-sdxl": "sdxl"}
ARCHS = tuple(PRESETS) + tuple(TINY_ARCHS)
_INPUT_SEED_OFFSET = {c: 1000 * (i + 1) for i, c in enumerate(COMPONENTS)}


@dataclass
class BenchOptions:
    """One benchmark run. None means: from the model (size), or from the device (dtype)."""

    arch: str = "sd15"
    model: Optional[str] = None  # a diffusers folder instead of random weights
    height: Optional[int] = None
    width: Optional[int] = None
    steps: int = 30
    batch: int = 1
    dtype: Optional[str] = None  # fp16 on CUDA, fp32 on the CPU
    backends: tuple = ("eager", "diffusers")
    components: tuple = COMPONENTS
    repeats: int = 20  # timed calls per component (end to end: e2e_repeats)
    warmup: int = 3
    e2e_repeats: int = 5
    e2e_warmup: int = 1
    budget_s: Optional[float] = 60.0  # per component: stop repeating after this long (at least 3 calls)
    device: Optional[str] = None
    seed: int = 0
    guidance_scale: float = 7.5
    output_type: str = "pil"
    # End-to-end sampler, for sdengine and diffusers alike (sdengine or A1111 names; None: the
    # checkpoint's scheduler). euler: the Triton backend's fused step covers it, and diffusers'
    # EulerDiscreteScheduler is its exact counterpart; the SD1.5 default, PNDM, has no fused step.
    sampler: Optional[str] = "euler"
    compile_mode: str = "max-autotune"
    peak_tflops: Optional[float] = None
    argv: list = field(default_factory=list)  # the command line, for the record

    def __post_init__(self):
        for name in ("steps", "batch", "repeats", "e2e_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "e2e_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ValueError(f"--backends: unknown backend(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from: {', '.join(BACKENDS)}")
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown or not self.components:
            raise ValueError(f"--components: unknown component(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from: {', '.join(COMPONENTS)}")
        if self.model is None and self.arch not in ARCHS:
            raise ValueError(f"--arch: unknown architecture {self.arch!r}; choose from: {', '.join(ARCHS)}")
        if self.dtype is not None and self.dtype not in measure.DTYPES:
            raise ValueError(f"--dtype: unknown dtype {self.dtype!r}; choose from: {', '.join(measure.DTYPES)}")
        if self.sampler is not None:
            try:  # names only here; Benchmark resolves against the model's scheduler config
                samplers.resolve(self.sampler, None, SchedulerConfig())
            except ValueError as e:
                raise ValueError(f"--sampler: {e}") from None


def resolve_config(arch: str, model: Optional[str]) -> tuple[ModelConfig, str]:
    """The model config to time, and the architecture name the record gives it."""
    if model is not None:
        config = ModelConfig.from_diffusers(model)
        return config, config.name
    if arch in TINY_ARCHS:
        return tiny_config(TINY_ARCHS[arch]), arch
    return ModelConfig.from_name(arch), arch


class Benchmark:
    """One run. `record` is filled in as measurements complete (see module docstring)."""

    on_result: Optional[Callable[[], None]] = None  # called after each result or skip lands (checkpoints)

    def __init__(self, options: BenchOptions, log: Callable[[str], None] = None, progress: bool = True):
        self.options = options
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.show_progress = progress
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {options.device}: CUDA is not available on this machine")
        dtype_name = options.dtype or ("fp16" if self.device.type == "cuda" else "fp32")
        self.dtype = measure.DTYPES[dtype_name]
        self.config, arch = resolve_config(options.arch, options.model)
        height = options.height or self.config.default_size
        width = options.width or self.config.default_size
        # pixels per latent cell times the UNet's downsampling, and the pipelines' multiple of 8
        multiple = math.lcm(8, self.config.vae.downscale * 2 ** (len(self.config.unet.block_out_channels) - 1))
        if height % multiple or width % multiple:
            raise ValueError(f"--height/--width {height}x{width}: must be multiples of {multiple} for {arch}")
        try:
            sampler, schedule = samplers.resolve(options.sampler, None, self.config.scheduler)
        except ValueError as e:
            raise ValueError(f"--sampler: {e}") from None
        self.workload = Workload(arch=arch, height=height, width=width, steps=options.steps, batch=options.batch,
                                 dtype=dtype_name, guidance_scale=options.guidance_scale,
                                 output_type=options.output_type, model=options.model, sampler=sampler,
                                 schedule=schedule)
        self.flop = flops.workload_flop(self.config, height, width, options.batch)
        self.peak_tflops, peak_source = measure.peak_tflops(self.device, self.dtype, options.peak_tflops)
        self.started = time.perf_counter()
        commit, dirty = measure.git_commit()
        self.record = {
            "schema_version": SCHEMA_VERSION,
            "created": utc_now(),
            **measure.environment(self.device),
            "commit": commit,
            "dirty": dirty,
            "command": self.command(),
            "argv": list(options.argv),
            "workload": {
                "arch": arch, "height": height, "width": width, "steps": options.steps, "batch": options.batch,
                "dtype": dtype_name, "guidance_scale": options.guidance_scale, "output_type": options.output_type,
                "model": options.model, "sampler": sampler, "schedule": schedule,
            },
            "settings": {
                "backends": list(options.backends), "components": list(options.components),
                "repeats": options.repeats, "warmup": options.warmup, "e2e_repeats": options.e2e_repeats,
                "e2e_warmup": options.e2e_warmup, "budget_s": options.budget_s, "seed": options.seed,
                "compile_mode": options.compile_mode,
                "timer": "cuda events" if self.device.type == "cuda" else "time.perf_counter",
            },
            "flop": dict(self.flop),
            "params": flops.model_params(self.config),
            "peak_tflops": self.peak_tflops,
            "peak_tflops_source": peak_source,
            "floor_ms": self._floor_ms(unet_calls=None),
            "results": [],
            "complete": False,
            "interrupted": None,
            "wall_s": 0.0,
        }

    def command(self) -> str:
        """The run as one explicit `sdengine bench` command line (every default spelled out)."""
        o, w = self.options, self.workload
        parts = ["sdengine", "bench"]
        parts += ["--model", o.model] if o.model else ["--arch", o.arch]
        parts += ["--height", str(w.height), "--width", str(w.width), "--steps", str(w.steps),
                  "--sampler", w.sampler if w.schedule == "default" else f"{w.sampler}_{w.schedule}",
                  "--batch", str(w.batch),
                  "--dtype", w.dtype, "--backends", ",".join(o.backends), "--components", ",".join(o.components),
                  "--repeats", str(o.repeats), "--warmup", str(o.warmup), "--e2e-repeats", str(o.e2e_repeats),
                  "--e2e-warmup", str(o.e2e_warmup), "--device", self.device.type, "--seed", str(o.seed)]
        if o.budget_s is not None:
            parts += ["--budget", f"{o.budget_s:g}"]
        if "diffusers-compile" in o.backends:
            parts += ["--compile-mode", o.compile_mode]
        if o.peak_tflops is not None:
            parts += ["--peak-tflops", f"{o.peak_tflops:g}"]
        return measure.shell_command(parts)

    # The run ------------------------------------------------------------------

    def calls_per_component(self, component: str) -> tuple[int, int]:
        o = self.options
        return (o.e2e_warmup, o.e2e_repeats) if component == "end_to_end" else (o.warmup, o.repeats)

    def run(self) -> dict:
        from tqdm.auto import tqdm

        o = self.options
        total = len(o.backends) * sum(sum(self.calls_per_component(c)) for c in o.components)
        self.bar = tqdm(total=total, desc="bench", unit="call", disable=not self.show_progress or None,
                        file=sys.stderr, dynamic_ncols=True)
        self.write = (lambda message: tqdm.write(message, file=sys.stderr)) if self.show_progress else self.log
        try:
            source = self._source_pipeline()
            for backend in o.backends:
                self._run_backend(backend, source)
            self.record["complete"] = True
        finally:
            self.bar.close()
            self.finish()
        return self.record

    def interrupted(self, reason: str):
        """Mark the record as cut short; what was measured stays in it."""
        self.record["complete"] = False
        self.record["interrupted"] = reason
        self.finish()

    def finish(self):
        """Ratios to eager diffusers, the end-to-end floor, the wall time."""
        results = [r for r in self.record["results"] if "skipped" not in r]
        reference = {r["component"]: r["p50_ms"] for r in results if r["backend"] == "diffusers"}
        for r in results:
            r["speedup_vs_diffusers"] = reference[r["component"]] / r["p50_ms"] \
                if r["component"] in reference and r["p50_ms"] > 0 else None
        calls = next((r["unet_calls"] for r in results if r["component"] == "end_to_end" and r.get("unet_calls")), None)
        self.record["floor_ms"] = self._floor_ms(calls)
        self.record["workload"]["unet_calls"] = calls
        self.record["wall_s"] = round(time.perf_counter() - self.started, 3)

    def _floor_ms(self, unet_calls: Optional[int]) -> dict:
        """The physical floor of each component: its FLOP at the device's peak rate."""
        flop = dict(self.flop, end_to_end=flops.end_to_end_flop(self.flop, unet_calls or self.options.steps))
        return {c: f / (self.peak_tflops * 1e12) * 1e3 for c, f in flop.items()}

    def _source_pipeline(self):
        """The diffusers pipeline every backend's weights come from, kept on the CPU."""
        from sdengine.bench.reference import load_pipeline, reference_pipeline

        t0 = time.perf_counter()
        if self.options.model is not None:
            pipe = load_pipeline(self.options.model, self.dtype)
            what = self.options.model
        else:
            # Random initialisation is much faster on the GPU; the copy then waits on the CPU.
            pipe = reference_pipeline(self.config, device=self.device, dtype=self.dtype, seed=self.options.seed)
            pipe.to("cpu")
            what = f"random {self.workload.arch} weights"
        measure.free_device_memory(self.device)
        self.write(f"built the shared diffusers pipeline ({what}, {self.workload.dtype}) "
                   f"in {time.perf_counter() - t0:.1f} s")
        return pipe

    def _skip(self, backend: str, reason: str, component: Optional[str] = None, error: bool = False):
        entry = {"backend": backend, "skipped": reason}
        if component is not None:
            entry["component"] = component
        if error:
            entry["error"] = True
        self.record["results"].append(entry)
        self.write(f"{backend}{' ' + component if component else ''}: skipped ({reason})")
        self._landed()

    def _landed(self):
        if self.on_result is not None:
            self.on_result()

    def _run_backend(self, backend: str, source):
        o = self.options
        calls = sum(sum(self.calls_per_component(c)) for c in o.components)
        self.bar.set_description(f"{backend}: setup")
        t0 = time.perf_counter()
        try:
            runner = make_runner(backend, source, self.config, self.workload, self.device, o.compile_mode)
        except BackendUnavailable as e:
            self._skip(backend, str(e))
            self.bar.update(calls)
            return
        except ImportError as e:
            self._skip(backend, f"missing package: {e}")
            self.bar.update(calls)
            return
        except Exception as e:  # a broken backend is reported, never crashes the run
            self._skip(backend, f"failed to build: {type(e).__name__}: {first_line(e)}", error=True)
            self.bar.update(calls)
            return
        setup_s = time.perf_counter() - t0
        try:
            for component in o.components:
                warmup, repeats = self.calls_per_component(component)
                try:
                    result = self._measure(runner, backend, component)
                except BackendUnavailable as e:  # e.g. no diffusers scheduler for the sampler
                    self._skip(backend, str(e), component)
                    self.bar.update(warmup + repeats)
                    continue
                except Exception as e:  # e.g. torch.cuda.OutOfMemoryError: report it, free what we can, go on
                    self._skip(backend, f"failed: {type(e).__name__}: {first_line(e)}", component, error=True)
                    measure.free_device_memory(self.device)
                    self.bar.update(warmup + repeats)  # whatever was left of its calls
                    continue
                result["setup_s"] = round(setup_s, 3)
                self.record["results"].append(result)
                self.write(self._describe(result))
                self._landed()
        finally:
            runner.close()
            del runner
            measure.free_device_memory(self.device)

    def _measure(self, runner, backend: str, component: str) -> dict:
        warmup, repeats = self.calls_per_component(component)
        inputs = make_inputs(component, self.config, self.workload, self.device, self.dtype, warmup + repeats,
                             seed=self.options.seed + _INPUT_SEED_OFFSET[component])
        self.bar.set_description(f"{backend}: {component}")
        fn = getattr(runner, component)
        last_output = []

        def call(args):
            last_output[:] = [fn(args)]

        measure.free_device_memory(self.device)
        memory_before = measure.device_memory_in_use(self.device)
        rss_scope = "component" if measure.reset_peak_memory(self.device) else "process"
        done = [0]

        def on_call():
            done[0] += 1
            self.bar.update(1)

        with torch.inference_mode():
            timing = measure.time_calls(call, inputs, warmup, self.device, self.options.budget_s, on_call)
        self.bar.update(warmup + repeats - done[0])  # calls the time budget skipped
        samples_ms = [round(s, 4) for s in timing.samples_ms]  # 0.1 us: finer than any timer here
        result = {"backend": backend, "component": component, **measure.summarize(samples_ms), "samples_ms": samples_ms,
                  "warmup_ms": [round(s, 3) for s in timing.warmup_ms], "stopped_early": timing.stopped_early}
        flop = self.flop.get(component)
        if component == "end_to_end":
            result["unet_calls"] = runner.unet_calls
            result.update(runner.ran())  # the sampler / scheduler that ran; whether the fused step ran it
            flop = flops.end_to_end_flop(self.flop, runner.unet_calls or self.workload.steps)
            result["it_per_s"] = self.workload.steps / (result["p50_ms"] * 1e-3)  # denoising steps per second
        else:
            result["it_per_s"] = 1e3 / result["p50_ms"]
        tflops = flop / (result["p50_ms"] * 1e-3) / 1e12
        result.update(
            flop=int(flop), tflops=tflops, pct_of_peak=100 * tflops / self.peak_tflops,
            floor_ms=flop / (self.peak_tflops * 1e12) * 1e3,
            peak_mem_bytes=measure.peak_device_memory(self.device), mem_before_bytes=memory_before,
            process_peak_rss_bytes=measure.process_peak_rss(), process_rss_scope=rss_scope,
            nonfinite_output=_nonfinite(last_output[0] if last_output else None),
        )
        return result

    def _describe(self, r: dict) -> str:
        mem = f", peak {r['peak_mem_bytes'] / 2 ** 30:.2f} GiB" if r["peak_mem_bytes"] else ""
        warm = f", first call {r['warmup_ms'][0]:.1f} ms" if r["warmup_ms"] else ""
        return (f"{r['backend']} {r['component']}: p50 {r['p50_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms, "
                f"min {r['min_ms']:.3f} ms (n={len(r['samples_ms'])}{warm}), {r['tflops']:.3g} TFLOP/s "
                f"= {r['pct_of_peak']:.3g}% of peak{mem}")


def _nonfinite(output) -> Optional[bool]:
    """Whether a component's output holds NaN or inf (None when it is not tensors, e.g. images)."""
    tensors = [t for t in (output if isinstance(output, (tuple, list)) else [output]) if isinstance(t, torch.Tensor)]
    if not tensors:
        return None
    return any(not bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
