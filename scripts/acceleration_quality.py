"""Quality of DeepCache, T-GATE and ToMe on the bundled demo model, each against none, same run.

    python scripts/acceleration_quality.py [--out benchmarks/results/acceleration_quality_demo.json]

For each setting, 10 digits x 10 seeds ("a handwritten digit seven", seeds 0-9) through the public
API, with the model's default sampler and steps; an SVC trained on scikit-learn's real digits
(tests/test_demo.py's classifier) reads each image. Recorded per setting: the accuracy, its drop
against no acceleration, the mean absolute pixel difference to the unaccelerated image of the same
prompt and seed (in [0, 1]), and the wall time of the call (100 images at once, the faster of two
calls; one thread, on a shared machine: compare within the run only).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import sdengine  # noqa: E402
from test_demo import accuracy, fit_classifier, generate_digits  # noqa: E402

SETTINGS = [
    ("none", {}),
    ("DeepCache interval 2", dict(deepcache=sdengine.DeepCache(interval=2))),
    ("DeepCache interval 3", dict(deepcache=sdengine.DeepCache(interval=3))),
    ("DeepCache interval 5", dict(deepcache=sdengine.DeepCache(interval=5))),
    ("DeepCache interval 3, branch 1", dict(deepcache=sdengine.DeepCache(interval=3, branch=1))),
    ("T-GATE gate step 10", dict(tgate=sdengine.TGate(gate_step=10))),
    ("T-GATE gate step 5", dict(tgate=sdengine.TGate(gate_step=5))),
    # the demo UNet has attention at its second level only: tomesd's default max_downsample 1 merges nothing
    ("ToMe ratio 0.5", dict(tome=sdengine.ToMe(ratio=0.5))),
    ("ToMe ratio 0.5, max_downsample 2", dict(tome=sdengine.ToMe(ratio=0.5, max_downsample=2))),
    ("DeepCache 3 + T-GATE 10", dict(deepcache=3, tgate=10)),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "acceleration_quality_demo.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    classifier = fit_classifier()[0]
    pipe = sdengine.load()
    generate_digits(pipe, steps=2)  # warm-up
    rows, baseline = [], None
    for name, options in SETTINGS:
        times = []
        for _ in range(2):  # the faster of two calls: the machine is shared
            started = time.perf_counter()
            images, labels = generate_digits(pipe, **options)
            times.append(time.perf_counter() - started)
        wall_s = min(times)
        row = dict(setting=name, options={k: str(v) for k, v in options.items()},
                   accuracy=accuracy(classifier, images, labels), wall_s=round(wall_s, 3))
        if baseline is None:
            baseline = dict(row, images=images)
        row.update(accuracy_drop=round(baseline["accuracy"] - row["accuracy"], 4),
                   mean_abs_pixel_diff=round(float(np.abs(images - baseline["images"]).mean()), 5),
                   speedup=round(baseline["wall_s"] / wall_s, 3))
        rows.append(row)
        print(f"{name:34s} accuracy {row['accuracy']:.2f} (drop {row['accuracy_drop']:+.2f}), mean |diff| "
              f"{row['mean_abs_pixel_diff']:.4f}, {wall_s:.1f} s ({row['speedup']:.2f}x)", flush=True)
    record = dict(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), model="demo-digits",
                  images_per_setting=len(labels), sampler="the model's default (dpmpp_2m, 30 steps)",
                  threads=args.threads, machine=platform.processor() or platform.machine(),
                  torch=torch.__version__, results=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
