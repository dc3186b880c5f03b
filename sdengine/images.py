"""Images in and out of the pipeline: checked arrays (sdengine.request) to tensors at the
request's size, and decoded tensors to the caller's arrays or PIL images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def image_tensor(images: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Float images (N, H, W, 3) in [0, 1] -> (N, 3, height, width) in [-1, 1] (bicubic resize
    when the size differs)."""
    image = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0  # (N, 3, H, W)
    if tuple(image.shape[-2:]) != (height, width):
        image = F.interpolate(image, size=(height, width), mode="bicubic", align_corners=False).clamp(-1, 1)
    return image


def mask_tensor(masks: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Float masks (N, H, W, 1 or 3) in [0, 1] -> (N, 1, height, width) binarised at 0.5, white (1)
    = repaint (diffusers' mask processor); nearest resize when the size differs."""
    if masks.shape[-1] == 3:  # grayscale as PIL's "L" does (ITU-R 601-2 luma)
        masks = masks[..., :1] * 0.299 + masks[..., 1:2] * 0.587 + masks[..., 2:3] * 0.114
    mask = (torch.from_numpy(np.ascontiguousarray(masks[..., :1])).permute(0, 3, 1, 2) >= 0.5).float()  # (N, 1, H, W)
    if tuple(mask.shape[-2:]) != (height, width):
        mask = F.interpolate(mask, size=(height, width), mode="nearest")
    return mask


def to_numpy(decoded: torch.Tensor) -> np.ndarray:
    """Decoded images (N, 3, H, W) in about [-1, 1] -> float array (N, H, W, 3) in [0, 1]."""
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def to_uint8(decoded: torch.Tensor) -> np.ndarray:
    """Decoded images (N, 3, H, W) in about [-1, 1] -> uint8 (N, H, W, 3), rounded as diffusers'
    postprocess. On CUDA one fused kernel (sdengine.kernels.decode_to_uint8: denormalise, round,
    NHWC) and a copy of a quarter of the bytes; elsewhere the same arithmetic in numpy."""
    if decoded.is_cuda:
        from . import kernels

        return kernels.decode_to_uint8(decoded.float()).cpu().numpy()
    return float_to_uint8(to_numpy(decoded))


def float_to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] -> uint8, rounding as diffusers does (half to even)."""
    return (images * 255).round().astype("uint8")


def to_pil(pixels: np.ndarray) -> list:
    """uint8 (N, H, W, 3) -> PIL images."""
    from PIL import Image

    return [Image.fromarray(im) for im in pixels]


def numpy_to_pil(images: np.ndarray) -> list:
    """(N, H, W, 3) floats in [0, 1] -> PIL images, rounding as diffusers does."""
    return to_pil(float_to_uint8(images))
