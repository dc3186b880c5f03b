"""The KL autoencoder of Stable Diffusion (Rombach et al. 2022), as diffusers' AutoencoderKL.

encode: image (B, 3, H, W) in [-1, 1] -> mean and log-variance of the latent Gaussian,
        (B, latent_channels, H/8, W/8) each.
decode: latent z (unscaled: the pipeline divides by scaling_factor and adds shift_factor)
        -> image (B, 3, H, W), roughly in [-1, 1].

Both halves are resnets with a stride-2 change of resolution per level and one
single-head self-attention block at the lowest resolution.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VAEConfig
from .layers import Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

EPS = 1e-6  # every GroupNorm of the VAE


class VAEAttention(Attention):
    """Single-head self-attention over the H*W positions, with its GroupNorm and residual
    (diffusers' Attention with group_norm and residual_connection, keys group_norm, to_q, ...)."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, qkv_bias=True)
        self.group_norm = GroupNorm(groups, channels, EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W). Returns (B, C, H, W)."""
        batch, channels, height, width = x.shape
        h = self.group_norm(x).reshape(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)


class MidBlock(nn.Module):
    """resnet, attention, resnet (diffusers' UNetMidBlock2D with attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nn.Module):
    """DownEncoderBlock2D: resnets, then a stride-2 downsample (padded right/bottom) except last."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, EPS)
            for i in range(num_layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, asymmetric_pad=True)] if add_downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    """UpDecoderBlock2D: resnets, then a 2x nearest upsample and conv except at the last level."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, EPS)
            for i in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if add_upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels, groups, levels = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(channels[max(i - 1, 0)], channels[i], cfg.layers_per_block, groups,
                         add_downsample=i < levels - 1)
            for i in range(levels))
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = GroupNorm(groups, channels[-1], EPS, silu=True)
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 2 * latent_channels, H/8, W/8): mean and log-variance stacked."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels = tuple(reversed(cfg.block_out_channels))  # lowest resolution first
        groups, levels = cfg.norm_num_groups, len(channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(channels[max(i - 1, 0)], channels[i], cfg.layers_per_block + 1, groups,
                         add_upsample=i < levels - 1)
            for i in range(levels))
        self.conv_norm_out = GroupNorm(groups, channels[-1], EPS, silu=True)
        self.conv_out = nn.Conv2d(channels[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, h, w) -> (B, 3, 8h, 8w)."""
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


class AutoencoderKL(nn.Module):
    """The VAE; state_dict keys equal diffusers' AutoencoderKL."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        latent = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, latent_channels, H/8, W/8).

        logvar is clamped to [-30, 20] as in the original LDM code."""
        moments = self.quant_conv(self.encoder(x))  # (B, 2 * latent, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: unscaled latent (B, latent_channels, h, w) -> image (B, 3, 8h, 8w)."""
        return self.decoder(self.post_quant_conv(z))
