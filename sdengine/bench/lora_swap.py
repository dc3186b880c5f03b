"""`sdengine bench --lora-swap`: how long merging a LoRA into the weights and removing it takes.

    sdengine bench --lora-swap --arch sd15 [--device cuda] [--dtype fp16] [--lora-rank 32]

Builds the architecture at its real size with random weights (the UNet and text encoder(s):
the networks a LoRA changes), writes a kohya LoRA file of the given rank covering what kohya's
trainer covers by default (every Linear / 1x1 conv of the UNet's transformer blocks, the text
encoders' attention and MLP), and times, through `Pipeline.set_loras`' machinery
(sdengine.lora.LoraWeights on the backend's weight_views):
- the first apply: read the file, check every key and shape, merge;
- apply again (the file cached) and remove (restore the base weights bit for bit), --repeats times;
On CUDA it also times a UNet step replayed from a CUDA graph (sdengine.backends.cuda_graphs;
with triton installed, on the fast path's layout: fused QKV, channels_last) before and after
the swaps, and checks that they captured nothing.

Writes a JSON record to --json, or benchmarks/results/<date>_<device>_<arch>_lora-swap.json.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def kohya_default_lora(config, path: Path, rank: int, dtype=torch.float16, seed: int = 0) -> dict:
    """Write a kohya LoRA file of `rank` over kohya's default targets; returns a summary."""
    from safetensors.torch import save_file

    from sdengine.lora import lora_names, lora_targets

    targets = lora_targets(config)
    generator = torch.Generator().manual_seed(seed)
    state, params = {}, 0
    for name, (component, key) in sorted(lora_names(config).items()):
        default = ".attentions." in key if component == "unet" else (".self_attn." in key or ".mlp." in key)
        diffusers_style = name.startswith("lora_unet_") and "_blocks_" in name and "input_blocks" not in name \
            and "output_blocks" not in name and "middle_block" not in name
        if not default or not (diffusers_style or name.startswith("lora_te")):
            continue
        shape = targets[(component, key)]
        down = torch.randn(rank, *shape[1:], generator=generator) / (shape[1] ** 0.5)
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=generator) * 0.01
        state[f"{name}.lora_down.weight"] = down.to(dtype)
        state[f"{name}.lora_up.weight"] = up.to(dtype)
        state[f"{name}.alpha"] = torch.tensor(float(rank) / 2).to(dtype)
        params += down.numel() + up.numel()
    save_file(state, str(path))
    return {"layers": len(state) // 3, "parameters": params, "file_mb": round(path.stat().st_size / 2 ** 20, 1)}


def _networks(config, device, dtype, seed: int) -> dict:
    """Our UNet and text encoder(s) at full size with random weights (filled in place, fast)."""
    from sdengine.loading import build_networks

    networks = {k: v for k, v in build_networks(config).items() if k != "vae"}
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in networks.values():
        module.to_empty(device=device)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02, generator=generator)
        module.to(dtype).eval().requires_grad_(False)
    return networks


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) * 1e3


def measure(arch: str = "sd15", device=None, dtype=None, rank: int = 32, repeats: int = 3, seed: int = 0,
            log=print) -> dict:
    """The lora-swap record (see the module docstring)."""
    from sdengine.device import resolve_device_dtype
    from sdengine.bench.harness import resolve_config
    from sdengine.lora import LoraWeights, parameter_views

    device, dtype = resolve_device_dtype(device, dtype)
    config, arch_name = resolve_config(arch, None)
    started = time.perf_counter()
    networks = _networks(config, device, dtype, seed)
    log(f"built the {arch_name} UNet and text encoder(s) on {device} in {time.perf_counter() - started:.1f} s")
    graphs, fused_qkv = None, False
    if device.type == "cuda":  # the fast path's layout (fused QKV, NHWC) and a graphed UNet step
        from sdengine import kernels
        from sdengine.backends.cuda_graphs import GraphCache

        if kernels.HAS_TRITON:
            from sdengine.backends.triton import prepare_for_triton

            for module in networks.values():
                prepare_for_triton(module, channels_last=True)
            fused_qkv = True
        graphs = GraphCache()
    views = lambda: parameter_views(networks)  # noqa: E731
    weights = LoraWeights(config, views)
    record = {"kind": "lora-swap", "arch": arch_name, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rank": rank,
              "fused_qkv": fused_qkv, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="sdengine-lora-swap-") as folder:
        path = Path(folder) / f"rank{rank}.safetensors"
        record["lora"] = kohya_default_lora(config, path, rank)
        log(f"wrote a rank-{rank} kohya LoRA: {record['lora']['layers']} layers, {record['lora']['file_mb']} MB")
        step = None
        if graphs is not None:
            from sdengine.backends.cuda_graphs import GraphedFunction

            def forward(x, t, context, text_embeds, time_ids):
                cond = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
                return networks["unet"](x, t, context, added_cond=cond)

            unet = GraphedFunction("unet", forward, graphs)
            side = config.unet.sample_size
            x = torch.randn(2, config.unet.in_channels, side, side, device=device, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            t = torch.full((2,), 500.0, device=device)
            context = torch.randn(2, 77, config.unet.cross_attention_dim, device=device, dtype=dtype)
            text_embeds = time_ids = None
            if config.unet.addition_embed_type == "text_time":
                text_embeds = torch.randn(2, config.text_encoder_2.projection_dim, device=device, dtype=dtype)
                time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=device, dtype=dtype)
            step = torch.inference_mode()(lambda: unet(x, t, context, text_embeds, time_ids))
            step()  # capture
            record["step_ms_before"] = statistics.median(_timed(step, device) for _ in range(20))
            captures = graphs.captures
        record["first_apply_ms"] = _timed(lambda: weights.apply([(path, 0.8)]), device)
        applies, removes = [], []
        for _ in range(repeats):
            removes.append(_timed(lambda: weights.apply([]), device))
            applies.append(_timed(lambda: weights.apply([(path, 0.8)]), device))
        if step is not None:
            record["step_ms_after"] = statistics.median(_timed(step, device) for _ in range(20))
            record["captures_unchanged"] = graphs.captures == captures
        removes.append(_timed(lambda: weights.apply([]), device))
    record.update(apply_ms=statistics.median(applies), remove_ms=statistics.median(removes),
                  apply_ms_all=applies, remove_ms_all=removes,
                  swap_ms=statistics.median(applies) + statistics.median(removes))
    return record


def run(args) -> int:
    """The bench CLI's --lora-swap: measure, print, write the record."""
    from sdengine.bench.output import slug

    record = measure(args.arch, device=args.device, dtype=args.dtype, rank=args.lora_rank,
                     repeats=max(1, min(args.repeats, 10)), seed=args.seed)
    print(f"{record['arch']} on {record['device']} ({record['dtype']}), rank {record['rank']}: first apply "
          f"{record['first_apply_ms']:.0f} ms (read + check + merge), apply {record['apply_ms']:.0f} ms, remove "
          f"{record['remove_ms']:.0f} ms, apply + remove {record['swap_ms']:.0f} ms")
    if "step_ms_before" in record:
        print(f"graphed UNet step {record['step_ms_before']:.2f} ms before, {record['step_ms_after']:.2f} ms after; "
              f"captures unchanged: {record['captures_unchanged']}")
    path = args.json
    if path is None:
        device = slug(record["device"]) if record["device_type"] == "cuda" else "cpu"
        out_dir = args.out_dir or Path("benchmarks") / "results"
        path = Path(out_dir) / f"{record['created'][:10]}_{device}_{slug(record['arch'])}_lora-swap.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0
