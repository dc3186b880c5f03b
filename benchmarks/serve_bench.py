"""Serving benchmark (issue 18): `sdengine serve` latency and throughput under concurrent load.

    python benchmarks/serve_bench.py [--requests 96] [--concurrency 16] [--steps 10] [--size 32] [--no-ray]

Runs, against real server processes on the loopback interface (httpx clients):
1. batching on vs off: the same same-shape requests (different prompts and seeds) from
   `--concurrency` clients; p50 / p99 latency and images per second;
2. Ray Serve, 1 model replica vs 2 (a local cluster): the same load, throughput ratio.
Writes benchmarks/results/serve/<date>_<machine>_serve.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdengine.serve.loadgen import LoadRequest, ServerProcess, free_port, run_load, txt2img  # noqa: E402

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def workload(n: int, steps: int, size: int, seed_base: int = 0) -> list:
    return [LoadRequest(txt2img(f"a handwritten digit {DIGITS[i % 10]}", seed=seed_base + i, steps=steps, size=size,
                                sampler="Euler a")) for i in range(n)]


def bench_local(args, extra: list) -> dict:
    with ServerProcess(extra + ["--max-queue", str(4 * args.concurrency)]) as server:
        run_load(server.url, workload(args.concurrency, args.steps, args.size, 10_000), concurrency=args.concurrency)
        stats = run_load(server.url, workload(args.requests, args.steps, args.size), concurrency=args.concurrency)
        assert not stats.unexpected(), stats.unexpected()[:3]
        return stats.summary()


def bench_ray(args, replicas: int) -> dict:
    import ray
    from ray import serve

    from sdengine.serve.app import ServeSettings
    from sdengine.serve.ray_app import APP_NAME, RayOptions, build_application

    port = free_port()
    ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(None, ServeSettings(max_queue=4 * args.concurrency),
                                    RayOptions(replicas=replicas, num_cpus_per_replica=1), threads=1),
                  name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        run_load(url, workload(args.concurrency, args.steps, args.size, 10_000), concurrency=args.concurrency)
        stats = run_load(url, workload(args.requests, args.steps, args.size), concurrency=args.concurrency)
        assert not stats.unexpected(), stats.unexpected()[:3]
        return stats.summary()
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    record = {
        "kind": "serve", "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip() or None,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "model": "demo-digits (bundled)", "device": "cpu", "threads_per_model": 1,
        "workload": {"requests": args.requests, "concurrency": args.concurrency, "steps": args.steps,
                     "size": args.size, "sampler": "Euler a", "cfg_scale": 7.0,
                     "note": "same shape, a different prompt and seed per request"},
        "batching": {},
    }
    started = time.time()
    record["batching"]["off"] = bench_local(args, ["--no-batching"])
    record["batching"]["on"] = bench_local(args, ["--max-batch-images", "8", "--batch-window-ms", "10"])
    on, off = record["batching"]["on"], record["batching"]["off"]
    record["batching"]["throughput_ratio_on_vs_off"] = on["throughput_img_s"] / off["throughput_img_s"]
    if not args.no_ray:
        record["ray"] = {"replicas_1": bench_ray(args, 1), "replicas_2": bench_ray(args, 2),
                         "note": "one CPU thread per replica, batching on (max 8 images, 5 ms window)"}
        record["ray"]["throughput_ratio_2_vs_1"] = (record["ray"]["replicas_2"]["throughput_img_s"]
                                                    / record["ray"]["replicas_1"]["throughput_img_s"])
    record["wall_s"] = time.time() - started
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "results" / "serve" /
                                           f"{record['date']}_cpu-{os.cpu_count()}core_serve.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("batching", "ray") if k in record}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
