"""The networks as export graphs, for both exporters: one forward per network, tensors in and out.

ONNX (export/onnx.py) and AOTInductor (export/aoti.py) wrap the same networks, each with the
inputs and outputs its readers expect (onnxruntime sessions and the manifest; libsdengine,
csrc/); a flag says which:

| network         | ONNX                                         | AOTInductor                                     |
|-----------------|----------------------------------------------|-------------------------------------------------|
| text encoder(s) | hidden, pooled, hidden states by clip_skip   | (input_ids, clip_skip (B,)) -> hidden at that   |
|                 | (`by_skip`)                                  | clip_skip (`hidden`); SDXL's second: + pooled   |
|                 |                                              | (`pooled`)                                      |
| UNet            | timestep (B,) as given                       | timestep[0] (`one_timestep`)                    |
| VAE encoder     | mean, logvar                                 | [mean, logvar] in one tensor (`stacked`)        |
| VAE decoder     | the same                                     | the same                                        |

Every graph holds its network as `self.m`, so its constants are named `m.<parameter>` (PREFIX).
"""

from __future__ import annotations

import torch
from torch import nn

PREFIX = "m."  # the graphs hold the network as `self.m`
TEXT_OUTPUTS = ("hidden", "pooled", "by_skip")


class TextEncoderGraph(nn.Module):
    """input_ids (B, L) int64 [, clip_skip (B,) int64] -> by `outputs`:
    "hidden":  hidden states (B, L, D) that condition the UNet, row b at clip_skip[b]: what
               CLIPTextModel.forward(clip_skip=clip_skip[b]) returns as hidden;
    "pooled":  (hidden states as "hidden", pooled (B, P)) (SDXL's second encoder);
    "by_skip": (hidden states, pooled, hidden_states_by_skip (S, B, L, D)), no clip_skip input, where
               hidden_states_by_skip[k] is what CLIPTextModel.forward(clip_skip=k) returns as hidden:
               for output_layer "last", the final LayerNorm of the output of layer N - k (S = N + 1);
               for "penultimate", the output of layer N - 1 - k with no LayerNorm (S = N).

    "hidden" and "pooled" (AOTInductor) take clip_skip as a tensor so that one compiled graph
    serves every clip_skip, and clip_skip 0 costs one gather more than a graph without it
    (the final LayerNorm runs once on the chosen layer, and once on the pooled rows only).
    Out-of-range values are clamped: the callers check the range (sdengine/request.py).
    """

    def __init__(self, text_encoder: nn.Module, outputs: str):
        super().__init__()
        if outputs not in TEXT_OUTPUTS:
            raise ValueError(f"outputs must be one of {TEXT_OUTPUTS}, got {outputs!r}")
        self.m, self.outputs = text_encoder, outputs

    def forward(self, input_ids, clip_skip=None):
        cfg, model = self.m.cfg, self.m.text_model
        x = model.embeddings(input_ids)  # (B, L, D)
        layer_outputs = [x]  # layer_outputs[k]: output of layer k (0 = embeddings)
        for layer in model.encoder.layers:
            x = layer(x)
            layer_outputs.append(x)
        batch_index = torch.arange(x.shape[0], device=x.device)
        eos = self.m._eos_positions(input_ids)  # (B,)
        if self.outputs == "by_skip":
            final = model.final_layer_norm(x)  # (B, L, D)
            earlier = list(reversed(layer_outputs[:-1]))  # layers N-1, N-2, ..., 0
            if cfg.output_layer == "last":
                by_skip = [final] + [model.final_layer_norm(h) for h in earlier]
            else:
                by_skip = earlier
            pooled = final[batch_index, eos]  # (B, D)
            if cfg.projection_dim is not None:
                pooled = self.m.text_projection(pooled)  # (B, projection_dim)
            return by_skip[0], pooled, torch.stack(by_skip)  # (S, B, L, D)
        # Row b's layer: N - clip_skip[b] ("last"), N - 1 - clip_skip[b] ("penultimate").
        top = cfg.num_hidden_layers - (1 if cfg.output_layer == "penultimate" else 0)
        layer_index = (top - clip_skip).clamp(0, top)  # (B,)
        hidden = torch.stack(layer_outputs[:top + 1])[layer_index, batch_index]  # (top + 1, B, L, D) -> (B, L, D)
        if cfg.output_layer == "last":
            hidden = model.final_layer_norm(hidden)
        if self.outputs == "hidden":
            return hidden
        # LayerNorm works token by token: the end-of-text rows alone give the pooled output.
        pooled = model.final_layer_norm(x[batch_index, eos])  # (B, D)
        if cfg.projection_dim is not None:
            pooled = self.m.text_projection(pooled)  # (B, projection_dim)
        return hidden, pooled


class UNetGraph(nn.Module):
    """x (B, C, h, w), t (B,) float32, context (B, L, D) [, text_embeds (B, P), time_ids (B, 6): SDXL]
    -> model output (B, C_out, h, w).

    one_timestep: the UNet gets t[0]. Every sampler step feeds one timestep to the whole batch,
    and the UNet's `timestep.numel() == 1` branch would otherwise make batch 1 a special case
    that torch.export refuses for a dynamic batch (AOTInductor).
    """

    def __init__(self, unet: nn.Module, one_timestep: bool = False):
        super().__init__()
        self.m, self.one_timestep = unet, one_timestep

    def forward(self, x, t, context, text_embeds=None, time_ids=None):
        added_cond = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.m(x, t[0] if self.one_timestep else t, context, added_cond=added_cond)


class VAEDecoderGraph(nn.Module):
    """Unscaled latents z (B, C, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.m = vae

    def forward(self, z):
        return self.m.decode(z)


class VAEEncoderGraph(nn.Module):
    """Images x (B, 3, 8h, 8w) in [-1, 1] -> the posterior (mean, logvar), each (B, C, h, w)
    (logvar clamped to [-30, 20]); stacked: [mean, logvar] in one tensor (B, 2C, h, w)
    (img2img samples mean + exp(logvar / 2) * eps with each image's generator)."""

    def __init__(self, vae: nn.Module, stacked: bool = False):
        super().__init__()
        self.m, self.stacked = vae, stacked

    def forward(self, x):
        mean, logvar = self.m.encode(x)
        return torch.cat([mean, logvar], dim=1) if self.stacked else (mean, logvar)
