"""diffusers timed plainly, in a process of its own, as a user runs it: the check that the
harness's diffusers rows are as fast as diffusers alone (issue 27).

    python benchmarks/plain_diffusers.py WEIGHTS_DIR --dtype bf16 --height 512 --width 512 --steps 4 \\
        --runs 3 --threads 2 --json benchmarks/results/plain.json

WEIGHTS_DIR is the benchmark's weights folder (sdengine bench --weights-dir, or the default
$SDE_CACHE_DIR/bench-weights/<arch>-seed<N>). The pipeline is read with
`from_pretrained(torch_dtype=...)`, given EulerDiscreteScheduler (the bench's default sampler),
warmed up with one generation, then each run is timed with perf_counter around the call,
prompt in, PIL image out: no harness, no other work in the process. Prints the p50 and writes
the samples as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROMPTS = ("a photograph of an astronaut riding a horse on the moon",
           "an oil painting of a lighthouse in a storm, dramatic light",
           "a watercolor fox in a snowy birch forest")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.weights, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - started

    def generate(i):
        return pipe(PROMPTS[i % len(PROMPTS)], num_inference_steps=args.steps, guidance_scale=7.5,
                    height=args.height, width=args.width, generator=torch.Generator().manual_seed(i)).images

    generate(0)  # warm-up
    samples = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        generate(i + 1)
        samples.append((time.perf_counter() - t0) * 1e3)
    result = {"what": "diffusers timed plainly (benchmarks/plain_diffusers.py)", "weights": str(args.weights),
              "dtype": args.dtype, "height": args.height, "width": args.width, "steps": args.steps,
              "threads": torch.get_num_threads(), "load_s": round(load_s, 3), "samples_ms": samples,
              "p50_ms": statistics.median(samples), "torch": torch.__version__,
              "diffusers": __import__("diffusers").__version__}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
