"""What one UNet forward costs the host besides its ops: diffusers' UNet against ours.

On a GPU host that pays ~29 µs of CPU per eager op (the lent H200's), the eager UNet step is
launch-bound: its op count and the Python work between ops set the step time. Both are
measured here on the meta device, at the workload's real architecture and latent size: every
op is dispatched and its output shape computed, but no data is touched and no kernel runs.

- `aten_ops`: the aten ops one forward dispatches (views excluded: they launch no kernel);
  on CUDA each is at least one launch;
- `python_ms`: the wall time of one forward minus the time spent inside those ops, the least of
  a few repeats (on meta
  that time is shape arithmetic, much of it Python reference code that has nothing to do with
  either UNet, hence its removal): the module code's own host work, comparable on any machine.

`sdengine bench` records both for `diffusers` and `eager` (`host_overhead` in the record),
so that a regression in our UNet's host work shows in every record, GPU or not. The GPU
side (host time per call without sync, device time by graph replay, kernels per step) is
benchmarks/profile_unet.py's.
"""

from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _TimedOps(TorchDispatchMode):
    """Counts the aten ops dispatched (views and aliases excluded) and the time spent in them."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.inside_s = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.__name__.startswith(("view", "_unsafe_view", "detach", "alias"))):
            self.ops += 1
        started = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.inside_s += time.perf_counter() - started
        return out


def _forwards(config, height: int, width: int, batch: int, dtype: torch.dtype) -> dict:
    """name -> a function running one UNet forward on meta tensors (at batch 2·batch: CFG)."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from sdengine.bench.reference import diffusers_unet_kwargs
    from sdengine.models.unet import UNet2DConditionModel

    cfg = config.unet
    latent_h, latent_w = height // config.vae.downscale, width // config.vae.downscale
    with torch.device("meta"):
        theirs = DiffusersUNet(**diffusers_unet_kwargs(cfg)).to(dtype).eval()
        ours = UNet2DConditionModel(cfg).to(dtype).eval()
        x = torch.empty(2 * batch, cfg.in_channels, latent_h, latent_w, dtype=dtype)
        t = torch.empty((), dtype=torch.float32)
        context = torch.empty(2 * batch, 77, cfg.cross_attention_dim, dtype=dtype)
        added = None
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            added = {"text_embeds": torch.empty(2 * batch, pooled, dtype=dtype),
                     "time_ids": torch.empty(2 * batch, 6, dtype=dtype)}
    return {
        "diffusers": lambda: theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False),
        # as the eager backend's denoise calls it: the timestep already (2B,) float32
        "eager": lambda: ours(x, t.expand(2 * batch), context, added_cond=added),
    }


def unet_host_overhead(config, height: int, width: int, batch: int = 1, dtype: torch.dtype = torch.float16,
                       repeats: int = 5) -> dict:
    """{"diffusers": {...}, "eager": {...}, "eager_vs_diffusers": ...}; see the module docstring."""
    result = {}
    with torch.inference_mode():
        for name, forward in _forwards(config, height, width, batch, dtype).items():
            forward()  # first call: lazy initialisation
            python_ms, ops = [], 0
            for _ in range(repeats):
                with _TimedOps() as timed:
                    started = time.perf_counter()
                    forward()
                    wall = time.perf_counter() - started
                python_ms.append((wall - timed.inside_s) * 1e3)
                ops = timed.ops
            # the least disturbed of the repeats: host timings only ever get slower from interference
            result[name] = {"aten_ops": ops, "python_ms": round(min(python_ms), 3),
                            "python_samples_ms": [round(t, 3) for t in python_ms]}
    result["eager_vs_diffusers"] = {
        "aten_ops": round(result["eager"]["aten_ops"] / result["diffusers"]["aten_ops"], 3),
        "python_ms": round(result["eager"]["python_ms"] / result["diffusers"]["python_ms"], 3)}
    result["method"] = ("one UNet forward at batch 2B on the meta device: aten ops dispatched (views excluded) and "
                        "the wall time outside them")
    return result
