"""The samplers' noise, drawn as diffusers draws it (one generator per image: batch-independent)."""

from __future__ import annotations

from typing import Sequence, Union

import torch


def randn(shape, generators: Union[None, torch.Generator, Sequence[torch.Generator]], device=None,
          dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn as diffusers' randn_tensor draws it.

    With a list of generators (one per image) image i is drawn from generators[i] with shape
    (1, *shape[1:]), so results do not depend on the batch size. CPU generators draw on the CPU
    and the result moves to `device`.
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generators, (list, tuple)) and len(generators) == 1:
        generators = generators[0]
    if isinstance(generators, torch.Generator):
        return torch.randn(shape, generator=generators, device=generators.device, dtype=dtype).to(device)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}; pass one per image")
    return torch.cat([torch.randn((1,) + shape[1:], generator=g, device=g.device, dtype=dtype)
                      for g in generators]).to(device)
