"""AOTInductor engines for DeepCache in the C++ loop: the model's UNet as DeepCache's two kinds
of step, for one skip branch.

A DeepCache engine is a folder beside the model's engine, for one (model architecture, branch)
pair, built as a ControlNet engine is (export/side_engine.py: random weights, constants handed
over at load time from the model's own UNet tensors, so LoRAs merged into them reach it):

    deepcache_engine.json   format, torch version, device, dtype, CPU capability, branch,
                            the kept state's channels and downscale (per latent cell), and per
                            network its package, component ("unet"), constant prefix and
                            constants' shapes
    unet_deep_store.pt2     x, t, context [, text_embeds, time_ids]
                            -> (model output, the state entering the branch's first up layer):
                            DeepCache's full step (sdengine/models/caching.py STORE)
    unet_deep_reuse.pt2     x, t, context [, text_embeds, time_ids], kept state -> model output:
                            the shallow branch only (REUSE)

Which step is which is DeepCache's schedule (sdengine/acceleration.py: every interval-th step,
counted from the first, is full); the C++ loop keeps the state between the calls. Batch,
height, width and the prompt windows are dynamic, as in the model's UNet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from . import aoti

DEEPCACHE_FORMAT = 1
DEEPCACHE_NETWORKS = ("unet_deep_store", "unet_deep_reuse")


class DeepCacheStoreExport(torch.nn.Module):
    """x, t, context [, text_embeds, time_ids] -> (output, kept state): DeepCache's full step."""

    def __init__(self, unet, branch: tuple):
        super().__init__()
        from sdengine.models.caching import STORE, StepKind

        self.m, self.kind = unet, StepKind(deep=STORE, branch=branch)

    def forward(self, x, t, context, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        out, stored = self.m(x, t[0], context, added_cond=added, kind=self.kind)
        return out, stored["deep"]


class DeepCacheReuseExport(torch.nn.Module):
    """x, t, context, deep -> output: DeepCache's cached step from the kept state."""

    def __init__(self, unet, branch: tuple):
        super().__init__()
        from sdengine.models.caching import REUSE, StepKind

        self.m, self.kind = unet, StepKind(deep=REUSE, branch=branch)

    def forward(self, x, t, context, deep):
        return self.m(x, t[0], context, kind=self.kind, cached={"deep": deep})[0]


class SDXLDeepCacheReuseExport(DeepCacheReuseExport):
    def forward(self, x, t, context, text_embeds, time_ids, deep):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.m(x, t[0], context, added_cond=added, kind=self.kind, cached={"deep": deep})[0]


@dataclasses.dataclass(frozen=True)
class DeepCacheEngineConfig:
    """What a DeepCache engine is compiled for: the model's architecture and DeepCache's branch
    (sdengine.DeepCache.branch: down level branch // 3, layer branch % 3)."""

    model: object  # sdengine.config.ModelConfig
    branch: int

    @property
    def name(self) -> str:
        return f"{self.model.name} DeepCache branch {self.branch}"

    @property
    def level_and_layer(self) -> tuple:
        return self.branch // 3, self.branch % 3

    def network_module(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        from sdengine.models.unet import UNet2DConditionModel

        sdxl = self.model.text_encoder_2 is not None
        kinds = {"unet_deep_store": DeepCacheStoreExport,
                 "unet_deep_reuse": SDXLDeepCacheReuseExport if sdxl else DeepCacheReuseExport}
        if name not in kinds:
            raise ValueError(f"unknown DeepCache engine network {name!r}; expected one of {DEEPCACHE_NETWORKS}")
        with torch.device(device):
            module = kinds[name](UNet2DConditionModel(self.model.unet), self.level_and_layer)
        return module.to(dtype=dtype).eval()

    def kept_state(self) -> dict:
        """The kept state's channels and downscale per latent cell, from one call of the UNet at
        the example inputs' sizes (random weights on the meta device: shapes only)."""
        from sdengine.models.caching import STORE, StepKind
        from sdengine.models.unet import UNet2DConditionModel

        examples, _ = aoti.example_inputs(self.model, torch.float32, torch.device("meta"))
        x, t, context, *added = examples["unet"][0]
        with torch.device("meta"):
            unet = UNet2DConditionModel(self.model.unet)
        added_cond = {"text_embeds": added[0], "time_ids": added[1]} if added else None
        with torch.no_grad():
            _, stored = unet(x, t[0], context, added_cond=added_cond, kind=StepKind(deep=STORE, branch=self.level_and_layer))
        deep = stored["deep"]
        return {"channels": int(deep.shape[1]), "downscale": int(x.shape[2] // deep.shape[2])}

    def example_inputs(self, dtype: torch.dtype, device: torch.device):
        """The model's UNet example inputs (aoti.example_inputs) and, for the reuse step, the kept
        state's: per network (args, dynamic shapes), and the latent multiple."""
        examples, multiple = aoti.example_inputs(self.model, dtype, device)
        args, dynamic = examples["unet"]
        kept = self.kept_state()
        x, scale = args[0], kept["downscale"]
        deep = torch.randn(x.shape[0], kept["channels"], x.shape[2] // scale, x.shape[3] // scale,
                           device=device, dtype=dtype)
        Dim = torch.export.Dim  # the same names and ranges as aoti.example_inputs' dimensions
        batch = Dim("batch", min=1, max=aoti.MAX_BATCH)
        h = Dim("h", min=1, max=aoti.MAX_LATENT // multiple)
        w = Dim("w", min=1, max=aoti.MAX_LATENT // multiple)
        dynamic = dict(dynamic, x={0: batch, 2: multiple * h, 3: multiple * w}, t={0: batch},
                       context=aoti.context_dims(batch, self.model.text_encoder.max_position_embeddings),
                       **({"text_embeds": {0: batch}, "time_ids": {0: batch}} if len(args) > 3 else {}))
        deep_dims = {0: batch, 2: (multiple // scale) * h, 3: (multiple // scale) * w}
        return {"unet_deep_store": (args, dynamic),
                "unet_deep_reuse": ((*args, deep), dict(dynamic, deep=deep_dims))}, multiple


def engine_key(model_config, branch: int, dtype: torch.dtype, device) -> str:
    """A hash of the model's engine key, the branch and the format."""
    ident = json.dumps({"model": aoti.engine_key(model_config, dtype, torch.device(device)), "branch": branch,
                        "format": DEEPCACHE_FORMAT}, sort_keys=True)
    return "deepcache-" + hashlib.sha256(ident.encode()).hexdigest()[:20]


def check_branch(model_config, branch: int) -> None:
    from sdengine.acceleration import Acceleration, DeepCache

    Acceleration(deepcache=DeepCache(branch=branch)).check_model(model_config.unet)


def build_deepcache_engine(model_config, branch: int, out_dir, *, dtype: torch.dtype, device,
                           progress: bool = True) -> Path:
    """Compile unet_deep_store.pt2 and unet_deep_reuse.pt2 for the branch into `out_dir` (see the
    module docstring)."""
    from . import side_engine

    check_branch(model_config, branch)
    config = DeepCacheEngineConfig(model_config, branch)
    meta = {"format": DEEPCACHE_FORMAT, "branch": branch, "kept": config.kept_state()}
    return side_engine.build(config, DEEPCACHE_NETWORKS, out_dir, meta_file="deepcache_engine.json", meta=meta,
                             component=lambda name: "unet", dtype=dtype, device=device, progress=progress)


def deepcache_engine_for(model_config, branch: int, *, dtype: torch.dtype, device, progress: bool = True) -> Path:
    """The cached DeepCache engine of the model's architecture and branch ($SDE_CACHE_DIR/aoti/deepcache-<key>),
    built on first use."""
    from . import side_engine

    check_branch(model_config, branch)
    return side_engine.cached(
        engine_key(model_config, branch, dtype, device), "deepcache_engine.json",
        lambda path: build_deepcache_engine(model_config, branch, path, dtype=dtype, device=device,
                                            progress=progress), "DeepCache")
