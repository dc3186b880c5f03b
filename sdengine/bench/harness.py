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

import dataclasses
import json
import math
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from sdengine.bench import flops, measure
from sdengine.bench.output import utc_now
from sdengine.bench.runners import (BACKENDS, COMPONENTS, ENGINE_BACKENDS, PEER_BACKENDS, Workload, check_backend,
                                    first_line, precheck, row_dtype, split_backend)
from sdengine.bench.schema import SCHEMA_VERSION
from sdengine import samplers
from sdengine.config import PRESETS, ModelConfig, SchedulerConfig, tiny_config
from sdengine.device import default_dtype

TINY_ARCHS = {"tiny": "sd15", "tiny-sd15": "sd15", "tiny-sd21-v": "sd21-v", "tiny-sdxl": "sdxl"}
ARCHS = tuple(PRESETS) + tuple(TINY_ARCHS)
# The fidelity image (sdengine/bench/worker.py makes it): the same prompt and seed for every
# backend and the fp32 reference.
FIDELITY_PROMPT = "a photograph of an astronaut riding a horse on the moon"
FIDELITY_SEED = 1234
ACCELERATION_METHODS = ("deepcache", "tgate", "tome")  # sdengine bench --deepcache N / --tgate N / --tome R


def accelerated_label(backend: str, name: str, value) -> str:
    """The row of a backend with an acceleration method on: "eager+deepcache=3"."""
    return f"{backend}+{name}={value:g}"


@dataclass
class BenchOptions:
    """One benchmark run. None means: from the model (size), or from the device (dtype)."""

    arch: str = "sd15"
    model: Optional[str] = None  # a diffusers folder instead of random weights
    height: Optional[int] = None
    width: Optional[int] = None
    steps: int = 30
    batch: int = 1
    dtype: Optional[str] = None  # of the rows without @dtype; None: sdengine's default on the device
    backends: tuple = ("eager", "diffusers")
    components: tuple = COMPONENTS
    repeats: int = 20  # timed calls per component (end to end: e2e_repeats)
    warmup: int = 3
    e2e_repeats: int = 10
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
    controlnets: int = 0  # ControlNets in the UNet step and end to end (random, from the UNet; sdengine bench --controlnet)
    # (method, setting) pairs of sdengine/acceleration.py, e.g. (("deepcache", 3),): each adds, for every
    # sdengine backend, an end-to-end row with the method on, in the same run (sdengine bench --deepcache 3)
    acceleration: tuple = ()
    hires_scale: float = 0.0  # end to end with A1111's hires fix at this scale (sdengine bench --hires; runners.hires_of)
    ip_adapters: int = 0  # end to end with IP-Adapters (random; sdengine bench --ip-adapter; runners.ip_adapters_for)
    compile_mode: str = "max-autotune"
    peak_tflops: Optional[float] = None
    argv: list = field(default_factory=list)  # the command line, for the record
    # Each backend runs in a process of its own: at most prepare_cap_s from its start until it is
    # built, compiled and captured, then at most run_cap_s for its components.
    prepare_cap_s: float = 600.0
    run_cap_s: float = 600.0
    # Runners that are not sdengine's backends (tests, plugins): backend name -> "module:function",
    # called as function(source_pipe, config, workload, device) in the backend's process, whose
    # sys.path gets sys_path first.
    runner_factories: dict = field(default_factory=dict)
    sys_path: tuple = ()
    # Each backend's image at a fixed prompt and seed against eager sdengine in fp32 on the same
    # weights (mean absolute error, in [0, 1] pixel units). None: when the run is not fp32.
    fidelity: Optional[bool] = None
    # Runner -> the interpreter its process runs under (sdengine bench --peer-python NAME=PATH): a peer
    # measured in the environment its users install (benchmarks/README.md, "Peers").
    peer_python: dict = field(default_factory=dict)
    # CPU threads of every backend's process (torch, OpenVINO, stable-diffusion.cpp, onnxruntime);
    # None: the physical cores this process may run on (sdengine.device.physical_cores).
    threads: Optional[int] = None
    # Where the random weights are kept between runs (None: $SDE_CACHE_DIR/bench-weights/<arch>-seed<N>),
    # so that the exports of the rows that build from them (onnx, the peers) are cached too.
    weights_dir: Optional[str] = None

    def __post_init__(self):
        for name in ("steps", "batch", "repeats", "e2e_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("prepare_cap_s", "run_cap_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name[:-2].replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("warmup", "e2e_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if not self.backends:
            raise ValueError(f"--backends: none given; choose from: {', '.join(BACKENDS)}")
        for backend in self.backends:
            problem = check_backend(backend, tuple(self.runner_factories))
            if problem:
                raise ValueError(f"--backends: {problem}")
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"--backends: a backend is named twice in {','.join(self.backends)}")
        for name, path in self.peer_python.items():
            if name not in {split_backend(b)[0] for b in self.backends}:
                raise ValueError(f"--peer-python {name}={path}: {name} is not in --backends")
            if not Path(path).is_file():
                raise FileNotFoundError(f"--peer-python {name}={path}: no such interpreter")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown or not self.components:
            raise ValueError(f"--components: unknown component(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from: {', '.join(COMPONENTS)}")
        if self.ip_adapters and set(self.components) != {"end_to_end"}:
            raise ValueError("--ip-adapter times end to end only (the image prompt reaches the UNet through the "
                             "pipeline): give --components end_to_end")
        if self.model is None and self.arch not in ARCHS:
            raise ValueError(f"--arch: unknown architecture {self.arch!r}; choose from: {', '.join(ARCHS)}")
        if self.dtype is not None and self.dtype not in measure.DTYPES:
            raise ValueError(f"--dtype: unknown dtype {self.dtype!r}; choose from: {', '.join(measure.DTYPES)}")
        for name, value in self.acceleration:
            from sdengine.acceleration import as_option

            if name not in ACCELERATION_METHODS:
                raise ValueError(f"acceleration: unknown method {name!r}; choose from {', '.join(ACCELERATION_METHODS)}")
            try:
                as_option(value, name)
            except ValueError as e:
                raise ValueError(f"--{name}: {e}") from None
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


def worker_command(spec_path: Path, python: Optional[str] = None) -> list[str]:
    """`python -P -m sdengine.bench.worker SPEC`. -P keeps the caller's working directory off
    the worker's sys.path: a folder there named like an installed package would hide it (the
    repo root's kernels/ once hid PyPI's `kernels`, which transformers imports, and every
    diffusers row was lost). Python 3.10 has no -P; there the directory stays on the path."""
    if python is not None:  # --peer-python: its own version decides whether it has -P
        return [python, "-c", "import sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
                "from sdengine.bench.worker import main; sys.exit(main())", str(spec_path)]
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, "-m", "sdengine.bench.worker", str(spec_path)]


def worker_env(threads: Optional[int] = None) -> dict:
    """The caller's environment, with the folder that this sdengine was imported from first on
    PYTHONPATH (unless it is a site-packages folder, already on the path), so that the worker
    runs this very sdengine: a checkout or a worktree, not whichever one is installed."""
    env = dict(os.environ)
    if threads is not None:  # OpenMP (torch, onnxruntime, stable-diffusion.cpp's ggml) reads it at start
        env["OMP_NUM_THREADS"] = str(threads)
    root = Path(__file__).resolve().parents[2]  # <root>/sdengine/bench/harness.py
    site_dirs = {Path(d).resolve() for d in [*site.getsitepackages(), site.getusersitepackages()]}
    if root not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return env


def default_weights_dir(arch: str, seed: int) -> Path:
    """$SDE_CACHE_DIR/bench-weights/<arch>-seed<seed>: the benchmark's random weights, kept."""
    from sdengine.compile_cache import cache_root

    return cache_root() / "bench-weights" / f"{arch}-seed{seed}"


def compare(results: list) -> Optional[dict]:
    """End to end, the fastest sdengine row (without DeepCache / T-GATE / ToMe) against each diffusers
    row and each peer (p50 over p50: how many times faster), and which peer was fastest; None
    before any sdengine row."""
    from sdengine.bench.runners import DIFFUSERS_BACKENDS

    e2e = {r["backend"]: r["p50_ms"] for r in results if r["component"] == "end_to_end" and r["p50_ms"] > 0}
    # sdengine's rows, not those with a training-free method on ("eager+deepcache=3": a quality trade-off)
    ours = {b: t for b, t in e2e.items() if split_backend(b)[0] in ENGINE_BACKENDS and "=" not in b}
    if not ours:
        return None
    best = min(ours, key=ours.get)
    others = {b: t for b, t in e2e.items() if split_backend(b)[0] in DIFFUSERS_BACKENDS + tuple(PEER_BACKENDS)}
    peers = {b: t for b, t in others.items() if split_backend(b)[0] in PEER_BACKENDS}
    fastest_peer = min(peers, key=peers.get) if peers else None
    return {"best": best, "best_ms": ours[best], "speedup_vs": {b: t / ours[best] for b, t in others.items()},
            "fastest_peer": fastest_peer,
            "speedup_vs_fastest_peer": peers[fastest_peer] / ours[best] if fastest_peer else None}


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
        # default: what sdengine.load picks here (fp16 on CUDA; bf16 on a CPU with bf16 dot products)
        dtype_name = options.dtype or measure.dtype_name(default_dtype(self.device))
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
                                 schedule=schedule, controlnets=options.controlnets, hires_scale=options.hires_scale,
                                 ip_adapters=options.ip_adapters)
        if sum(map(bool, (options.hires_scale, options.controlnets, options.ip_adapters))) > 1:
            raise ValueError("--hires, --controlnet and --ip-adapter: benchmark one at a time")
        self.flop = flops.workload_flop(self.config, height, width, options.batch)
        from sdengine.device import physical_cores

        self.threads = options.threads or (physical_cores() if self.device.type == "cpu" else torch.get_num_threads())
        torch.set_num_threads(self.threads)  # the peak below, the weights' build: as the backends will run
        # The peak each row's % of peak divides by: this device's best matmul (on a CPU, or
        # convolution) in that row's dtype, at the backends' thread count (rows may carry their
        # own dtype: diffusers@bf16).
        self.row_dtypes = {b: row_dtype(b, dtype_name) for b in options.backends}
        self.peaks = {}
        for name in dict.fromkeys([dtype_name, *self.row_dtypes.values()]):
            self.peaks[name] = measure.peak_tflops(self.device, measure.DTYPES[name], options.peak_tflops)
        self.peak_tflops, peak_source = self.peaks[dtype_name]
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
                "model": options.model, "sampler": sampler, "schedule": schedule, "controlnets": options.controlnets,
                "hires_scale": options.hires_scale, "ip_adapters": options.ip_adapters,
            },
            "settings": {
                "backends": list(options.backends), "components": list(options.components),
                "acceleration": [[name, value] for name, value in options.acceleration],
                "repeats": options.repeats, "warmup": options.warmup, "e2e_repeats": options.e2e_repeats,
                "e2e_warmup": options.e2e_warmup, "budget_s": options.budget_s, "seed": options.seed,
                "compile_mode": options.compile_mode, "prepare_cap_s": options.prepare_cap_s,
                "run_cap_s": options.run_cap_s, "isolation": "one process per backend",
                "threads": self.threads, "peer_python": dict(options.peer_python),
                "timer": "cuda events" if self.device.type == "cuda" else "time.perf_counter",
            },
            "flop": dict(self.flop),
            "params": flops.model_params(self.config),
            "peak_tflops": self.peak_tflops,
            "peak_tflops_source": peak_source,
            "peak_tflops_by_dtype": {name: {"tflops": tflops, "source": source}
                                     for name, (tflops, source) in self.peaks.items()},
            "threads": self.threads,
            "baseline": None,
            "comparison": None,
            "floor_ms": self._floor_ms(unet_calls=None),
            "results": [],
            "backends": {},  # per backend: load_s, prepare_s, what prepare did, the exit code of its process
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
                  "--batch", str(w.batch), *(["--controlnet", str(w.controlnets)] if w.controlnets else []),
                  *[arg for name, value in o.acceleration for arg in (f"--{name}", f"{value:g}")],
                  *(["--hires", f"{w.hires_scale:g}"] if w.hires_scale else []),
                  *(["--ip-adapter", str(w.ip_adapters)] if w.ip_adapters else []),
                  "--dtype", w.dtype, "--backends", ",".join(o.backends), "--components", ",".join(o.components),
                  "--repeats", str(o.repeats), "--warmup", str(o.warmup), "--e2e-repeats", str(o.e2e_repeats),
                  "--e2e-warmup", str(o.e2e_warmup), "--device", self.device.type, "--seed", str(o.seed)]
        if o.budget_s is not None:
            parts += ["--budget", f"{o.budget_s:g}"]
        parts += ["--prepare-cap", f"{o.prepare_cap_s:g}", "--run-cap", f"{o.run_cap_s:g}"]
        if "diffusers-compile" in o.backends:
            parts += ["--compile-mode", o.compile_mode]
        if o.peak_tflops is not None:
            parts += ["--peak-tflops", f"{o.peak_tflops:g}"]
        parts += ["--threads", str(self.threads)]
        for name, path in o.peer_python.items():
            parts += ["--peer-python", f"{name}={path}"]
        return measure.shell_command(parts)

    # The run ------------------------------------------------------------------

    def run(self) -> dict:
        """Measure every backend, each in its own process (sdengine/bench/worker.py), into
        self.record; what a backend measured stays even if it crashes, hangs or is cut off."""
        from tqdm.auto import tqdm

        o = self.options
        variants = len(o.acceleration) * sum(1 for b in o.backends if split_backend(b)[0] in ENGINE_BACKENDS)
        self.bar = tqdm(total=len(o.backends) * len(o.components) + variants, desc="bench", unit="component",
                        disable=not self.show_progress or None, file=sys.stderr, dynamic_ncols=True)
        self.write = (lambda message: tqdm.write(message, file=sys.stderr)) if self.show_progress else self.log
        try:
            if "unet_step" in o.components:
                self._host_overhead()
            with tempfile.TemporaryDirectory(prefix="sdengine-bench-") as work:
                self.work = Path(work)
                source = self._source_folder()
                for backend in o.backends:
                    self._run_backend(backend, source)
                    if split_backend(backend)[0] in ENGINE_BACKENDS:  # then with each method on, end to end
                        for name, value in o.acceleration:
                            self._run_backend(backend, source, acceleration=(name, value))
                if self.fidelity:
                    self._fidelity(source)
            self.record["complete"] = True
        finally:
            self._stop_child()
            self.bar.close()
            self.finish()
        return self.record

    def interrupted(self, reason: str):
        """Mark the record as cut short; what was measured stays in it."""
        self._stop_child()
        self.record["complete"] = False
        self.record["interrupted"] = reason
        self.finish()

    def finish(self):
        """Ratios to eager diffusers (the baseline row: `diffusers`, else `diffusers@<the run's dtype>`,
        else the first diffusers row), the end-to-end comparison, the floor, the wall time."""
        results = [r for r in self.record["results"] if "skipped" not in r]
        baseline = self._baseline(results)
        self.record["baseline"] = baseline
        self.record["comparison"] = compare(results)
        reference = {r["component"]: r["p50_ms"] for r in results if r["backend"] == baseline}
        for r in results:
            r["speedup_vs_diffusers"] = reference[r["component"]] / r["p50_ms"] \
                if r["component"] in reference and r["p50_ms"] > 0 else None
        calls = next((r["unet_calls"] for r in results if r["component"] == "end_to_end" and r.get("unet_calls")), None)
        self.record["floor_ms"] = self._floor_ms(calls)
        self.record["workload"]["unet_calls"] = calls
        self.record["wall_s"] = round(time.perf_counter() - self.started, 3)

    def _baseline(self, results: list) -> Optional[str]:
        names = [r["backend"] for r in results]
        diffusers_rows = [n for n in dict.fromkeys(names) if split_backend(n)[0] == "diffusers"]
        for candidate in ("diffusers", f"diffusers@{self.workload.dtype}"):
            if candidate in names:
                return candidate
        return diffusers_rows[0] if diffusers_rows else None

    def _floor_ms(self, unet_calls: Optional[int]) -> dict:
        """The physical floor of each component: its FLOP at the device's peak rate."""
        flop = dict(self.flop, end_to_end=flops.end_to_end_flop(self.flop, unet_calls or self.options.steps))
        return {c: f / (self.peak_tflops * 1e12) * 1e3 for c, f in flop.items()}

    def _host_overhead(self):
        """Both UNets' host work per forward (ops dispatched, Python time) on the meta device:
        comparable on any machine (sdengine/bench/host_overhead.py)."""
        from sdengine.bench.host_overhead import unet_host_overhead

        try:
            self.record["host_overhead"] = unet_host_overhead(self.config, self.workload.height, self.workload.width,
                                                              self.workload.batch, self.dtype, repeats=3)
        except Exception as e:  # a diagnostic: never worth losing the run for
            self.record["host_overhead"] = {"error": f"{type(e).__name__}: {first_line(e)}"}
            return
        h = self.record["host_overhead"]
        self.write(f"host work per UNet forward (meta device): eager {h['eager']['aten_ops']} ops, "
                   f"{h['eager']['python_ms']:.1f} ms of Python; diffusers {h['diffusers']['aten_ops']} ops, "
                   f"{h['diffusers']['python_ms']:.1f} ms")
        self._landed()

    @property
    def fidelity(self) -> bool:
        o = self.options
        return o.fidelity if o.fidelity is not None else any(d != "fp32" for d in self.row_dtypes.values())

    def _fidelity(self, source: str):
        """The fp32 reference image (eager sdengine, fp32 weights read from the same files), and
        each backend's mean absolute error to it."""
        import numpy as np

        self._run_backend("eager", source, reference=True)
        info = self.record["fidelity"] = {
            "reference": "eager sdengine in fp32 on the same weights", "prompt": FIDELITY_PROMPT,
            "seed": FIDELITY_SEED, "mae": {}, "max_abs": {}}
        reference = self.work / "reference.image.npy"
        if not reference.exists():
            info["error"] = "the fp32 reference image could not be made (see the eager-fp32 entry)"
            self._landed()
            return
        ref = np.load(reference)
        for backend in self.options.backends:
            path = self.work / f"{backend}.image.npy"
            if path.exists():
                image = np.load(path)
                if image.shape == ref.shape:
                    info["mae"][backend] = round(float(np.abs(image - ref).mean()), 6)
                    info["max_abs"][backend] = round(float(np.abs(image - ref).max()), 6)
        self.write("fidelity against eager fp32 (mean absolute error): " +
                   ", ".join(f"{b} {v:.4f}" for b, v in info["mae"].items()))
        self._landed()

    def _source_folder(self) -> str:
        """The diffusers folder every backend's weights come from: --model, or random weights in
        float32 (each row reads them in its own dtype), built once and kept under --weights-dir, so
        that every backend's process reads the same weights, and the next run (and the exports made
        from them: onnx, the peers' own) finds them."""
        from sdengine.bench.reference import WEIGHT_NOISE, reference_pipeline

        if self.options.model is not None:
            return self.options.model
        folder = Path(self.options.weights_dir) if self.options.weights_dir else default_weights_dir(
            self.workload.arch, self.options.seed)
        stamp = {"arch": self.workload.arch, "seed": self.options.seed, "weight_noise": WEIGHT_NOISE,
                 "dtype": "fp32", "diffusers": measure.package_version("diffusers")}
        marker = folder / "sdengine-bench.json"
        if marker.is_file() and json.loads(marker.read_text()) == stamp:
            self.write(f"random {self.workload.arch} weights (fp32, seed {self.options.seed}) read from {folder}")
            return str(folder)
        t0 = time.perf_counter()
        # Random initialisation is much faster on the GPU; the copy then waits on the CPU.
        pipe = reference_pipeline(self.config, device=self.device, dtype=torch.float32, seed=self.options.seed)
        pipe.to("cpu")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / marker.name).write_text(json.dumps(stamp))
            if folder.exists():  # an older build (another stamp), or another run's: replaced whole
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        del pipe
        measure.free_device_memory(self.device)
        self.write(f"built the shared diffusers pipeline (random {self.workload.arch} weights, fp32) in "
                   f"{time.perf_counter() - t0:.1f} s, kept in {folder}")
        return str(folder)

    def _skip(self, backend: str, reason: str, component: Optional[str] = None, error: bool = False,
              phase: Optional[str] = None, log_tail: Optional[str] = None):
        entry = {"backend": backend, "skipped": reason}
        if component is not None:
            entry["component"] = component
        if error:
            entry["error"] = True
        if phase is not None:
            entry["phase"] = phase
        if log_tail:
            entry["log_tail"] = log_tail
        self.record["results"].append(entry)
        self.write(f"{backend}{' ' + component if component else ''}: skipped ({reason})")
        self._landed()

    def _landed(self):
        if self.on_result is not None:
            self.on_result()

    def _spec(self, backend: str, source: str, events: Path, reference: bool = False,
              acceleration: Optional[tuple] = None) -> dict:
        o = self.options
        workload = dataclasses.asdict(self.workload)
        workload["dtype"] = "fp32" if reference else self.row_dtypes.get(backend, self.workload.dtype)
        image = self.work / ("reference.image.npy" if reference else f"{backend}.image.npy")
        components = [] if reference else ["end_to_end"] if acceleration else list(o.components)
        return {
            "backend": backend, "source": source, "events": str(events), "parent_pid": os.getpid(),
            "label": accelerated_label(backend, *acceleration) if acceleration else backend,
            "acceleration": dict([acceleration]) if acceleration else {},
            "arch": o.arch, "model": o.model, "device": str(self.device), "compile_mode": o.compile_mode,
            "workload": workload, "components": components,
            "fidelity_image": str(image) if self.fidelity and not acceleration else None,
            "settings": self.record["settings"], "flop": dict(self.flop),
            "peak_tflops": self.peaks.get(workload["dtype"], (self.peak_tflops,))[0],
            "runner_factory": o.runner_factories.get(split_backend(backend)[0]), "sys_path": list(o.sys_path),
            "threads": self.threads,
        }

    def _run_backend(self, backend: str, source: str, reference: bool = False, acceleration: Optional[tuple] = None):
        """One backend in a child process, under its prepare cap and then its run cap.
        reference: the fp32 fidelity reference (no timings; recorded as "eager-fp32").
        acceleration: (method, setting): the backend with that method on, end to end only."""
        o = self.options
        components = 1 if acceleration else len(o.components)
        label = "eager-fp32" if reference else accelerated_label(backend, *acceleration) if acceleration else backend
        reason = precheck(split_backend(backend)[0], self.device) if backend not in o.runner_factories else None
        if reason is not None:
            self._skip(label, reason)
            self.bar.update(components)
            return
        events = self.work / f"{label}.events.jsonl"
        log_path = self.work / f"{label}.log"
        spec_path = self.work / f"{label}.spec.json"
        spec_path.write_text(json.dumps(self._spec(backend, source, events, reference, acceleration)))
        events.touch()
        self.bar.set_description(f"{label}: prepare")
        with open(log_path, "wb") as log:
            python = None if reference else o.peer_python.get(split_backend(backend)[0])
            self.child = subprocess.Popen(worker_command(spec_path, python), env=worker_env(self.threads), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        status = {"backend": label, "phase": "load", "started": time.perf_counter(), "done": False,
                  "components": 0, "info": {}}
        deadline = status["started"] + o.prepare_cap_s
        offset = 0
        while True:
            finished = self.child.poll() is not None
            with open(events) as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[:chunk.rfind("\n") + 1]
            offset += len(complete.encode())
            for line in complete.splitlines():
                event = json.loads(line)
                if self._on_event(status, event):
                    deadline = time.perf_counter() + o.run_cap_s
            if finished or status["done"]:
                break
            if time.perf_counter() > deadline:
                cap = o.prepare_cap_s if status["phase"] in ("load", "prepare") else o.run_cap_s
                self._stop_child()
                self._skip(label, f"timed out: over its {cap:g} s {status['phase']} cap", error=True,
                           phase=status["phase"], log_tail=_tail(log_path))
                break
            time.sleep(0.05)
        code = self._stop_child(grace_s=30 if status["done"] or status["phase"] == "unavailable" else 0)
        if not status["done"] and code not in (None, 0) and not status.get("stopped"):
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            self._skip(label, f"crashed in {status['phase']} ({how})", error=True, phase=status["phase"],
                       log_tail=_tail(log_path))
        elif not status["done"] and code == 0 and status["phase"] != "unavailable" and not status.get("stopped"):
            self._skip(label, f"ended in {status['phase']} without finishing", error=True, phase=status["phase"],
                       log_tail=_tail(log_path))
        self.record["backends"][label] = dict(status["info"], exit=code)
        if not reference:
            self.bar.update(components - status["components"])

    def _on_event(self, status: dict, event: dict) -> bool:
        """Take one event of the child; True when its run phase (and run cap) begins."""
        kind, backend = event["event"], status["backend"]
        if kind == "loaded":
            status["phase"] = "prepare"
            status["info"]["load_s"] = event["load_s"]
        elif kind == "unavailable":
            status["phase"] = "unavailable"
            self._skip(backend, event["reason"])
        elif kind == "prepared":
            status["phase"] = "run"
            status["info"].update(prepare_s=event["prepare_s"], prepare=event["prepare"])
            self.write(f"{backend}: prepared in {event['prepare_s']:.1f} s "
                       f"(weights read in {status['info'].get('load_s', 0):.1f} s)")
            self.bar.set_description(f"{backend}: run")
            return True
        elif kind == "result":
            result = dict(event["result"], prepare_s=status["info"].get("prepare_s"))
            self.record["results"].append(result)
            self.write(self._describe(result))
            status["components"] += 1
            self.bar.update(1)
            self._landed()
        elif kind == "skip":
            self._skip(backend, event["reason"], event["component"], error=event.get("error", False), phase="run")
            status["components"] += 1
            self.bar.update(1)
        elif kind == "image":
            if "error" in event:
                status["info"]["image_error"] = event["error"]
        elif kind == "done":
            status["done"] = True
        return False

    def _stop_child(self, grace_s: float = 0) -> Optional[int]:
        """End the current child, if any (its whole process group), after grace_s for it to
        exit by itself; returns its exit code."""
        child, self.child = getattr(self, "child", None), None
        if child is None:
            return None
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        if child.poll() is None:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
                try:
                    os.killpg(child.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    child.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        return child.wait()

    def _describe(self, r: dict) -> str:
        mem = f", peak {r['peak_mem_bytes'] / 2 ** 30:.2f} GiB" if r["peak_mem_bytes"] else ""
        warm = f", first call {r['warmup_ms'][0]:.1f} ms" if r["warmup_ms"] else ""
        host = f", host {r['host_p50_ms']:.3f} ms" if r.get("host_p50_ms") is not None else ""
        return (f"{r['backend']} {r['component']}: p50 {r['p50_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms, "
                f"min {r['min_ms']:.3f} ms (n={len(r['samples_ms'])}{warm}){host}, {r['tflops']:.3g} TFLOP/s "
                f"= {r['pct_of_peak']:.3g}% of peak{mem}")


def _tail(path: Path, limit: int = 3000) -> str:
    """The end of a child's log, for the record of why it stopped."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")
