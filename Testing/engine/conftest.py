"""Shared fixtures of the engine tests.

- ``ct_chest``: the real chest CT ``CTChest4`` from the ``slicerio`` package with its lung label
  (session scope; read once).
- ``oblique_geometry``: a small grid with a real rotation, anisotropic spacing and a non-zero origin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mismatch.io import Geometry


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """3x3 rotation matrix (radians about x, then y, then z)."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def oblique_geometry() -> Geometry:
    """7x6x5 voxels (I, J, K), spacing 0.7 x 0.9 x 2.5 mm, oblique, origin away from zero."""
    direction = rotation(0.3, -0.2, 0.5)
    return Geometry(size=(7, 6, 5), spacing=(0.7, 0.9, 2.5), origin=(-120.3, 33.7, 410.1),
                    direction=tuple(float(v) for v in direction.ravel()))


@pytest.fixture(scope="session")
def ct_chest():
    """``(image float32 [1, K, J, I] in HU, lungs uint8 [K, J, I], Geometry)`` of CTChest4 (128x128x34).

    Checked on the way: the lung label lies on the dark (air-filled) part of the CT.
    """
    pytest.importorskip("slicerio")
    from mismatch.data import load_ctchest

    image, labels, geometry = load_ctchest("lungs")
    assert image.shape == (1,) + labels.shape and labels.shape == geometry.shape
    lung_hu = image[0][labels > 0]
    assert lung_hu.size > 1000 and float(np.median(lung_hu)) < -600, "lung label is not on the lungs"
    return image, labels, geometry


@pytest.fixture
def one_torch_thread():
    """One torch thread in this process, like each torchrun rank: on a busy shared 2-core machine, two
    OpenMP threads per process wait for each other far longer than the tiny networks compute."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
