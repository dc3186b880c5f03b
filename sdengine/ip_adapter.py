"""IP-Adapter in the pipeline: reading adapter files and image encoders, the image preprocessing,
and the image tokens of a run.

    pipe.load_ip_adapter("ip-adapter_sd15.safetensors", image_encoder="models/image_encoder")
    result = pipe("a cat", ip_adapter_image=photo, ip_adapter_scale=0.6)

Semantics are diffusers' (`load_ip_adapter`, `set_ip_adapter_scale`, `ip_adapter_image`), so
images match diffusers' on the same weights:
- the image is preprocessed as transformers' CLIPImageProcessor does (`preprocess`: the shortest
  side resized to the encoder's image size, bicubic; the centre cropped square; scaled to [0, 1]
  and normalized with CLIP's mean and std);
- basic adapters (`image_proj.proj`) project the encoder's `image_embeds`; their negative
  (classifier-free guidance) embedding is zeros. Plus adapters (`image_proj.latents`, the
  Resampler) read the encoder's penultimate hidden states; their negative is the encoder's
  output for an all-zero image (after normalization), as diffusers does;
- each cross-attention of the UNet adds `scale * attention(q, to_k_ip(tokens), to_v_ip(tokens))`
  per adapter (models/layers.py Attention.ip_layers); several adapters add up.

The projection runs once per request, outside the denoising step: the step gets the image
tokens (`ip_tokens_i`, one (2N or N, T, D) tensor per adapter) and the scales (`ip_scales`,
(2N or N, adapters)) in its added conditioning, which the graph layers keep as static buffers, so
that a new image or scale replays the captured step without recapturing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .errors import ModelLoadError

# OpenAI CLIP's normalization (CLIPImageProcessor's image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# diffusers' attn_processors order: the UNet's modules as registered (down, up, then mid).
_BLOCK_ORDER = ("down_blocks.", "up_blocks.", "mid_block.")


def preprocess(image, size: int) -> torch.Tensor:
    """A PIL image -> (1, 3, size, size) float32, as transformers' CLIPImageProcessor(size=
    {"shortest_edge": size}, crop_size=size) makes pixel_values: RGB; the shortest side resized to
    `size` (PIL bicubic; the other side int(size * long / short)); the centre size x size cropped
    (top = (h - size) // 2, as its center_crop rounds); / 255; normalized."""
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    top, left = (image.height - size) // 2, (image.width - size) // 2
    array = np.asarray(image, dtype=np.float32)[top:top + size, left:left + size] / 255.0  # (S, S, 3)
    array = (array - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())[None]


def load_image_encoder(folder, device, dtype):
    """Our CLIPVisionModelWithProjection from a transformers folder (config.json + model.safetensors,
    or pytorch_model.bin through torch.load(weights_only=True)). ModelLoadError names the file."""
    from .config import VisionEncoderConfig
    from .models.clip_vision import CLIPVisionModelWithProjection
    from .weights import component_weight_files, open_weights

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image_encoder: no such folder: {folder} (a transformers "
                                "CLIPVisionModelWithProjection folder: config.json and model.safetensors)")
    try:
        data = json.loads((folder / "config.json").read_text())
        config = VisionEncoderConfig.from_dict(data)
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{folder / 'config.json'}: not a CLIP vision config: {e}") from None
    reader = open_weights(component_weight_files(folder))
    state = {key: reader.get(key) for key in reader.shapes if not key.endswith("position_ids")}
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    _load_state(model, state, str(folder))
    return model.to(device, dtype).eval().requires_grad_(False)


def _load_state(model: nn.Module, state: dict, where: str) -> None:
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelLoadError(f"{where}: {len(missing)} missing and {len(extra)} unexpected weights "
                             f"(missing: {missing[:4]}, unexpected: {extra[:4]})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelLoadError(f"{where}: shape mismatch for {key!r}: found {list(tensor.shape)}, expected "
                                 f"{list(expected[key].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)


def read_adapter_file(path) -> tuple[dict, dict]:
    """(image_proj state, ip_adapter state) of an original IP-Adapter file: a .safetensors with
    flat `image_proj.*` / `ip_adapter.*` keys, or a .bin / .pt holding {"image_proj": {...},
    "ip_adapter": {...}} (read through torch.load(weights_only=True))."""
    from .weights import open_weights

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ip_adapter: no such file: {path}")
    if path.suffix == ".safetensors":
        reader = open_weights([path])
        flat = {key: reader.get(key) for key in reader.shapes}
    elif path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same error for the user
            raise ModelLoadError(f"{path}: refused by torch.load(weights_only=True): {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("image_proj", "ip_adapter")):
            raise ModelLoadError(f"{path}: not an IP-Adapter file (expected 'image_proj' and 'ip_adapter' dicts)")
        flat = {f"{part}.{key}": value for part in ("image_proj", "ip_adapter") for key, value in data[part].items()}
    else:
        raise ModelLoadError(f"{path}: unsupported file type {path.suffix!r}; expected .safetensors or .bin")
    parts = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        if part not in parts or not isinstance(value, torch.Tensor):
            raise ModelLoadError(f"{path}: unexpected key {key!r} (an IP-Adapter file holds image_proj.* and "
                                 "ip_adapter.* only)")
        parts[part][rest] = value
    if not parts["image_proj"] or not parts["ip_adapter"]:
        raise ModelLoadError(f"{path}: not an IP-Adapter file (no image_proj.* or no ip_adapter.* keys)")
    return parts["image_proj"], parts["ip_adapter"]


def projection_of(state: dict, context_dim: int, path) -> tuple[nn.Module, bool]:
    """(the image projection network of an adapter file's image_proj state, whether it reads the
    encoder's hidden states (Plus)). Basic and Plus; FaceID and "full" adapters are refused."""
    from .models.ip_adapter import ImageProjection, Resampler

    if "proj.weight" in state:
        out_features, clip_dim = state["proj.weight"].shape
        tokens = out_features // context_dim
        if tokens * context_dim != out_features or state["norm.weight"].shape[0] != context_dim:
            raise ModelLoadError(f"{path}: image_proj.proj gives {out_features} features, not tokens of the UNet's "
                                 f"context width {context_dim} (an adapter for another model family?)")
        build, hidden = (lambda: ImageProjection(clip_dim, context_dim, tokens)), False
    elif "latents" in state and "proj_in.weight" in state:
        if state["proj_out.weight"].shape[0] != context_dim:
            raise ModelLoadError(f"{path}: image_proj.proj_out gives {state['proj_out.weight'].shape[0]} features, "
                                 f"the UNet's context is {context_dim} wide (an adapter for another model family?)")
        depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("layers."))
        _, queries, dim = state["latents"].shape
        heads = state["layers.0.0.to_q.weight"].shape[0] // 64  # dim_head 64, as every Plus adapter
        build, hidden = (lambda: Resampler(state["proj_in.weight"].shape[1], dim, context_dim, depth, heads,
                                           queries)), True
    else:
        raise ModelLoadError(f"{path}: unsupported IP-Adapter projection (keys {sorted(state)[:4]}); sdengine reads "
                             "the basic adapters (image_proj.proj) and IP-Adapter Plus (image_proj.latents); "
                             "FaceID and 'full' adapters are not supported")
    with torch.device("meta"):
        model = build()
    _load_state(model, state, f"{path} (image_proj)")
    return model, hidden


def cross_attentions(unet: nn.Module) -> list:
    """(diffusers name, module) of every attention of the UNet in diffusers' attn_processors order,
    whose positions number an adapter file's ip_adapter keys (cross-attentions are the odd ones)."""
    from .models.layers import Attention

    named = [(name, module) for name, module in unet.named_modules() if isinstance(module, Attention)]
    return sorted(named, key=lambda item: next(i for i, p in enumerate(_BLOCK_ORDER) if item[0].startswith(p)))


@dataclass
class IPAdapter:
    """One loaded adapter: its projection, whether it reads hidden states (Plus), and its
    key / value projections by attention name."""

    name: str
    path: Path
    projection: nn.Module
    reads_hidden_states: bool
    layers: dict  # attention name -> models.ip_adapter.IPAttention
    _hash: Optional[str] = None

    @property
    def num_tokens(self) -> int:
        """How many image tokens its projection gives (4 for the basic adapters, 16 for Plus)."""
        latents = getattr(self.projection, "latents", None)  # the Resampler's queries
        return latents.shape[1] if latents is not None else self.projection.num_tokens

    @property
    def shorthash(self) -> str:
        """A1111's legacy hash (sha256 of 64 KiB at 1 MiB, 8 hex digits), as its ControlNet extension shows."""
        if self._hash is None:
            with open(self.path, "rb") as f:
                f.seek(0x100000)
                self._hash = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        return self._hash


def load_adapter(path, unet: nn.Module, context_dim: int, device, dtype) -> IPAdapter:
    """An adapter file checked against the UNet (every ip_adapter key names a cross-attention of
    it, with its widths) and built on device / dtype; nothing is attached yet."""
    from .models.ip_adapter import IPAttention

    path = Path(path)
    image_proj, ip_state = read_adapter_file(path)
    projection, hidden = projection_of(image_proj, context_dim, path)
    attentions = cross_attentions(unet)
    indices = sorted({int(key.split(".")[0]) for key in ip_state})
    cross = [i for i, (_, module) in enumerate(attentions) if module.is_cross]
    if indices != cross:
        raise ModelLoadError(f"{path}: its ip_adapter weights are for attentions {indices[:6]}..., this UNet's "
                             f"cross-attentions are {cross[:6]}... (an adapter for another model?)")
    layers = {}
    for index in indices:
        name, module = attentions[index]
        dim = module.to_out[0].in_features
        layer = IPAttention(context_dim, dim)
        _load_state(layer, {k.split(".", 1)[1]: v for k, v in ip_state.items() if k.split(".")[0] == str(index)},
                    f"{path} (ip_adapter.{index})")
        layers[name] = layer.to(device, dtype).eval().requires_grad_(False)
    return IPAdapter(path.stem, path, projection.to(device, dtype).eval().requires_grad_(False), hidden, layers)


@torch.inference_mode()
def image_tokens(adapters: list, encoder: nn.Module, images: list, scales: list, n_images: int, cfg: bool,
                 device, dtype) -> dict:
    """added_cond's IP entries for a run: ip_tokens_i ([negative rows, image rows] with guidance,
    (2N or N, T, D)) per adapter, and ip_scales (2N or N, adapters): every row holds the scales."""
    size = encoder.cfg.image_size
    entries = {}
    for i, (adapter, image) in enumerate(zip(adapters, images)):
        pixels = preprocess(image, size).to(device, dtype)
        embeds, hidden = encoder(pixels)
        if adapter.reads_hidden_states:
            features = hidden
            negative = encoder(torch.zeros_like(pixels))[1]
        else:
            features, negative = embeds, torch.zeros_like(embeds)
        tokens = adapter.projection(features).expand(n_images, -1, -1)  # (N, T, D)
        if cfg:
            tokens = torch.cat([adapter.projection(negative).expand(n_images, -1, -1), tokens])
        entries[f"ip_tokens_{i}"] = tokens.float()
    rows = 2 * n_images if cfg else n_images
    entries["ip_scales"] = torch.tensor([float(s) for s in scales], dtype=torch.float32).expand(rows, -1).clone()
    return entries


def infotext_unit(adapter: IPAdapter, encoder: nn.Module, config, scale: float) -> dict:
    """The adapter as a unit of A1111's ControlNet extension writes it into `parameters` (its IP-Adapter
    preprocessors are named for the image encoder: ip-adapter_clip_sd15 is ViT-H, ..._sdxl is bigG)."""
    vit_h = encoder.cfg.hidden_size == 1280
    module = "ip-adapter_clip_sd15" if not config.is_sdxl else "ip-adapter_clip_sdxl_plus_vith" if vit_h \
        else "ip-adapter_clip_sdxl"
    name = adapter.name.replace(",", "").replace(":", "")
    try:
        model = f"{name} [{adapter.shorthash}]"
    except OSError:
        model = name
    return {"Module": module, "Model": model, "Weight": float(scale), "Resize Mode": "Crop and Resize",
            "Processor Res": encoder.cfg.image_size, "Threshold A": -1.0, "Threshold B": -1.0, "Guidance Start": 0.0,
            "Guidance End": 1.0, "Pixel Perfect": False, "Control Mode": "Balanced"}
