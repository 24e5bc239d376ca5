"""Size estimates behind the lossy stages' choices (low rank, rate control): order-0 information."""

from __future__ import annotations

import numpy as np


def entropy_bits(counts: np.ndarray) -> float:
    """Order-0 information content of a histogram, in bits."""
    c = counts[counts > 0].astype(np.float64)
    if len(c) == 0:
        return 0.0
    return float(-(c * np.log2(c / c.sum())).sum())
