"""What one accelerated UNet call computes, reuses and stores: DeepCache, T-GATE and ToMe
inside the network (sdengine/acceleration.py makes the per-step plan and keeps the tensors).

- DeepCache (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free"): a full step
  keeps the hidden state that enters one up-block layer ("deep"); a cached step runs only the
  shallow skip branch above it (conv_in, the down layers whose skips that layer and the ones after
  it consume, those up layers, conv_out) from the kept state.
- T-GATE (Zhang et al. 2024, "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion
  Models"; TGATE-V2, "Faster Diffusion via Temporal Attention Decomposition"): an attention
  layer's output is kept ("attn1.<block>" self-attention, "attn2.<block>" cross-attention) and
  later reused instead of computed.
- ToMe for SD (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"): before a
  transformer block's self-attention the tokens are merged by bipartite soft matching (one
  destination token per sy x sx cell, the most similar source tokens averaged into their
  destinations) and un-merged after it.

The call is functional, so that a captured graph or a compiled network serves it: what is
reused comes in (`cached`, ToMe's random destination choices `rand`), what is kept goes out
(`StepCall.stored`); the caller keeps the tensors between calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

COMPUTE, STORE, STORE_MEAN, REUSE = "compute", "store", "store_mean", "reuse"  # an attention's mode
ATTENTION_MODES = (COMPUTE, STORE, STORE_MEAN, REUSE)


@dataclass(frozen=True)
class ToMeArgs:
    """tomesd.apply_patch's arguments (sdengine.ToMe holds the same, checked)."""

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False


@dataclass(frozen=True)
class StepKind:
    """What one UNet call computes and what it reuses; hashable, since a captured graph bakes it in.

    cfg:        the UNet runs on [uncond, cond] (T-GATE turns guidance off after its gate step).
    deep:       DeepCache: COMPUTE (off), STORE (full step, keeps the branch's input) or REUSE.
    branch:     DeepCache's (down level, layer) of the skip branch (DeepCacheSDHelper's cache_block_id,
                cache_layer_id).
    self_attn, cross_attn: T-GATE's mode of every self- / cross-attention (ATTENTION_MODES).
    tome:       ToMe's arguments, or None.
    """

    cfg: bool = True
    deep: str = COMPUTE
    branch: Optional[tuple] = None
    self_attn: str = COMPUTE
    cross_attn: str = COMPUTE
    tome: Optional[ToMeArgs] = None

    def reads(self, key: str) -> bool:
        """Whether a kept tensor named key is read by a call of this kind (when it is there)."""
        if key == "deep":
            return self.deep == REUSE
        if key.startswith("attn1."):
            return self.self_attn == REUSE
        return key.startswith("attn2.") and self.cross_attn == REUSE

    @property
    def in_blocks(self) -> bool:
        """Whether the transformer blocks do anything but their ordinary forward (T-GATE, ToMe)."""
        return self.self_attn != COMPUTE or self.cross_attn != COMPUTE or self.tome is not None


@dataclass
class StepCall:
    """One UNet call's view of the caches: its kind, the kept tensors it may read (`cached`),
    ToMe's destination choices per transformer block (`rand`, (h // sy, w // sx, 1) int64, absent
    without use_rand), the latent size, and what the call keeps (`stored`, filled as it runs)."""

    kind: StepKind
    cached: dict
    rand: dict
    latent_size: tuple
    stored: dict = field(default_factory=dict)

    def attention(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """An attention layer's output under T-GATE: reused from `cached`, or computed (and kept)."""
        mode = self.kind.self_attn if key.startswith("attn1.") else self.kind.cross_attn
        if mode == REUSE and key in self.cached:
            return self.cached[key]
        out = compute()
        if mode == STORE:
            self.stored[key] = out
        elif mode == STORE_MEAN:  # TGATE-V2 at its gate: the mean of the unconditional and conditional halves
            uncond, cond = out.chunk(2)
            self.stored[key] = (uncond + cond) / 2
        return out

    def merging(self, block_index: int, x: torch.Tensor, height: int, width: int):
        """ToMe's (merge, unmerge) for a transformer block over x (B, height·width, C), or None where
        it does not apply (no ToMe, a level downsampled more than max_downsample, nothing to merge)."""
        tome = self.kind.tome
        if tome is None or not tome_applies(tome, self.latent_size, height, width):
            return None
        return bipartite_merge(x, height, width, tome.sx, tome.sy, int(x.shape[1] * tome.ratio),
                               self.rand.get(block_index))


# ---------------------------------------------------------------------------
# ToMe: bipartite soft matching over a 2D grid of tokens
# ---------------------------------------------------------------------------

def tome_applies(tome: ToMeArgs, latent_size: tuple, height: int, width: int) -> bool:
    """Whether a transformer block over a height x width grid merges tokens: its level is
    downsampled at most max_downsample times from the latent (tomesd's test, on token counts),
    and ratio merges at least one token."""
    tokens = height * width
    downsample = math.ceil(math.sqrt((latent_size[0] * latent_size[1]) // tokens))
    return downsample <= tome.max_downsample and int(tokens * tome.ratio) > 0


def tome_draw_shape(tome: ToMeArgs, height: int, width: int) -> tuple:
    """The shape of a block's random destination choice: one index in [0, sx·sy) per whole cell."""
    return (height // tome.sy, width // tome.sx, 1)


def bipartite_merge(x: torch.Tensor, height: int, width: int, sx: int, sy: int, r: int,
                    rand: Optional[torch.Tensor]) -> tuple:
    """ToMe's bipartite soft matching (Bolya et al. 2023, "Token Merging: Your ViT But Faster";
    for SD: Bolya & Hoffman 2023) of x (B, height·width, C) -> (merge, unmerge).

    Destinations: one token per sy x sx cell of the grid, at the cell offset `rand` (h//sy, w//sx, 1)
    gives (row-major within the cell), or the top-left one when rand is None; every other token is a
    source. Each source's most similar destination (cosine similarity of x) is its match, and the r
    sources with the best matches are averaged into their destinations. merge: (B, N, c) ->
    (B, N - r, c); unmerge: (B, N - r, c) -> (B, N, c), a merged source taking its destination's value.
    The grid is shared by the batch. Only index tensors are computed here, with no host sync, so a
    CUDA graph captures it.
    """
    batch, tokens, _ = x.shape
    device = x.device
    cells_y, cells_x = height // sy, width // sx
    num_dst = cells_y * cells_x
    offset = rand.to(device).view(cells_y, cells_x) if rand is not None else \
        torch.zeros(cells_y, cells_x, dtype=torch.int64, device=device)
    rows = torch.arange(cells_y, device=device)[:, None] * sy + offset // sx  # (cells_y, cells_x)
    cols = torch.arange(cells_x, device=device)[None, :] * sx + offset % sx
    is_src = torch.ones(height * width, dtype=torch.int64, device=device)
    is_src[(rows * width + cols).flatten()] = 0
    order = torch.argsort(is_src, stable=True)  # destinations, then sources, each in raster order
    dst_idx, src_idx = order[:num_dst], order[num_dst:]  # (num_dst,), (num_src,)
    r = min(r, tokens - num_dst)

    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True)
        scores = metric[:, src_idx] @ metric[:, dst_idx].transpose(-1, -2)  # (B, num_src, num_dst)
        best, match = scores.max(dim=-1)  # (B, num_src)
        ranked = best.argsort(dim=-1, descending=True)[..., None]  # (B, num_src, 1)
        unmerged, merged = ranked[:, r:], ranked[:, :r]  # sources kept apart, sources merged away
        merged_dst = match[..., None].gather(1, merged)  # (B, r, 1): where each merged source goes

    def merge(t: torch.Tensor) -> torch.Tensor:
        channels = t.shape[-1]
        src, dst = t[:, src_idx], t[:, dst_idx]  # (B, num_src, c), (B, num_dst, c)
        kept = src.gather(1, unmerged.expand(-1, -1, channels))
        moved = src.gather(1, merged.expand(-1, -1, channels))
        dst = dst.scatter_reduce(1, merged_dst.expand(-1, -1, channels), moved, reduce="mean")
        return torch.cat([kept, dst], dim=1)  # (B, N - r, c)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        channels = t.shape[-1]
        n_kept = unmerged.shape[1]
        kept, dst = t[:, :n_kept], t[:, n_kept:]
        out = t.new_zeros(t.shape[0], tokens, channels)
        out[:, dst_idx] = dst
        src_positions = src_idx[None, :, None].expand(t.shape[0], -1, 1)  # (B, num_src, 1)
        out.scatter_(1, src_positions.gather(1, unmerged).expand(-1, -1, channels), kept)
        out.scatter_(1, src_positions.gather(1, merged).expand(-1, -1, channels),
                     dst.gather(1, merged_dst.expand(-1, -1, channels)))
        return out

    return merge, unmerge
