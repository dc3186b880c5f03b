"""CLIP's vision tower (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"; Radford et al.
2021, CLIP), as transformers' CLIPVisionModelWithProjection: IP-Adapter's image encoder.

Patches of the image (a stride-`patch_size` convolution) and a class token, plus learned
positions, through a pre-LayerNorm transformer (the text tower's layers, without the causal
mask). IP-Adapter reads the projected, post-LayerNormed class token (`image_embeds`), or the
Plus adapters the penultimate layer's hidden states of every token (transformers'
`hidden_states[-2]`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionEncoderConfig
from .clip import CLIPEncoderLayer
from .layers import LayerNorm


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, 1 + (S / patch)^2, D): the class token, then the patches row by row."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal=False) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    """The parameters under transformers' `vision_model.` prefix ("pre_layrnorm" is its spelling)."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.encoder = CLIPVisionEncoder(cfg)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)


class CLIPVisionModelWithProjection(nn.Module):
    """state_dict keys equal transformers' CLIPVisionModelWithProjection (vision_model.*,
    visual_projection.weight)."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (B, 3, S, S), normalized (sdengine.ip_adapter.preprocess).
        Returns (image_embeds (B, projection_dim), penultimate hidden states (B, 1 + P, D))."""
        model = self.vision_model
        x = model.pre_layrnorm(model.embeddings(pixel_values))  # transformers' hidden_states[0]
        penultimate = x
        for index, layer in enumerate(model.encoder.layers):
            if index == len(model.encoder.layers) - 1:
                penultimate = x  # hidden_states[-2]: the input of the last layer
            x = layer(x)
        pooled = model.post_layernorm(x[:, 0])  # the class token
        return self.visual_projection(pooled), penultimate
