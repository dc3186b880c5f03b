"""Exports of sdengine's networks for other runtimes (installed as `sdengine.export`).

    sdengine.export.onnx(model, out_dir, dtype="fp16")   # ONNX graphs + manifest (export/onnx.py)
    sdengine.export.aoti ...                              # AOTInductor packages (export/aoti.py)

Submodules are imported on first use, so `import sdengine.export` needs neither onnx
nor onnxruntime. `sdengine.export.onnx` is the module export/onnx.py, and calling it
calls its `export_onnx`.
"""

from pathlib import Path as _Path

# This package's modules live in the repo's top-level export/ folder, which has no
# __init__.py: run from the repo root, a `export` package there would hide an installed
# distribution of that name (PyPI's `kernels`, which transformers imports). In a checkout
# (an editable install, or the repo root on sys.path) __path__ reaches that folder; a wheel
# carries the modules here, beside this file (setup.py's BuildPy).
_FOLDER = _Path(__file__).resolve().parents[2] / "export"
if (_FOLDER / "onnx.py").is_file():
    __path__.append(str(_FOLDER))

import importlib

_SUBMODULES = ("onnx", "aoti", "cli")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
