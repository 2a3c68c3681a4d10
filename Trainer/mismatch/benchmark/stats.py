"""Summary statistics for the benchmark tables.

``mann_whitney_p`` is the two-sided Mann-Whitney U test the paper uses against MisMatch. It calls
:func:`mismatch.metrics.mann_whitney_u` (scipy's exact or asymptotic test), so the engine and the tables
agree.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["mann_whitney_p", "mean_std"]


def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Mann-Whitney U p-value of samples ``a`` and ``b`` (NaN values dropped).

    Returns NaN when either sample is empty. Note the floor this puts on small samples: with 3 against 3
    values the exact two-sided p is at least 0.1, with 5 against 5 at least 0.0079.
    """
    a = np.asarray([x for x in a if x is not None], dtype=float)
    b = np.asarray([x for x in b if x is not None], dtype=float)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if len(a) == 0 or len(b) == 0:
        return math.nan
    if np.ptp(np.concatenate([a, b])) == 0:
        return 1.0  # all values equal: no evidence of a difference (scipy would return NaN or 1)
    from ..metrics import mann_whitney_u   # here, not at the top: the engine's metrics import torch

    return float(mann_whitney_u(a, b)[1])


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, sample standard deviation (ddof = 1; 0 for one value), n)`` of the non-NaN values.

    Returns ``(nan, nan, 0)`` for no values.
    """
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, int(len(v))
