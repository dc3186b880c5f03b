"""The one way the tests measure how far two results are apart."""

import numpy as np


def max_diff(a, b) -> float:
    """The largest absolute difference between a and b (arrays, CPU tensors or nested lists),
    computed in float64 so that the measure itself adds no rounding."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
