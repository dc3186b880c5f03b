"""Benchmark every kernel against its torch counterpart: `python -m sdengine.kernels.bench`.

On a GPU it runs SD1.5's real shapes (fp16): attention at B=2, H=8 for N=4096 (D=40),
4096×77 (cross-attention), 1024 (D=80) and 256 (D=160), each against SDPA's flash, cuDNN and
memory-efficient backends; GroupNorm+SiLU at 2×320×64×64 (UNet) and 1×128×512×512 (VAE),
channels_last; LayerNorm and GEGLU at the 64×64 level; the fused guidance + sampler steps
at the SD1.5 latent (1×4×64×64, batch 2 with CFG) and at a large shape that shows bandwidth;
decode_to_uint8 at 512×512. Each line prints ms (median), TFLOP/s or GB/s, and that figure
as a percentage of the device's measured peak: a large device copy (GB/s, bytes read +
written) and a large bf16 matmul (TFLOP/s), both measured first. GB/s counts the minimum
traffic (each input read once, each output written once), so it is an effective bandwidth.
The L2 cache is flushed (a 256 MB write) before every timed sample: cold-cache numbers.

On a CPU it only smoke-runs tiny shapes through the Triton interpreter (it re-executes
itself with TRITON_INTERPRET=1), to show that every entry runs.

    python -m sdengine.kernels.bench [--json PATH] [--only attn,gn] [--iters N]

`--json PATH` writes a record (device, torch/triton/CUDA versions, git commit, the exact
command, peaks, and per-kernel raw samples in ms), atomically.
"""

import argparse
import datetime
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Case:
    name: str
    shape: str
    ours: object  # () -> result
    theirs: object  # () -> result, the torch counterpart
    theirs_label: str
    flops: float = 0.0  # per call, for TFLOP/s
    bytes: float = 0.0  # minimum traffic per call, for GB/s
    samples: dict = field(default_factory=dict)


def _sdpa_backends(device) -> list:
    """SDPA's fused kernels to compare with on this device (all of them on CUDA; on the CPU the
    default choice only, for the smoke run)."""
    return ["flash", "cudnn", "efficient"] if device == "cuda" else ["default"]


def _sdpa(q, k, v, backend="default"):
    """F.scaled_dot_product_attention restricted to one backend (it raises where that backend
    cannot take the inputs, and the case is then recorded as such)."""
    if backend == "default":
        return F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    with sdpa_kernel(chosen):
        return F.scaled_dot_product_attention(q, k, v)


def cases(device, tiny):
    """The benchmark cases for `device`; `tiny` gives the CPU smoke shapes."""
    # The Triton wrappers, not the package's dispatching functions of the same names.
    from .attention import attention
    from .decode import decode_to_uint8
    from .geglu import geglu
    from .group_norm import group_norm
    from .layer_norm import layer_norm
    from .sampler_step import dpmpp_2m_triton, euler_triton

    dt = torch.float32 if tiny else torch.float16
    cl = torch.channels_last
    out = []

    def randn(*shape, dtype=dt, fmt=torch.contiguous_format):
        return torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=fmt)

    # Attention: (B, H, N, D) views of (B, N, H, D), as the UNet's projections lay them out, at
    # SD1.5's four levels (self-attention 4096/1024/256 tokens, head dims 40/80/160, and the
    # 4096x77 cross-attention), against each of SDPA's fused backends that takes the shape.
    shapes = {"attn_self_4096": (2, 8, 4096, 4096, 40), "attn_cross_4096x77": (2, 8, 4096, 77, 40),
              "attn_self_1024": (2, 8, 1024, 1024, 80), "attn_self_256": (2, 8, 256, 256, 160)}
    for label, (b, h, nq, nk, d) in shapes.items():
        if tiny:
            b, h, nq, nk = 1, 1, 64, min(nk, 64)
        q = randn(b, nq, h, d).transpose(1, 2)
        k = randn(b, nk, h, d).transpose(1, 2)
        v = randn(b, nk, h, d).transpose(1, 2)
        for backend in _sdpa_backends(device):
            out.append(Case(f"{label}_vs_{backend}", f"B={b} H={h} Nq={nq} Nk={nk} D={d} {str(dt)[6:]}",
                            lambda q=q, k=k, v=v: attention(q, k, v),
                            lambda q=q, k=k, v=v, backend=backend: _sdpa(q, k, v, backend),
                            f"SDPA ({backend})", flops=4.0 * b * h * nq * nk * d))

    # GroupNorm + SiLU, channels_last (the UNet's and VAE's activations).
    for label, shape in {"gn_silu_unet": (2, 320, 64, 64), "gn_silu_vae": (1, 128, 512, 512)}.items():
        if tiny:
            shape = (1, 64, 8, 8)
        x = randn(*shape, fmt=cl)
        w, bias = randn(shape[1]), randn(shape[1])
        out.append(Case(label, f"{'x'.join(map(str, shape))} channels_last {str(dt)[6:]}",
                        lambda x=x, w=w, bias=bias: group_norm(x, 32, w, bias, silu=True),
                        lambda x=x, w=w, bias=bias: F.silu(F.group_norm(x, 32, w, bias)), "F.group_norm + F.silu",
                        bytes=2.0 * x.numel() * x.element_size()))

    rows, d = (64, 64) if tiny else (2 * 4096, 320)
    x, w, bias = randn(rows, d), randn(d), randn(d)
    out.append(Case("layer_norm", f"{rows}x{d} {str(dt)[6:]}", lambda: layer_norm(x, w, bias),
                    lambda: F.layer_norm(x, (d,), w, bias), "F.layer_norm", bytes=2.0 * x.numel() * x.element_size()))

    rows, f = (64, 64) if tiny else (2 * 4096, 1280)
    hidden = randn(rows, 2 * f)

    def geglu_torch():
        a, gate = hidden.chunk(2, dim=-1)
        return a * F.gelu(gate)

    out.append(Case("geglu", f"{rows}x{2 * f} {str(dt)[6:]}", lambda: geglu(hidden), geglu_torch,
                    "chunk + F.gelu + mul", bytes=1.5 * hidden.numel() * hidden.element_size()))

    # Guided sampler steps: fp16 UNet output at batch 2B, fp32 latents (as the loop keeps them).
    for label, shape in {"sd15": (1, 4, 64, 64), "large": (16, 4, 256, 256)}.items():
        if tiny:
            shape = (1, 4, 8, 8)
        lat = randn(*shape, dtype=torch.float32)
        model_out = randn(2 * shape[0], *shape[1:])
        noise, old = torch.randn_like(lat), torch.randn_like(lat)
        n = lat.numel()
        scalars = [torch.tensor([v], device=device) for v in (7.5, 3.0, 2.0, 4.0)]
        scale, sigma, sigma_next, sigma_prev = scalars
        base = 2 * n * model_out.element_size() + 2 * n * 4  # model out + x read, x_next written

        def euler_torch():
            uncond, cond = model_out.float().chunk(2)
            guided = uncond + scale * (cond - uncond)
            denoised = lat - sigma * guided
            return lat + (lat - denoised) / sigma * (sigma_next - sigma)

        def dpmpp_torch():
            uncond, cond = model_out.float().chunk(2)
            denoised = lat - sigma * (uncond + scale * (cond - uncond))
            h, h_last = torch.log(sigma / sigma_next), torch.log(sigma_prev / sigma)
            w_ = h / (2 * h_last)
            ratio = sigma_next / sigma
            return ratio * lat + (1 - ratio) * ((1 + w_) * denoised - w_ * old), denoised

        what = f"{'x'.join(map(str, shape))} (model out {str(dt)[6:]} at 2B, x fp32)"
        out.append(Case(f"euler_{label}", what,
                        lambda: euler_triton(model_out, lat, scale, sigma, sigma_next), euler_torch,
                        "unfused CFG + Euler (torch)", bytes=base))
        out.append(Case(f"dpmpp_2m_{label}", what,
                        lambda: dpmpp_2m_triton(model_out, lat, old, scale, sigma, sigma_next, sigma_prev), dpmpp_torch,
                        "unfused CFG + DPM++(2M) (torch)", bytes=base + 2 * n * 4))  # + old read, denoised written

    img = randn(1, 3, 64 if tiny else 512, 64 if tiny else 512, dtype=torch.float32)

    def decode_torch():
        return ((img * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    out.append(Case("decode_to_uint8", f"{'x'.join(map(str, img.shape))} fp32 → uint8 NHWC",
                    lambda: decode_to_uint8(img), decode_torch, "denormalize + round + permute (torch)",
                    bytes=img.numel() * 5.0))
    return out


class Timer:
    """Per-call samples in ms: CUDA events with an L2 flush before each on GPU, wall clock on CPU."""

    def __init__(self, device):
        self.cuda = device == "cuda"
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if self.cuda else None

    def __call__(self, fn, iters, warmup):
        for _ in range(warmup):
            fn()
        samples = []
        if self.cuda:
            torch.cuda.synchronize()
            for _ in range(iters):
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
        else:
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return samples


def measure_peaks(device, timer, tiny):
    """Copy bandwidth (GB/s, read + write) and bf16 matmul throughput (TFLOP/s) of this device."""
    n_bytes = (16 if tiny else 2048) * 2**20
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src), 5 if tiny else 20, 2 if tiny else 5)
    n = 512 if tiny else 8192
    mm_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    mm_ms = timer(lambda: a @ b, 5 if tiny else 20, 2 if tiny else 5)
    return {"copy_gbps": 2 * n_bytes / statistics.median(copy_ms) / 1e6, "copy_ms": copy_ms, "copy_bytes": n_bytes,
            "matmul_tflops": 2 * n**3 / statistics.median(mm_ms) / 1e9, "matmul_ms": mm_ms, "matmul_n": n,
            "matmul_dtype": str(mm_dtype)}


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(args):
    from ._triton import HAS_TRITON

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = device == "cpu" or args.tiny
    iters = args.iters or (3 if tiny else 50)
    warmup = 1 if tiny else 10
    timer = Timer(device)
    peaks = measure_peaks(device, timer, tiny)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter; smoke run only)"
    print(f"device: {name}   copy {peaks['copy_gbps']:.0f} GB/s   matmul ({peaks['matmul_dtype'][6:]}) "
          f"{peaks['matmul_tflops']:.3g} TFLOP/s   (measured peaks)")
    only = set(args.only.split(",")) if args.only else None
    results = []
    header = f"{'kernel':18} {'shape':48} {'ours ms':>9} {'torch ms':>9} {'speedup':>8} {'rate':>16} {'% peak':>7}"
    print(header)
    print("-" * len(header))
    for case in cases(device, tiny):
        if only and not any(case.name.startswith(o) for o in only):
            continue
        try:
            ours = timer(case.ours, iters, warmup)
            theirs = timer(case.theirs, iters, warmup)
        except Exception as e:  # e.g. an SDPA backend that does not take this shape: say so, go on
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"{case.name:18} {case.shape[:48]:48} not run: {error}")
            results.append({"name": case.name, "shape": case.shape, "torch_counterpart": case.theirs_label,
                            "error": error})
            if device == "cuda":
                torch.cuda.synchronize()
            continue
        med, med_t = statistics.median(ours), statistics.median(theirs)
        if case.flops:
            rate = case.flops / med / 1e9
            rate_s, pct = f"{rate:.3g} TFLOP/s", 100 * rate / peaks["matmul_tflops"]
        else:
            rate = case.bytes / med / 1e6
            rate_s, pct = f"{rate:.4g} GB/s", 100 * rate / peaks["copy_gbps"]
        print(f"{case.name:18} {case.shape[:48]:48} {med:9.4f} {med_t:9.4f} {med_t / med:7.2f}x {rate_s:>16} {pct:6.1f}%")
        results.append({"name": case.name, "shape": case.shape, "torch_counterpart": case.theirs_label,
                        "flops": case.flops, "bytes": case.bytes, "ours_ms": ours, "torch_ms": theirs,
                        "ours_median_ms": med, "torch_median_ms": med_t, "speedup": med_t / med,
                        "rate": rate, "rate_unit": "TFLOP/s" if case.flops else "GB/s", "pct_of_peak": pct})
    record = {
        "kind": "sdengine.kernels.bench", "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": name, "device_type": device, "tiny_shapes": tiny, "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__ if HAS_TRITON else None,
        "cuda": torch.version.cuda, "git_commit": _git_commit(),
        "command": " ".join(getattr(sys, "orig_argv", [sys.executable, "-m", "sdengine.kernels.bench", *sys.argv[1:]])),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"), "iters": iters, "warmup": warmup,
        "l2_flushed": device == "cuda", "peaks": peaks, "results": results,
    }
    if args.json:
        tmp = args.json + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sdengine.kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the record (device, versions, commit, command, raw samples) here")
    parser.add_argument("--only", help="comma-separated name prefixes, e.g. attn,gn_silu")
    parser.add_argument("--iters", type=int, default=0, help="timed samples per kernel (default 50 GPU, 3 CPU)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes even on a GPU")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when it is imported (by sdengine.kernels): start again with it set.
        env = dict(os.environ, TRITON_INTERPRET="1")
        sys.stdout.flush()
        os.execvpe(sys.executable, [sys.executable, "-m", "sdengine.kernels.bench", *(argv or sys.argv[1:])], env)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
