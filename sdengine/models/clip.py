"""The CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), as transformers' CLIPTextModel / CLIPTextModelWithProjection.

A causal pre-LayerNorm transformer over 77 token positions. SD1 conditions on the final
LayerNorm output of OpenAI's ViT-L/14 text tower; SD2 on OpenCLIP ViT-H's (whose diffusers
folder already dropped the last layer); SDXL on the penultimate layer of two encoders,
plus the projected pooled output of the second.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextEncoderConfig
from .layers import LayerNorm, UsesOps


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(UsesOps):
    """Multi-head self-attention with transformers' names (q_proj, k_proj, v_proj, out_proj):
    causal in the text tower, over every patch in the vision tower."""

    def __init__(self, dim: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, dim) -> (B, L, dim); causal: position i attends to positions <= i."""
        out = self.ops.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=self.causal)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)). cfg: a TextEncoderConfig or VisionEncoderConfig."""

    def __init__(self, cfg: TextEncoderConfig, causal: bool = True):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, causal)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding.

    `reserve_added_tokens(n)` (compiled engines only) adds a table of n more token vectors,
    zeros until textual-inversion embeddings are written into it, for ids vocab_size ... +n-1:
    an engine's vocabulary can grow without recompiling. (Python pipelines grow the token
    table itself instead, as diffusers does.)
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def reserve_added_tokens(self, count: int) -> None:
        table = self.token_embedding.weight
        self.register_buffer("added_tokens", torch.zeros(count, table.shape[1], dtype=table.dtype,
                                                         device=table.device), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, D)."""
        added_tokens = self._buffers.get("added_tokens")  # (n, D), see reserve_added_tokens
        if added_tokens is None:
            tokens = self.token_embedding(input_ids)
        else:
            vocab = self.token_embedding.weight.shape[0]
            base = self.token_embedding(input_ids.clamp(max=vocab - 1))  # (B, L, D)
            added = added_tokens[(input_ids - vocab).clamp(min=0, max=added_tokens.shape[0] - 1)]
            tokens = torch.where((input_ids >= vocab)[..., None], added, base)
        return tokens + self.position_embedding.weight[:input_ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """The parameters under transformers' `text_model.` prefix."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)


def add_text_model_prefix(state_dict: dict) -> dict:
    """Rename transformers 5's flat CLIPTextModel keys (`embeddings.*`, `encoder.*`,
    `final_layer_norm.*`) to the `text_model.*` names that checkpoints on the Hub, older
    transformers and CLIPTextModelWithProjection use. Other keys are kept as they are."""
    flat = ("embeddings.", "encoder.", "final_layer_norm.")
    return {("text_model." + k if k.startswith(flat) else k): v for k, v in state_dict.items()}


class CLIPTextModel(nn.Module):
    """CLIP text encoder; state_dict keys equal a transformers CLIPTextModel checkpoint's
    (text_model.*; transformers 5 saves CLIPTextModel without the prefix: see
    add_text_model_prefix), plus text_projection.weight when cfg.projection_dim is set
    (CLIPTextModelWithProjection)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, clip_skip: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids: (B, L) long, L <= max_position_embeddings.

        Returns (hidden (B, L, D), pooled (B, D), or (B, projection_dim) when projected).
        hidden: for output_layer "last", the output of the last layer, or of the layer
        `clip_skip` layers before it, through the final LayerNorm (diffusers' clip_skip);
        for "penultimate", the output of the layer 1 + clip_skip before the last, with no
        LayerNorm (SDXL). pooled: the final LayerNorm output at the end-of-text token.
        """
        cfg, model = self.cfg, self.text_model
        num_layers = cfg.num_hidden_layers
        out_index = self.output_index(clip_skip)
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"input_ids must be (batch, tokens <= {cfg.max_position_embeddings}), "
                             f"got shape {tuple(input_ids.shape)}")

        x = model.embeddings(input_ids)  # (B, L, D)
        hidden = x  # kept when out_index == 0: the embeddings themselves
        for index, layer in enumerate(model.encoder.layers, start=1):
            x = layer(x)
            if index == out_index:
                hidden = x
        final = model.final_layer_norm(x)  # (B, L, D)
        if cfg.output_layer == "last":
            hidden = final if out_index == num_layers else model.final_layer_norm(hidden)

        pooled = final[torch.arange(final.shape[0], device=final.device), self._eos_positions(input_ids)]  # (B, D)
        if cfg.projection_dim is not None:
            pooled = self.text_projection(pooled)  # (B, projection_dim)
        return hidden, pooled

    def output_index(self, clip_skip: Optional[int]) -> int:
        """Which hidden state `clip_skip` conditions on: k is the output of layer k (0 = the
        embeddings), as transformers counts. ValueError when clip_skip is out of range."""
        cfg = self.cfg
        skip = 0 if clip_skip is None else int(clip_skip)
        out_index = cfg.num_hidden_layers - skip - (1 if cfg.output_layer == "penultimate" else 0)
        if skip < 0 or out_index < 0:
            raise ValueError(f"clip_skip={clip_skip} is out of range for a {cfg.num_hidden_layers}-layer text encoder "
                             f"with output_layer={cfg.output_layer!r}")
        return out_index

    def _eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the end-of-text token in each row. transformers' legacy rule: with
        eos_token_id == 2 (the configs SD shipped with), it is the largest token id, which
        is <|endoftext|> = 49407 in CLIP's vocabulary; otherwise the first eos_token_id."""
        if self.cfg.eos_token_id == 2:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)
