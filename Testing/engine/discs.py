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


def two_painted_squares() -> tuple[np.ndarray, np.ndarray]:
    """The smallest training case of the engine tests: a noise volume ``[1, 6, 24, 24]`` (float32, seed 0) and
    class indices ``[6, 24, 24]`` with a square painted on slices 1 and 4 (train with ``labelled=[1, 4]``)."""
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(1, 6, 24, 24)).astype(np.float32)
    labels = np.zeros((6, 24, 24), dtype=np.int64)
    labels[1, 6:18, 6:18] = 1
    labels[4, 8:16, 8:16] = 1
    return vol, labels
