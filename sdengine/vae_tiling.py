"""Tiled VAE decoding with blended seams, for images whose decode would not fit in memory.

The latent is cut into overlapping tiles; each tile is decoded on its own, and the
decoded tiles are blended with linear ramps across the overlaps, so that no seam
shows. Peak memory is that of one tile's decode, whatever the image size.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# Above this many latent cells (128 x 128 = a 1024 x 1024 SD1.5 image) the pipeline
# tiles the decode unless told otherwise.
AUTO_TILE_CELLS = 128 * 128
# Tile and overlap in latent cells: 64 cells (512 px) decode in about the memory of a
# 512 x 512 image; 16 cells (128 px) of overlap hide the seams.
TILE, OVERLAP = 64, 16


def _starts(size: int, tile: int, stride: int) -> list:
    """Tile origins covering [0, size): a regular grid, the last tile flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, rise: bool, fall: bool) -> torch.Tensor:
    """1-D blend weights: a linear rise over the first `overlap` samples when a tile lies
    before this one, a fall over the last `overlap` when one lies after; 1 elsewhere."""
    w = torch.ones(length)
    ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap  # in (0, 1): never zero
    if rise:
        w[:overlap] = ramp
    if fall:
        w[length - overlap:] = ramp.flip(0)
    return w


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, scale: int,
                 tile: Optional[int] = None, overlap: Optional[int] = None) -> torch.Tensor:
    """Decode latents z (B, C, h, w) tile by tile; returns (B, 3, h·scale, w·scale).

    decode: unscaled latents -> images; scale: pixels per latent cell; tile, overlap: in
    latent cells (overlap < tile); default TILE and OVERLAP.
    """
    tile = TILE if tile is None else tile
    overlap = OVERLAP if overlap is None else overlap
    if not 0 < overlap < tile:
        raise ValueError(f"vae tiling: overlap ({overlap}) must be in (0, tile={tile})")
    batch, _, h, w = z.shape
    if h <= tile and w <= tile:
        return decode(z)
    stride = tile - overlap
    ys, xs = _starts(h, tile, stride), _starts(w, tile, stride)
    out = weight = None
    for y0 in ys:
        for x0 in xs:
            th, tw = min(tile, h - y0), min(tile, w - x0)
            image = decode(z[:, :, y0:y0 + th, x0:x0 + tw]).float()  # (B, 3, th·scale, tw·scale)
            if out is None:
                out = torch.zeros(batch, image.shape[1], h * scale, w * scale, device=image.device)
                weight = torch.zeros(1, 1, h * scale, w * scale, device=image.device)
            wy = _ramp(th * scale, overlap * scale, rise=y0 > 0, fall=y0 + th < h)
            wx = _ramp(tw * scale, overlap * scale, rise=x0 > 0, fall=x0 + tw < w)
            mask = (wy[:, None] * wx[None, :]).to(image.device)  # (th·scale, tw·scale)
            region = (slice(None), slice(None), slice(y0 * scale, (y0 + th) * scale),
                      slice(x0 * scale, (x0 + tw) * scale))
            out[region] += image * mask
            weight[region] += mask
    return out / weight
