"""From volumes to training slices: labelled-slice detection, normalisation, the two-stream sampler.

A volume is a stack of 2D slices along one index axis of its grid: ``k`` (the file's slice direction,
the default), ``j`` or ``i``; they are numpy axes 0, 1, 2 of a ``[K, J, I]`` array (1, 2, 3 with the
channel axis in front).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import UserError

AXES = {"k": 0, "j": 1, "i": 2}


def axis_index(axis: str) -> int:
    try:
        return AXES[axis]
    except KeyError:
        raise UserError(f"slice axis {axis!r}: use k (the file's slice direction), j or i") from None


def parse_slice_list(text: str) -> list[int]:
    """``"3,7,12"`` and ranges ``"10-14"`` -> sorted unique slice indices."""
    out: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UserError(f"slice list {text!r}: use numbers and ranges like 3,7,10-12")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UserError(f"slice list {text!r}: range {part} runs backwards")
        out.update(range(lo, hi + 1))
    return sorted(out)


def labelled_slices(labels: np.ndarray, axis: str = "k", explicit: Sequence[int] | None = None) -> np.ndarray:
    """Indices of labelled slices: those with any non-zero voxel, and those listed in ``explicit``
    (so a labelled slice may be all background)."""
    ax = axis_index(axis)
    other = tuple(a for a in range(3) if a != ax)
    found = set(np.flatnonzero(np.any(labels != 0, axis=other)).tolist())
    n = labels.shape[ax]
    for s in explicit or ():
        if not 0 <= int(s) < n:
            raise UserError(f"labelled slice {s} is outside the volume: axis {axis} has slices 0 to {n - 1}")
        found.add(int(s))
    return np.asarray(sorted(found), dtype=np.int64)


def take_slice(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
    """``[C, K, J, I] -> [C, H, W]`` or ``[K, J, I] -> [H, W]`` (a view, no copy)."""
    ax = axis_index(axis) + (volume.ndim - 3)
    return volume[(slice(None),) * ax + (index,)]


def check_label_values(labels: np.ndarray, num_classes: int) -> None:
    """``num_classes`` includes background; a value >= it is a :class:`UserError`."""
    top = int(labels.max()) if labels.size else 0
    if top >= num_classes:
        raise UserError(f"label value {top} is beyond the {num_classes - 1} class(es) of this model; "
                        "use values 1..N for N classes")


@dataclass
class Normalisation:
    """Per-volume, per-channel z-score; for CT optionally a HU window (clip) first."""

    method: str = "zscore"
    hu_window: tuple[float, float] | None = None

    def apply(self, image: np.ndarray) -> np.ndarray:
        """``[C, K, J, I]`` -> a new float32 array; a constant channel becomes zeros."""
        out = np.empty(image.shape, dtype=np.float32)
        for c in range(image.shape[0]):
            ch = image[c].astype(np.float32, copy=True)
            if self.hu_window is not None:
                np.clip(ch, self.hu_window[0], self.hu_window[1], out=ch)
            mean = float(ch.mean(dtype=np.float64))
            std = float(ch.std(dtype=np.float64))
            ch -= mean
            if std > 1e-6:
                ch /= std
            else:
                ch[...] = 0
            out[c] = ch
        return out

    def to_dict(self) -> dict:
        return {"method": self.method, "hu_window": list(self.hu_window) if self.hu_window else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalisation":
        w = d.get("hu_window")
        return cls(method=d.get("method", "zscore"), hu_window=tuple(w) if w else None)


class _Stream:
    """Shuffled passes over items: every item once per pass, then a new order."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng = n, rng
        self.order = rng.permutation(n).tolist() if n else []
        self.pos = 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.order = self.rng.permutation(self.n).tolist()
                self.pos = 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out


class TwoStreamSampler:
    """Labelled and unlabelled slices drawn as two streams (the paper's "streaming" setting).

    ``volumes``: normalised float32 ``[C, K, J, I]``, volume 0 the labelled case; ``labels [K, J, I]`` for
    volume 0; ``labelled``: its labelled slice indices. Unlabelled items are every other slice of volume 0
    and every slice of volumes 1..; each stream goes through shuffled passes, so every unlabelled slice is
    used once before any is repeated, and the few labelled slices are seen at every step.
    ``patch_size``: square random crops of that side (smaller slices are padded, centred); None or 0 for
    whole slices (padded to a common multiple of 8 per batch). Labelled crops are centred on a random
    foreground voxel with probability ``foreground_fraction``.
    """

    def __init__(self, volumes: Sequence[np.ndarray], labels: np.ndarray, labelled: Sequence[int],
                 axis: str = "k", patch_size: int | None = 176, seed: int = 0, foreground_fraction: float = 0.33):
        self.volumes = list(volumes)
        self.labels = labels
        self.axis = axis
        self.ax = axis_index(axis)
        self.patch = int(patch_size) if patch_size else None
        self.fg_fraction = foreground_fraction
        self.rng = np.random.default_rng(seed)
        labelled_set = set(int(s) for s in labelled)
        self.labelled_items = [(0, s) for s in sorted(labelled_set)]
        self.unlabelled_items = [(0, s) for s in range(volumes[0].shape[1 + self.ax]) if s not in labelled_set]
        for v in range(1, len(self.volumes)):
            self.unlabelled_items += [(v, s) for s in range(self.volumes[v].shape[1 + self.ax])]
        self._lab = _Stream(len(self.labelled_items), self.rng)
        self._unl = _Stream(len(self.unlabelled_items), self.rng)
        self._fg_cache: dict[int, np.ndarray] = {}

    @property
    def num_labelled(self) -> int:
        return len(self.labelled_items)

    @property
    def num_unlabelled(self) -> int:
        return len(self.unlabelled_items)

    def _image_slice(self, v: int, s: int) -> np.ndarray:
        return take_slice(self.volumes[v], self.axis, s)

    def _crop_box(self, h: int, w: int, centre: tuple[int, int] | None) -> tuple[int, int]:
        p = self.patch
        def start(n, c):
            if n <= p:
                return 0
            if c is None:
                return int(self.rng.integers(0, n - p + 1))
            return int(np.clip(c - p // 2, 0, n - p))
        return start(h, None if centre is None else centre[0]), start(w, None if centre is None else centre[1])

    def _cut(self, arr: np.ndarray, y0: int, x0: int, fill: float) -> np.ndarray:
        """Crop ``[..., H, W]`` to P x P at (y0, x0), padding (centred) where the slice is smaller."""
        p = self.patch
        h, w = arr.shape[-2:]
        crop = arr[..., y0:y0 + p, x0:x0 + p]
        ch, cw = crop.shape[-2:]
        if ch == p and cw == p:
            return crop
        out = np.full(arr.shape[:-2] + (p, p), fill, dtype=arr.dtype)
        oy, ox = (p - ch) // 2, (p - cw) // 2
        out[..., oy:oy + ch, ox:ox + cw] = crop
        return out

    def _foreground_pixels(self, s: int) -> np.ndarray:
        if s not in self._fg_cache:
            self._fg_cache[s] = np.argwhere(take_slice(self.labels, self.axis, s) != 0)
        return self._fg_cache[s]

    def labelled_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """``x float32 [B, C, P, P]``, ``y int64 [B, P, P]``."""
        if not self.labelled_items:
            raise UserError("no labelled slice to train on; paint the structure on at least one slice")
        xs, ys = [], []
        for idx in self._lab.take(batch_size):
            v, s = self.labelled_items[idx]
            img = self._image_slice(v, s)
            lab = take_slice(self.labels, self.axis, s)
            if self.patch:
                centre = None
                fg = self._foreground_pixels(s)
                if len(fg) and self.rng.random() < self.fg_fraction:
                    centre = tuple(fg[int(self.rng.integers(len(fg)))])
                y0, x0 = self._crop_box(img.shape[-2], img.shape[-1], centre)
                img = self._cut(img, y0, x0, float(img.min()))
                lab = self._cut(lab, y0, x0, 0)
            xs.append(img)
            ys.append(lab)
        return self._stack(xs), self._stack(ys, label=True).astype(np.int64)

    def unlabelled_batch(self, batch_size: int) -> np.ndarray:
        """``x float32 [B, C, P, P]``."""
        if not self.unlabelled_items:
            raise UserError("every slice is labelled, so there is nothing for the semi-supervised term; "
                            "train with --method unet (supervised), or add unlabelled volumes with --unlabelled")
        xs = []
        for idx in self._unl.take(batch_size):
            v, s = self.unlabelled_items[idx]
            img = self._image_slice(v, s)
            if self.patch:
                y0, x0 = self._crop_box(img.shape[-2], img.shape[-1], None)
                img = self._cut(img, y0, x0, float(img.min()))
            xs.append(img)
        return self._stack(xs)

    def _stack(self, arrays: list[np.ndarray], label: bool = False) -> np.ndarray:
        if self.patch:
            return np.stack(arrays).astype(np.float32 if not label else arrays[0].dtype, copy=False)
        h = max(a.shape[-2] for a in arrays)
        w = max(a.shape[-1] for a in arrays)
        h, w = h + (-h) % 8, w + (-w) % 8
        out = []
        for a in arrays:
            pad = [(0, 0)] * (a.ndim - 2) + [((h - a.shape[-2]) // 2, h - a.shape[-2] - (h - a.shape[-2]) // 2),
                                             ((w - a.shape[-1]) // 2, w - a.shape[-1] - (w - a.shape[-1]) // 2)]
            out.append(np.pad(a, pad, constant_values=0 if label else float(a.min())))
        return np.stack(out).astype(np.float32 if not label else out[0].dtype, copy=False)

    def state_dict(self) -> dict:
        """JSON-serialisable: the random generator and both streams' positions, for exact resumption."""
        return {"rng": self.rng.bit_generator.state,
                "labelled": {"order": self._lab.order, "pos": self._lab.pos},
                "unlabelled": {"order": self._unl.order, "pos": self._unl.pos}}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._lab.order, self._lab.pos = list(state["labelled"]["order"]), int(state["labelled"]["pos"])
        self._unl.order, self._unl.pos = list(state["unlabelled"]["order"]), int(state["unlabelled"]["pos"])


def load_ctchest(structure: str = "lungs"):
    """The real chest CT ``CTChest4`` and a binary label of ``structure`` from the ``slicerio`` package.

    Returns ``(image float32 [1, K, J, I] in HU, labels uint8 [K, J, I], Geometry)``. The segments are
    found by name in the .seg.nrrd ("lungs" = right lung + left lung) and placed on the CT's grid using
    the segmentation's own geometry (a .seg.nrrd may be cropped to the segments' extent).
    """
    try:
        import slicerio
    except ImportError:
        raise UserError("the demo data ships in the slicerio package: pip install slicerio") from None
    from pathlib import Path

    from .io import read_image

    folder = Path(slicerio.__file__).parent / "data"
    image, geometry = read_image([folder / "CTChest4.nrrd"])
    seg = slicerio.read_segmentation(str(folder / "Segmentation.seg.nrrd"))
    wanted = {"lungs": ("right lung", "left lung")}.get(structure, (structure,))
    segments = [s for s in seg["segments"] if s["name"].lower() in wanted]
    if len(segments) != len(wanted):
        names = [s["name"] for s in seg["segments"]]
        raise UserError(f"structure {structure!r} not found in the CTChest4 segmentation (it has {names})")
    voxels = np.asarray(seg["voxels"])                       # [I, J, K] or [I, J, K, layers]
    if voxels.ndim == 3:
        voxels = voxels[..., None]
    mask_ijk = np.zeros(voxels.shape[:3], dtype=bool)
    for s in segments:
        mask_ijk |= voxels[..., int(s.get("layer", 0) or 0)] == int(s["labelValue"])
    # place the segmentation's voxels on the image grid: image index of the segmentation's voxel (0, 0, 0)
    img_ijk_to_lps = np.eye(4)
    img_ijk_to_lps[:3, :3] = np.asarray(geometry.direction).reshape(3, 3) * np.asarray(geometry.spacing)
    img_ijk_to_lps[:3, 3] = geometry.origin
    seg_to_img = np.linalg.inv(img_ijk_to_lps) @ np.asarray(seg["ijkToLPS"], dtype=float)
    if not np.allclose(seg_to_img[:3, :3], np.eye(3), atol=1e-3):
        raise UserError("the CTChest4 segmentation is not on the CT's voxel grid")
    offset = np.round(seg_to_img[:3, 3]).astype(int)
    labels = np.zeros(tuple(reversed(geometry.size)), dtype=np.uint8)   # [K, J, I]
    lo = np.maximum(offset, 0)
    hi = np.minimum(offset + np.asarray(mask_ijk.shape), np.asarray(geometry.size))
    src = mask_ijk[lo[0] - offset[0]:hi[0] - offset[0], lo[1] - offset[1]:hi[1] - offset[1],
                   lo[2] - offset[2]:hi[2] - offset[2]]
    labels[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = np.transpose(src, (2, 1, 0))
    return image, labels, geometry
