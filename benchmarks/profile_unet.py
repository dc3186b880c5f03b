"""Where one UNet step's time goes: diffusers' UNet against ours, eager and with the Triton ops.

    python benchmarks/profile_unet.py --arch sd15 --size 512 --json out.json

A diagnostic for a GPU session, not a benchmark record (`sdengine bench` writes those). On
the same random weights at batch 2 (classifier-free guidance), for each variant: diffusers'
UNet; `eager`, our UNet through the eager backend; `triton`, the Triton backend's denoise
(Triton ops, channels_last, CUDA-graph replay); `triton-ops`, its UNet called directly (the
same kernels, no graph):
- the first call's wall time (the Triton kernels compile and autotune there) and, after
  warm-up, the median of CUDA-event timings;
- the torch profiler's top kernels by total device time, with their call counts;
- the number of kernel launches per step.
Prints a summary and rewrites --json after every measurement, so a run stopped by the
caller's timeout keeps what it measured. `--device cpu --arch tiny` is a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch


def _profile(fn, top: int, device: str) -> dict:
    """Top ops by self time on the device (on the CPU: by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if device == "cuda":
            device_us = getattr(e, "self_device_time_total", None)
            if device_us is None:
                device_us = getattr(e, "self_cuda_time_total", 0)
        else:
            device_us = e.self_cpu_time_total
        if device_us > 0:
            rows.append({"name": e.key[:160], "calls": e.count, "device_ms": device_us / 1e3})
    rows.sort(key=lambda r: -r["device_ms"])
    prefixes = ("aten::", "cuda", "Memcpy", "Memset", "Activity", "ProfilerStep")
    launches = sum(r["calls"] for r in rows if not r["name"].startswith(prefixes)) if device == "cuda" else None
    return {"top": rows[:top], "device_ms_total": sum(r["device_ms"] for r in rows), "kernel_calls": launches}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents are size / 8)")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--variants", default="diffusers,eager,triton,triton-ops")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("profile_unet: no CUDA device (--device cpu for a smoke test)", file=sys.stderr)
        return 2

    import sdengine
    from sdengine.bench import measure
    from sdengine.bench.harness import resolve_config
    from sdengine.bench.reference import reference_pipeline

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    config, _ = resolve_config(args.arch, None)
    pipe = reference_pipeline(config, device=device, dtype=dtype, seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    latent = args.size // config.vae.downscale
    x = torch.randn(2, config.unet.in_channels, latent, latent, device=device, dtype=dtype, generator=gen)
    t = torch.tensor([500.0, 500.0], device=device)
    context = torch.randn(2, 77, config.unet.cross_attention_dim, device=device, dtype=dtype, generator=gen)
    if config.text_encoder_2 is not None:
        raise SystemExit("profile_unet: SDXL's added conditioning is not wired here; use sd15 or sd21-v")

    report = {"arch": args.arch, "size": args.size, "dtype": args.dtype, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "variants": {}}

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))

    def step_of(variant):
        if variant == "diffusers":
            unet = pipe.unet
            return lambda: unet(x, t, context).sample
        backend = sdengine.from_diffusers(copy.deepcopy(pipe), backend=variant.removesuffix("-ops")).backend
        if variant == "triton-ops":  # the UNet itself: Triton ops, no CUDA graph
            unet, x_in = backend.unet, x.contiguous(memory_format=torch.channels_last) if device == "cuda" else x
            return lambda: unet(x_in, t, context)
        return lambda: backend.denoise(x, t, context)

    for variant in args.variants.split(","):
        entry = report["variants"].setdefault(variant, {})
        try:
            with torch.inference_mode():
                fn = step_of(variant)
                print(f"== {variant}: first call", flush=True)
                first = measure.time_calls(lambda _: fn(), [None], 1, torch.device(device))
                entry["first_call_s"] = round(first.warmup_ms[0] / 1e3, 3)
                save()
                print(f"   first call {entry['first_call_s']} s", flush=True)
                timing = measure.time_calls(lambda _: fn(), [None] * (3 + args.repeats), 3, torch.device(device))
                entry.update(median_ms=measure.summarize(timing.samples_ms)["p50_ms"], min_ms=min(timing.samples_ms))
                entry.update(_profile(fn, args.top, device))
        except Exception as e:  # report and go on with the next variant
            entry["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        save()
        print(f"   {variant}: " + (entry.get("error") or
              f"median {entry['median_ms']:.2f} ms, {entry['kernel_calls']} kernel calls, "
              f"profiled total {entry['device_ms_total']:.2f} ms"), flush=True)
        for row in entry.get("top", []):
            print(f"     {row['device_ms']:8.3f} ms  {row['calls']:5d}x  {row['name'][:110]}")
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
