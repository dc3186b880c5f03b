"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models"), as diffusers' ControlNetModel.

A trainable copy of the UNet's encoder reads the noisy latents, the timestep, the text and a
control image (edges, depth, pose, ...), and returns one residual per UNet skip plus one for
the mid block; the UNet adds them (`UNet2DConditionModel.forward`'s
`down_block_additional_residuals` / `mid_block_additional_residual`). Every residual leaves
through a 1x1 "zero convolution" (initialised to zero in training, so an untrained ControlNet
changes nothing).

The encoder is the UNet's own (`UNetEncoder`: conv_in, time embedding, down levels, mid
block), so no layer is written twice; this module adds the conditioning embedding (a small
conv net from the control image to conv_in's features) and the zero convolutions.
state_dict keys equal diffusers' ControlNetModel.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ControlNetConfig
from .unet import UNetEncoder


class ControlNetConditioningEmbedding(nn.Module):
    """Control image (B, C_cond, H, W) -> (B, C0, H / 2^(k-1), W / 2^(k-1)): conv_in, then per
    channel step a 3x3 conv and a stride-2 3x3 conv, SiLU after each, then a zero conv_out."""

    def __init__(self, out_channels: int, conditioning_channels: int, block_out_channels: tuple):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(block_out_channels[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


class ControlNetModel(UNetEncoder):
    """The ControlNet; state_dict keys equal diffusers' ControlNetModel."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__(cfg.unet, cfg.unet.in_channels)
        self.controlnet_cfg = cfg
        c0 = cfg.unet.block_out_channels[0]
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            c0, cfg.conditioning_channels, cfg.conditioning_embedding_out_channels)
        # One zero convolution per UNet skip (conv_in's output, each resnet, each downsample).
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, 1) for c in self.skip_channels)
        mid = cfg.unet.block_out_channels[-1]
        self.controlnet_mid_block = nn.Conv2d(mid, mid, 1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: Union[float, torch.Tensor] = 1.0,
                guess_mode: bool = False, added_cond: Optional[dict] = None) -> tuple:
        """sample: (B, C, h, w) latents as the UNet gets them (without inpainting's extra channels);
        timestep, encoder_hidden_states, added_cond: as the UNet's; controlnet_cond: the control
        image (B, C_cond, h * downscale, w * downscale) in [0, 1]; conditioning_scale: a number or
        a 1-element tensor (a device scalar: nothing here syncs with the host).

        guess_mode (diffusers' meaning): the residuals are scaled from 0.1 (first skip) to 1.0
        (mid block), log-spaced, times conditioning_scale.

        Returns (down residuals: a list with one (B, C_skip, h_skip, w_skip) per UNet skip,
        mid residual (B, C_mid, h_mid, w_mid)), as diffusers' ControlNetModel."""
        cfg = self.controlnet_cfg
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        time_act = self.time_activation(sample, timestep, added_cond)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        x, skips = self.encode(x, time_act, encoder_hidden_states)
        down = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        return scale_residuals(down, mid, conditioning_scale, guess_mode, cfg.global_pool_conditions)


def scale_residuals(down: list, mid: torch.Tensor, conditioning_scale, guess_mode: bool, global_pool: bool) -> tuple:
    """The zero convolutions' outputs -> the residuals the UNet adds, as diffusers' ControlNetModel:
    times conditioning_scale; in guess mode also times 10^(-1 + k / n) for skip k of n (0.1 at the
    first skip, 1.0 at the mid block); averaged over H, W for global_pool_conditions ControlNets.
    (The native backend applies it to its compiled ControlNet's outputs.)"""
    if guess_mode and not global_pool:
        scales = [10.0 ** (-1.0 + k / len(down)) for k in range(len(down) + 1)]
        down = [d * (s * conditioning_scale) for d, s in zip(down, scales)]
        mid = mid * (scales[-1] * conditioning_scale)
    else:
        down = [d * conditioning_scale for d in down]
        mid = mid * conditioning_scale
    if global_pool:
        down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
        mid = mid.mean(dim=(2, 3), keepdim=True)
    return down, mid

