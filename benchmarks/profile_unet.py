"""Where one UNet step's time goes: diffusers' UNet against ours, A/B, on one GPU.

    python benchmarks/profile_unet.py --arch sd15 --size 512 --json out.json

A diagnostic for a GPU session, not a benchmark record (`sdengine bench` writes those). It
answers why our eager UNet step can trail diffusers' while dispatching fewer ops. On the same
random weights at batch 2 (classifier-free guidance), for each variant — `diffusers`, its
UNet; `eager`, our UNet (the eager backend's network); `graph`, our UNet through the graph
layer's denoise (one CUDA graph per call); `triton-ops`, our UNet with the Triton kernels,
no graph — it records:

- `first_call_s`: the first call's wall time (compiles and autotunes happen there);
- `latency_ms`: the median of CUDA-event timings of synchronised calls (what a step costs);
- `host_ms`: the median CPU time of a call until it returns, without a sync (the launches
  issued: a launch-bound step has host ≈ latency);
- `device_ms`: the median replay time of the call captured as a CUDA graph (the kernels
  alone, no launch gaps): latency − device is what the host costs the step;
- `kernels`: the CUDA kernels one call launches, and `top`: the kernels by total device time,
  with their call counts (each kernel counted once: op rows are left out, as they carry their
  kernels' time too).

Prints a summary and rewrites --json after every measurement, so a run stopped by the
caller's timeout keeps what it measured. `--device cpu --arch tiny` is a smoke test (no
graphs, no device time; the profile's rows are then the ops' CPU time).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sdengine.device import DTYPES


def _profile(fn, top: int, device: str) -> dict:
    """The kernels one call launches (on the CPU: its ops) by total time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if device == "cuda":
            if e.device_type != DeviceType.CUDA:  # op rows repeat their kernels' time: kernels only
                continue
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0)
        else:
            if not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        rows.append({"name": e.key[:160], "calls": e.count, "ms": us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    memcopies = ("Memcpy", "Memset")
    kernels = sum(r["calls"] for r in rows if not r["name"].startswith(memcopies))
    return {"top": rows[:top], "profiled_ms": sum(r["ms"] for r in rows), "kernels": kernels}


def _medians(fn, repeats: int, device: str) -> dict:
    """latency (events around a synchronised call) and host time (until the call returns)."""
    latency, host = [], []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
            end.record()
            torch.cuda.synchronize()
            latency.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            latency.append((time.perf_counter() - t0) * 1e3)
            host.append(latency[-1])
    return {"latency_ms": statistics.median(latency), "host_ms": statistics.median(host),
            "min_latency_ms": min(latency)}


def _graph_replay_ms(fn, repeats: int):
    """The call captured as a CUDA graph, replayed: its kernels' time without launch gaps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    del graph
    return statistics.median(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latents are size / 8)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--variants", default="diffusers,eager,graph,triton-ops")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("profile_unet: no CUDA device (--device cpu for a smoke test)", file=sys.stderr)
        return 2

    import sdengine
    from sdengine.bench.harness import resolve_config
    from sdengine.bench.reference import reference_pipeline

    dtype = DTYPES[args.dtype]
    config, _ = resolve_config(args.arch, None)
    pipe = reference_pipeline(config, device=device, dtype=dtype, seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    latent = args.size // config.vae.downscale
    x = torch.randn(2, config.unet.in_channels, latent, latent, device=device, dtype=dtype, generator=gen)
    t = torch.tensor(500.0, device=device)  # 0-d float32 on the device, as diffusers' pipelines pass it
    t2 = t.expand(2).contiguous()  # (2B,), as our pipeline passes it
    context = torch.randn(2, 77, config.unet.cross_attention_dim, device=device, dtype=dtype, generator=gen)
    added, added_diffusers = None, None
    if config.text_encoder_2 is not None:
        pooled = config.unet.projection_class_embeddings_input_dim - 6 * config.unet.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, device=device, dtype=dtype, generator=gen),
                 "time_ids": torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * 2, device=device,
                                          dtype=dtype)}
        added_diffusers = added

    report = {"arch": args.arch, "size": args.size, "dtype": args.dtype, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "variants": {}}

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))

    def step_of(variant):
        if variant == "diffusers":
            unet = pipe.unet
            return lambda: unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added_diffusers,
                                return_dict=False)[0]
        name = {"eager": "eager", "graph": "graph", "triton-ops": "triton"}[variant]
        backend = sdengine.from_diffusers(copy.deepcopy(pipe), backend=name).backend
        if variant == "graph":
            return lambda: backend.denoise(x, t2, context, added)
        unet = backend.unet
        x_in = x.contiguous(memory_format=torch.channels_last) if variant == "triton-ops" and device == "cuda" else x
        return lambda: unet(x_in, t2, context, added_cond=added)

    for variant in args.variants.split(","):
        entry = report["variants"].setdefault(variant, {})
        try:
            with torch.inference_mode():
                fn = step_of(variant)
                print(f"== {variant}: first call", flush=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                entry["first_call_s"] = round(time.perf_counter() - started, 3)
                save()
                for _ in range(3):
                    fn()
                entry.update(_medians(fn, args.repeats, device))
                save()
                if device == "cuda" and variant != "graph":  # graph: its calls are replays already
                    entry["device_ms"] = _graph_replay_ms(fn, args.repeats)
                    save()
                entry.update(_profile(fn, args.top, device))
        except Exception as e:  # report and go on with the next variant
            entry["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        save()
        if "error" in entry:
            print(f"   {variant}: {entry['error']}", flush=True)
        else:
            device_ms = f", device {entry['device_ms']:.2f} ms (graph replay)" if "device_ms" in entry else ""
            print(f"   {variant}: latency {entry['latency_ms']:.2f} ms, host {entry['host_ms']:.2f} ms{device_ms}, "
                  f"{entry['kernels']} kernels, first call {entry['first_call_s']} s", flush=True)
            for row in entry.get("top", []):
                print(f"     {row['ms']:8.3f} ms  {row['calls']:5d}x  {row['name'][:110]}")
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
