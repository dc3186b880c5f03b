"""Single-file checkpoints: the original LDM / A1111 key layout, and architecture detection.

sdengine's networks carry diffusers' / transformers' parameter names. A single-file
checkpoint (`.safetensors`, `.ckpt`) carries the names of the original latent-diffusion
code instead; this module maps each sdengine key to the checkpoint key it is read from,
and recognises the architecture from the keys and shapes alone.

The LDM layout, by network (prefix in the file -> sdengine component):
  model.diffusion_model.*                 -> unet   (openaimodel.py: input_blocks, middle_block,
                                                     output_blocks, time_embed, label_emb, out)
  first_stage_model.*                     -> vae    (encoder.down.N.block.M, mid.block_1, mid.attn_1, ...)
  cond_stage_model.transformer.*          -> text_encoder     SD1: transformers' CLIP-L layout
  cond_stage_model.model.*                -> text_encoder     SD2: OpenCLIP ViT-H layout
  conditioner.embedders.0.transformer.*   -> text_encoder     SDXL: CLIP-L
  conditioner.embedders.1.model.*         -> text_encoder_2   SDXL: OpenCLIP ViT-bigG

The maps below are derived from the structure of the LDM UNet: level i of the encoder
holds `layers_per_block` (resnet, attention) pairs in input_blocks 1 + i*(L+1) + j, then
one downsampler; the decoder mirrors it with L+1 pairs per level, the upsampler sharing
the last output block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping, Optional

from .config import PRESETS, ModelConfig, SchedulerConfig, TextEncoderConfig, UNetConfig, VAEConfig
from .errors import ModelLoadError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."  # the refiner's only encoder: OpenCLIP bigG

# Keys of training state that no network reads: the DDPM schedule buffers of LatentDiffusion,
# EMA bookkeeping, and the A1111/ComfyUI marker keys (read by detection, not loaded).
IGNORED_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "v_pred", "ztsnr", "denoiser.sigmas",
}
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")


@dataclass(frozen=True)
class Source:
    """Where one sdengine tensor comes from in a checkpoint.

    transform: "" (as is, a trailing 1x1 kernel may be dropped or added), "q" / "k" / "v"
    (that third of a fused attention in_proj, along dim 0), or "transpose" (OpenCLIP's
    text_projection is stored (width, proj); a Linear weight is (proj, width)).
    """

    key: str
    transform: str = ""


def transformed_shape(shape: tuple, transform: str) -> tuple:
    """The shape a source tensor has after its transform."""
    if transform in ("q", "k", "v"):
        return (shape[0] // 3, *shape[1:])
    if transform == "transpose":
        return tuple(reversed(shape))
    return tuple(shape)


def apply_transform(tensor, transform: str):
    if transform in ("q", "k", "v"):
        return tensor.chunk(3, dim=0)["qkv".index(transform)]
    if transform == "transpose":
        return tensor.t()
    return tensor


def same_up_to_unit_dims(found: tuple, expected: tuple) -> bool:
    """A 1x1 convolution kernel (C, C, 1, 1) and a Linear weight (C, C) hold the same values."""
    strip = lambda s: tuple(s[:2]) if len(s) > 2 and all(d == 1 for d in s[2:]) else tuple(s)  # noqa: E731
    return strip(found) == strip(expected)


# ---------------------------------------------------------------------------
# Key maps: sdengine (diffusers) key -> LDM key
# ---------------------------------------------------------------------------

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class UnmappedKey(KeyError):
    """An sdengine key that has no place in the LDM layout (a bug, or an unsupported block)."""


def _rename_first(rest: str, table: dict, key: str) -> str:
    """Rename the leading module of `rest` (e.g. "norm1.weight") through table."""
    for name, ldm_name in table.items():
        if rest.startswith(name + "."):
            return ldm_name + rest[len(name):]
    raise UnmappedKey(key)


def unet_key_to_ldm(key: str, cfg: UNetConfig) -> str:
    """The LDM name (without the model.diffusion_model. prefix) of a diffusers UNet key."""
    per_level = cfg.layers_per_block + 1  # input blocks per encoder level, output blocks per decoder level
    module, _, param = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + level * per_level + j
        if kind == "resnets":
            return f"input_blocks.{block}.0.{_rename_first(rest, _UNET_RESNET, key)}"
        return f"input_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_first(m[2], _UNET_RESNET, key)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = level * per_level + j
        if kind == "resnets":
            return f"output_blocks.{block}.0.{_rename_first(rest, _UNET_RESNET, key)}"
        return f"output_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        # The upsampler follows the resnet (and the attention, on attention levels).
        slot = 2 if cfg.up_block_types[level].startswith("CrossAttn") else 1
        return f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv.{m[2]}"
    raise UnmappedKey(key)


def vae_key_to_ldm(key: str, cfg: VAEConfig) -> str:
    """The LDM name (without the first_stage_model. prefix) of a diffusers AutoencoderKL key."""
    levels = len(cfg.block_out_channels)
    resnet = lambda rest: rest.replace("conv_shortcut.", "nin_shortcut.")  # noqa: E731
    if key.startswith(("quant_conv.", "post_quant_conv.", "encoder.conv_in.", "encoder.conv_out.",
                       "decoder.conv_in.", "decoder.conv_out.")):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # The LDM decoder numbers its levels from the lowest resolution up, diffusers from the top down.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_rename_first(m[2], _VAE_ATTENTION, key)}"
    raise UnmappedKey(key)


def clip_key_to_ldm(key: str, prefix: str) -> Source:
    """transformers' CLIP-L layout (SD1, SDXL's first encoder): the same names under a prefix.

    prefix ends in "text_model." for current files; the oldest SD1 files omit that level,
    and `prefix` then is the bare cond_stage_model.transformer.
    """
    if not key.startswith("text_model."):
        raise UnmappedKey(key)
    return Source(prefix + key[len("text_model."):])


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openclip_key_to_ldm(key: str, prefix: str) -> Source:
    """OpenCLIP's text tower (SD2, SDXL's second encoder) under `prefix`.

    OpenCLIP fuses q, k, v into one `in_proj` (3*width rows, in q, k, v order, as
    nn.MultiheadAttention stores them) and keeps `text_projection` as a (width, proj) matrix.
    """
    fixed = {"text_model.embeddings.token_embedding.weight": Source(prefix + "token_embedding.weight"),
             "text_model.embeddings.position_embedding.weight": Source(prefix + "positional_embedding"),
             "text_model.final_layer_norm.weight": Source(prefix + "ln_final.weight"),
             "text_model.final_layer_norm.bias": Source(prefix + "ln_final.bias"),
             "text_projection.weight": Source(prefix + "text_projection", "transpose")}
    if key in fixed:
        return fixed[key]
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
    if not m:
        raise UnmappedKey(key)
    layer, rest = f"{prefix}transformer.resblocks.{m[1]}.", m[2]
    if qkv := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
        return Source(f"{layer}attn.in_proj_{qkv[2]}", qkv[1])
    return Source(layer + _rename_first(rest, _OPENCLIP_LAYER, key))


# ---------------------------------------------------------------------------
# Layout and architecture detection
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Which LDM text-encoder layout a checkpoint uses, and where each network lives."""

    family: str                # "sd1", "sd2" or "sdxl"
    text_prefix: str           # prefix of the first text encoder's keys
    text_openclip: bool        # True: OpenCLIP layout (SD2); False: transformers' CLIP layout
    text_2_prefix: Optional[str] = None  # SDXL's OpenCLIP bigG
    # Some converted SDXL files store the projection as a Linear weight ("text_projection.weight",
    # (proj, width)) rather than open_clip's (width, proj) matrix "text_projection".
    text_2_projection_linear: bool = False

    def source(self, component: str, key: str, config: ModelConfig) -> Source:
        """The checkpoint tensor that sdengine's `component` key is read from."""
        if component == "unet":
            return Source(UNET_PREFIX + unet_key_to_ldm(key, config.unet))
        if component == "vae":
            return Source(VAE_PREFIX + vae_key_to_ldm(key, config.vae))
        if component == "text_encoder":
            if self.text_openclip:
                return openclip_key_to_ldm(key, self.text_prefix)
            return clip_key_to_ldm(key, self.text_prefix)
        if component == "text_encoder_2":
            if key == "text_projection.weight" and self.text_2_projection_linear:
                return Source(self.text_2_prefix + "text_projection.weight")
            return openclip_key_to_ldm(key, self.text_2_prefix)
        raise ValueError(f"unknown component {component!r}")

    def ignorable(self, key: str, config: ModelConfig) -> bool:
        """A checkpoint key that no network reads and that is expected to be there."""
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.endswith("position_ids"):
            return True
        for prefix in (p for p in (self.text_prefix, self.text_2_prefix) if p):
            if key.startswith(prefix) and key[len(prefix):] in ("logit_scale", "attn_mask"):
                return True
        if self.family == "sd2":
            # SD2 conditions on the penultimate layer: the last resblock and the projection
            # to the image embedding space are unused (diffusers' SD2 text encoder drops them).
            if key == self.text_prefix + "text_projection":
                return True
            m = re.match(re.escape(self.text_prefix) + r"transformer\.resblocks\.(\d+)\.", key)
            if m and int(m[1]) >= config.text_encoder.num_hidden_layers:
                return True
        return False


def _prefixes_found(keys) -> list[str]:
    """The first two dotted levels of the keys, for error messages."""
    return sorted({".".join(k.split(".")[:2]) for k in keys})


def detect_layout(keys) -> Layout:
    """Recognise the network layout of an LDM checkpoint from its key names."""
    keys = set(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    found = ", ".join(_prefixes_found(keys)[:12]) or "no keys"
    if not has(UNET_PREFIX):
        raise ModelLoadError(f"no UNet weights ({UNET_PREFIX}*); found: {found}. A single file must hold the "
                             "whole model in the LDM/A1111 layout (UNet-only or LoRA files are not supported)")
    if not has(VAE_PREFIX):
        raise ModelLoadError(f"no VAE weights ({VAE_PREFIX}*); found: {found}")
    if has(SDXL_TEXT_2_PREFIX):
        if not has(SDXL_TEXT_PREFIX):
            raise ModelLoadError(f"SDXL-style checkpoint without its CLIP-L encoder ({SDXL_TEXT_PREFIX}*); "
                                 f"found: {found}")
        text_prefix = SDXL_TEXT_PREFIX + ("text_model." if has(SDXL_TEXT_PREFIX + "text_model.") else "")
        linear = SDXL_TEXT_2_PREFIX + "text_projection.weight" in keys
        return Layout("sdxl", text_prefix, False, SDXL_TEXT_2_PREFIX, text_2_projection_linear=linear)
    if has(SDXL_REFINER_TEXT_PREFIX):  # SDXL's refiner: OpenCLIP bigG alone, as the second encoder
        linear = SDXL_REFINER_TEXT_PREFIX + "text_projection.weight" in keys
        return Layout("sdxl-refiner", "", False, SDXL_REFINER_TEXT_PREFIX, text_2_projection_linear=linear)
    if has(SD2_TEXT_PREFIX):
        return Layout("sd2", SD2_TEXT_PREFIX, True)
    if has(SD1_TEXT_PREFIX):
        text_prefix = SD1_TEXT_PREFIX + ("text_model." if has(SD1_TEXT_PREFIX + "text_model.") else "")
        return Layout("sd1", text_prefix, False)
    raise ModelLoadError(f"unknown architecture: no text encoder weights (cond_stage_model.* or "
                         f"conditioner.embedders.*); found: {found}")


def _indices(shapes: Mapping[str, tuple], pattern: str) -> list[int]:
    """Sorted distinct integers captured by pattern's group 1 across the keys."""
    regex = re.compile(pattern)
    return sorted({int(m[1]) for k in shapes if (m := regex.match(k))})


def _shape(shapes: Mapping[str, tuple], key: str) -> tuple:
    if key not in shapes:
        raise ModelLoadError(f"cannot detect the architecture: key {key!r} is missing")
    return tuple(shapes[key])


def _detect_unet(shapes: Mapping[str, tuple], base: UNetConfig, heads_rule: str, prefix: str = UNET_PREFIX,
                 encoder_only: bool = False) -> UNetConfig:
    """The UNet config from the LDM keys under prefix. encoder_only: a ControlNet's copy of the
    encoder (no output blocks): the up types mirror the down types, out_channels = in_channels."""
    p = prefix
    conv_in = _shape(shapes, p + "input_blocks.0.0.weight")  # (model_channels, in_channels, 3, 3)
    downsamplers = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight")
    blocks = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
    if downsamplers:
        per_level = downsamplers[0]  # the first downsampler closes level 0: input_blocks L+1
        levels = len(downsamplers) + 1
    else:
        per_level, levels = len(blocks), 1
    layers = per_level - 1
    regular = downsamplers == [(i + 1) * per_level for i in range(levels - 1)] and blocks[-1] == levels * per_level - 1
    if layers < 1 or not regular:
        raise ModelLoadError(f"unsupported UNet layout: input_blocks {blocks}, downsamplers at {downsamplers}")

    channels, down_types, up_types, depths, linear = [], [], [], [], None
    # diffusers sizes the middle block's transformer by the last level's depth.
    mid_depth = len(_indices(shapes, re.escape(p) + r"middle_block\.1\.transformer_blocks\.(\d+)\.")) or 1
    for level in range(levels):
        first = f"{p}input_blocks.{1 + level * per_level}"
        channels.append(_shape(shapes, f"{first}.0.out_layers.3.weight")[0])
        depth = len(_indices(shapes, re.escape(first) + r"\.1\.transformer_blocks\.(\d+)\."))
        down_types.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
        depths.append(depth or (mid_depth if level == levels - 1 else 1))
        if depth:
            linear = len(_shape(shapes, f"{first}.1.proj_in.weight")) == 2
    for level in range(levels):
        if encoder_only:
            has_attention = down_types[levels - 1 - level].startswith("CrossAttn")
        else:
            has_attention = f"{p}output_blocks.{level * per_level}.1.proj_in.weight" in shapes
        up_types.append("CrossAttnUpBlock2D" if has_attention else "UpBlock2D")
    to_k = sorted(k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight"))
    if not to_k:
        raise ModelLoadError("unsupported UNet: no cross-attention layers (attn2.to_k.weight)")
    if heads_rule == "8":  # SD1: 8 heads at every level
        heads = (8,) * levels
    else:  # SD2 / SDXL: heads of 64 channels (num_head_channels=64 in their LDM configs)
        heads = tuple(max(1, c // 64) for c in channels)

    extra = {}
    if p + "label_emb.0.0.weight" in shapes:
        extra = dict(addition_embed_type="text_time",
                     projection_class_embeddings_input_dim=_shape(shapes, p + "label_emb.0.0.weight")[1])
    return replace(
        base,
        in_channels=conv_in[1],
        out_channels=conv_in[1] if encoder_only else _shape(shapes, p + "out.2.weight")[0],
        block_out_channels=tuple(channels),
        down_block_types=tuple(down_types),
        up_block_types=tuple(up_types),
        layers_per_block=layers,
        attention_head_dim=heads,
        num_attention_heads=heads,
        cross_attention_dim=_shape(shapes, to_k[0])[1],
        transformer_layers_per_block=tuple(depths),
        use_linear_projection=bool(linear),
        **extra,
    )


def _detect_vae(shapes: Mapping[str, tuple], base: VAEConfig) -> VAEConfig:
    p = VAE_PREFIX
    levels = _indices(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ModelLoadError(f"unsupported VAE layout: no {p}encoder.down.* keys")
    return replace(
        base,
        in_channels=_shape(shapes, p + "encoder.conv_in.weight")[1],
        out_channels=_shape(shapes, p + "decoder.conv_out.weight")[0],
        latent_channels=_shape(shapes, p + "post_quant_conv.weight")[0],
        block_out_channels=tuple(_shape(shapes, f"{p}encoder.down.{i}.block.0.conv2.weight")[0] for i in levels),
        layers_per_block=len(_indices(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.")),
    )


def _detect_clip(shapes: Mapping[str, tuple], prefix: str, base: TextEncoderConfig) -> TextEncoderConfig:
    """transformers' CLIP layout: sizes from the embedding and MLP shapes; 64-wide heads."""
    vocab, width = _shape(shapes, prefix + "embeddings.token_embedding.weight")
    return replace(
        base, vocab_size=vocab, hidden_size=width, num_attention_heads=max(1, width // 64),
        max_position_embeddings=_shape(shapes, prefix + "embeddings.position_embedding.weight")[0],
        intermediate_size=_shape(shapes, prefix + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=len(_indices(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")),
    )


def _detect_openclip(shapes: Mapping[str, tuple], prefix: str, base: TextEncoderConfig,
                     drop_last: bool) -> TextEncoderConfig:
    vocab, width = _shape(shapes, prefix + "token_embedding.weight")
    layers = len(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
    projection = shapes.get(prefix + "text_projection")  # (width, proj)
    if projection is None and prefix + "text_projection.weight" in shapes:  # a Linear weight: (proj, width)
        projection = tuple(reversed(shapes[prefix + "text_projection.weight"]))
    return replace(
        base, vocab_size=vocab, hidden_size=width, num_attention_heads=max(1, width // 64),
        max_position_embeddings=_shape(shapes, prefix + "positional_embedding")[0],
        intermediate_size=_shape(shapes, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=layers - 1 if drop_last else layers,
        projection_dim=None if drop_last or projection is None else projection[1],
    )


def layout_for(config: ModelConfig) -> Layout:
    """The LDM layout sdengine writes for a config (the one its family's original files use)."""
    family = family_name(config)
    if family == "sdxl":
        return Layout("sdxl", SDXL_TEXT_PREFIX + "text_model.", False, SDXL_TEXT_2_PREFIX)
    if family == "sdxl-refiner":
        return Layout("sdxl-refiner", "", False, SDXL_REFINER_TEXT_PREFIX)
    if family.startswith("sd21"):
        return Layout("sd2", SD2_TEXT_PREFIX, True)
    return Layout("sd1", SD1_TEXT_PREFIX + "text_model.", False)


# ldm's VAE AttnBlock uses 1x1 convolutions where diffusers uses Linear layers.
_VAE_CONV_ATTENTION = re.compile(r"first_stage_model\.(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def to_ldm_state_dict(config: ModelConfig, state_dicts: Mapping[str, Mapping]) -> dict:
    """The inverse of single-file loading: sdengine state_dicts -> one LDM / A1111 state dict.

    state_dicts: component name ("unet", "vae", "text_encoder", "text_encoder_2") -> that
    network's state_dict. The tensors are reused where no rewrite is needed (no copy).
    SD2 files hold OpenCLIP ViT-H's 24th layer and its image-space projection, which SD2
    never runs (it conditions on the penultimate layer); they are written as a copy of the
    last used layer and an identity matrix, so that the file has the standard layout.
    """
    import torch

    layout = layout_for(config)
    out, packed = {}, {}
    for component, state in state_dicts.items():
        for key, tensor in state.items():
            source = layout.source(component, key, config)
            if source.transform in ("q", "k", "v"):
                packed.setdefault(source.key, {})[source.transform] = tensor
            elif source.transform == "transpose":
                out[source.key] = tensor.t().contiguous()
            elif _VAE_CONV_ATTENTION.fullmatch(source.key) and tensor.ndim == 2:
                out[source.key] = tensor[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
            else:
                out[source.key] = tensor
    for key, parts in packed.items():  # nn.MultiheadAttention's packing: rows q, k, v
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if layout.family == "sd2":
        last = config.text_encoder.num_hidden_layers - 1
        prefix = f"{layout.text_prefix}transformer.resblocks."
        for key in [k for k in out if k.startswith(f"{prefix}{last}.")]:
            out[key.replace(f"{prefix}{last}.", f"{prefix}{last + 1}.", 1)] = out[key].clone()
        width = config.text_encoder.hidden_size
        reference = out[layout.text_prefix + "token_embedding.weight"]
        out[layout.text_prefix + "text_projection"] = torch.eye(width, dtype=reference.dtype, device=reference.device)
    return out


def family_name(config: ModelConfig) -> str:
    """The preset family a config belongs to: sd15, sd15-inpaint, sd21, sd21-v, sd21-inpaint or sdxl.

    SD2 is told from SD1 by its OpenCLIP text encoder (GELU; OpenAI's CLIP uses quick_gelu).
    """
    if config.text_encoder is None:
        return "sdxl-refiner"
    if config.text_encoder_2 is not None:
        return "sdxl"
    if config.text_encoder.hidden_act == "gelu":
        if config.is_inpaint:
            return "sd21-inpaint"
        return "sd21-v" if config.prediction_type == "v_prediction" else "sd21"
    return "sd15-inpaint" if config.is_inpaint else "sd15"


def prediction_type_from_metadata(metadata: Optional[Mapping[str, str]]) -> Optional[str]:
    """The prediction type a safetensors header declares (Stability's SAI Model Spec, which
    kohya's trainers and sdengine write): `modelspec.prediction_type` "epsilon" / "v", or
    else a `modelspec.architecture` naming the SD2 512 or 768-v model. None if neither."""
    metadata = metadata or {}
    declared = str(metadata.get("modelspec.prediction_type", "")).strip().lower()
    if declared in ("epsilon", "eps"):
        return "epsilon"
    if declared in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    architecture = str(metadata.get("modelspec.architecture", ""))
    if architecture.startswith("stable-diffusion-v2-768-v"):
        return "v_prediction"
    if architecture.startswith("stable-diffusion-v2-512"):
        return "epsilon"
    return None


def default_prediction_type(family: str, inpaint: bool) -> str:
    """What a single file of this family predicts when neither the caller, its header nor a
    `v_pred` key says: SD2 text-to-image files are taken as the 768-v model (diffusers'
    single-file loader does the same), everything else as epsilon."""
    return "v_prediction" if family == "sd2" and not inpaint else "epsilon"


def family_preset(family: str, inpaint: bool, prediction_type: str) -> ModelConfig:
    """The preset that supplies what a single file's shapes do not record (norm groups,
    schedule, VAE scaling, sample size): family "sd1", "sd2" or "sdxl"."""
    if family in ("sdxl", "sdxl-refiner"):
        name = "sdxl"
    elif family == "sd2":
        name = "sd21-inpaint" if inpaint else ("sd21-v" if prediction_type == "v_prediction" else "sd21")
    else:
        name = "sd15-inpaint" if inpaint else "sd15"
    return PRESETS.get(name) or replace(PRESETS["sd21"], name=name, unet=replace(PRESETS["sd21"].unet, in_channels=9))


def ldm_sources(config: ModelConfig, component: str, key: str) -> list[Source]:
    """Every single-file tensor that sdengine's `component` key may be read from, in the order
    to try them: the layout of the family's original files first, then, for SD1, that of
    the oldest files (no `text_model.` level under cond_stage_model.transformer.) and, for
    SDXL, that of files holding bigG's projection as a Linear weight. The
    native runtime reads single files through this list (export/aoti.py writes it into
    each engine). Empty for a key the LDM layout does not hold."""
    layouts = [layout_for(config)]
    if layouts[0].family == "sd1":
        layouts.append(Layout("sd1", SD1_TEXT_PREFIX, False))
    if layouts[0].family in ("sdxl", "sdxl-refiner"):  # converted files that store bigG's projection as a Linear weight
        layouts.append(replace(layouts[0], text_2_projection_linear=True))
    sources = []
    for layout in layouts:
        try:
            source = layout.source(component, key, config)
        except UnmappedKey:
            continue
        if source not in sources:
            sources.append(source)
    return sources


def detect_config(shapes: Mapping[str, tuple], *, prediction_type: Optional[str] = None,
                  metadata: Optional[Mapping[str, str]] = None) -> tuple[ModelConfig, Layout]:
    """The ModelConfig of an LDM-layout checkpoint, from its keys and tensor shapes.

    The family (SD1 / SD2 / SDXL) comes from the text encoder's layout; the preset of that
    family then supplies what no shape records (norm groups, schedule, VAE scaling factor,
    sample size), and every size the shapes do record is read from them: UNet levels,
    channels, layers per block, in/out channels (9 = inpainting), transformer depth,
    context width, conv vs linear proj_in, SDXL's added embedding; VAE channels and
    levels; text encoder width, depth, MLP size, vocabulary and context length.

    Head counts are not in the shapes: SD1 uses 8 heads per level; SD2 and SDXL use heads
    of 64 channels (their `num_head_channels: 64`); text encoders use 64-wide heads. Pass a
    full `config=` to the loader for checkpoints that follow neither rule.

    Prediction type, in order: the `prediction_type` argument; the safetensors header's
    `modelspec.prediction_type` / `modelspec.architecture` (`metadata`, see
    prediction_type_from_metadata); a `v_pred` key in the file (A1111's and ComfyUI's
    marker) -> "v_prediction"; SD2 with 4 input channels ->
    "v_prediction" (there is no reliable key: like diffusers' single-file loader we take
    the 768-v SD2.x model as the default SD2, so a 512-base SD2 file needs
    prediction_type="epsilon"); anything else -> "epsilon". A `ztsnr` key turns on
    zero-terminal-SNR rescaling of the betas.
    """
    layout = detect_layout(shapes)
    family = layout.family
    in_channels = _shape(shapes, UNET_PREFIX + "input_blocks.0.0.weight")[1]
    if in_channels not in (4, 9):
        raise ModelLoadError(f"unsupported architecture: a UNet with {in_channels} input channels "
                             "(sdengine runs 4-channel text-to-image and 9-channel inpainting models; depth (5) "
                             "and instruct-pix2pix (8) models are not supported)")
    inpaint = in_channels == 9
    if prediction_type is None:
        prediction_type = prediction_type_from_metadata(metadata)
    if prediction_type is None:
        prediction_type = "v_prediction" if "v_pred" in shapes else default_prediction_type(family, inpaint)
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")

    preset = family_preset(family, inpaint, prediction_type)
    name = preset.name

    refiner = family == "sdxl-refiner"
    text = None if refiner else \
        _detect_openclip(shapes, layout.text_prefix, preset.text_encoder, drop_last=True) if layout.text_openclip \
        else _detect_clip(shapes, layout.text_prefix, preset.text_encoder)
    text_2 = None
    if family in ("sdxl", "sdxl-refiner"):
        text_2 = _detect_openclip(shapes, layout.text_2_prefix, preset.text_encoder_2, drop_last=False)
    unet = _detect_unet(shapes, preset.unet, heads_rule="8" if family == "sd1" else "64")
    if unet.addition_embed_type == "text_time":
        if text_2 is None or text_2.projection_dim is None:
            raise ModelLoadError("unsupported architecture: the UNet has SDXL's added embedding (label_emb) "
                                 "but the checkpoint has no SDXL text encoders")
        # label_emb input = pooled text embedding + 6 Fourier-embedded size/crop numbers (the
        # refiner's: 5, the aesthetic score in place of the target size)
        numbers = 5 if refiner else 6
        time_dim, rest = divmod(unet.projection_class_embeddings_input_dim - text_2.projection_dim, numbers)
        if rest or time_dim < 1:
            raise ModelLoadError("unsupported SDXL added embedding of width "
                                 f"{unet.projection_class_embeddings_input_dim}")
        unet = replace(unet, addition_time_embed_dim=time_dim)
    elif p := [k for k in shapes if k.startswith(UNET_PREFIX + "label_emb.")]:
        raise ModelLoadError(f"unsupported architecture: class-conditioned UNet ({p[0]})")
    scheduler: SchedulerConfig = replace(preset.scheduler, prediction_type=prediction_type)
    if "ztsnr" in shapes:
        scheduler = replace(scheduler, rescale_betas_zero_snr=True)
    try:
        config = ModelConfig(name="sdxl-refiner" if refiner else name, text_encoder=text, unet=unet,
                             vae=_detect_vae(shapes, preset.vae), scheduler=scheduler, text_encoder_2=text_2,
                             requires_aesthetics_score=refiner, force_zeros_for_empty_prompt=not refiner)
    except ValueError as e:
        raise ModelLoadError(f"inconsistent {name} checkpoint: {e}") from None
    return config, layout


# ---------------------------------------------------------------------------
# ControlNets: the LDM layout of A1111 / Civitai single files (lllyasviel's cldm.py)
# ---------------------------------------------------------------------------
#
#   control_model.time_embed / label_emb / input_blocks / middle_block  the UNet's encoder (as above)
#   control_model.input_hint_block.{0, 2, 4, ...}   the conditioning embedding's convs (SiLU between)
#   control_model.zero_convs.N.0                     the zero convolution of skip N
#   control_model.middle_block_out.0                 the mid block's zero convolution
#
# Some files (thibaud's SD2.1 ControlNets) hold the same keys without "control_model.".

CONTROLNET_PREFIX = "control_model."


def controlnet_key_to_ldm(key: str, cfg) -> str:
    """The LDM name (without the control_model. prefix) of a diffusers ControlNetModel key;
    cfg: its ControlNetConfig."""
    module, _, param = key.rpartition(".")
    if module == "controlnet_cond_embedding.conv_in":
        return f"input_hint_block.0.{param}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{param}"
    if module == "controlnet_cond_embedding.conv_out":
        blocks = 2 * (len(cfg.conditioning_embedding_out_channels) - 1)
        return f"input_hint_block.{2 * (blocks + 1)}.{param}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
        return f"zero_convs.{m[1]}.0.{param}"
    if module == "controlnet_mid_block":
        return f"middle_block_out.0.{param}"
    return unet_key_to_ldm(key, cfg.unet)


def controlnet_prefix(keys) -> str:
    """The prefix of a single-file ControlNet's keys ("control_model." or ""); ModelLoadError
    saying what the file is instead when it holds no ControlNet."""
    keys = set(keys)
    if any(k.startswith(CONTROLNET_PREFIX + "input_hint_block.") for k in keys):
        return CONTROLNET_PREFIX
    if any(k.startswith("input_hint_block.") for k in keys):
        return ""
    found = ", ".join(_prefixes_found(keys)[:12]) or "no keys"
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        what = "a diffusers ControlNet state dict: give its folder (config.json + weights)"
    elif any(k.startswith(UNET_PREFIX) for k in keys):
        what = "a Stable Diffusion checkpoint, not a ControlNet: load it with sdengine.load"
    elif any("lora" in k for k in keys):
        what = "a LoRA (or a Control-LoRA), not a full ControlNet; sdengine does not run Control-LoRAs"
    elif any(k.startswith(("adapter.", "body.")) for k in keys):
        what = "a T2I-Adapter, not a ControlNet"
    else:
        what = "not a ControlNet"
    raise ModelLoadError(f"no ControlNet weights ({CONTROLNET_PREFIX}input_hint_block.*): {what}; found: {found}")


def controlnet_family(unet: UNetConfig) -> str:
    """"sdxl", "sd2" or "sd1", from a ControlNet's encoder config: SDXL's added embedding, else
    SD2's linear projections in the transformers (SD1 projects with 1x1 convolutions) or its
    1024-wide context (OpenCLIP ViT-H), else SD1."""
    if unet.addition_embed_type == "text_time":
        return "sdxl"
    return "sd2" if unet.use_linear_projection or unet.cross_attention_dim == 1024 else "sd1"


def detect_controlnet_config(shapes: Mapping[str, tuple], base: Optional[UNetConfig] = None):
    """The ControlNetConfig of an LDM-layout ControlNet from its keys and shapes, and its key prefix.

    Everything with a size in the file is read from it (levels, channels, layers, transformer
    depths, context width, conv vs linear projections, SDXL's added embedding, the conditioning
    embedding's channels). Head counts are not: they come from `base`, the UNet the ControlNet
    will run with (a ControlNet is a copy of its base's encoder), when its levels and channels
    agree; otherwise from the family's rule (SD1: 8 heads, SD2 / SDXL: 64-channel heads).
    """
    from .config import ControlNetConfig

    prefix = controlnet_prefix(shapes)
    is_sdxl = prefix + "label_emb.0.0.weight" in shapes
    to_k = [k for k in shapes if k.startswith(prefix + "input_blocks.") and k.endswith("attn2.to_k.weight")] or \
        [k for k in shapes if k.startswith(prefix + "middle_block.") and k.endswith("attn2.to_k.weight")]
    context = _shape(shapes, sorted(to_k)[0])[1] if to_k else None
    proj_in = sorted(k for k in shapes if k.startswith(prefix) and k.endswith(".proj_in.weight"))
    linear = bool(proj_in) and len(shapes[proj_in[0]]) == 2  # SD2 / SDXL: Linear; SD1: 1x1 convolution
    family = "sdxl" if is_sdxl else "sd2" if context == 1024 or linear else "sd1"
    preset = PRESETS["sdxl" if family == "sdxl" else "sd21" if family == "sd2" else "sd15"].unet
    unet = _detect_unet(shapes, preset, heads_rule="8" if family == "sd1" else "64", prefix=prefix,
                        encoder_only=True)
    if base is not None and base.block_out_channels == unet.block_out_channels:
        unet = replace(unet, attention_head_dim=base.num_attention_heads, num_attention_heads=base.num_attention_heads,
                       norm_num_groups=base.norm_num_groups, upcast_attention=base.upcast_attention)
    if is_sdxl:
        time_dim = base.addition_time_embed_dim if base is not None and base.addition_time_embed_dim \
            else preset.addition_time_embed_dim
        unet = replace(unet, addition_time_embed_dim=time_dim)
    hint = prefix + "input_hint_block."
    convs = _indices(shapes, re.escape(hint) + r"(\d+)\.weight")
    if not convs or convs != list(range(0, 2 * len(convs), 2)) or len(convs) % 2:
        raise ModelLoadError(f"unsupported ControlNet conditioning embedding: {hint}* convolutions at {convs}")
    # conv_in, then (conv, stride-2 conv) per channel step, then conv_out
    embedding_channels = [_shape(shapes, f"{hint}0.weight")[0]] + \
        [_shape(shapes, f"{hint}{i}.weight")[0] for i in convs[2:-1:2]]
    try:
        config = ControlNetConfig(unet=unet, conditioning_channels=_shape(shapes, f"{hint}0.weight")[1],
                                  conditioning_embedding_out_channels=tuple(embedding_channels))
    except ValueError as e:
        raise ModelLoadError(f"inconsistent ControlNet: {e}") from None
    return config, prefix
