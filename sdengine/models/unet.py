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
from .caching import REUSE, STORE, StepCall, StepKind
from .layers import (Attention, Downsample2D, FeedForward, GroupNorm, IPContext, LayerNorm, ResnetBlock2D,
                     Upsample2D)


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
        self.index = -1  # its place in the UNet's order of calls (the key of its caches; set by the UNet)

    def forward(self, x: torch.Tensor, context: torch.Tensor, step: Optional[StepCall] = None,
                size: Optional[tuple] = None) -> torch.Tensor:
        """x: (B, HW, dim); context: (B, L, context_dim). step (with size, the (H, W) of the tokens):
        an accelerated call (sdengine/models/caching.py: T-GATE's kept attention outputs, ToMe)."""
        if step is None or not step.kind.in_blocks:
            x = x + self.attn1(self.norm1(x))
            x = x + self.attn2(self.norm2(x), context)
            return x + self.ff(self.norm3(x))
        tome = step.kind.tome
        merging = step.merging(self.index, x, *size)  # tomesd: the metric is the block's input
        merge, unmerge = merging if merging is not None else (None, None)

        def merged(run, on: bool):
            """run(h) on merged tokens where ToMe merges for this sub-layer."""
            return (lambda h: unmerge(run(merge(h)))) if merge is not None and on else run

        self_attention = merged(self.attn1, tome is not None and tome.merge_attn)
        cross_attention = merged(lambda h: self.attn2(h, context), tome is not None and tome.merge_crossattn)
        # T-GATE keeps the attention outputs unmerged, so that a reused one needs no partition
        x = x + step.attention(f"attn1.{self.index}", lambda: self_attention(self.norm1(x)))
        x = x + step.attention(f"attn2.{self.index}", lambda: cross_attention(self.norm2(x)))
        return x + merged(self.ff, tome is not None and tome.merge_mlp)(self.norm3(x))


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

    def forward(self, x: torch.Tensor, context: torch.Tensor, step: Optional[StepCall] = None) -> torch.Tensor:
        """x: (B, C, H, W); context: (B, L, context_dim). Returns (B, C, H, W)."""
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, HW, C)
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context) if step is None else block(h, context, step, (height, width))
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

    def forward(self, x: torch.Tensor, time_act: torch.Tensor, context: torch.Tensor,
                step: Optional[StepCall] = None, layers: Optional[int] = None) -> tuple:
        """Returns the output and the skips, one per resnet plus one after the downsample.
        layers: run only the first `layers` resnets (and transformers), without the downsample
        (DeepCache's shallow branch)."""
        skips = []
        for i, resnet in enumerate(self.resnets[:layers]):
            x = resnet(x, time_act)
            if self.attentions:
                x = self.attentions[i](x, context, step)
            skips.append(x)
        for downsample in self.downsamplers if layers is None else ():
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

    def forward(self, x: torch.Tensor, time_act: torch.Tensor, context: torch.Tensor,
                step: Optional[StepCall] = None) -> torch.Tensor:
        x = self.resnets[0](x, time_act)
        x = self.attentions[0](x, context, step)
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
                upsample_size: Optional[tuple] = None, step: Optional[StepCall] = None, start: int = 0,
                stop: Optional[int] = None) -> torch.Tensor:
        """skips: this level's skip tensors, consumed last-first (popped, one per layer run).
        start, stop: run layers [start, stop) only; the upsample runs with the last layer."""
        stop = len(self.resnets) if stop is None else stop
        for i in range(start, stop):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = self.resnets[i](x, time_act)
            if self.attentions:
                x = self.attentions[i](x, context, step)
        for upsample in self.upsamplers if stop == len(self.resnets) else ():
            x = upsample(x, upsample_size)
        return x


def block_levels(cfg: UNetConfig) -> list:
    """The level (0: the latent's resolution) of every transformer block of the UNet, in the order
    a forward calls them: the down levels', the mid block's, the up levels'."""
    levels = len(cfg.block_out_channels)
    down = [level for level, t in enumerate(cfg.down_block_types) if t.startswith("CrossAttn")
            for _ in range(cfg.layers_per_block * cfg.transformer_layers_per_block[level])]
    mid = [levels - 1] * cfg.transformer_layers_per_block[-1]
    up = [levels - 1 - u for u, t in enumerate(cfg.up_block_types) if t.startswith("CrossAttn")
          for _ in range((cfg.layers_per_block + 1) * cfg.transformer_layers_per_block[levels - 1 - u])]
    return down + mid + up


def transformer_grids(cfg: UNetConfig, height: int, width: int) -> list:
    """(block index, grid height, grid width) of every transformer block, in call order, for a
    latent of height x width (each level halves it, rounding up as the stride-2 downsample does)."""
    sizes = [(height, width)]
    for _ in range(len(cfg.block_out_channels) - 1):
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    return [(index, *sizes[level]) for index, level in enumerate(block_levels(cfg))]


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

    def encode(self, x: torch.Tensor, time_act: torch.Tensor, context: torch.Tensor,
               step: Optional[StepCall] = None) -> tuple:
        """conv_in's output x through the down levels and the mid block.
        Returns (mid block output, skips: one per entry of skip_channels)."""
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, time_act, context, step)
            skips += block_skips
        return self.mid_block(x, time_act, context, step), skips

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
        # The transformer blocks in the order a forward calls them: their index keys what an
        # accelerated call keeps of them (T-GATE) and draws for them (ToMe).
        down = [t for b in self.down_blocks for t in b.attentions]
        up = [t for b in self.up_blocks for t in b.attentions]
        blocks = [block for t in down + [self.mid_block.attentions[0]] + up for block in t.transformer_blocks]
        assert len(blocks) == len(block_levels(cfg))
        for index, block in enumerate(blocks):
            block.index = index

    def deepcache_branch(self, branch: tuple) -> tuple:
        """DeepCache's skip branch (down level B, layer L) as (up block index, first up layer it runs):
        the up layers of level B from that one on consume the skips of the layers before layer L of
        down level B (and the last skip before it), which the shallow branch computes."""
        level, layer = branch
        levels = len(self.up_blocks)
        if not 0 <= level < levels or layer < 0:
            raise ValueError(f"deepcache.branch: level {level}, layer {layer} is not in this UNet ({levels} levels)")
        block = levels - 1 - level
        return block, max(0, len(self.up_blocks[block].resnets) - 1 - layer)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond: Optional[dict] = None, down_block_additional_residuals: Optional[list] = None,
                mid_block_additional_residual: Optional[torch.Tensor] = None, *, kind: Optional[StepKind] = None,
                cached: Optional[dict] = None, rand: Optional[dict] = None):
        """sample: (B, in_channels, H, W); timestep: (B,) or scalar; encoder_hidden_states: (B, L, D);
        added_cond (SDXL): {"text_embeds": (B, P), "time_ids": (B, 6)}; with IP-Adapters also
        "ip_tokens_i" (B, T, D) per adapter i and "ip_scales" (B, adapters). ControlNet residuals, added
        as diffusers adds them: down_block_additional_residuals, one per skip (B, C_skip, h, w), are
        added to the skips after the down levels; mid_block_additional_residual to the mid block's
        output. Returns (B, out_channels, H, W).

        kind: an accelerated call (sdengine/models/caching.py: DeepCache, T-GATE, ToMe), reading the
        kept tensors in `cached` and ToMe's draws in `rand`; it returns (output, the tensors it keeps).
        """
        step = None if kind is None else StepCall(kind, cached or {}, rand or {}, tuple(sample.shape[-2:]))
        time_act = self.time_activation(sample, timestep, added_cond)
        context = encoder_hidden_states
        if added_cond and "ip_scales" in added_cond:  # IP-Adapter: the cross-attentions' image tokens
            tokens = tuple(added_cond[f"ip_tokens_{i}"] for i in range(added_cond["ip_scales"].shape[1]))
            context = IPContext(context, tokens, added_cond["ip_scales"])
        x = self.conv_in(sample)
        if step is not None and kind.deep == REUSE and "deep" in step.cached:
            out = self._shallow_branch(x, time_act, context, step, down_block_additional_residuals)
            return out, step.stored
        x, skips = self.encode(x, time_act, context, step)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"tensors, the UNet has {len(skips)} skips")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        branch = self.deepcache_branch(kind.branch) if step is not None and kind.deep == STORE else (None, None)
        for i, block in enumerate(self.up_blocks):
            level_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            # Upsample to the next level's skip size, so odd sizes survive the stride-2 downsample.
            upsample_size = skips[-1].shape[-2:] if skips else None
            if i == branch[0]:  # DeepCache's full step: keep what enters the branch's first up layer
                x = block(x, level_skips, time_act, context, upsample_size, step, stop=branch[1])
                step.stored["deep"] = x
                x = block(x, level_skips, time_act, context, upsample_size, step, start=branch[1])
            else:
                x = block(x, level_skips, time_act, context, upsample_size, step)
        out = self.conv_out(self.conv_norm_out(x))
        return out if step is None else (out, step.stored)

    def _shallow_branch(self, x: torch.Tensor, time_act: torch.Tensor, context: torch.Tensor, step: StepCall,
                        down_residuals: Optional[list]) -> torch.Tensor:
        """DeepCache's cached step from conv_in's output x: the down levels above the branch, the
        branch level's first layers, then the up layers from the branch's on, starting from the kept
        state. ControlNet residuals are added to the skips it computes (the first of the list)."""
        level, layer = step.kind.branch
        first, start = self.deepcache_branch((level, layer))
        skips = [x]
        for block in self.down_blocks[:level]:
            x, block_skips = block(x, time_act, context, step)
            skips += block_skips
        skips += self.down_blocks[level](x, time_act, context, step, layers=layer)[1]
        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals)]
        x = step.cached["deep"]
        for i, block in enumerate(self.up_blocks[first:], start=first):
            count = len(block.resnets) - (start if i == first else 0)
            level_skips = skips[-count:]
            del skips[-count:]
            upsample_size = skips[-1].shape[-2:] if skips else None
            x = block(x, level_skips, time_act, context, upsample_size, step, start=start if i == first else 0)
        return self.conv_out(self.conv_norm_out(x))
