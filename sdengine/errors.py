"""Exception types of sdengine.

Each message names the parameter, path, file or key at fault. The types derive from
the built-in ones a caller would already catch (a bad checkpoint is a ValueError).
"""

from pathlib import Path

import torch


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded: unknown architecture, corrupt file, missing,
    extra or mis-shaped weights. Nothing is returned half-loaded."""


class InvalidArgumentError(ValueError):
    """A generation argument was refused (sdengine.request). `parameter` names it, and the
    message starts with that name and says what the value must be."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


class OutOfMemoryError(torch.OutOfMemoryError, MemoryError):
    """A request ran out of device (or host) memory. The message names the size and batch;
    what the request allocated has been freed, so a smaller request can run next. A
    torch.OutOfMemoryError (so torch.cuda.OutOfMemoryError) and a MemoryError, so existing
    handlers of either catch it; the C API returns SDE_ERR_OUT_OF_MEMORY."""


class GenerationCancelled(RuntimeError):
    """Raised when the callback asked to stop (returned False)."""


def weights_file(path, what: str, suffixes: tuple) -> Path:
    """`path` as a Path to an existing file of one of `suffixes`: FileNotFoundError naming `what`
    (e.g. "LoRA") when it is missing, ModelLoadError for another file type."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if path.suffix not in suffixes:
        raise ModelLoadError(f"{path}: unsupported {what} file type {path.suffix!r}; expected {', '.join(suffixes)}")
    return path
