"""Exports of sdengine's networks for other runtimes (installed as `sdengine.export`).

    sdengine.export.onnx(model, out_dir, dtype="fp16")   # ONNX graphs + manifest (export/onnx.py)
    sdengine.export.aoti ...                              # AOTInductor packages (export/aoti.py)

Submodules are imported on first use, so `import sdengine.export` needs neither onnx
nor onnxruntime. `sdengine.export.onnx` is the module export/onnx.py, and calling it
calls its `export_onnx`.
"""

import importlib

_SUBMODULES = ("onnx", "aoti", "cli")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
