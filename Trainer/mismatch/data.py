"""From volumes to training slices: labelled-slice detection, normalisation, the two-stream sampler.

A volume is a stack of 2D slices along one index axis of its grid: ``k`` (the file's slice direction,
the default), ``j`` or ``i``; they are numpy axes 0, 1, 2 of a ``[K, J, I]`` array (1, 2, 3 of a
``[C, K, J, I]`` image). A slice along ``k`` is ``[J, I]``, along ``j`` ``[K, I]``, along ``i`` ``[K, J]``
(``[H, W]`` in general, with the channel axis in front for images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .contract import parse_slices
from .errors import UserError

AXES = {"k": 0, "j": 1, "i": 2}



def axis_index(axis: str) -> int:
    """Numpy axis (0, 1, 2) of a ``[K, J, I]`` array for the slice axis name ``k``, ``j`` or ``i``."""
    try:
        return AXES[str(axis).strip().lower()]
    except KeyError:
        raise UserError(f"slice axis {axis!r}: use k (the file's slice direction), j or i") from None


def painted_axis(labels: np.ndarray) -> tuple[str, str]:
    """The slice axis a painted label map ``[K, J, I]`` was painted along (``mismatch train --axis auto``), and
    a line saying why.

    Painted on a few slices along an axis, the label map's slices along that axis holding paint are separate
    (gaps between them) or a single one, while along the other two axes every slice across the structure
    holds some. ``k`` (the file's slice direction) unless its painted slices are one contiguous run of
    several and ``j`` or ``i`` has fewer painted slices that are separate or single: then that axis (the
    fewest painted slices). An all-zero map, or paint that looks the same along every axis, gives ``k``."""
    runs = {}
    for name in AXES:
        found = labelled_slices(labels, name)
        separate = len(found) == 1 or (len(found) > 1 and int(found[-1] - found[0]) + 1 > len(found))
        runs[name] = (len(found), separate)
    n_k, separate_k = runs["k"]
    others = [(n, name) for name, (n, separate) in runs.items() if name != "k" and separate and n < n_k]
    if n_k == 0 or separate_k or not others:
        return "k", f"painted on {n_k} slice(s) along k"
    n, name = min(others)
    return name, (f"painted on {n} separate slice(s) along {name} (along k every one of {n_k} slices across the "
                  f"structure holds paint): slices along {name}; give --axis to choose")


def parse_slice_list(text: str) -> list[int]:
    """``"3,7,12"`` and ranges ``"10-14"`` (inclusive) -> sorted unique slice indices (0-based), as the module
    reads them (:func:`mismatch.contract.parse_slices`); anything else is a :class:`UserError`."""
    return parse_slices(text, f"slice list {text!r}", error=UserError)


def check_patch_size(patch_size: int | None, option: str = "--patch-size", zero: str = "whole slices") -> None:
    """A :class:`UserError` unless the patch side ``patch_size`` given by ``option`` is None (the preset's),
    0 (what ``zero`` says it means) or at least 16."""
    if patch_size is not None and (patch_size < 0 or 0 < patch_size < 16):
        raise UserError(f"{option} {patch_size}: use 0 ({zero}) or at least 16")


def labelled_slices(labels: np.ndarray, axis: str = "k", explicit: Sequence[int] | None = None) -> np.ndarray:
    """Sorted unique ``int64`` indices of the labelled slices of ``labels [K, J, I]`` along ``axis``.

    A slice is labelled when it has any non-zero voxel, or when its index is in ``explicit`` (so a labelled
    slice may be all background: "I looked, there is nothing here"). Explicit indices outside the volume
    are a :class:`UserError`.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be [K, J, I], got shape {labels.shape}")
    ax = axis_index(axis)
    other = tuple(a for a in range(3) if a != ax)
    found = set(np.flatnonzero(np.any(labels, axis=other)).tolist())
    n = labels.shape[ax]
    for s in explicit or ():
        s = int(s)
        if not 0 <= s < n:
            raise UserError(f"labelled slice {s} is outside the volume: along axis {axis} the slices are "
                            f"0 to {n - 1}; fix the slice list")
        found.add(s)
    return np.asarray(sorted(found), dtype=np.int64)


def choose_axis(labels: np.ndarray, axis: str, log) -> str:
    """``axis``, or for ``"auto"`` (``--axis auto``) the axis ``labels`` were painted along (:func:`painted_axis`),
    ``log`` told why when that is not ``k``."""
    if axis != "auto":
        return axis
    axis, why = painted_axis(labels)
    if axis != "k":
        log(why)
    return axis


def check_empty_slices(labels: np.ndarray, axis: str, empty: Sequence[int] | None, labels_path) -> None:
    """A :class:`UserError` naming ``labels_path`` when a slice listed as empty (``--empty-slices``) has painted
    voxels: the two say opposite things, and which one the user meant is theirs to say."""
    ax = axis_index(axis)
    n = labels.shape[ax]
    for s in sorted(set(int(s) for s in empty or ())):
        if 0 <= s < n and np.any(take_slice(labels, axis, s)):
            raise UserError(f"{labels_path}: slice {s} along axis {axis} is listed in --empty-slices but has painted "
                            "voxels; unpaint it, or take it out of --empty-slices")


def with_empty_slices(labels: np.ndarray, axis: str, explicit: Sequence[int] | None, empty: Sequence[int] | None,
                      labels_path) -> list[int]:
    """The slices that count as labelled beside the painted ones: ``explicit`` and ``empty`` (``--empty-slices``:
    checked and found without the structure), once :func:`check_empty_slices` has found none of ``empty``
    painted."""
    check_empty_slices(labels, axis, empty, labels_path)
    return list(explicit or ()) + list(empty or ())


def painted_slices(labels: np.ndarray, axis: str, explicit: Sequence[int] | None, labels_path,
                   empty: Sequence[int] | None = None) -> np.ndarray:
    """:func:`labelled_slices`, the slices of ``explicit`` and of ``empty`` counted as labelled
    (:func:`with_empty_slices`); none at all is a :class:`UserError` naming ``labels_path``, and so is a slice
    of ``empty`` with painted voxels."""
    labelled = labelled_slices(labels, axis, with_empty_slices(labels, axis, explicit, empty, labels_path))
    if len(labelled) == 0:
        raise UserError(f"{labels_path}: no labelled slice along axis {axis}; paint the structure on at least one "
                        "slice, or list labelled slices with --labelled-slices")
    return labelled


def window_note(window, why: str = "the image looks like a CT in Hounsfield units") -> str:
    """The log line that says an image is clipped to ``window`` before normalising, and ``why``."""
    return (f"{why}: clipped to {window[0]:g} to {window[1]:g} before normalising (--hu-window=LOW,HIGH for "
            "another window, --hu-window none for none)")


def label_values(labels: np.ndarray) -> np.ndarray:
    """The distinct values of a label map, sorted, as :func:`numpy.unique` gives them. Integer maps whose
    values span at most 16 (the label maps users paint) are tested a value at a time, a few passes over the
    volume instead of sorting or hashing every voxel (5x faster on a 512 x 512 x 300 map);
    :func:`numpy.unique` for anything else."""
    a = np.asarray(labels)
    if a.size and a.dtype.kind in "uib":
        lo, hi = int(a.min()), int(a.max())
        if hi - lo <= 16:
            values = [v for v in range(lo, hi + 1) if v in (lo, hi) or bool((a == v).any())]
            return np.asarray(values, dtype=a.dtype)
    return np.unique(a)


def take_slice(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
    """``[C, K, J, I] -> [C, H, W]`` or ``[K, J, I] -> [H, W]``: a view (no copy) of slice ``index``."""
    ax = axis_index(axis) + (volume.ndim - 3)
    return volume[(slice(None),) * ax + (int(index),)]


def context_slices(index: int, n: int, context: int) -> list[int]:
    """The slices a network with ``context`` neighbours on each side reads for slice ``index`` of ``n``, in
    input order: the slice, then one before and one after, two before and two after...; a neighbour beyond
    the first or last slice is that slice repeated. The one rule for training and inference alike."""
    offsets = [0] + [sign * d for d in range(1, int(context) + 1) for sign in (-1, 1)]
    return [min(max(int(index) + d, 0), n - 1) for d in offsets]


def slice_with_context(volume: np.ndarray, axis: str, index: int, context: int = 0) -> np.ndarray:
    """``[C, K, J, I] -> [C * (1 + 2 * context), H, W]``: slice ``index`` and, after its channels, those of
    its neighbours (:func:`context_slices`, the 2.5D input). ``context`` 0: :func:`take_slice` itself (a
    view)."""
    if not context:
        return take_slice(volume, axis, index)
    n = volume.shape[1 + axis_index(axis)]
    return np.concatenate([take_slice(volume, axis, j) for j in context_slices(index, n, context)])


def check_label_values(labels: np.ndarray, num_classes: int) -> None:
    """:class:`UserError` if a label value is ``>= num_classes`` (``num_classes`` includes background)."""
    top = int(labels.max()) if labels.size else 0
    if top >= num_classes:
        raise UserError(f"label value {top} is beyond the {num_classes - 1} class(es) of this model; "
                        "use values 1..N for N classes (or give the classes with --classes)")


#: The window a CT in Hounsfield units is clipped to unless the user gives another (``--hu-window``): air to
#: just above soft tissue and contrast, so that bone, metal and the scanner's padding (-1024 to -3024 outside
#: the field of view) do not set the z-score's spread. The benchmark's CT data sets are measured with it.
CT_WINDOW = (-1000.0, 400.0)


def auto_window(image: np.ndarray) -> tuple[float, float] | None:
    """:data:`CT_WINDOW` when ``image`` looks like a CT in Hounsfield units (its darkest voxel at -500 or below:
    air, or the scanner's padding), else None (MRI and other images are not clipped)."""
    return CT_WINDOW if image.size and float(np.min(image)) <= -500.0 else None


def intensity_window(hu_window) -> tuple[float, float] | None:
    """``(low, high)`` as floats, or None; a :class:`UserError` unless low < high."""
    if hu_window is None:
        return None
    lo_hi = (float(hu_window[0]), float(hu_window[1]))
    if not lo_hi[0] < lo_hi[1]:
        raise UserError(f"intensity window {hu_window}: the low end must be below the high end")
    return lo_hi


def centre_channel(ch: np.ndarray) -> tuple[float, float]:
    """Subtract its mean from the float32 array ``ch`` (one channel, slices along the first axis) in place
    and return ``(mean, std)``; ``std`` is 0 for a constant channel (a spread below 1e-6 of the mean, or not
    finite). The mean is accumulated in float64, the sum of squares slice by slice (float32 dot, summed in
    float64): no float64 copy and no big temporary. :class:`Normalisation` and
    :class:`mismatch.manifest.ManifestPool` both use it."""
    n = ch.size
    mean = float(np.add.reduce(ch.ravel(), dtype=np.float64)) / n
    ch -= np.float32(mean)
    sq = 0.0
    for k in range(ch.shape[0]):
        s = ch[k].ravel()
        sq += float(np.dot(s, s))
    std = (sq / n) ** 0.5
    return mean, (std if std > 1e-6 * max(1.0, abs(mean)) and np.isfinite(std) else 0.0)


@dataclass
class Normalisation:
    """Per-volume, per-channel z-score: subtract the channel's mean, divide by its standard deviation.

    ``hu_window``: ``(low, high)`` in the image's units (HU for CT): clip to it before the z-score. The card
    records it as ``{"method": "zscore", "hu_window": ...}``; z-score is the only method.
    """

    hu_window: tuple[float, float] | None = None

    def apply(self, image: np.ndarray, stats: list | None = None) -> np.ndarray:
        """``[C, K, J, I]`` -> a new float32 array of the same shape; a constant channel becomes zeros.
        ``stats``: a list that gets each channel's ``(mean, std)`` appended, so that a normalised value ``v``
        is ``v * std + mean`` in the image's units (within the window)."""
        lo_hi = intensity_window(self.hu_window)
        out = np.empty(image.shape, dtype=np.float32)
        for c in range(image.shape[0]):
            ch = out[c]
            np.copyto(ch, image[c], casting="unsafe")
            if lo_hi is not None:
                np.clip(ch, lo_hi[0], lo_hi[1], out=ch)
            mean, std = centre_channel(ch) if ch.size else (0.0, 0.0)
            if stats is not None:
                stats.append((mean, std))
            if std > 0:
                ch *= np.float32(1.0 / std)
            else:
                ch[...] = 0
        return out

    def to_dict(self) -> dict:
        """JSON-serialisable: ``{"method": "zscore", "hu_window": [low, high] or None}``."""
        return {"method": "zscore", "hu_window": [float(v) for v in self.hu_window] if self.hu_window else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalisation":
        """Inverse of :meth:`to_dict`; a :class:`UserError` for a method other than z-score."""
        method = d.get("method", "zscore")
        if method != "zscore":
            raise UserError(f"normalisation {method!r} is not known; use zscore")
        w = d.get("hu_window")
        return cls(hu_window=(float(w[0]), float(w[1])) if w else None)


class _Stream:
    """Shuffled passes over ``n`` items: every item once per pass, then a new random order."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng = n, rng
        self.order = rng.permutation(n).tolist() if n else []
        self.pos = 0

    def take(self, k: int) -> list[int]:
        if self.n == 0:
            raise RuntimeError("empty stream")
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.order = self.rng.permutation(self.n).tolist()
                self.pos = 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out


def _channel_min(img: np.ndarray) -> np.ndarray:
    """Per-channel minimum of ``[C, H, W]`` as ``[C, 1, 1]`` (the padding value)."""
    return img.min(axis=(-2, -1), keepdims=True)


@dataclass(frozen=True)
class Crop:
    """One slice of a batch plan: slice ``slice`` of volume ``volume`` (along the sampler's axis), cut at
    ``(y0, x0)`` to ``h x w`` (the whole slice: origin 0 and the slice's size)."""

    volume: int
    slice: int
    y0: int
    x0: int
    h: int
    w: int

    def cut(self, arr: np.ndarray) -> np.ndarray:
        """``arr [..., H, W]`` cut to this crop (a view). A slice side shorter than the patch is taken whole,
        never padded. (Padding a 21-pixel side to 128 filled the patch with a constant that the network never
        sees at inference, where its instance normalisation then met other statistics: it learned the padded
        patches and failed on the real slices.)"""
        return arr[..., self.y0:self.y0 + self.h, self.x0:self.x0 + self.w]


@dataclass(frozen=True)
class BatchPlan:
    """One step's global batch of one stream: its :class:`Crop` s in order, the same on every process."""

    crops: list
    labelled: bool

    @property
    def size(self) -> tuple[int, int]:
        """``(h, w)`` every share of the batch is padded to: the largest crop's sides."""
        return max(c.h for c in self.crops), max(c.w for c in self.crops)


class TwoStreamSampler:
    """Labelled and unlabelled slices drawn as two streams (the paper's streaming setting).

    ``volumes``: normalised float32 ``[C, K, J, I]``; volume 0 is the labelled case. ``labels``: integer
    ``[K, J, I]`` for volume 0. ``labelled``: indices (along ``axis``) of volume 0's labelled slices.
    Unlabelled items are all other slices of volume 0 and every slice of volumes 1... Each stream goes
    through shuffled passes, so every item is used once before any is repeated.

    ``patch_size``: ``P`` for ``P x P`` crops at a uniformly random position (a slice side shorter than ``P``
    is taken whole: ``min(P, H) x min(P, W)``, never padded); ``None`` or 0 for whole slices. Slices of
    volumes of different shapes are padded (centred) per batch to a common size.
    ``foreground_fraction``: probability that a labelled crop is centred (clamped to the slice) on a random
    non-zero label voxel of its slice, when it has one. All randomness comes from one
    ``numpy.random.Generator(seed)``; :meth:`state_dict` / :meth:`load_state_dict` resume exactly.
    Slices are taken as views; a batch copies only its crops.

    A batch is made in two steps: :meth:`plan_labelled` / :meth:`plan_unlabelled` draw the global batch's
    :class:`BatchPlan` (which slices, which crop origins: all the randomness, from slice shapes and labels
    only), and :meth:`materialise` reads and crops this process's share of it. ``shard``: ``(rank,
    world_size)`` for data-parallel training (:mod:`mismatch.distributed`): every rank draws the same plan
    and materialises the ``rank``-th of ``world_size`` equal parts of it, padded to the global batch's size.
    So the ranks' batches together are exactly the batch one process would draw, and the sampler's state is
    the same on every rank. Batch sizes are then global and must be multiples of ``world_size``.
    ``volumes`` may also hold lazily read volumes (:class:`mismatch.manifest.LazyVolume`) after volume 0.
    ``context``: each slice comes with its neighbours' channels (:func:`slice_with_context`), ``C * (1 + 2 *
    context)`` channels in all.
    """

    #: Cache of foreground voxel positions per labelled slice is dropped above this many bytes.
    FG_CACHE_BYTES = 256 * 2**20

    def __init__(self, volumes: Sequence[np.ndarray], labels: np.ndarray, labelled: Sequence[int],
                 axis: str = "k", patch_size: int | None = 176, seed: int = 0, foreground_fraction: float = 0.33,
                 shard: tuple[int, int] | None = None, context: int = 0):
        self.volumes = list(volumes)
        self.context = int(context)
        self.shard = (int(shard[0]), int(shard[1])) if shard and int(shard[1]) > 1 else None
        if not self.volumes:
            raise ValueError("no volume given")
        for v in self.volumes:
            if v.ndim != 4:
                raise ValueError(f"volumes must be [C, K, J, I], got shape {v.shape}")
            if v.shape[0] != self.volumes[0].shape[0]:
                raise UserError(f"the volumes have different numbers of channels ({self.volumes[0].shape[0]} "
                                f"and {v.shape[0]}); give every case the same channels")
        if labels.shape != self.volumes[0].shape[1:]:
            raise UserError(f"the label map's shape {labels.shape} differs from the image's "
                            f"{self.volumes[0].shape[1:]} ([K, J, I]); resample the labels onto the image")
        self.labels = labels
        self.axis = axis
        self.ax = axis_index(axis)
        if patch_size is not None and int(patch_size) < 0:
            raise UserError(f"patch size {patch_size}: use a positive size, or 0 for whole slices")
        self.patch = int(patch_size) if patch_size else None
        self.fg_fraction = float(foreground_fraction)
        self.rng = np.random.default_rng(seed)
        n0 = self.volumes[0].shape[1 + self.ax]
        labelled_set = {int(s) for s in labelled}
        for s in labelled_set:
            if not 0 <= s < n0:
                raise UserError(f"labelled slice {s} is outside the volume: along axis {axis} the slices are "
                                f"0 to {n0 - 1}; fix the slice list")
        self.labelled_items = [(0, s) for s in sorted(labelled_set)]
        self.unlabelled_items = [(0, s) for s in range(n0) if s not in labelled_set]
        for v in range(1, len(self.volumes)):
            self.unlabelled_items += [(v, s) for s in range(self.volumes[v].shape[1 + self.ax])]
        self._lab = _Stream(len(self.labelled_items), self.rng)
        self._unl = _Stream(len(self.unlabelled_items), self.rng)
        self._fg_cache: dict[int, np.ndarray] = {}
        self._fg_bytes = 0

    @property
    def num_labelled(self) -> int:
        """Number of labelled slices (items of the labelled stream)."""
        return len(self.labelled_items)

    @property
    def num_unlabelled(self) -> int:
        """Number of unlabelled slices over all volumes (items of the unlabelled stream)."""
        return len(self.unlabelled_items)

    # -- cropping -------------------------------------------------------------------------------------
    def _start(self, n: int, centre: int | None) -> int:
        p = self.patch
        if n <= p:
            return 0
        if centre is None:
            return int(self.rng.integers(0, n - p + 1))
        return int(np.clip(centre - p // 2, 0, n - p))

    def _foreground(self, s: int) -> np.ndarray:
        """Flat (row-major ``H*W``) indices of the non-zero label voxels of labelled slice ``s``."""
        fg = self._fg_cache.get(s)
        if fg is None:
            lab = take_slice(self.labels, self.axis, s)
            fg = np.flatnonzero(lab).astype(np.int32 if lab.size < 2**31 else np.int64)
            if self._fg_bytes + fg.nbytes <= self.FG_CACHE_BYTES:
                self._fg_cache[s] = fg
                self._fg_bytes += fg.nbytes
        return fg

    # -- the batch plan: the same on every process -------------------------------------------------------
    def plan_labelled(self, batch_size: int) -> "BatchPlan":
        """The next labelled batch of ``batch_size`` as a :class:`BatchPlan`: which slices and where to crop
        them. Draws the sampler's random numbers (decided from slice shapes and labels only, no image is read),
        so every process that draws it gets the same plan."""
        if not self.labelled_items:
            raise UserError("no labelled slice to train on; paint the structure on at least one slice "
                            "(or list the slices that are labelled)")
        crops = []
        for idx in self._lab.take(batch_size):
            v, s = self.labelled_items[idx]
            h, w = self._slice_shape(v)
            y0 = x0 = 0
            if self.patch:
                cy = cx = None
                if self.rng.random() < self.fg_fraction:
                    fg = self._foreground(s)
                    if len(fg):
                        cy, cx = divmod(int(fg[int(self.rng.integers(len(fg)))]), w)
                y0, x0 = self._start(h, cy), self._start(w, cx)
            crops.append(self._crop(v, s, h, w, y0, x0))
        return BatchPlan(crops, labelled=True)

    def plan_unlabelled(self, batch_size: int) -> "BatchPlan":
        """The next unlabelled batch of ``batch_size`` as a :class:`BatchPlan` (see :meth:`plan_labelled`)."""
        if not self.unlabelled_items:
            raise UserError("every slice is labelled, so there is nothing for the semi-supervised term; "
                            "train supervised with --method unet, or add unlabelled cases with --unlabelled")
        crops = []
        for idx in self._unl.take(batch_size):
            v, s = self.unlabelled_items[idx]
            h, w = self._slice_shape(v)
            y0, x0 = (self._start(h, None), self._start(w, None)) if self.patch else (0, 0)
            crops.append(self._crop(v, s, h, w, y0, x0))
        return BatchPlan(crops, labelled=False)

    def _slice_shape(self, v: int) -> tuple[int, int]:
        """``(H, W)`` of a slice of volume ``v`` along the slice axis, from its shape (nothing is read)."""
        kji = self.volumes[v].shape[1:]
        return tuple(int(n) for a, n in enumerate(kji) if a != self.ax)

    def _crop(self, v: int, s: int, h: int, w: int, y0: int, x0: int) -> "Crop":
        if not self.patch:
            return Crop(v, s, 0, 0, h, w)
        return Crop(v, s, y0, x0, min(self.patch, h), min(self.patch, w))

    # -- materialising a plan: this process's share -----------------------------------------------------
    def share(self, n: int) -> range:
        """Positions of a global batch of ``n`` that this process materialises: all of them for one process,
        the ``rank``-th of ``world_size`` equal parts with a ``shard``."""
        if self.shard is None:
            return range(n)
        rank, world = self.shard
        if n % world:
            raise UserError(f"a batch of {n} slices cannot be split evenly over {world} processes; "
                            f"use a batch size that is a multiple of {world}")
        k = n // world
        return range(rank * k, (rank + 1) * k)

    def materialise(self, plan: "BatchPlan") -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        """This process's share of ``plan`` (:meth:`share`), read and cropped, padded to the global batch's
        size: ``(x, y)`` for a labelled plan, ``x`` for an unlabelled one. Reads only those slices."""
        crops = [plan.crops[b] for b in self.share(len(plan.crops))]
        xs = [c.cut(slice_with_context(self.volumes[c.volume], self.axis, c.slice, self.context)) for c in crops]
        x = self._stack(xs, label=False, size=plan.size)
        if not plan.labelled:
            return x
        ys = [c.cut(take_slice(self.labels, self.axis, c.slice)) for c in crops]
        return x, self._stack(ys, label=True, size=plan.size)

    def labelled_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """``x float32 [B, C, h, w]``, ``y int64 [B, h, w]`` with ``h = min(P, H)``, ``w = min(P, W)``
        (whole-slice mode: ``H, W``): this process's share of the next labelled plan."""
        return self.materialise(self.plan_labelled(batch_size))

    def unlabelled_batch(self, batch_size: int) -> np.ndarray:
        """``x float32 [B, C, h, w]`` as :meth:`labelled_batch`."""
        return self.materialise(self.plan_unlabelled(batch_size))

    @staticmethod
    def _stack(arrays: list[np.ndarray], label: bool, size: tuple[int, int]) -> np.ndarray:
        """One batch of ``size``; slices (or crops) of different sizes, from volumes of different shapes, are
        padded (centred: images with each slice's per-channel minimum, labels with 0) to it. Slices of one
        volume are never padded here: the network pads to its multiple of 8 itself, as at inference."""
        dtype = np.int64 if label else np.float32
        h, w = size
        if all(a.shape[-2:] == (h, w) for a in arrays):
            return np.stack(arrays).astype(dtype, copy=False)
        out = np.empty((len(arrays),) + arrays[0].shape[:-2] + (h, w), dtype=dtype)
        for b, a in enumerate(arrays):
            pad_centred(a, (h, w), 0 if label else _channel_min(a), out=out[b])
        return out

    # -- resumption -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable: the generator state and both streams' orders and positions."""
        return {"rng": self.rng.bit_generator.state,
                "labelled": {"n": self._lab.n, "order": list(self._lab.order), "pos": self._lab.pos},
                "unlabelled": {"n": self._unl.n, "order": list(self._unl.order), "pos": self._unl.pos}}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where :meth:`state_dict` was taken (same volumes, labels and settings)."""
        for name, stream in (("labelled", self._lab), ("unlabelled", self._unl)):
            saved = state[name]
            n = int(saved.get("n", len(saved["order"])))
            if n != stream.n:
                raise UserError(f"the checkpoint was made with {n} {name} slices but the data now has "
                                f"{stream.n}; resume with the same images, labels and slice settings")
        self.rng.bit_generator.state = state["rng"]
        for name, stream in (("labelled", self._lab), ("unlabelled", self._unl)):
            stream.order = [int(i) for i in state[name]["order"]]
            stream.pos = int(state[name]["pos"])


def pad_centred(a: np.ndarray, size: tuple[int, int], fill, out: np.ndarray | None = None) -> np.ndarray:
    """``a [..., h, w]`` centred in ``[..., H, W]`` (``size``), the rest set to ``fill`` (a number, or an array
    that broadcasts, e.g. per-channel minima ``[..., 1, 1]``); ``a`` itself when it has that size already.
    ``out``: write into it instead of a new array."""
    h, w = size
    ah, aw = a.shape[-2:]
    if out is None:
        if (ah, aw) == (h, w):
            return a
        out = np.empty(a.shape[:-2] + (h, w), dtype=a.dtype)
    out[...] = fill
    oy, ox = (h - ah) // 2, (w - aw) // 2
    out[..., oy:oy + ah, ox:ox + aw] = a
    return out


def common_size(xl: np.ndarray, yl: np.ndarray, xu: np.ndarray | None):
    """Whole-slice batches (``[B, C, H, W]``, labels ``[B, H, W]``) padded, centred, to one common ``H, W``:
    labelled and unlabelled slices of different sizes (other volumes) go through the network together.
    Images are padded with each slice's per-channel minimum, labels with 0. Same-size batches are returned
    as they are."""
    if xu is None or xl.shape[-2:] == xu.shape[-2:]:
        return xl, yl, xu
    size = max(xl.shape[-2], xu.shape[-2]), max(xl.shape[-1], xu.shape[-1])
    return (pad_centred(xl, size, xl.min(axis=(-2, -1), keepdims=True)), pad_centred(yl, size, 0),
            pad_centred(xu, size, xu.min(axis=(-2, -1), keepdims=True)))


# -- demo data -----------------------------------------------------------------------------------------
_STRUCTURES = {"lungs": ("right lung", "left lung")}


def _segment_mask(seg: dict, segment: dict) -> np.ndarray:
    """Boolean ``[I, J, K]`` mask of one segment of a ``slicerio.read_segmentation`` result.

    slicerio gives ``voxels`` as ``[I, J, K]`` (one layer) or ``[layers, I, J, K]`` (overlapping segments).
    """
    voxels = np.asarray(seg["voxels"])
    value = int(segment["labelValue"])
    if voxels.ndim == 4:
        return voxels[int(segment.get("layer", 0) or 0)] == value
    if voxels.ndim == 3:
        return voxels == value
    raise UserError(f"unexpected segmentation array shape {voxels.shape}; expected 3D or 4D (layered)")


def place_on_grid(mask_ijk: np.ndarray, ijk_to_lps: np.ndarray, geometry) -> np.ndarray:
    """Put a boolean ``[I, J, K]`` mask whose voxel grid is ``ijk_to_lps`` (4x4) onto ``geometry``.

    The mask's grid must be the image's grid shifted by whole voxels (a .seg.nrrd cropped to the segments'
    extent, or extended beyond the image): same axes and spacing. Returns ``uint8 [K, J, I]`` on the image
    grid (voxels outside the image are dropped). A grid that is rotated, rescaled or shifted by a fraction
    of a voxel is a :class:`UserError` (it would need resampling).
    """
    img = np.eye(4)
    img[:3, :3] = np.asarray(geometry.direction, float).reshape(3, 3) * np.asarray(geometry.spacing, float)
    img[:3, 3] = geometry.origin
    seg_to_img = np.linalg.inv(img) @ np.asarray(ijk_to_lps, dtype=float)
    offset_f = seg_to_img[:3, 3]
    offset = np.round(offset_f).astype(int)
    if not (np.allclose(seg_to_img[:3, :3], np.eye(3), atol=1e-3) and np.allclose(offset_f, offset, atol=1e-2)):
        raise UserError("the segmentation is not on the image's voxel grid (rotated, rescaled or shifted by "
                        "part of a voxel); export it as a label map with the image as reference")
    size = np.asarray(geometry.size)
    labels = np.zeros(geometry.shape, dtype=np.uint8)   # [K, J, I]
    lo = np.maximum(offset, 0)
    hi = np.minimum(offset + np.asarray(mask_ijk.shape), size)
    if np.any(hi <= lo):
        return labels
    src = mask_ijk[lo[0] - offset[0]:hi[0] - offset[0], lo[1] - offset[1]:hi[1] - offset[1],
                   lo[2] - offset[2]:hi[2] - offset[2]]
    labels[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = np.transpose(src, (2, 1, 0))
    return labels


def ctchest_segments():
    """The real chest CT ``CTChest4`` and every segment of its segmentation, from the ``slicerio`` package.

    Returns ``(image float32 [1, K, J, I] in HU, {segment name: bool [K, J, I]}, Geometry)``; the grid is
    128x128x34 voxels, 3.05 x 3.05 x 10 mm. The segments of ``Segmentation.seg.nrrd`` are placed on the CT's
    grid from the segmentation's own ijkToLPS (a .seg.nrrd may be cropped to the segments' extent, and may
    be layered 4D when segments overlap). The demo, the tests and the benchmark's ``ctchest-*`` data sets
    all read CTChest4 here.
    """
    try:
        import slicerio
    except ImportError:
        raise UserError("the demo data ships in the slicerio package: pip install slicerio") from None
    from pathlib import Path

    from .io import read_image

    folder = Path(slicerio.__file__).parent / "data"
    ct_path, seg_path = folder / "CTChest4.nrrd", folder / "Segmentation.seg.nrrd"
    if not ct_path.exists() or not seg_path.exists():
        raise UserError(f"the installed slicerio has no CTChest4 sample data in {folder}; "
                        "reinstall it: pip install --force-reinstall slicerio")
    image, geometry = read_image([ct_path])
    seg = slicerio.read_segmentation(str(seg_path))
    masks = {s["name"]: place_on_grid(_segment_mask(seg, s), seg["ijkToLPS"], geometry).astype(bool)
             for s in seg["segments"]}
    return image, masks, geometry


def load_ctchest(structure: str = "lungs"):
    """CTChest4 (:func:`ctchest_segments`) and a binary label of ``structure``.

    Returns ``(image float32 [1, K, J, I] in HU, labels uint8 [K, J, I] (0/1), Geometry)``. ``structure``:
    ``"lungs"`` (right lung + left lung) or the name of one segment of the file (case-insensitive, e.g.
    ``"ribs"``).
    """
    image, masks, geometry = ctchest_segments()
    names = {name.strip().lower(): name for name in masks}
    wanted = _STRUCTURES.get(structure.strip().lower(), (structure.strip().lower(),))
    missing = [w for w in wanted if w not in names]
    if missing:
        raise UserError(f"structure {structure!r} not found in the CTChest4 segmentation; choose one of "
                        f"{', '.join(['lungs'] + list(masks))}")
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    for w in wanted:
        labels[masks[names[w]]] = 1
    return image, labels, geometry
