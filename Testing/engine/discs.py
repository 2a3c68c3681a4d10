"""The small synthetic volume of the command-line tests: a bright disc that widens from slice to slice."""

from __future__ import annotations

import numpy as np


def disc_volume(shape: tuple[int, int, int], centre: tuple[float, float], radius: float, labelled: list[int],
                growth: float = 0.3, inside: float = 40.0, outside: float = -800.0, noise: float = 20.0):
    """``(image float32, labels uint8, disc bool)``, each ``[K, J, I]``: a disc of radius ``radius + growth * k``
    voxels around ``centre`` (j, i) on slice k, CT-like intensities with Gaussian noise (seed 0), labels on the
    ``labelled`` slices only."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    disc = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) < (radius + zz * growth) ** 2
    image = (np.where(disc, inside, outside) + rng.normal(0, noise, shape)).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[labelled] = disc[labelled]
    return image, labels, disc
