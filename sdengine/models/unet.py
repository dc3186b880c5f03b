"""The denoising UNet of Stable Diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"), as diffusers' UNet2DConditionModel.

One class covers SD1.x, SD2.x (linear projections, per-level head counts, fp32
attention), the 9-channel inpainting UNet (only in_channels differs) and SDXL
(micro-conditioning on the pooled text embedding and the image size/crop ids,
several transformer blocks per level, no attention at the first level).

Data flow: timestep embedding -> conv_in -> down levels (each: resnets, optional
transformers, downsample), keeping every output as a skip -> mid block -> up levels
(each consumes layers_per_block + 1 skips) -> GroupNorm-SiLU -> conv_out.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import UNetConfig
from .layers import Attention, Downsample2D, FeedForward, GroupNorm, LayerNorm, ResnetBlock2D, Upsample2D


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps (Vaswani et al. 2017; DDPM). (N,) -> (N, dim), fp32.

    Frequencies are max_period^(-i / (dim/2 - freq_shift)); `flip_sin_to_cos` puts cos first.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    angles = timesteps[:, None].float() * freqs[None, :]  # (N, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (N, 2 * half)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))  # (N, dim)
    return emb


class TimestepEmbedding(nn.Module):
    """Linear-SiLU-Linear MLP on a sinusoidal embedding (diffusers' linear_1 / linear_2)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(nn.functional.silu(self.linear_1(x)))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on the text, GEGLU MLP; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, HW, dim); context: (B, L, context_dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in, `depth` transformer blocks over the H*W
    tokens, project out, residual. SD1 projects with 1x1 convs, SD2/SDXL with linears
    (`linear_projection`), which act on tokens rather than on the image."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 linear_projection: bool, upcast: bool):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        make_proj = (lambda: nn.Linear(channels, channels)) if linear_projection \
            else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = make_proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim, upcast) for _ in range(depth))
        self.proj_out = make_proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, L, context_dim). Returns (B, C, H, W)."""
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, HW, C)
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear_projection:
            h = self.proj_out(h.contiguous())
        return x + h


class DownBlock(nn.Module):
    """One encoder level: resnets (each followed by a transformer on attention levels) and
    a stride-2 downsample except at the last level. Serves CrossAttnDownBlock2D and DownBlock2D."""

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, num_layers: int, cfg: UNetConfig,
                 heads: Optional[int], depth: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, time_channels,
                          cfg.norm_num_groups, cfg.norm_eps)
            for i in range(num_layers))
        self.attentions = nn.ModuleList(
            _transformer(out_channels, heads, depth, cfg) for _ in range(num_layers if heads else 0))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if add_downsample else [])

    def forward(self, x: torch.Tensor, time_act: torch.Tensor, context: torch.Tensor) -> tuple:
        """Returns the output and the skips, one per resnet plus one after the downsample."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, time_act)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for downsample in self.downsamplers:
            x = downsample(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet, transformer, resnet at the lowest resolution (UNetMidBlock2DCrossAttn)."""

    def __init__(self, channels: int, time_channels: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, time_channels, cfg.norm_num_groups, cfg.norm_eps) for _ in range(2))
        self.attentions = nn.ModuleList(
            [_transformer(channels, cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1], cfg)])

    def forward(self, x: torch.Tensor, time_act: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, time_act)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, time_act)


class UpBlock(nn.Module):
    """One decoder level: num_layers resnets, each on the concatenation of the running
    features and a skip, optional transformers, and a 2x upsample except at the last level.
    Serves CrossAttnUpBlock2D and UpBlock2D."""

    def __init__(self, prev_channels: int, out_channels: int, skip_channels: list, time_channels: int,
                 cfg: UNetConfig, heads: Optional[int], depth: int, add_upsample: bool):
        super().__init__()
        num_layers = len(skip_channels)
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_channels if i == 0 else out_channels) + skip_channels[i], out_channels,
                          time_channels, cfg.norm_num_groups, cfg.norm_eps)
            for i in range(num_layers))
        self.attentions = nn.ModuleList(
            _transformer(out_channels, heads, depth, cfg) for _ in range(num_layers if heads else 0))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if add_upsample else [])

    def forward(self, x: torch.Tensor, skips: list, time_act: torch.Tensor, context: torch.Tensor,
                upsample_size: Optional[tuple] = None) -> torch.Tensor:
        """skips: this level's skip tensors, consumed last-first."""
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, time_act)
            if self.attentions:
                x = self.attentions[i](x, context)
        for upsample in self.upsamplers:
            x = upsample(x, upsample_size)
        return x


def _transformer(channels: int, heads: int, depth: int, cfg: UNetConfig) -> Transformer2DModel:
    return Transformer2DModel(channels, heads, depth, cfg.cross_attention_dim, cfg.norm_num_groups,
                              cfg.use_linear_projection, cfg.upcast_attention)


class UNetEncoder(nn.Module):
    """The encoder half that the UNet and a ControlNet share (diffusers' ControlNetModel copies
    these blocks from the UNet): timestep (and SDXL's added) embedding, conv_in, the down
    levels and the mid block. Subclasses add what follows: the decoder (the UNet) or the
    conditioning embedding and zero convolutions (sdengine/models/controlnet.py)."""

    def __init__(self, cfg: UNetConfig, in_channels: int):
        super().__init__()
        self.cfg = cfg
        channels = cfg.block_out_channels
        levels = len(channels)
        time_channels = channels[0] * 4
        has_attention = [t.startswith("CrossAttn") for t in cfg.down_block_types]

        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], time_channels)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, time_channels)

        self.down_blocks = nn.ModuleList()
        self.skip_channels = [channels[0]]  # conv_in's output is the first skip
        for level in range(levels):
            last = level == levels - 1
            self.down_blocks.append(DownBlock(
                channels[max(level - 1, 0)], channels[level], time_channels, cfg.layers_per_block, cfg,
                cfg.num_attention_heads[level] if has_attention[level] else None,
                cfg.transformer_layers_per_block[level], add_downsample=not last))
            self.skip_channels += [channels[level]] * (cfg.layers_per_block + (0 if last else 1))

        self.mid_block = MidBlock(channels[-1], time_channels, cfg)

    def time_activation(self, sample: torch.Tensor, timestep: torch.Tensor, added_cond: Optional[dict]) -> torch.Tensor:
        """SiLU of the timestep embedding (plus SDXL's added embedding), which every resnet
        projects: computed once. timestep: (B,) or scalar. Returns (B, 4 * C0) in sample's dtype."""
        cfg = self.cfg
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device)
        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep  # (B,)
        t_emb = timestep_embedding(timestep, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(t_emb.to(sample.dtype))  # (B, T)
        if cfg.addition_embed_type == "text_time":
            emb = emb + self.add_embedding(self._text_time_embedding(added_cond, batch).to(emb.dtype))
        return nn.functional.silu(emb)

    def encode(self, x: torch.Tensor, time_act: torch.Tensor, context: torch.Tensor) -> tuple:
        """conv_in's output x through the down levels and the mid block.
        Returns (mid block output, skips: one per entry of skip_channels)."""
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, time_act, context)
            skips += block_skips
        return self.mid_block(x, time_act, context), skips

    def _text_time_embedding(self, added_cond: Optional[dict], batch: int) -> torch.Tensor:
        """SDXL micro-conditioning: pooled text embedding, concatenated with the sinusoidal
        embedding of each of the 6 size/crop ids. Returns (B, projection_class_embeddings_input_dim)."""
        if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
            raise ValueError("this UNet (addition_embed_type='text_time') needs added_cond="
                             "{'text_embeds': (B, P), 'time_ids': (B, 6)}")
        text_embeds, time_ids = added_cond["text_embeds"], added_cond["time_ids"]
        time_embeds = timestep_embedding(time_ids.flatten(), self.cfg.addition_time_embed_dim,
                                         self.cfg.flip_sin_to_cos, self.cfg.freq_shift)  # (B * 6, E)
        time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)  # (B, 6 * E)
        return torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1)  # (B, P + 6 * E)


class UNet2DConditionModel(UNetEncoder):
    """The conditional UNet; state_dict keys equal diffusers' UNet2DConditionModel."""

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg, cfg.in_channels)
        channels = cfg.block_out_channels
        levels = len(channels)
        time_channels = channels[0] * 4
        up_has_attention = [t.startswith("CrossAttn") for t in cfg.up_block_types]

        self.up_blocks = nn.ModuleList()
        skip_channels = list(self.skip_channels)
        prev = channels[-1]
        for i, level in enumerate(reversed(range(levels))):
            level_skips = [skip_channels.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(
                prev, channels[level], level_skips, time_channels, cfg,
                cfg.num_attention_heads[level] if up_has_attention[i] else None,
                cfg.transformer_layers_per_block[level], add_upsample=level > 0))
            prev = channels[level]

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, channels[0], cfg.norm_eps, silu=True)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond: Optional[dict] = None, down_block_additional_residuals: Optional[list] = None,
                mid_block_additional_residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sample: (B, in_channels, H, W); timestep: (B,) or scalar; encoder_hidden_states: (B, L, D);
        added_cond (SDXL): {"text_embeds": (B, P), "time_ids": (B, 6)}. ControlNet residuals, added
        as diffusers adds them: down_block_additional_residuals, one per skip (B, C_skip, h, w), are
        added to the skips after the down levels; mid_block_additional_residual to the mid block's
        output. Returns (B, out_channels, H, W)."""
        time_act = self.time_activation(sample, timestep, added_cond)
        context = encoder_hidden_states
        x, skips = self.encode(self.conv_in(sample), time_act, context)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"tensors, the UNet has {len(skips)} skips")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for block in self.up_blocks:
            level_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            # Upsample to the next level's skip size, so odd sizes survive the stride-2 downsample.
            upsample_size = skips[-1].shape[-2:] if skips else None
            x = block(x, level_skips, time_act, context, upsample_size)
        return self.conv_out(self.conv_norm_out(x))
