"""Tiny IP-Adapter files and image encoders for the tests, in the layouts users download.

    folder = write_image_encoder(tmp / "image_encoder")           # transformers CLIPVisionModelWithProjection
    path = write_ip_adapter(tmp / "ip.safetensors", "sd15")       # tencent-ailab's keys, random weights

The image encoder is transformers' own model (image size 224 and patch 32, as the default
CLIPImageProcessor crops to 224, with a tiny width), saved by save_pretrained. The adapter files
hold `image_proj.*` (the basic projection, or IP-Adapter Plus's Resampler) and `ip_adapter.{i}.to_k_ip
/ to_v_ip` for every cross-attention i of diffusers' attn_processors order, as the original files do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdengine.config import tiny_config

ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224,
               patch_size=32, projection_dim=24, hidden_act="gelu")
PLUS_DIM = 64  # the Resampler's width: heads of 64, as every Plus adapter


def write_image_encoder(folder, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def cross_attention_indices(kind: str) -> list:
    """(index in diffusers' attn_processors order, query width) of each cross-attention of the tiny UNet."""
    from support.tiny import diffusers_unet

    unet = diffusers_unet(tiny_config(kind).unet)
    modules = dict(unet.named_modules())
    out = []
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            out.append((i, modules[name.removesuffix(".processor")].to_q.out_features))
    return out


def adapter_state(kind: str, plus: bool = False, seed: int = 0, tokens: int = 4) -> dict:
    """{"image_proj": ..., "ip_adapter": ...} of a random adapter for the tiny model `kind`."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=0.2: torch.randn(*shape, generator=g) * scale  # noqa: E731
    norm = lambda n: {"weight": 1 + rand(n, scale=0.05), "bias": rand(n, scale=0.05)}  # noqa: E731
    context = tiny_config(kind).unet.cross_attention_dim
    proj = {}
    if plus:
        d = PLUS_DIM
        proj = {"latents": rand(1, tokens, d, scale=1.0), "proj_in.weight": rand(d, ENCODER["hidden_size"]),
                "proj_in.bias": rand(d), "proj_out.weight": rand(context, d), "proj_out.bias": rand(context),
                **{f"norm_out.{k}": v for k, v in norm(context).items()}}
        for layer in range(4):  # the depth diffusers assumes (every published Plus adapter)
            p = f"layers.{layer}."
            proj.update({f"{p}0.norm1.{k}": v for k, v in norm(d).items()})
            proj.update({f"{p}0.norm2.{k}": v for k, v in norm(d).items()})
            proj.update({f"{p}0.to_q.weight": rand(d, d), f"{p}0.to_kv.weight": rand(2 * d, d),
                         f"{p}0.to_out.weight": rand(d, d), f"{p}1.1.weight": rand(4 * d, d),
                         f"{p}1.3.weight": rand(d, 4 * d)})
            proj.update({f"{p}1.0.{k}": v for k, v in norm(d).items()})
    else:
        proj = {"proj.weight": rand(context * tokens, ENCODER["projection_dim"]), "proj.bias": rand(context * tokens),
                **{f"norm.{k}": v for k, v in norm(context).items()}}
    layers = {}
    for index, width in cross_attention_indices(kind):
        layers[f"{index}.to_k_ip.weight"] = rand(width, context, scale=0.5)
        layers[f"{index}.to_v_ip.weight"] = rand(width, context, scale=0.5)
    return {"image_proj": proj, "ip_adapter": layers}


def write_ip_adapter(path, kind: str, plus: bool = False, seed: int = 0, tokens: int = 4) -> Path:
    """A .safetensors with flat image_proj.* / ip_adapter.* keys, or a .bin holding the two dicts;
    `tokens` image tokens (the published basic adapters have 4, the Plus ones 16)."""
    path = Path(path)
    state = adapter_state(kind, plus, seed, tokens)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({f"{part}.{k}": v.contiguous() for part, d in state.items() for k, v in d.items()}, str(path))
    else:
        torch.save(state, path)
    return path
