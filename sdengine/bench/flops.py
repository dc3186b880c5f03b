"""Analytic FLOP and parameter counts of the Stable Diffusion networks, from their configs.

The walk follows diffusers' `UNet2DConditionModel` and `AutoencoderKL` and transformers'
`CLIPTextModel` layer by layer. Conventions, chosen to match the published totals in
ANCHORS.md (and `torch.utils.flop_counter.FlopCounterMode`):

- a multiply-add is 2 FLOP;
- only matrix work is counted: convolutions, linear layers and the two attention
  products (Q·Kᵀ and P·V). Biases, norms, activations, softmax, residual adds and
  resampling are left out: together they are under 1% of the total, and they are
  bandwidth, not arithmetic;
- a convolution costs 2 · H_out · W_out · C_out · C_in · k² (the groups are all 1 here).

Parameters are counted in full (biases, norms and embeddings included), so that the
totals can be checked against the models' own `numel()` sums.

    >>> cost = unet_cost(PRESETS["sd15"].unet, 64, 64)
    >>> round(cost.flop / 1e12, 3), round(cost.params / 1e6, 1)
    (0.803, 859.5)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sdengine.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

TEXT_TOKENS = 77  # CLIP's context length: every prompt is padded to it


@dataclass
class Cost:
    """FLOP per category ("conv", "linear", "attention"), parameters and layer counts."""

    flop_by_kind: Counter = field(default_factory=Counter)
    params: int = 0
    layers: Counter = field(default_factory=Counter)  # resnet, transformer, group_norm, layer_norm, attention

    @property
    def flop(self) -> int:
        return sum(self.flop_by_kind.values())

    def __iadd__(self, other: "Cost") -> "Cost":
        self.flop_by_kind.update(other.flop_by_kind)
        self.params += other.params
        self.layers.update(other.layers)
        return self

    # The counted operations ----------------------------------------------------

    def conv(self, c_in: int, c_out: int, kernel: int, h_out: int, w_out: int, bias: bool = True):
        self.flop_by_kind["conv"] += 2 * h_out * w_out * c_out * c_in * kernel * kernel
        self.params += c_out * c_in * kernel * kernel + (c_out if bias else 0)

    def linear(self, d_in: int, d_out: int, tokens: int, bias: bool = True):
        self.flop_by_kind["linear"] += 2 * tokens * d_in * d_out
        self.params += d_in * d_out + (d_out if bias else 0)

    def attention(self, q_tokens: int, kv_tokens: int, dim: int):
        """softmax(Q Kᵀ) V over all heads: dim = heads · head_dim."""
        self.flop_by_kind["attention"] += 2 * (2 * q_tokens * kv_tokens * dim)
        self.layers["attention"] += 1

    def group_norm(self, channels: int):
        self.params += 2 * channels
        self.layers["group_norm"] += 1

    def layer_norm(self, dim: int):
        self.params += 2 * dim
        self.layers["layer_norm"] += 1

    def embedding(self, rows: int, dim: int):
        self.params += rows * dim


# ---------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------

def _resnet(cost: Cost, c_in: int, c_out: int, temb: int, h: int, w: int):
    """diffusers ResnetBlock2D: norm, SiLU, conv3x3, + time projection, norm, SiLU, conv3x3, shortcut."""
    cost.group_norm(c_in)
    cost.conv(c_in, c_out, 3, h, w)
    cost.linear(temb, c_out, 1)
    cost.group_norm(c_out)
    cost.conv(c_out, c_out, 3, h, w)
    if c_in != c_out:
        cost.conv(c_in, c_out, 1, h, w)
    cost.layers["resnet"] += 1


def _transformer(cost: Cost, channels: int, context_dim: int, depth: int, linear_projection: bool,
                 h: int, w: int, context_tokens: int = TEXT_TOKENS):
    """diffusers Transformer2DModel: GroupNorm, proj_in, `depth` BasicTransformerBlocks, proj_out."""
    tokens = h * w
    cost.group_norm(channels)
    project = (lambda: cost.linear(channels, channels, tokens)) if linear_projection \
        else (lambda: cost.conv(channels, channels, 1, h, w))
    project()  # proj_in
    for _ in range(depth):
        cost.layer_norm(channels)  # self-attention: to_q/k/v have no bias, to_out has one
        for _ in range(3):
            cost.linear(channels, channels, tokens, bias=False)
        cost.attention(tokens, tokens, channels)
        cost.linear(channels, channels, tokens)
        cost.layer_norm(channels)  # cross-attention on the text context
        cost.linear(channels, channels, tokens, bias=False)
        for _ in range(2):
            cost.linear(context_dim, channels, context_tokens, bias=False)
        cost.attention(tokens, context_tokens, channels)
        cost.linear(channels, channels, tokens)
        cost.layer_norm(channels)  # GEGLU feed-forward, inner width 4·channels
        cost.linear(channels, 2 * 4 * channels, tokens)
        cost.linear(4 * channels, channels, tokens)
        cost.layers["transformer_block"] += 1
    project()  # proj_out
    cost.layers["transformer"] += 1


def _timestep_embedding(cost: Cost, d_in: int, d_out: int):
    """TimestepEmbedding: linear, SiLU, linear (one token)."""
    cost.linear(d_in, d_out, 1)
    cost.linear(d_out, d_out, 1)


def unet_cost(cfg: UNetConfig, latent_height: int, latent_width: int) -> Cost:
    """One UNet forward of ONE sample at the given latent size (pixels / 8)."""
    if latent_height % 2 ** (len(cfg.block_out_channels) - 1) or latent_width % 2 ** (len(cfg.block_out_channels) - 1):
        raise ValueError(f"latent size {latent_height}x{latent_width} is not divisible by the UNet's "
                         f"{2 ** (len(cfg.block_out_channels) - 1)}x downsampling")
    cost = Cost()
    channels = cfg.block_out_channels
    temb = 4 * channels[0]
    _timestep_embedding(cost, channels[0], temb)
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text + 6 sinusoid-embedded size/crop ids
        _timestep_embedding(cost, cfg.projection_class_embeddings_input_dim, temb)

    def transformer(level: int, c: int, h: int, w: int):
        _transformer(cost, c, cfg.cross_attention_dim, cfg.transformer_layers_per_block[level],
                     cfg.use_linear_projection, h, w)

    h, w = latent_height, latent_width
    cost.conv(cfg.in_channels, channels[0], 3, h, w)  # conv_in
    skips = [channels[0]]  # channel count of each skip connection, in order
    c_prev = channels[0]
    for level, (block, c) in enumerate(zip(cfg.down_block_types, channels)):
        for _ in range(cfg.layers_per_block):
            _resnet(cost, c_prev, c, temb, h, w)
            if block.startswith("CrossAttn"):
                transformer(level, c, h, w)
            c_prev = c
            skips.append(c)
        if level < len(channels) - 1:
            h, w = h // 2, w // 2
            cost.conv(c, c, 3, h, w)  # Downsample2D: stride-2 conv
            skips.append(c)

    _resnet(cost, c_prev, c_prev, temb, h, w)  # mid block
    transformer(len(channels) - 1, c_prev, h, w)
    _resnet(cost, c_prev, c_prev, temb, h, w)

    reversed_channels = channels[::-1]
    reversed_depth = len(channels) - 1
    for i, (block, c) in enumerate(zip(cfg.up_block_types, reversed_channels)):
        level = reversed_depth - i
        for _ in range(cfg.layers_per_block + 1):
            skip = skips.pop()
            _resnet(cost, c_prev + skip, c, temb, h, w)
            if block.startswith("CrossAttn"):
                transformer(level, c, h, w)
            c_prev = c
        if i < len(channels) - 1:
            h, w = h * 2, w * 2
            cost.conv(c, c, 3, h, w)  # Upsample2D: nearest x2, then conv

    cost.group_norm(channels[0])  # conv_norm_out
    cost.conv(channels[0], cfg.out_channels, 3, h, w)
    return cost


# ---------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------

def _vae_mid_block(cost: Cost, c: int, h: int, w: int):
    """UNetMidBlock2D: resnet, single-head self-attention (with bias), resnet."""
    _vae_resnet(cost, c, c, h, w)
    cost.group_norm(c)
    for _ in range(4):  # to_q, to_k, to_v, to_out
        cost.linear(c, c, h * w)
    cost.attention(h * w, h * w, c)
    _vae_resnet(cost, c, c, h, w)


def _vae_resnet(cost: Cost, c_in: int, c_out: int, h: int, w: int):
    """ResnetBlock2D without a time embedding."""
    cost.group_norm(c_in)
    cost.conv(c_in, c_out, 3, h, w)
    cost.group_norm(c_out)
    cost.conv(c_out, c_out, 3, h, w)
    if c_in != c_out:
        cost.conv(c_in, c_out, 1, h, w)
    cost.layers["resnet"] += 1


def vae_decoder_cost(cfg: VAEConfig, height: int, width: int) -> Cost:
    """AutoencoderKL.decode of ONE latent to an image of height x width pixels (post_quant_conv included)."""
    scale = cfg.downscale
    if height % scale or width % scale:
        raise ValueError(f"image size {height}x{width} is not divisible by the VAE's {scale}x downsampling")
    cost = Cost()
    h, w = height // scale, width // scale
    reversed_channels = cfg.block_out_channels[::-1]
    cost.conv(cfg.latent_channels, cfg.latent_channels, 1, h, w)  # post_quant_conv
    cost.conv(cfg.latent_channels, reversed_channels[0], 3, h, w)  # conv_in
    _vae_mid_block(cost, reversed_channels[0], h, w)
    c_prev = reversed_channels[0]
    for i, c in enumerate(reversed_channels):
        for _ in range(cfg.layers_per_block + 1):
            _vae_resnet(cost, c_prev, c, h, w)
            c_prev = c
        if i < len(reversed_channels) - 1:
            h, w = h * 2, w * 2
            cost.conv(c, c, 3, h, w)  # Upsample2D
    cost.group_norm(c_prev)
    cost.conv(c_prev, cfg.out_channels, 3, h, w)
    return cost


def vae_encoder_cost(cfg: VAEConfig, height: int, width: int) -> Cost:
    """AutoencoderKL.encode of ONE image of height x width pixels (quant_conv included)."""
    scale = cfg.downscale
    if height % scale or width % scale:
        raise ValueError(f"image size {height}x{width} is not divisible by the VAE's {scale}x downsampling")
    cost = Cost()
    h, w = height, width
    channels = cfg.block_out_channels
    cost.conv(cfg.in_channels, channels[0], 3, h, w)  # conv_in
    c_prev = channels[0]
    for i, c in enumerate(channels):
        for _ in range(cfg.layers_per_block):
            _vae_resnet(cost, c_prev, c, h, w)
            c_prev = c
        if i < len(channels) - 1:
            h, w = h // 2, w // 2
            cost.conv(c, c, 3, h, w)  # Downsample2D: stride-2 conv, asymmetric padding
    _vae_mid_block(cost, c_prev, h, w)
    cost.group_norm(c_prev)
    cost.conv(c_prev, 2 * cfg.latent_channels, 3, h, w)  # conv_out: mean and logvar
    cost.conv(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, h, w)  # quant_conv
    return cost


# ---------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------

def text_encoder_cost(cfg: TextEncoderConfig, tokens: int = TEXT_TOKENS) -> Cost:
    """CLIP text transformer on ONE prompt of `tokens` tokens (the text projection too, if any)."""
    cost = Cost()
    d = cfg.hidden_size
    cost.embedding(cfg.vocab_size, d)
    cost.embedding(cfg.max_position_embeddings, d)
    for _ in range(cfg.num_hidden_layers):
        cost.layer_norm(d)
        for _ in range(4):  # q, k, v, out (all with bias)
            cost.linear(d, d, tokens)
        cost.attention(tokens, tokens, d)
        cost.layer_norm(d)
        cost.linear(d, cfg.intermediate_size, tokens)
        cost.linear(cfg.intermediate_size, d, tokens)
    cost.layer_norm(d)  # final_layer_norm
    if cfg.projection_dim is not None:  # pooled (EOS) token only
        cost.linear(d, cfg.projection_dim, 1, bias=False)
    return cost


# ---------------------------------------------------------------------------
# What the benchmark measures
# ---------------------------------------------------------------------------

def workload_flop(config: ModelConfig, height: int, width: int, batch: int = 1,
                  cfg_batch: int = 2) -> dict[str, int]:
    """FLOP of each benchmarked component for `batch` images of height x width pixels.

    With classifier-free guidance (cfg_batch=2) the text encoder and the UNet run on the
    prompt and the negative prompt together, i.e. at batch 2·batch; the VAE decodes
    `batch` latents. `end_to_end` is left out: it depends on the number of UNet calls
    the sampler makes (see `end_to_end_flop`).
    """
    latent_h, latent_w = height // config.vae.downscale, width // config.vae.downscale
    text = text_encoder_cost(config.text_encoder).flop
    if config.text_encoder_2 is not None:
        text += text_encoder_cost(config.text_encoder_2).flop
    return {
        "text_encoder": cfg_batch * batch * text,
        "unet_step": cfg_batch * batch * unet_cost(config.unet, latent_h, latent_w).flop,
        "vae_decode": batch * vae_decoder_cost(config.vae, height, width).flop,
    }


def end_to_end_flop(component_flop: dict[str, int], unet_calls: int) -> int:
    """A whole generation: one text encoding, `unet_calls` UNet steps, one VAE decode."""
    return component_flop["text_encoder"] + unet_calls * component_flop["unet_step"] + component_flop["vae_decode"]


def model_params(config: ModelConfig) -> dict[str, int]:
    """Parameter counts of each network, at the config's architecture."""
    size = config.default_size
    params = {
        "text_encoder": text_encoder_cost(config.text_encoder).params,
        "unet": unet_cost(config.unet, config.unet.sample_size, config.unet.sample_size).params,
        "vae_encoder": vae_encoder_cost(config.vae, size, size).params,
        "vae_decoder": vae_decoder_cost(config.vae, size, size).params,
    }
    if config.text_encoder_2 is not None:
        params["text_encoder_2"] = text_encoder_cost(config.text_encoder_2).params
    return params
