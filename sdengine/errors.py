"""Exception types of sdengine.

Each message names the parameter, path, file or key at fault. The types derive from
the built-in ones a caller would already catch (a bad checkpoint is a ValueError).
"""


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded: unknown architecture, corrupt file, missing,
    extra or mis-shaped weights. Nothing is returned half-loaded."""
