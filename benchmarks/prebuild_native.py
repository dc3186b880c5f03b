"""Build the native backend's engine for a benchmark workload ahead of the benchmark.

    python benchmarks/prebuild_native.py --arch sd15 --dtype fp16

Builds the AOTInductor engine exactly as `sdengine bench --backends native` would on first use
(random weights of the architecture, sdengine.from_diffusers(..., backend="native")), so that
it lands in the engine cache ($SDE_CACHE_DIR/aoti) and the benchmark finds it there.
benchmarks/gpu_session.sh runs this in the background while the GPU tests run: the compile
of a full-size UNet takes minutes and must not sit inside a timed benchmark step.
Prints the engine folder and each network's compile time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from sdengine.device import DTYPES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import sdengine
    from sdengine.bench.harness import resolve_config
    from sdengine.bench.reference import reference_pipeline

    dtype = DTYPES[args.dtype]
    config, _ = resolve_config(args.arch, None)
    started = time.perf_counter()
    pipe = reference_pipeline(config, device=args.device, dtype=dtype, seed=args.seed)
    engine = sdengine.from_diffusers(pipe, backend="native").backend
    meta = json.loads((engine.engine_dir / "engine.json").read_text())
    print(f"engine {engine.engine_dir} ready in {time.perf_counter() - started:.1f} s")
    for name, network in meta["networks"].items():
        print(f"  {name}: compiled in {network.get('compile_s', '?')} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
