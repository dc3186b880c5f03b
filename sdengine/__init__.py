"""sdengine: a fast, dependable Stable Diffusion inference engine.

    import sdengine
    result = sdengine.generate("a handwritten digit seven", seed=1)
    result.images[0].save("seven.png")

    pipe = sdengine.load("path/to/model.safetensors")   # or a diffusers folder
    result = pipe("a photo of a cat", sampler="DPM++ 2M Karras", steps=25, seed=7)
"""

__version__ = "0.1.0"

from .acceleration import DeepCache, TGate, ToMe  # noqa: E402
from .api import from_diffusers, generate, load  # noqa: E402
from .config import PRESETS, ModelConfig  # noqa: E402
from .controlnet import Control, ControlNet, load_controlnet  # noqa: E402
from .errors import InvalidArgumentError, OutOfMemoryError  # noqa: E402
from .hires import Hires  # noqa: E402
from .pipeline import GenerationCancelled, GenerationResult, Pipeline  # noqa: E402
from .request import Request  # noqa: E402

__all__ = ["load", "generate", "from_diffusers", "Pipeline", "GenerationResult", "GenerationCancelled",
           "ModelConfig", "PRESETS", "Request", "InvalidArgumentError", "OutOfMemoryError",
           "Control", "ControlNet", "load_controlnet", "DeepCache", "TGate", "ToMe", "Hires"]


def __getattr__(name):
    """`sdengine._C`, the native runtime (libsdengine), is imported on first use only: it
    links libtorch's C++ side, which a pure-Python run should not have to load."""
    if name == "_C":
        import importlib

        return importlib.import_module("sdengine._C")
    raise AttributeError(f"module 'sdengine' has no attribute {name!r}")
