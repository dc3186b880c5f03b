"""IP-Adapter's networks (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for
Text-to-Image Diffusion Models"), with the key names of its original files (tencent-ailab's
`image_proj.*` and `ip_adapter.*`):

- `ImageProjection`: the basic adapters' projection of the CLIP image embedding into
  `num_tokens` context tokens (`proj` Linear, `norm` LayerNorm);
- `Resampler`: IP-Adapter Plus's perceiver (Flamingo's Perceiver Resampler, Alayrac et al. 2022)
  from the image encoder's penultimate hidden states to `num_queries` tokens;
- `IPAttention`: the decoupled cross-attention's key and value projections of one UNet
  cross-attention layer (`to_k_ip`, `to_v_ip`), which `models.layers.Attention` runs beside the
  text's (its `ip_layers`), scaled by the adapter's scale.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerNorm


class ImageProjection(nn.Module):
    """(B, clip_dim) image embeddings -> (B, num_tokens, context_dim) tokens."""

    def __init__(self, clip_dim: int, context_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.context_dim = num_tokens, context_dim
        self.proj = nn.Linear(clip_dim, context_dim * num_tokens)
        self.norm = LayerNorm(context_dim, 1e-5)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(-1, self.num_tokens, self.context_dim)  # (B, T, D)
        return self.norm(tokens)


class PerceiverAttention(nn.Module):
    """The latents attend to the image features and to themselves (norm1: features, norm2: latents)."""

    def __init__(self, dim: int, heads: int, dim_head: int = 64):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1 = LayerNorm(dim, 1e-5)
        self.norm2 = LayerNorm(dim, 1e-5)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        batch, queries, _ = latents.shape
        q = self.to_q(latents)  # (B, Q, inner)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)  # (B, N + Q, inner) each

        def heads(t):  # (B, L, inner) -> (B, heads, L, dim_head)
            return t.reshape(batch, -1, self.heads, self.dim_head).transpose(1, 2)

        out = nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # (B, heads, Q, dim_head)
        return self.to_out(out.transpose(1, 2).reshape(batch, queries, -1))


class Resampler(nn.Module):
    """(B, N, clip_hidden) hidden states -> (B, num_queries, context_dim): learned latents refined
    by `depth` blocks of perceiver attention and a bias-free GELU MLP (each residual)."""

    def __init__(self, clip_hidden: int, dim: int, context_dim: int, depth: int, heads: int, num_queries: int,
                 ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(1, num_queries, dim))
        self.proj_in = nn.Linear(clip_hidden, dim)
        self.proj_out = nn.Linear(dim, context_dim)
        self.norm_out = LayerNorm(context_dim, 1e-5)
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(dim, heads),
            nn.Sequential(LayerNorm(dim, 1e-5), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                          nn.Linear(dim * ff_mult, dim, bias=False)),
        ]) for _ in range(depth))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(hidden.shape[0], -1, -1)  # (B, Q, dim)
        features = self.proj_in(hidden)  # (B, N, dim)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IPAttention(nn.Module):
    """One adapter's key and value projections of the image tokens, for one cross-attention layer."""

    def __init__(self, context_dim: int, dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, dim, bias=False)
        self.to_v_ip = nn.Linear(context_dim, dim, bias=False)
