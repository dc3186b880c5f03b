"""What a live preview costs a denoising step (issue 29): `sdengine serve --preview-every 1`.

    python benchmarks/preview_cost.py [--models demo,sd15] [--runs 3] [--out PATH]

For each model, one pipeline runs the same request several times, alternating
- none:    no preview (the callback only notes the time);
- preview: a preview made after every step, in the step's own thread (the latents' RGB by
           A1111's "Approx cheap" factors, or fitted ones, upscaled, PNG, base64): the most a
           preview can cost, since the server makes it only when /sdapi/v1/progress asks, at
           most once per step, outside the denoising loop.
Step time is the median interval between callbacks, first step of each run left out. The
preview's own time is also measured alone, on the run's last latents. Models: the bundled
demo model at its 32x32, and SD1.5's networks at 512x512 with random weights
(sdengine.bench.reference; the cost does not depend on the values).

Writes benchmarks/results/serve/<date>_<machine>_preview.json, with the machine's load average
before and after (the CPU machine is shared: compare the ratios of one run, not the times).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a handwritten digit seven"


def load(model: str):
    import torch

    import sdengine

    if model == "demo":
        torch.set_num_threads(1)  # as `sdengine serve` runs the demo model
        return sdengine.load(None), 32, 40
    if model == "sd15":
        from sdengine.bench.reference import reference_pipeline
        from sdengine.config import ModelConfig

        torch.set_num_threads(os.cpu_count() or 1)
        return sdengine.from_diffusers(reference_pipeline(ModelConfig.from_name("sd15"))), 512, 3
    raise ValueError(f"unknown model {model!r}: demo or sd15")


def step_times(pipe, size: int, steps: int, on_step) -> list:
    stamps = []

    def callback(step, total, latents):
        on_step(latents)
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    pipe(PROMPT, seed=1, steps=steps, width=size, height=size, sampler="Euler", guidance_scale=7.0,
         callback=callback, progress=False, output_type="latent")
    intervals = [b - a for a, b in zip([start] + stamps, stamps)]
    return intervals[1:]  # the first holds the text encoder and the start of the loop


def measure(model: str, runs: int) -> dict:
    import torch

    from sdengine.serve.preview import LatentPreview

    pipe, size, steps = load(model)
    preview = LatentPreview.for_pipeline(pipe)
    last = {}

    def make_preview(latents):
        last["latents"] = latents
        base64.b64encode(preview.png(latents[0]))

    none, with_preview = [], []
    step_times(pipe, size, 1, lambda latents: None)  # warm-up
    for _ in range(runs):
        none += step_times(pipe, size, steps, lambda latents: None)
        with_preview += step_times(pipe, size, steps, make_preview)
    alone = []
    for _ in range(20):
        t = time.perf_counter()
        make_preview(last["latents"])
        alone.append(time.perf_counter() - t)
    step_none, step_preview = statistics.median(none), statistics.median(with_preview)
    preview_s = statistics.median(alone)
    return {
        "model": model, "size": size, "steps_per_run": steps, "runs_each": runs, "torch_threads": torch.get_num_threads(),
        "latents": list(last["latents"].shape), "preview_png_bytes": len(preview.png(last["latents"][0])),
        "factors": preview.source,
        "step_ms_no_preview": round(step_none * 1e3, 3), "step_ms_preview_every_step": round(step_preview * 1e3, 3),
        "step_time_ratio": round(step_preview / step_none, 4),
        "preview_ms_alone": round(preview_s * 1e3, 3), "preview_share_of_step": round(preview_s / step_none, 5),
        "step_samples": {"no_preview": len(none), "preview": len(with_preview)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,sd15")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    load_before = os.getloadavg()
    started = time.time()
    results = [measure(m, args.runs) for m in args.models.split(",")]
    record = {
        "benchmark": "preview_cost", "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "device": "cpu", "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "seconds": round(time.time() - started, 1), "results": results,
        "note": "preview made in the step's own thread after every step: the most it can cost "
                "(the server makes it on request, outside the loop)",
    }
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "results" / "serve" /
                                           f"{record['date']}_cpu-{os.cpu_count()}core_preview.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    for r in results:
        print(f"{r['model']} {r['size']}px: step {r['step_ms_no_preview']} ms, with a preview every step "
              f"{r['step_ms_preview_every_step']} ms (x{r['step_time_ratio']}); the preview alone "
              f"{r['preview_ms_alone']} ms = {100 * r['preview_share_of_step']:.3f}% of a step")
    print(f"load average before {record['machine']['load_average_before']}, after "
          f"{record['machine']['load_average_after']}; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
