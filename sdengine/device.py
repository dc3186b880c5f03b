"""Devices and dtypes: the one table of dtype names, and the defaults.

    device, dtype = resolve_device_dtype("cuda", "fp16")
    dtype_name(torch.bfloat16)   # "bf16"

Every place that reads or writes a dtype by name (the API and CLIs, export manifests,
engine.json, the benchmark record) goes through `DTYPES` / `dtype_name`.
"""

from __future__ import annotations

import torch

from .errors import InvalidArgumentError

# The short names sdengine writes (CLI flags, manifests, engine.json, benchmark records) and
# the long ones it also reads.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32", "fp16" or "bf16"; ValueError for any other dtype."""
    if dtype not in _NAMES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return _NAMES[dtype]


def to_dtype(dtype) -> torch.dtype:
    """A torch dtype from a torch dtype or a name ("fp16", "float16", ...)."""
    if isinstance(dtype, str):
        names = {**DTYPES, **_ALIASES}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
        return names[dtype]
    return dtype


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA when available; fp16 on CUDA, fp32 on the CPU."""
    try:
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                              else "cpu")
    except (RuntimeError, TypeError):
        raise InvalidArgumentError("device", f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device", "device='cuda' was requested but torch sees no CUDA device")
    dtype = (torch.float16 if device.type == "cuda" else torch.float32) if dtype is None else to_dtype(dtype)
    if dtype not in _NAMES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return device, dtype
