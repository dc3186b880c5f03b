"""`sdengine bench`: time every backend against eager diffusers on one workload.

    sdengine bench --arch sd15 --height 512 --width 512 --steps 30 --sampler euler --batch 1 \\
        --backends diffusers,diffusers-compile,eager,graph,triton,compile --dtype fp16 --json out.json

Each backend runs in a process of its own, under a prepare cap (load, build, compile,
capture) and a run cap: one that crashes, hangs or runs out of memory is recorded as
skipped with why and the end of its log, and the run goes on with the next.

End-to-end runs use the same sampler on every backend: sdengine's backends get --sampler,
diffusers the matching scheduler class, built from the pipeline's scheduler config.

Writes a JSON record (validated against benchmarks/schema.json), a markdown table and a
PNG chart: to --json's path (the .md and .png beside it) or, by default, to
benchmarks/results/<date>_<device>_<arch>.{json,md,png} under the current directory
(--out-dir to change it). Ctrl-C or SIGTERM writes what was measured so far, marked
incomplete; the JSON record is also rewritten after every result, marked unfinished until
the run ends, so that a run killed outright keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from sdengine.bench.harness import ARCHS, BenchOptions
from sdengine.bench.runners import BACKENDS, COMPONENTS


def register(subparsers):
    p = subparsers.add_parser("bench", help="benchmark backends against eager diffusers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("workload")
    what.add_argument("--arch", default="sd15", choices=ARCHS,
                      help="architecture at its real size with random weights (tiny*: smoke-test sizes)")
    what.add_argument("--model", metavar="PATH", help="a diffusers folder to time instead of random weights")
    what.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    what.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    what.add_argument("--steps", type=int, default=30, help="denoising steps of an end-to-end run")
    what.add_argument("--sampler", default="euler",
                      help="sampler of the end-to-end runs, on every backend: an sdengine or A1111 name (euler_a, "
                           "dpmpp_2m, 'DPM++ 2M Karras'); diffusers gets the matching scheduler class. Default: "
                           "euler, which the Triton backend's fused step covers and whose exact diffusers "
                           "counterpart is EulerDiscreteScheduler (the SD1.5 default, PNDM, has no fused step)")
    what.add_argument("--batch", type=int, default=1, help="images per prompt batch (the UNet runs at 2x for CFG)")
    what.add_argument("--dtype", choices=("fp16", "bf16", "fp32"),
                      help="of the rows without @DTYPE; default: what sdengine.load picks on the device (fp16 on "
                           "CUDA; bf16 on a CPU with bf16 dot products, else fp32)")
    what.add_argument("--guidance-scale", type=float, default=7.5)
    what.add_argument("--output-type", default="pil", help="what an end-to-end run returns (default: pil)")
    what.add_argument("--controlnet", type=int, default=0, choices=(0, 1, 2), metavar="N",
                      help="add N ControlNets (random, made from the UNet) to the UNet step and end to end, in "
                           "every backend and in diffusers' StableDiffusion(XL)ControlNetPipeline (default: 0)")
    what.add_argument("--deepcache", type=int, metavar="INTERVAL",
                      help="add an end-to-end row per sdengine backend with DeepCache at this interval (branch 0), "
                           "in the same run as the rows without it; the record keeps the denoising loop apart")
    what.add_argument("--tgate", type=int, metavar="GATE_STEP", help="likewise with T-GATE at this gate step")
    what.add_argument("--tome", type=float, metavar="RATIO", help="likewise with token merging (ToMe) at this ratio")

    what.add_argument("--hires", type=float, default=0.0, metavar="SCALE",
                      help="end to end with A1111's hires fix (Latent upscaler x SCALE, half the steps again at "
                           "denoising 0.5) in every backend, and written out on diffusers' pipelines (default: off)")
    what.add_argument("--ip-adapter", type=int, default=0, choices=(0, 1, 2), metavar="N",
                      help="end to end with N IP-Adapters (random, ip-adapter_sd15's layout and ViT-H/14 image "
                           "encoder at their real sizes; one image prompt each, scale 0.6) in every backend and in "
                           "diffusers' load_ip_adapter; times end_to_end only (default: 0)")

    how = p.add_argument_group("measurement")
    how.add_argument("--backends", default="eager,diffusers",
                     help=f"comma-separated, in the order to run: {','.join(BACKENDS)} (default: eager,diffusers). "
                          "NAME@DTYPE runs that row in its own dtype and keeps the name (diffusers@fp32,diffusers@bf16); "
                          "the peers take their own precisions (optimum-openvino@f32, sdcpp@q8_0: benchmarks/README.md)")
    how.add_argument("--peer-python", action="append", default=[], metavar="NAME=PATH",
                     help="run backend NAME's process under the interpreter PATH: a peer in the environment its users "
                          "install (e.g. optimum-openvino=/work/venvs/peers/bin/python); repeatable")
    how.add_argument("--threads", type=int,
                     help="CPU threads of every backend (torch, OpenVINO, stable-diffusion.cpp, onnxruntime); default: "
                          "the physical cores this process may use; recorded")
    how.add_argument("--weights-dir", type=Path, metavar="DIR",
                     help="where the random weights are kept between runs (default: $SDE_CACHE_DIR/bench-weights/"
                          "<arch>-seed<N>); the onnx row's export and the peers' conversions are cached from them")
    how.add_argument("--components", default=None,
                     help=f"comma-separated subset of {','.join(COMPONENTS)} (the default; with --ip-adapter: "
                          "end_to_end)")
    how.add_argument("--repeats", type=int, default=20, help="timed calls per component (default: 20)")
    how.add_argument("--warmup", type=int, default=3, help="untimed first calls per component (default: 3)")
    how.add_argument("--e2e-repeats", type=int, default=10, help="timed end-to-end runs (default: 10)")
    how.add_argument("--e2e-warmup", type=int, default=1, help="untimed end-to-end runs (default: 1)")
    how.add_argument("--budget", type=float, default=60.0, metavar="SECONDS",
                     help="stop repeating a component after this long, keeping at least 3 samples (default: 60)")
    how.add_argument("--prepare-cap", type=float, default=600.0, metavar="SECONDS",
                     help="each backend runs in its own process: the most it may take to load, build, compile "
                          "and capture before it is recorded as skipped (default: 600)")
    how.add_argument("--run-cap", type=float, default=600.0, metavar="SECONDS",
                     help="then the most its timed components may take (default: 600)")
    how.add_argument("--fidelity", action=argparse.BooleanOptionalAction, default=None,
                     help="compare each backend's image at a fixed prompt and seed with eager sdengine in fp32 on the "
                          "same weights (mean absolute error; default: on when a row is not fp32)")
    how.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    how.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    how.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of diffusers-compile")
    how.add_argument("--lora-swap", action="store_true",
                     help="instead: time merging a LoRA into the weights and removing it (sdengine/bench/lora_swap.py)")
    how.add_argument("--lora-rank", type=int, default=32, help="rank of the --lora-swap LoRA (default: 32)")
    how.add_argument("--peak-tflops", type=float,
                     help="the device's peak rate for the floor and the %% of peak (default: ANCHORS.md for "
                          "H100/H200 in fp16/bf16, else a matmul measured at start)")

    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="PATH", help="record path; the .md and .png go beside it")
    out.add_argument("--out-dir", type=Path, metavar="DIR",
                     help="directory of the default-named outputs (default: benchmarks/results)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. from `timeout`), handled like Ctrl-C: keep what was measured."""


@contextlib.contextmanager
def _sigterm_interrupts():
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _split(value: str) -> tuple:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _peer_pythons(values: list) -> dict:
    """["NAME=PATH", ...] -> {NAME: PATH}; ValueError naming --peer-python for a malformed one."""
    pythons = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--peer-python {value!r}: expected NAME=PATH, e.g. optimum-openvino=/venv/bin/python")
        pythons[name] = path
    return pythons


def run(args) -> int:
    if getattr(args, "lora_swap", False):
        from sdengine.bench import lora_swap

        return lora_swap.run(args)
    from sdengine.bench.harness import Benchmark
    from sdengine.bench.output import default_json_path, summary_table, write_json, write_outputs

    options = BenchOptions(
        arch=args.arch, model=args.model, height=args.height, width=args.width, steps=args.steps,
        sampler=args.sampler, batch=args.batch, dtype=args.dtype, backends=_split(args.backends),
        components=_split(args.components or ("end_to_end" if args.ip_adapter else ",".join(COMPONENTS))),
        repeats=args.repeats, warmup=args.warmup, e2e_repeats=args.e2e_repeats, e2e_warmup=args.e2e_warmup,
        budget_s=args.budget, prepare_cap_s=args.prepare_cap, run_cap_s=args.run_cap, fidelity=args.fidelity,
        device=args.device, seed=args.seed, guidance_scale=args.guidance_scale, controlnets=args.controlnet,
        hires_scale=args.hires, ip_adapters=args.ip_adapter,
        output_type=args.output_type, compile_mode=args.compile_mode, peak_tflops=args.peak_tflops,
        acceleration=tuple((name, getattr(args, name)) for name in ("deepcache", "tgate", "tome")
                           if getattr(args, name, None) is not None),
        peer_python=_peer_pythons(args.peer_python), threads=args.threads,
        weights_dir=str(args.weights_dir) if args.weights_dir else None,
        argv=["sdengine", *sys.argv[1:]] if sys.argv[1:2] == ["bench"] else [],  # [] when called from Python
    )
    if args.model is not None and not Path(args.model).exists():
        raise FileNotFoundError(f"--model {args.model}: no such file or folder")
    if args.json is not None and args.json.suffix != ".json":
        raise ValueError(f"--json {args.json}: the record's file name must end in .json")
    bench = Benchmark(options, progress=not args.no_progress)
    path = args.json or default_json_path(bench.record, args.out_dir)

    def checkpoint():
        """After each result: the record so far, marked unfinished, so that a run killed
        outright (SIGKILL, a crash in native code) still leaves what it measured."""
        bench.finish()
        record = dict(bench.record, complete=False,
                      interrupted=bench.record["interrupted"] or "unfinished: a checkpoint written during the run")
        write_json(record, path)

    bench.on_result = checkpoint

    def write() -> dict:
        paths = write_outputs(bench.record, path)
        print("\n".join(summary_table(bench.record)))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return paths

    try:
        with _sigterm_interrupts():
            bench.run()
    except BaseException as e:  # Ctrl-C, SIGTERM or a crash: keep what was measured
        bench.interrupted("SIGTERM" if isinstance(e, Terminated) else "KeyboardInterrupt"
                          if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}")
        write()
        raise
    write()
    return 0
