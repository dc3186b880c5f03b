"""sdengine: a fast, dependable Stable Diffusion inference engine.

    import sdengine
    result = sdengine.generate("a handwritten digit seven", seed=1)
    result.images[0].save("seven.png")

    pipe = sdengine.load("path/to/model.safetensors")   # or a diffusers folder
    result = pipe("a photo of a cat", sampler="DPM++ 2M Karras", steps=25, seed=7)
"""

__version__ = "0.1.0"

from .api import from_diffusers, generate, load  # noqa: E402
from .config import PRESETS, ModelConfig  # noqa: E402
from .pipeline import GenerationCancelled, GenerationResult, Pipeline  # noqa: E402

__all__ = ["load", "generate", "from_diffusers", "Pipeline", "GenerationResult", "GenerationCancelled",
           "ModelConfig", "PRESETS"]

try:  # the native runtime (libsdengine); absent in a source tree that was not built
    from . import _C  # noqa: E402,F401
except ImportError:  # pragma: no cover
    _C = None
