"""sdengine: a fast, dependable Stable Diffusion inference engine."""

__version__ = "0.1.0"
