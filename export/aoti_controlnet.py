"""AOTInductor engines for ControlNets: `controlnet.pt2` and the UNet that takes their residuals.

A ControlNet engine is a folder next to the model's engine, for one (model architecture,
ControlNet architecture) pair, built like the model's networks (export/aoti.py: random weights,
constants handed over at load time, so one engine serves every checkpoint of the pair; each
network compiled in a child process):

    controlnet_engine.json  format, torch version, device, dtype, CPU capability, the ControlNet's
                            config, its skips ([channels, level] per residual), and per network
                            its package, component, constant prefix, constants' shapes and (for
                            the ControlNet) the single-file tensors each constant may be read from
    controlnet.pt2          x (B, C, h, w), t (B,) float32, context (B, 77, D), cond (B, C_cond, H, W)
                            in [0, 1] [, SDXL: text_embeds (B, P), time_ids (B, 6)]
                            -> (one residual per UNet skip, ..., the mid residual), at scale 1
    unet_control.pt2        x, t, context [, text_embeds, time_ids], down residuals, mid residual
                            -> model output: the model's UNet with the residuals added

Guess mode, the scale and the sum over several ControlNets are elementwise and stay outside
the packages (sdengine/backends/native.py, csrc). Batch, height and width are dynamic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from . import aoti

CONTROL_FORMAT = 2  # 2: contexts of any number of 77-token windows
CONTROL_NETWORKS = ("controlnet", "unet_control")


class ControlNetExport(torch.nn.Module):
    """x, t, context, cond -> (down residuals..., mid residual) at scale 1 (as UNetExport, t[0])."""

    def __init__(self, controlnet):
        super().__init__()
        self.m = controlnet

    def forward(self, x, t, context, cond):
        down, mid = self.m(x, t[0], context, cond)
        return (*down, mid)


class SDXLControlNetExport(ControlNetExport):
    def forward(self, x, t, context, cond, text_embeds, time_ids):
        down, mid = self.m(x, t[0], context, cond, added_cond={"text_embeds": text_embeds, "time_ids": time_ids})
        return (*down, mid)


class UNetControlExport(torch.nn.Module):
    """The UNet with ControlNet residuals: x, t, context, down (a list, one per skip), mid."""

    def __init__(self, unet):
        super().__init__()
        self.m = unet

    def forward(self, x, t, context, down, mid):
        return self.m(x, t[0], context, down_block_additional_residuals=list(down), mid_block_additional_residual=mid)


class SDXLUNetControlExport(UNetControlExport):
    def forward(self, x, t, context, text_embeds, time_ids, down, mid):
        return self.m(x, t[0], context, added_cond={"text_embeds": text_embeds, "time_ids": time_ids},
                      down_block_additional_residuals=list(down), mid_block_additional_residual=mid)


def skips(unet_config) -> list:
    """[channels, level] of each UNet skip (each residual), in order: conv_in's output, then per
    level its resnets' outputs and, but at the last level, its downsample's (one level lower)."""
    channels = unet_config.block_out_channels
    out = [[channels[0], 0]]
    for level, c in enumerate(channels):
        out += [[c, level]] * unet_config.layers_per_block
        if level < len(channels) - 1:
            out.append([c, level + 1])
    return out


@dataclasses.dataclass(frozen=True)
class ControlEngineConfig:
    """What a ControlNet engine is compiled for: the model and the ControlNet architectures."""

    model: object       # sdengine.config.ModelConfig
    controlnet: object  # sdengine.config.ControlNetConfig

    @property
    def name(self) -> str:
        return f"{self.model.name} ControlNet"

    def network_module(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        from sdengine.models.controlnet import ControlNetModel
        from sdengine.models.unet import UNet2DConditionModel

        sdxl = self.model.text_encoder_2 is not None
        with torch.device(device):
            if name == "controlnet":
                module = (SDXLControlNetExport if sdxl else ControlNetExport)(ControlNetModel(self.controlnet))
            elif name == "unet_control":
                module = (SDXLUNetControlExport if sdxl else UNetControlExport)(UNet2DConditionModel(self.model.unet))
            else:
                raise ValueError(f"unknown ControlNet engine network {name!r}; expected one of {CONTROL_NETWORKS}")
        return module.to(dtype=dtype).eval()

    def example_inputs(self, dtype: torch.dtype, device: torch.device):
        """The model's example inputs (aoti.example_inputs) extended to the ControlNet's and the
        residuals': per network (args, dynamic shapes), and the latent multiple."""
        examples, multiple = aoti.example_inputs(self.model, dtype, device)
        return self._examples(examples, multiple, dtype, device)

    def _examples(self, examples, multiple, dtype, device):
        Dim = torch.export.Dim
        args, dynamic = examples["unet"]
        batch = Dim("batch", min=1, max=aoti.MAX_BATCH)
        h = Dim("h", min=1, max=aoti.MAX_LATENT // multiple)
        w = Dim("w", min=1, max=aoti.MAX_LATENT // multiple)
        x, t, context, *added = args
        latent = x[:, :self.model.vae.latent_channels]  # a ControlNet reads the latents only
        down = self.controlnet.downscale
        cond = torch.rand(x.shape[0], self.controlnet.conditioning_channels, x.shape[2] * down, x.shape[3] * down,
                          device=device, dtype=dtype)
        spatial = lambda level: {2: (multiple // 2 ** level) * h, 3: (multiple // 2 ** level) * w}  # noqa: E731
        base = {"x": {0: batch, **spatial(0)}, "t": {0: batch},
                "context": aoti.context_dims(batch, self.model.text_encoder.max_position_embeddings)}
        added_dynamic = {"text_embeds": {0: batch}, "time_ids": {0: batch}} if added else {}
        cn_dynamic = dict(base, cond={0: batch, 2: down * multiple * h, 3: down * multiple * w}, **added_dynamic)
        residuals = [torch.randn(x.shape[0], c, x.shape[2] // 2 ** level, x.shape[3] // 2 ** level, device=device,
                                 dtype=dtype) for c, level in skips(self.model.unet)]
        levels = len(self.model.unet.block_out_channels)
        mid = torch.randn(x.shape[0], self.model.unet.block_out_channels[-1], x.shape[2] // 2 ** (levels - 1),
                          x.shape[3] // 2 ** (levels - 1), device=device, dtype=dtype)
        unet_dynamic = dict(base, **added_dynamic,
                            down=[{0: batch, **spatial(level)} for _, level in skips(self.model.unet)],
                            mid={0: batch, **spatial(levels - 1)})
        return {
            "controlnet": ((latent.contiguous(), t, context, cond, *added), cn_dynamic),
            "unet_control": ((x, t, context, *added, residuals, mid), unet_dynamic),
        }, multiple


def engine_key(model_config, controlnet_config, dtype: torch.dtype, device) -> str:
    """A hash of both architectures, dtype, device kind, CPU capability and torch version."""
    device = torch.device(device)
    ident = json.dumps({"model": aoti.engine_key(model_config, dtype, device),
                        "controlnet": dataclasses.asdict(controlnet_config), "format": CONTROL_FORMAT},
                       sort_keys=True, default=str)
    return "controlnet-" + hashlib.sha256(ident.encode()).hexdigest()[:20]


def _ldm_sources(config: ControlEngineConfig, constants: dict) -> dict:
    """Per ControlNet constant, the single-file tensors it may be read from: the control_model.*
    layout, then the same without the prefix (ldm_layout.controlnet_key_to_ldm)."""
    from sdengine.ldm_layout import CONTROLNET_PREFIX, UnmappedKey, controlnet_key_to_ldm

    out = {}
    for fqn in constants:
        try:
            key = controlnet_key_to_ldm(fqn[len(aoti.PREFIX):], config.controlnet)
        except UnmappedKey:
            continue
        out[fqn] = [[CONTROLNET_PREFIX + key, ""], [key, ""]]
    return out


def build_controlnet_engine(model_config, controlnet_config, out_dir, *, dtype: torch.dtype, device,
                            progress: bool = True) -> Path:
    """Compile controlnet.pt2 and unet_control.pt2 for the pair into `out_dir` (see the module
    docstring), each in a child process; written aside and renamed into place."""
    from . import side_engine

    config = ControlEngineConfig(model_config, controlnet_config)
    meta = {"format": CONTROL_FORMAT, "controlnet_config": dataclasses.asdict(controlnet_config),
            "skips": skips(model_config.unet),
            "single_file": {}}  # its "ldm" sources read A1111 single files (csrc single_file_weights)

    def ldm(name, result):
        return {"ldm": _ldm_sources(config, result["constants"])} if name == "controlnet" else {}

    return side_engine.build(config, CONTROL_NETWORKS, out_dir, meta_file="controlnet_engine.json", meta=meta,
                             component=lambda name: "controlnet" if name == "controlnet" else "unet",
                             dtype=dtype, device=device, progress=progress, extra=ldm)


def controlnet_engine_for(model_config, controlnet_config, *, dtype: torch.dtype, device, progress: bool = True) -> Path:
    """The cached ControlNet engine of the pair for device and dtype ($SDE_CACHE_DIR/aoti/controlnet-<key>),
    built on first use (one builder per entry: sdengine.cachedir's lock)."""
    from . import side_engine

    return side_engine.cached(
        engine_key(model_config, controlnet_config, dtype, device), "controlnet_engine.json",
        lambda path: build_controlnet_engine(model_config, controlnet_config, path, dtype=dtype, device=device,
                                             progress=progress), "ControlNet")
