"""Competing region growing from the painted slices: what Slicer's *Grow from seeds* does, in the engine.

Every painted voxel is a seed of its class (painted background included). Each other voxel takes the
class of the seed it is closest to along a path through the image, where a step between two neighbouring
voxels (26-neighbourhood) costs the intensity difference between them: the shortest-path form of GrowCut
that Slicer's Grow from seeds (FastGrowCut) computes. Structures with a clear edge (air-filled lungs, contrast
-filled vessels, grey against white matter) are traced along that edge between and beyond the painted
slices; a structure whose edge is faint leaks. :func:`grown_box` says, for every voxel, how much closer the
winning class's painted voxels are than any other's: a leak through a faint edge wins by little.

It runs on the painted voxels' bounding box grown by 20 % per axis (at least 3 voxels), as the Slicer effect
does, and along the slice axis at least ``beyond`` slices past the outermost painted ones; outside that box
nothing grows. A box of more than ``max_voxels`` (the graph takes about 330 bytes a voxel of the box while
it grows) is grown on a grid subsampled in-plane and the margins interpolated back. Arrays are
``[K, J, I]``; ``axis`` is the numpy axis of the slices.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy import sparse as sp
from scipy.sparse import csgraph

__all__ = ["grown_box", "painted_box", "GROWTH", "MAX_VOXELS"]

GROWTH = 0.2          # the effect's margin around the seeds, a fraction of their extent per axis
MIN_MARGIN = 3
MAX_VOXELS = 1_000_000
EPS = 1e-4            # every step costs a little, so that equal intensities favour the nearer seed


def _box(mask: np.ndarray, axis: int, labelled: np.ndarray, beyond: int) -> tuple[slice, ...]:
    """The painted structure's bounding box in-plane and the painted slices' range along ``axis``, grown by
    ``GROWTH`` of their extent (at least ``MIN_MARGIN`` voxels), and by at least ``beyond`` slices beyond
    the outermost painted slices."""
    nz = np.nonzero(mask)
    box = []
    for ax in range(3):
        if ax == axis:
            lo, hi = int(labelled.min()), int(labelled.max())
        else:
            lo, hi = int(nz[ax].min()), int(nz[ax].max())
        m = int(max(MIN_MARGIN, GROWTH * (hi - lo), beyond if ax == axis else 0))
        box.append(slice(max(0, lo - m), min(mask.shape[ax], hi + m + 1)))
    return tuple(box)


def painted_box(sparse: np.ndarray, labelled: Sequence[int], axis: int = 0, beyond: int = 0
                ) -> tuple[slice, ...] | None:
    """The box where growing runs (:func:`grown_box`): the painted structure's bounding box grown by
    ``GROWTH``, along ``axis`` the painted range grown by as much and by at least ``beyond`` slices; None
    where no structure voxel is painted."""
    sparse = np.asarray(sparse)
    lab = np.unique(np.asarray(labelled, dtype=np.int64))
    index = [slice(None)] * 3
    index[axis] = lab
    fg = np.zeros(sparse.shape, dtype=bool)
    fg[tuple(index)] = np.asarray(sparse)[tuple(index)] > 0
    return _box(fg, axis, lab, beyond) if fg.any() else None


# the 13 offsets of the 26-neighbourhood that come after the centre (the other 13 are their reverses)
_HALF_OFFSETS = [o for o in ((a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1))
                 if o > (0, 0, 0)]


def _graph(image: np.ndarray, eps: float) -> sp.csr_matrix:
    """The 26-neighbour grid graph of ``image`` with edge cost ``|difference| + eps``, each edge once (from
    a voxel to its neighbours later in C order), built as CSR directly: 12 bytes an edge, 13 edges a voxel
    (the shortest-path search adds the transpose)."""
    shape = image.shape
    n = image.size
    flat = image.ravel()
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    offsets = sorted(_HALF_OFFSETS, key=lambda o: int(np.dot(o, strides)))
    coords = np.indices(shape, dtype=np.int32).reshape(3, -1)
    counts = np.zeros(n, dtype=np.int32)
    valid = []
    for off in offsets:
        ok = np.ones(n, dtype=bool)
        for d, o in enumerate(off):
            if o > 0:
                ok &= coords[d] < shape[d] - o
            elif o < 0:
                ok &= coords[d] >= -o
        valid.append(ok)
        counts += ok
    del coords
    indptr = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    indices = np.empty(nnz, dtype=np.int32)
    data = np.empty(nnz, dtype=np.float64)
    fill = indptr[:-1].copy()
    ids = np.arange(n, dtype=np.int32)
    for off, ok in zip(offsets, valid):    # ascending neighbour ids: each row's indices come out sorted
        src = ids[ok]
        dst = src + np.int32(np.dot(off, strides))
        at = fill[ok]
        indices[at] = dst
        data[at] = np.abs(flat[src] - flat[dst]) + eps
        fill[ok] += 1
    return sp.csr_matrix((data, indices, indptr), shape=(n, n))


def _distances(image: np.ndarray, seeds: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``float32 [len(values), *image.shape]``: each voxel's path cost to the nearest seed of each value
    (inf where none reaches); the image is scaled by its 5-95 percentile spread first."""
    spread = float(np.subtract(*np.percentile(image, [95, 5]))) or 1.0
    graph = _graph(image.astype(np.float32) / spread, EPS)
    flat = seeds.ravel()
    out = np.full((len(values), flat.size), np.inf, dtype=np.float32)
    for i, v in enumerate(values):
        ids = np.flatnonzero(flat == v)
        if ids.size:
            out[i] = csgraph.dijkstra(graph, directed=False, indices=ids, min_only=True)
    return out.reshape((len(values),) + seeds.shape)


def _margins(image: np.ndarray, seeds: np.ndarray, n_fg: int, background: int) -> np.ndarray:
    """``float32 [n_fg, ...]``: for each class, how much closer (path cost) its nearest seed is than the
    nearest seed of any other value, background included: > 0 where the class grows there."""
    values = list(range(1, n_fg + 1)) + [background]
    d = _distances(image, seeds, values)
    out = np.empty((n_fg,) + seeds.shape, dtype=np.float32)
    for c in range(n_fg):
        others = np.min(np.delete(d, c, axis=0), axis=0)
        with np.errstate(invalid="ignore"):
            m = others - d[c]
        out[c] = np.nan_to_num(m, nan=0.0, posinf=1e3, neginf=-1e3)
    return out


def grown_box(image: np.ndarray, sparse: np.ndarray, labelled: Sequence[int], axis: int = 0,
              num_classes: int | None = None, max_voxels: int = MAX_VOXELS, beyond: int = 0
              ) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """The margins of growing the painted slices ``labelled`` of ``sparse`` through ``image`` (float
    ``[K, J, I]``), in the box where growing runs: ``(box, float32 [N, *box shape])`` (N foreground classes),
    or None where nothing is painted (no class or no painted structure voxel). A margin is how much closer,
    in path cost through the image (scaled by its 5-95 percentile spread in the box), a voxel is to the
    painted voxels of its class than to those of every other class and painted background: growing labels a
    voxel with the class whose margin is positive, and the size of the margin says how clear the edges are
    that separate it from the others (a leak through a faint edge has a small one). ``beyond``: grow at
    least this many slices beyond the outermost painted ones."""
    image = np.asarray(image, dtype=np.float32)
    sparse = np.asarray(sparse)
    if image.shape != sparse.shape:
        raise ValueError(f"image {image.shape} and labels {sparse.shape} differ")
    lab = np.unique(np.asarray(labelled, dtype=np.int64))
    n_fg = int(num_classes - 1) if num_classes else int(np.max(np.take(sparse, lab, axis=axis), initial=0))
    on_slice = np.zeros(sparse.shape[axis], dtype=bool)
    on_slice[lab] = True
    shape = [1, 1, 1]
    shape[axis] = -1
    on_slice = np.broadcast_to(on_slice.reshape(shape), sparse.shape)
    box = painted_box(sparse, lab, axis, beyond) if n_fg > 0 else None
    if box is None:
        return None
    background = n_fg + 1
    seeds = np.where(on_slice, np.where(sparse > 0, sparse, background), 0).astype(np.int16)
    img, sd = image[box], seeds[box]
    f = 1       # too big a box: grown on a grid subsampled in-plane
    while img.size / (f * f) > max_voxels:
        f += 1
    if f == 1:
        return box, _margins(img, sd, n_fg, background)
    step = [f, f, f]
    step[axis] = 1
    sub = tuple(slice(None, None, s) for s in step)
    coarse = _margins(img[sub], sd[sub], n_fg, background)
    # back to the full grid, linear in-plane (the margins are smooth; their zero crossing, the grown
    # boundary, then falls between the coarse voxels instead of on a block's edge)
    margins = np.empty((n_fg,) + img.shape, dtype=np.float32)
    h, w = [n for ax, n in enumerate(img.shape) if ax != axis]
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32) / f, np.arange(w, dtype=np.float32) / f, indexing="ij")
    for c in range(n_fg):
        for k in range(img.shape[axis]):     # a slice at a time
            index = [slice(None)] * 3
            index[axis] = k
            margins[(c,) + tuple(index)] = ndimage.map_coordinates(
                np.take(coarse[c], k, axis=axis), [yy, xx], order=1, mode="nearest")
    return box, margins
