"""What a Slicer user can do with the Segment Editor's *Threshold* and *Islands* effects: a baseline.

A user who segments a structure set apart by its intensity (white matter on a T1 MRI, bone or air on a CT)
thresholds the volume and keeps the islands they clicked on. :func:`threshold_islands` does that with the
most favourable range a user could set without seeing the answer: per class, the intensity range
``[low, high]`` whose mask reproduces the painted slices best (the highest IoU with the class's painted
voxels over the painted slices, each bound at one of :data:`~mismatch.prior.RANGE_BINS` intensity levels or open;
:func:`mismatch.prior.best_range`), applied to the
whole volume; the painted slices stay as painted; then only the 3D parts connected to the class's painted
voxels are kept (:func:`mismatch.prior.keep_connected`, with the product's rule for a class painted in many
pieces), each class on its own, as a user thresholds one segment at a time. Where several classes' masks
overlap, the class with the lowest label value keeps the voxel.

Arrays are ``[K, J, I]``; ``axis`` is the numpy axis of the slices; label maps are integer, 0 = background.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["threshold_islands"]


def threshold_islands(image: np.ndarray, labels: np.ndarray, labelled_slices: Sequence[int], axis: int = 0,
                      many_parts: float | None = None, joined_parts: float | None = None) -> np.ndarray:
    """The label map a user gets from *Threshold* and *Islands* (module docstring): ``image`` ``[K, J, I]`` (one
    channel), ``labels`` the painted label map (only ``labelled_slices`` are read). ``many_parts`` and
    ``joined_parts``: :func:`~mismatch.prior.keep_connected`'s rule for a class in many pieces (default: the
    product's, :class:`~mismatch.prior.PriorSettings`)."""
    from ..prior import PriorSettings, _check, intensity_ranges, keep_connected

    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
    lab = _check(labels, labelled_slices, axis)
    defaults = PriorSettings()
    many_parts = defaults.many_parts if many_parts is None else many_parts
    joined_parts = defaults.joined_parts if joined_parts is None else joined_parts
    painted = np.take(labels, lab, axis=axis)
    index = [slice(None)] * 3
    index[axis] = lab
    out = np.zeros(labels.shape, dtype=labels.dtype)
    ranges = intensity_ranges(image, labels, lab, axis, int(painted.max()))
    for c in [int(v) for v in np.unique(painted) if v != 0]:   # one segment at a time, as a user thresholds
        low, high, _ = ranges[c - 1]
        mask = ((image >= low) & (image < high)).astype(np.uint8)
        mask[tuple(index)] = painted == c
        mask = keep_connected(mask, (labels == c).astype(np.uint8), lab, axis, many_parts, joined_parts)
        out[(out == 0) & (mask > 0)] = c
    out[tuple(index)] = painted
    return out
