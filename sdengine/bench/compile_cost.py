"""The first-call compile cost of the triton layer for one workload, measured without a GPU.

    python -m sdengine.bench.compile_cost --arch sd15 --height 512 --width 512 --batch 1 --target sm_90

It lists every Triton kernel specialization the triton backend launches for the workload,
from a shape-only dry run of the backend's own code (sdengine.backends.triton.kernel_launches),
compiles each for the target through Triton's disk cache (the one the backend uses: under
$SDE_CACHE_DIR, see sdengine/compile_cache.py), in a process pool, and ends with one line:

    N kernels (C compiled), S s serial, W s wall with J jobs

N counts distinct compiled kernels, C those that were not in the cache already (a second run
prints "(0 compiled)"), S the compile time of those C summed, W the wall time with J worker
processes. --json writes the per-kernel list and the totals.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sdengine.bench.harness import ARCHS, resolve_config
from sdengine.bench.measure import DTYPES


def measure(arch: str, height=None, width=None, batch: int = 1, sampler: str = "euler", dtype: str = "fp16",
            target: str = "sm_90", jobs=None, model=None) -> dict:
    """Dry-run the workload, compile its kernels for `target`; returns the report as a dict."""
    from sdengine import compile_cache, samplers
    from sdengine.backends.triton import kernel_launches
    from sdengine.kernels import precompile

    compile_cache.use_cache_dirs()
    config, arch_name = resolve_config(arch, model)
    height = height or config.default_size
    width = width or config.default_size
    sampler_name, schedule = samplers.resolve(sampler, None, config.scheduler)
    started = time.perf_counter()
    launches = kernel_launches(config, height, width, batch=batch, sampler=sampler_name, schedule=schedule,
                               dtype=DTYPES[dtype])
    dry_run_s = time.perf_counter() - started
    specs = precompile.kernel_specs(launches)
    report = precompile.compile_specs(specs, precompile.parse_target(target), jobs=jobs)
    return {
        "workload": {"arch": arch_name, "height": height, "width": width, "batch": batch, "sampler": sampler_name,
                     "schedule": schedule, "dtype": dtype},
        "target": target, "launches": len(launches), "specs": len(specs), "dry_run_s": round(dry_run_s, 3),
        "kernels": report.distinct, "compiled": report.compiled, "serial_s": round(report.serial_s, 3),
        "wall_s": round(report.wall_s, 3), "jobs": report.jobs, "failures": report.failures,
        "summary": report.summary(), "cache_dir": str(compile_cache.use_cache_dirs()["triton"]),
        "per_kernel": report.unique(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdengine.bench.compile_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15", choices=ARCHS)
    p.add_argument("--model", metavar="PATH", help="a diffusers folder's architecture instead of --arch")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    p.add_argument("--target", default="sm_90", help="sm_XY, or native (this machine's GPU)")
    p.add_argument("--jobs", type=int, help="worker processes (default: one per CPU)")
    p.add_argument("--json", type=Path, metavar="PATH")
    args = p.parse_args(argv)
    try:
        result = measure(args.arch, args.height, args.width, args.batch, args.sampler, args.dtype, args.target,
                         args.jobs, args.model)
    except ValueError as e:
        print(f"compile_cost: error: {e}", file=sys.stderr)
        return 2
    for k in result["per_kernel"]:
        status = k.get("error") or ("compiled" if k.get("compiled") else "cached")
        seconds = f"{k['seconds']:6.2f} s" if "seconds" in k else "       "
        print(f"{seconds}  {status:8}  {k['label']}")
    for failure in result["failures"]:
        print(f"FAILED {failure['label']}: {failure['error']}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(result["summary"])
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
