"""What the painted slices imply about the slices between and around them.

A user paints a structure on a few slices. Before any network is trained, those slices already say a lot:
the structure lies *near* the painted shapes on the slices between them, and it ends somewhere beyond the
outermost painted slice. This module turns that into

- the free baselines a user has at once: :func:`nearest_slice` (copy the closest painted slice) and
  :func:`shape_interpolation` (shape-based interpolation: linear in the signed distance between the two
  painted slices around each slice, the nearest painted slice copied beyond the outermost ones);
- :class:`SlicePrior`: per-slice prior log-odds of each class from the interpolated signed distance, soft
  where the slice is far from any painted one. Inference adds them to the network's log-odds (a product of
  experts: the network says what the image looks like, the prior says where the structure can be), which
  removes the network's confident false positives far from the structure and keeps its boundaries where
  the interpolation is unsure;
- :func:`keep_connected`: the parts of a segmentation connected in 3D to the painted voxels of their class.

Arrays are ``[K, J, I]``; ``axis`` is the numpy axis of the slices; ``spacing`` is ``(K, J, I)`` mm.
``sparse`` label maps hold class indices 0..N on the labelled slices (0 = background there) and are ignored
elsewhere. A labelled slice with no voxel of a class says "this class is absent here".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from .data import label_values
from .grow import grown_box, painted_box

__all__ = ["nearest_slice", "shape_interpolation", "SlicePrior", "keep_connected", "signed_distance"]


def _plane_spacing(spacing: Sequence[float], axis: int) -> tuple[float, float]:
    sp = [float(s) for a, s in enumerate(spacing) if a != axis]
    return sp[0], sp[1]


def signed_distance(mask: np.ndarray, spacing: tuple[float, float], absent: float) -> np.ndarray:
    """In-plane signed distance (mm) to the boundary of a 2D mask: negative inside, positive outside.

    Measured between pixel centres and shifted by half a pixel, so that ``sdf < 0`` gives the mask back
    exactly. An empty mask gives ``absent`` everywhere (the structure is far away); a full one ``-absent``.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, absent, dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, -absent, dtype=np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    half = 0.5 * min(spacing)
    return np.where(mask, -(inside - half), outside - half).astype(np.float32)


def _check(sparse: np.ndarray, labelled: Sequence[int], axis: int) -> np.ndarray:
    sparse = np.asarray(sparse)
    if sparse.ndim != 3:
        raise ValueError(f"labels must be [K, J, I], got shape {sparse.shape}")
    lab = np.unique(np.asarray(labelled, dtype=np.int64))
    if lab.size == 0:
        raise ValueError("no labelled slice")
    if lab[0] < 0 or lab[-1] >= sparse.shape[axis]:
        raise ValueError(f"labelled slices {lab.tolist()} outside 0..{sparse.shape[axis] - 1}")
    return lab


def _neighbours(n: int, labelled: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every slice: the painted slice at or below it, the one at or above it (-1 where none), and the
    distance in slices to the nearest painted slice."""
    idx = np.arange(n)
    pos = np.searchsorted(labelled, idx, side="right") - 1          # last labelled <= s
    below = np.where(pos >= 0, labelled[np.clip(pos, 0, None)], -1)
    pos_up = np.searchsorted(labelled, idx, side="left")            # first labelled >= s
    above = np.where(pos_up < len(labelled), labelled[np.clip(pos_up, None, len(labelled) - 1)], -1)
    dist = np.min(np.abs(idx[:, None] - labelled[None, :]), axis=1)
    return below, above, dist


def nearest_slice(sparse: np.ndarray, labelled: Sequence[int], axis: int = 0) -> np.ndarray:
    """Every slice a copy of the nearest labelled slice (the lower one on a tie)."""
    lab = _check(sparse, labelled, axis)
    src = np.moveaxis(np.asarray(sparse), axis, 0)
    nearest = lab[np.argmin(np.abs(np.arange(src.shape[0])[:, None] - lab[None, :]), axis=1)]
    return np.moveaxis(src[nearest], 0, axis).copy()


def _class_sdfs(src: np.ndarray, lab: np.ndarray, classes: Sequence[int], spacing2: tuple[float, float],
                absent: float) -> dict[int, np.ndarray]:
    """``{slice: float32 [N, H, W]}``: each class's signed distance on each labelled slice."""
    return {int(s): np.stack([signed_distance(src[s] == c, spacing2, absent) for c in classes]) for s in lab}


def _interpolated(sdfs: dict[int, np.ndarray], s: int, below: int, above: int) -> np.ndarray:
    """The signed distances of slice ``s``, linear between the painted slices ``below`` and ``above``.

    Where a class is painted on one of the two slices and absent from the other, the absent side counts as
    the painted shape's depth (its largest inside distance) everywhere: the shape then shrinks and ends
    halfway between the two slices, instead of vanishing right next to the painted one."""
    if below == above or above < 0:
        return sdfs[below]
    if below < 0:
        return sdfs[above]
    t = (s - below) / (above - below)
    lo, hi = sdfs[below], sdfs[above]
    lo_absent = lo.reshape(len(lo), -1).min(1) > 0
    hi_absent = hi.reshape(len(hi), -1).min(1) > 0
    if np.any(lo_absent != hi_absent):
        lo, hi = lo.copy(), hi.copy()
        for c in np.flatnonzero(lo_absent & ~hi_absent):
            lo[c] = -hi[c].min()
        for c in np.flatnonzero(hi_absent & ~lo_absent):
            hi[c] = -lo[c].min()
    return (1 - t) * lo + t * hi


def _labels_from_sdf(sdf: np.ndarray) -> np.ndarray:
    """Class indices from per-class signed distances ``[N, H, W]``: the class with the most negative
    distance where any is negative, else background."""
    best = np.argmin(sdf, axis=0)
    inside = np.take_along_axis(sdf, best[None], 0)[0] < 0
    return np.where(inside, best + 1, 0)


def shape_interpolation(sparse: np.ndarray, labelled: Sequence[int], axis: int = 0,
                        spacing: Sequence[float] = (1.0, 1.0, 1.0), num_classes: int | None = None) -> np.ndarray:
    """Shape-based interpolation: between two labelled slices each class's signed distance is interpolated
    linearly and its negative part kept; beyond the outermost labelled slices the nearest one is copied."""
    lab = _check(sparse, labelled, axis)
    n_cls = int(num_classes - 1) if num_classes else int(np.moveaxis(np.asarray(sparse), axis, 0)[lab].max())
    out = np.zeros(np.moveaxis(np.asarray(sparse), axis, 0).shape, dtype=np.uint8 if n_cls < 255 else np.int32)
    if n_cls == 0:
        return np.moveaxis(out, 0, axis)
    prior = SlicePrior(sparse, lab, axis, spacing, n_cls + 1)
    for s in range(out.shape[0]):
        out[s] = _labels_from_sdf(prior.interpolated_sdf(s))
    return np.moveaxis(out, 0, axis)


@dataclass
class PriorSettings:
    """How sure the prior is.

    The log-odds of class c at a pixel are ``-d_c / tau``, with ``d_c`` the interpolated signed distance (mm)
    and ``tau = tau_mm + tau_rate * rate * D``, where ``D`` is the distance (mm, along the slice axis) to the
    nearest labelled slice and ``rate`` how far the structure's boundary moves per mm along the slice axis,
    *measured on the painted slices themselves* (:func:`boundary_rate`): a structure whose outline changes
    fast from slice to slice (cortex, vessels) gets a weak prior, one that changes slowly (lungs, a liver) a
    sharp one. Beyond the outermost labelled slice the shape also shrinks by ``shrink_rate * rate`` mm per mm
    (it has to end somewhere). ``weight`` scales the prior's log-odds before they are added to the
    network's. ``connected``: keep only the parts of each class connected in 3D to its painted voxels
    (:func:`keep_connected`), except for a class painted in at least ``many_parts`` separate pieces a painted
    slice on average (0: no exception) that lie in at least ``joined_parts`` separate parts of the segmentation
    (0: however many): ribs, a dozen or more arcs on every slice that move from one slice to the next, leave
    many arcs of the slices between the painted ones touching no painted voxel, and the connected parts alone
    lost a fifth of them (``docs/benchmarks.md``, "Structures in many pieces"); the pieces of a structure
    that the segmentation joins in 3D (a spine painted sagittally: its processes) make one structure.
    ``default_rate`` is used when a single slice is painted.

    Where the structure ends: painted slices spread over a structure, as the README advises, leave about
    half a gap (the mean distance between painted slices) beyond the outermost ones. Beyond
    ``end_reach`` gaps past the outermost painted slice, every class's log-odds (after ``weight``) fall by
    ``end_penalty`` per gap further out: near the painted range a confident network still keeps the
    structure's tail, far beyond it (bowel gas below painted lungs, tissue past a tumour's end) it has to
    be very sure. Needs two painted slices (a gap); ``end_penalty`` 0 turns it off. Painted slices close
    together at one part of a long structure leave a short gap: where the network alone sees the structure
    go on past them, the inference moves that side's end out (``end_follows_network``;
    :meth:`SlicePrior.extend_end`). With ``end_intensity``, only where what the network sees there also has
    the painted structure's intensities (:meth:`SlicePrior.intensity_support` at least
    :data:`END_INTENSITY_MIN`): the liver under painted lungs, marked by a network that has seen no slice
    without lung, has the shape of the lung base but not its intensity, and must not move the lungs' end.
    ``end_intensity_share``: and at least this share of the support that the network's foreground has on the
    outermost painted slice itself (0: any support above :data:`END_INTENSITY_MIN`). Past a brain tumour's end,
    painted in the coronal view, a network that has never seen a slice without the tumour marks its place for
    24 slices on tissue with a little of its intensities (support 0.03 to 0.18 against 0.66 next to the painted
    slice); half the painted slice's support stops the end where the tumour's intensities stop.

    What the image's edges say (:mod:`mismatch.grow`): the painted voxels, structure and background, grown
    through the image as Slicer's Grow from seeds grows them. Each voxel's margin (how much closer, in path
    cost, the painted voxels of a class are than any other's) becomes a vote of ``grow_beta *
    tanh(margin / grow_scale)`` log-odds for that class (after ``weight``): a full vote where a clear edge
    separates the class from the rest, almost none where growing wins by little (a leak through a faint
    edge, where the network decides). It grows in the painted structure's bounding box grown by 20 %
    in-plane, and along the slice axis over the painted range and ``grow_reach`` gaps beyond it: there it
    also says where the structure ends (air below painted lungs that no edge-free path joins to them).
    Needs the image; ``grow_beta`` 0 turns it off.

    What the painted voxels' intensities say (:func:`intensity_log_ratios`): in the same box, each class's
    intensity histogram on the painted slices against everything else painted there gives every intensity
    a log-likelihood ratio (clipped to +-4), added with weight ``intensity_beta`` (after ``weight``). It
    carries the structure's intensity band (grey matter between white matter and fluid, contrast in a
    vessel) to voxels that no edge-free path joins to the painted ones. ``intensity_beta`` 0 turns it off.
    ``intensity_counts``: how many voxels' worth of the rest's histogram each class's histogram starts from
    (0: none), so that a class painted on few voxels (a small lesion) gets weaker ratios.
    ``intensity_beyond``: along the slice axis past that box (in the same in-plane box), the intensities
    still vote, but only against a class (their negative log-ratios): the liver under painted lungs, which a
    network that has never seen a slice without lung marks with the lung base's shape, is not lung by its
    intensity however far from the painted slices; what does look like the structure there gets no vote for
    it (bowel gas beyond painted lungs), where the end of the structure decides.

    ``temperature``: the combined log-odds (network plus prior) are divided by it before they become
    probabilities. The experts are not independent (the network, the edges and the intensities often see the
    same thing), so their sum is overconfident; a temperature above 1 tempers the confidence without changing
    any label (the most probable class stays the most probable). ``range_temperature``: the temperature instead
    when every painted class has an intensity range (below): the range's vote, added to the rest, makes such
    classes the most overconfident (0: ``temperature`` always).

    ``beyond_scale``: the prior's weight past the outermost painted slices, as a multiple of ``weight``
    (:meth:`SlicePrior.weight`). Between painted slices the network interpolates between slices it was
    trained on; past them it extrapolates to slices unlike any it has seen (smaller cross-sections, the
    structure's end, other anatomy), while the prior's shrinking shape, its end and the painted intensities
    say where the structure stops. 1 (the default): the same weight everywhere. No larger value won over the
    data sets (``docs/benchmarks.md``, "Trusting the prior more only past the painted slices"): it removes the
    network's false positives past a large structure's end (white matter), and the structure the network
    rightly finds going on past the painted slices (ribs, tumours).

    What the painted outlines' intensities say (:func:`boundary_threshold`): the pixels within
    ``boundary_band`` pixels of each class's painted outline, on either side, are what decides where an outline
    lies; a logistic fit of "in the class" on their intensity gives the intensity at which the painted
    outlines lie and how sharply (a steep fit where the structure's edge has a clear contrast: vessels, bone,
    lungs; a flat one where intensities overlap: most tumours). Over the painted structure's box
    (:func:`~mismatch.grow.painted_box`; past the outermost painted slices only against a class), each pixel
    gets that fit's log-odds (clipped to +-:data:`INTENSITY_CLIP`) times ``boundary_beta``, added after the
    network's and the rest of the prior's (not scaled by ``weight``) and damped where those are sure
    (``1 / (1 + (z / BOUNDARY_GATE) ** 2)`` for their combined log-odds ``z``): it moves the outlines that they
    leave in doubt onto the painted outlines' intensity, and leaves alone what they agree on (the bright
    vessels inside painted lungs). The inference adds it (:func:`mismatch.inference.segment_volume`); the
    prior's label map alone (``mismatch fill``) does not (:meth:`SlicePrior.label_map`). 0 turns it off.
    ``boundary_reach``: between the painted slices, the vote for a class stands only within that many pixels of
    a pixel that the fit calls outside it (next to an intensity edge); elsewhere only the vote against it does
    (0: everywhere). Where the structure meets tissue of its own intensity (a lung tumour on the chest wall) the
    fit says "inside" across that tissue, and voting for the structure there grew it into the wall
    (``docs/benchmarks.md``, "The outline vote only next to an edge").

    What the painted slices on both sides agree on (:meth:`SlicePrior.agreement`): between two painted slices, a
    pixel outside a class on both lies outside it in between too, unless the class bulges past both outlines
    there. How far a class does is measured on the painted slices themselves (:func:`bulge_rates`: each middle
    one of three consecutive painted slices against the two around it); a pixel past both outlines by more
    than that gets up to ``agree_beta`` times :data:`INTENSITY_CLIP` log-odds against the class (after
    ``weight``). Where the structure meets tissue of its own intensity (a lung lesion on the chest wall, a
    vertebra on its neighbours) neither the edges nor the intensities separate them, and the shape term above
    is too soft to separate them at a few pixels; painted slices close together then say where the outline lies.
    It needs three painted slices holding the class and acts only between painted slices, on a gap where that
    reach is at most ``agree_pixels`` pixels (across a longer gap new pieces appear that no outline moved to: a
    vessel's branch); a class in ``many_parts`` or more pieces gets none (ribs: an arc between two painted
    slices lies outside both slices' arcs). 0 turns it off.

    Where an intensity range is the structure (:func:`intensity_ranges`): when one range of intensities
    reproduces a class's painted voxels on the painted slices with an IoU of at least ``range_iou`` (white or
    grey matter on a T1 template, the soft tissue of a CT; not a tumour, a vessel or bone beside bone, whose
    best range reproduces a fifth to three quarters of the painting), every voxel in that range gets
    ``range_beta`` log-odds for the class and every other voxel ``range_beta`` against it (after ``weight``),
    on every slice: what the Segment Editor's Threshold effect with that range, then Islands, gives, with the
    network and the rest of the prior deciding where they are sure. 0 turns it off. Past the structure's end,
    more than ``range_far`` gaps between painted slices past where the end penalty starts (``end_reach``), that
    range decides for such a class instead of the shape extrapolated from the outermost painted slice and the end
    penalty (both assume the structure ends within a gap or so of its painted range, which does not hold for a
    tissue painted on slices bunched in one part of the volume): the shape term is 0 there and the range votes
    ``range_beyond`` times ``range_beta``, so that the structure goes on as far as thresholding and the 3D
    connection to the painted voxels take it. 0 turns this off. ``range_ramp``: over that many gaps before
    ``range_far`` the range takes over gradually (:meth:`SlicePrior.range_takeover`: a share rising linearly
    from 0 to 1 gives up that share of the shape term and the end penalty and takes that share of the stronger
    vote); 0: at ``range_far``, at once.
    """

    tau_mm: float = 4.0
    tau_rate: float = 0.5
    shrink_rate: float = 2.0
    weight: float = 0.25
    default_rate: float = 0.5
    connected: bool = True
    end_follows_network: bool = True
    end_intensity: bool = True
    intensity_beyond: bool = True
    end_reach: float = 0.25
    end_penalty: float = 4.0
    grow_beta: float = 8.0
    grow_scale: float = 0.1
    grow_reach: float = 1.0
    intensity_beta: float = 1.0
    intensity_counts: float = 1000.0
    temperature: float = 1.5
    beyond_scale: float = 1.0
    # 3 since the vote for a class stands only next to an edge (boundary_reach): chosen at 2 before that rule, on
    # draws outside the benchmark 3 is ahead (docs/benchmarks.md, "The outline vote at weight 3")
    boundary_beta: float = 3.0
    boundary_band: float = 1.0
    end_intensity_share: float = 0.5
    many_parts: float = 12.0
    boundary_reach: float = 1.0
    # 4 since the spine painted on 3 sagittal slices: its sections' 16 pieces lie in 2 parts of the prediction,
    # the ribs' in 8 to 12 (docs/benchmarks.md, "Pieces that join in 3D")
    joined_parts: float = 4.0
    # 2 since a lesion on the chest wall painted on 5 slices a slice apart grew into the wall (docs/benchmarks.md,
    # "What both painted neighbours call outside")
    agree_beta: float = 2.0
    agree_pixels: float = 4.0
    # 4 since white and grey matter of the MNI152 template, labels that follow its intensity, were behind Slicer's
    # Threshold + Islands (docs/benchmarks.md, "Where an intensity range is the structure")
    range_beta: float = 4.0
    range_iou: float = 0.9
    # 4 and 0.5 since grey and white matter and soft tissue painted on slices bunched in one part of the volume
    # were cut off past the painted range where thresholding went on (docs/benchmarks.md, "Past the end, the range")
    range_beyond: float = 4.0
    range_far: float = 0.5
    range_ramp: float = 0.0
    # the temperature when every painted class has an intensity range (SlicePrior.temperature): the range's vote makes
    # such classes the most overconfident; 3 brought grey matter's band ECE from 2.5 to 0.7 % at 5 slices
    # (docs/benchmarks.md, "The confidence is tempered"). 0: ``temperature`` for every volume
    range_temperature: float = 3.0

    _FLOATS = ("tau_mm", "tau_rate", "shrink_rate", "weight", "default_rate", "end_reach", "end_penalty",
               "grow_beta", "grow_scale", "grow_reach", "intensity_beta", "intensity_counts", "temperature",
               "beyond_scale", "boundary_beta", "boundary_band", "end_intensity_share", "many_parts",
               "boundary_reach", "joined_parts", "agree_beta", "agree_pixels", "range_beta", "range_iou",
               "range_beyond", "range_far", "range_ramp", "range_temperature")

    def to_dict(self) -> dict:
        return {**{k: float(getattr(self, k)) for k in self._FLOATS}, "connected": bool(self.connected),
                "end_follows_network": bool(self.end_follows_network), "end_intensity": bool(self.end_intensity),
                "intensity_beyond": bool(self.intensity_beyond)}

    #: each setting added after the first recorded settings, with the value that gives the prior as it was
    #: before it (:meth:`from_dict`)
    _BEFORE = {
        "end_follows_network": False, "end_intensity": False, "intensity_beyond": False, "end_penalty": 0.0,
        "grow_beta": 0.0, "intensity_beta": 0.0, "intensity_counts": 0.0, "temperature": 1.0, "beyond_scale": 1.0,
        "boundary_beta": 0.0, "boundary_band": 1.0, "end_intensity_share": 0.0, "many_parts": 0.0,
        "boundary_reach": 0.0, "joined_parts": 0.0, "agree_beta": 0.0, "range_beta": 0.0,
        "range_beyond": 0.0, "range_temperature": 0.0, "range_ramp": 0.0}

    @classmethod
    def from_dict(cls, d: dict | None) -> "PriorSettings":
        """From :meth:`to_dict`'s dict. Settings recorded before the end of the structure or the image's
        edges or intensities were part of the prior (no ``end_penalty`` / ``grow_beta`` /
        ``intensity_beta``: a model card or benchmark of an earlier version) segment as they did then:
        without them; without ``intensity_counts``, with the histograms as they were then (no counts); without
        ``end_follows_network``, with the end where the painted slices put it; without ``end_intensity``, with
        the end moved by the network's shapes alone; without ``intensity_beyond``, with the intensities in the
        growing's box only; without ``temperature``, untempered; without ``boundary_beta``, without the painted
        outlines' intensities."""
        d = d or {}
        values = {k: float(d[k]) for k in cls._FLOATS if k in d}
        for key in ("connected", "end_follows_network", "end_intensity", "intensity_beyond"):
            if key in d:
                values[key] = bool(d[key])
        if d:   # recorded settings: what they lack was added later, and is taken as it was before then
            values.update({k: v for k, v in cls._BEFORE.items() if k not in d})
        return cls(**values)


def boundary_rate(sdfs: dict[int, np.ndarray], dz: float, pixel: float = 1.0) -> float | None:
    """How many mm the painted outlines move per mm along the slice axis: for each pair of consecutive
    labelled slices, the mean distance from each one's boundary pixels to the other's outline, divided by
    their distance; the median over the pairs. ``pixel``: the larger in-plane spacing (mm). ``None`` with fewer
    than two labelled slices or no outline."""
    keys = sorted(sdfs)
    rates = []
    for a, b in zip(keys, keys[1:]):
        sa, sb = sdfs[a], sdfs[b]
        for c in range(len(sa)):
            on_a, on_b = np.abs(sa[c]) <= 0.51 * pixel, np.abs(sb[c]) <= 0.51 * pixel   # the outline pixels
            present_a, present_b = sa[c].min() < 0, sb[c].min() < 0
            if not (present_a and present_b and on_a.any() and on_b.any()):
                continue
            moved = 0.5 * (np.abs(sb[c][on_a]).mean() + np.abs(sa[c][on_b]).mean())
            rates.append(moved / ((b - a) * dz))
    return float(np.median(rates)) if rates else None


def bulge_rates(sdfs: dict[int, np.ndarray], src: np.ndarray, labelled: np.ndarray, dz: float,
                q: float = 99.0) -> list[float | None]:
    """For each class, how far (mm per mm along the slice axis) it reaches past the outlines of the painted
    slices around it, measured on the painted slices themselves: for each three consecutive painted slices
    holding the class, the middle one's pixels of the class outside it on both others, by the smaller of their
    two distances; the ``q``-th percentile of those distances over all the middle slice's pixels of the class
    (0 where it lies inside either), divided by the mean distance from the middle slice to the other two; the
    largest over the triples. None for a class with no such three painted slices."""
    keys = sorted(int(k) for k in labelled)
    n = len(next(iter(sdfs.values()))) if sdfs else 0
    out: list[float | None] = [None] * n
    for a, m, b in zip(keys, keys[1:], keys[2:]):
        for c in range(n):
            inside = src[m] == c + 1
            if not inside.any() or sdfs[a][c].min() >= 0 or sdfs[b][c].min() >= 0:
                continue
            past = np.maximum(np.minimum(sdfs[a][c][inside], sdfs[b][c][inside]), 0.0)
            rate = float(np.percentile(past, q)) / (0.5 * (b - a) * dz)
            out[c] = rate if out[c] is None else max(out[c], rate)
    return out


class SlicePrior:
    """Prior log-odds from the labelled slices, computed a slice at a time (no volume-sized float array).

    ``log_odds(s)`` is ``float32 [N, H, W]`` (one map per foreground class, against background) for slice
    ``s``; on a labelled slice it is ``+-inf`` (the painted labels are kept as painted).

    ``image``: float ``[K, J, I]`` (the normalised volume's first channel), for the image's edges
    (``settings.grow_beta``) and intensities (``settings.intensity_beta``); without it the prior has
    neither. The growing runs here, once; the image is kept (not copied) for the intensities.
    """

    def __init__(self, sparse: np.ndarray, labelled: Sequence[int], axis: int, spacing: Sequence[float],
                 num_classes: int, settings: PriorSettings | None = None, image: np.ndarray | None = None):
        self.lab = _check(sparse, labelled, axis)
        self.axis = int(axis)
        self.sparse = np.asarray(sparse)
        self.src = np.moveaxis(self.sparse, axis, 0)
        self.settings = settings or PriorSettings()
        self.n_fg = int(num_classes) - 1
        self.sp2 = _plane_spacing(spacing, axis)
        self.dz = float(spacing[axis])
        self.absent = float(np.hypot(self.src.shape[1] * self.sp2[0], self.src.shape[2] * self.sp2[1]))
        self.sdfs = _class_sdfs(self.src, self.lab, range(1, self.n_fg + 1), self.sp2, self.absent)
        self.below, self.above, self.dist = _neighbours(self.src.shape[0], self.lab)
        measured = boundary_rate(self.sdfs, self.dz, max(self.sp2))
        self.rate = self.settings.default_rate if measured is None else measured
        # how far each class reaches past its painted neighbours' outlines (bulge_rates); None without agree_beta
        # and for a class in many pieces, whose pieces do not match from one painted slice to the next (ribs)
        self.bulge: list[float | None] = [None] * self.n_fg
        if self.settings.agree_beta > 0:
            painted = self.src[self.lab]
            self.bulge = [None if in_many_pieces(painted, c + 1, 0, self.settings.many_parts) else b
                          for c, b in enumerate(bulge_rates(self.sdfs, self.src, self.lab, self.dz))]
        # the mean distance (mm) between painted slices; None with one painted slice
        self.gap_mm = float(np.mean(np.diff(self.lab))) * self.dz if len(self.lab) > 1 else None
        # the slices the end penalty counts from, below and above: the outermost painted ones unless moved
        # out (extend_end)
        self.ends = {-1: int(self.lab[0]), 1: int(self.lab[-1])}
        self.edges = None       # (box, margins [N, *box]) of the image's edges
        self.intensity = None   # (box, bin edges, log-ratios [N, bins]) of the painted voxels' intensities
        image = None if image is None else np.asarray(image)
        st = self.settings
        if image is not None and st.weight > 0 and self.n_fg > 0 and (st.grow_beta > 0 or st.intensity_beta > 0):
            beyond = int(np.ceil(st.grow_reach * self.gap_mm / self.dz)) if self.gap_mm else 0
            if st.grow_beta > 0:
                self.edges = grown_box(image, self.sparse, self.lab, self.axis, num_classes, beyond=beyond)
            box = None
            if st.intensity_beta > 0:   # the growing's box, found once
                box = self.edges[0] if self.edges else painted_box(self.sparse, self.lab, self.axis, beyond)
            if box is not None:
                self.intensity = (box, *intensity_log_ratios(image, self.sparse, self.lab, self.axis,
                                                          self.n_fg, box, st.intensity_counts))

        self.boundary = None   # (box, [(slope, threshold) or None per class]): the painted outlines' intensities
        if image is not None and st.boundary_beta > 0 and self.n_fg > 0:
            box = painted_box(self.sparse, self.lab, self.axis)
            fits = [] if box is None else boundary_threshold(image, self.sparse, self.lab, self.axis, self.n_fg,
                                                        st.boundary_band)
            if any(f is not None for f in fits):
                self.boundary = (box, fits)
        # (low, high) per class where an intensity range reproduces its painting (intensity_ranges), else None
        self.ranges: list[tuple[float, float] | None] = [None] * self.n_fg
        self.range_ious: list[float | None] = [None] * self.n_fg   # how well each class's range reproduces it
        if image is not None and st.range_beta > 0 and st.weight > 0 and self.n_fg > 0:
            fits = intensity_ranges(image, self.sparse, self.lab, self.axis, self.n_fg)
            self.ranges = [None if r is None or r[2] < st.range_iou else r[:2] for r in fits]
            self.range_ious = [None if r is None else r[2] for r in fits]
        self.ranged = np.array([r is not None for r in self.ranges], dtype=bool)   # the classes that have one
        # kept (not copied) only for the intensity votes that read it per slice: without them the caller's
        # volume is not held (segment_volume frees it before the connectivity pass)
        needed = self.intensity is not None or self.boundary is not None or self.ranged.any()
        self.image = image if needed else None

    def boundary_vote(self, s: int) -> np.ndarray | None:
        """The painted outlines' intensity fit on slice ``s`` (:func:`boundary_threshold`): log-odds
        ``float32 [N, H, W]``, one map per foreground class, clipped to +-:data:`INTENSITY_CLIP`, 0 outside the
        painted structure's in-plane box (and for a class without a fit); None off the box's slices or without a
        fit (``settings.boundary_beta`` 0, no image). Past the outermost painted slices it votes only against a
        class (its negative log-odds): where the structure ends, what has the painted outlines' intensity is as
        often something else (a brain tumour's enhancing neighbours past its end: 57.9 % against 80.5 % on one
        training of five when it voted for the tumour there, docs/benchmarks.md)."""
        if self.boundary is None:
            return None
        box, fits = self.boundary
        along = box[self.axis]
        if not along.start <= int(s) < along.stop:
            return None
        between = self.lab[0] < int(s) < self.lab[-1]
        inplane = tuple(b for a, b in enumerate(box) if a != self.axis)
        values = np.take(self.image, int(s), axis=self.axis)[inplane]
        out = np.zeros((self.n_fg,) + tuple(self.src.shape[1:]), dtype=np.float32)
        reach = int(round(self.settings.boundary_reach))
        for c, fit in enumerate(fits):
            if fit is not None:
                slope, threshold = fit
                vote = np.clip(slope * (values - threshold), -INTENSITY_CLIP, INTENSITY_CLIP if between else 0.0)
                if reach > 0 and between:   # for the class only next to what looks like outside it
                    edge = ndimage.minimum_filter(vote, size=2 * reach + 1, mode="nearest") < 0
                    vote = np.where((vote > 0) & ~edge, np.float32(0), vote)
                out[(c,) + inplane] = vote
        return out

    @property
    def temperature(self) -> float:
        """What the combined log-odds are divided by before they become the confidence: ``range_temperature``
        when every painted class has an intensity range (:attr:`ranged`), else ``temperature``. One value for the
        whole volume, so that no voxel's most probable class changes."""
        st = self.settings
        if st.range_temperature > 0 and self.n_fg > 0 and bool(self.ranged.all()):
            return float(st.range_temperature)
        return float(st.temperature)

    def is_labelled(self, s: int) -> bool:
        return int(s) in self.sdfs

    def labels(self, s: int) -> np.ndarray:
        """The painted class indices of labelled slice ``s``."""
        return self.src[int(s)]

    def extend_end(self, side: int, s: int) -> None:
        """Count the end penalty (``settings.end_penalty``) below (``side`` -1) or above (1) the painted range
        from slice ``s`` instead of from the outermost painted slice: the structure goes on at least to ``s``.
        The shape beyond the painted range is extrapolated from the painted slice as before."""
        painted = self.outermost(side)
        if side * (int(s) - painted) < 0:
            raise ValueError(f"slice {s} is not {'below' if side < 0 else 'above'} the painted slice {painted}")
        self.ends[side] = int(s)

    def outermost(self, side: int) -> int:
        """The outermost painted slice below (``side`` -1) or above (1) the painted range."""
        if side not in (-1, 1):
            raise ValueError(f"side must be -1 (below) or 1 (above), not {side!r}")
        return int(self.lab[0] if side < 0 else self.lab[-1])

    def moved_ends(self) -> dict[int, int]:
        """``{side: slice}`` for each side whose end :meth:`extend_end` moved past the outermost painted slice."""
        return {side: end for side, end in self.ends.items() if end != self.outermost(side)}

    def label_map(self, shape: Sequence[int]) -> np.ndarray:
        """What the painted slices say on their own, with no network: class indices ``[K, J, I]``
        (``shape``), the painted slices as painted, every other slice the class whose log-odds
        (:meth:`log_odds`) is highest where it is above 0, background elsewhere; then, with
        ``settings.connected``, only the parts connected to a painted voxel (:meth:`keep_connected`).
        Without the painted outlines' intensity (:meth:`boundary_vote`): its damping where the other experts
        are sure needs the network's log-odds; with the prior's alone it thresholds the whole box by intensity
        (measured: the held-out spine's fill 86.8 against 90.3 % at 5 slices, docs/benchmarks.md)."""
        out = np.zeros(tuple(shape), dtype=np.uint8 if self.n_fg < 255 else np.int32)
        moved = np.moveaxis(out, self.axis, 0)   # a view: writing a slice of it writes ``out``
        for s in range(moved.shape[0]):
            if self.is_labelled(s):
                moved[s] = self.labels(s)
            else:
                odds = self.log_odds(s)
                moved[s] = np.where(odds.max(0) > 0, odds.argmax(0) + 1, 0)
        return self.keep_connected(out) if self.settings.connected else out

    def keep_connected(self, labels: np.ndarray) -> np.ndarray:
        """:func:`keep_connected` of a ``[K, J, I]`` segmentation with these painted slices."""
        return keep_connected(labels, self.sparse, self.lab, self.axis, self.settings.many_parts,
                              self.settings.joined_parts)

    def intensity_support(self, s: int, inplane: tuple[slice, ...], mask: np.ndarray) -> float | None:
        """How much the voxels ``mask`` of slice ``s`` (a boolean array over the in-plane box ``inplane`` of
        that slice) look like a painted structure: the mean, over them, of the painted intensities' log-ratio
        (:func:`intensity_log_ratios`) of the class they look most like; above 0 where they are more typical
        of a painted class than of what was painted around it. None without the intensities or without voxels."""
        mask = np.asarray(mask, dtype=bool)
        if self.intensity is None or not mask.any():
            return None
        _, bins, ratios = self.intensity
        values = np.take(self.image, int(s), axis=self.axis)[inplane][mask]
        return float(ratios[:, intensity_bin(bins, values)].max(0).mean())

    def weight(self, s: int) -> float:
        """The prior's weight in the fusion on slice ``s``: ``settings.weight``, times ``settings.beyond_scale``
        past the outermost painted slices."""
        st = self.settings
        s = int(s)
        outside = s < self.lab[0] or s > self.lab[-1]
        return float(st.weight) * (float(st.beyond_scale) if outside else 1.0)

    def interpolated_sdf(self, s: int) -> np.ndarray:
        """``float32 [N, H, W]``: each class's signed distance (mm) on slice ``s``, linear between the painted
        slices around it, the nearest painted slice's beyond them (:func:`shape_interpolation`'s shapes)."""
        s = int(s)
        return _interpolated(self.sdfs, s, int(self.below[s]), int(self.above[s]))

    def agreement(self, below: int, above: int) -> np.ndarray:
        """``float32 [N, H, W]``, for the slices between the painted slices ``below`` and ``above``: where a pixel
        lies outside a class on both, minus its smaller distance (mm) to that class's outline on the two, in
        units of how far the class may reach past both outlines at the middle of the gap (the larger of
        :attr:`rate` and the class's :attr:`bulge`, times half the gap, and at least one pixel: an outline is
        known to a pixel), clipped to -:data:`INTENSITY_CLIP`; 0 elsewhere, for a class without a bulge and where
        that unit is above ``settings.agree_pixels`` pixels."""
        a, b = self.sdfs[int(below)], self.sdfs[int(above)]
        half = 0.5 * (int(above) - int(below)) * self.dz
        out = np.zeros(a.shape, dtype=np.float32)
        pixel = max(self.sp2)
        for c, bulge in enumerate(self.bulge):
            if bulge is not None:
                scale = max(max(self.rate, bulge) * half, pixel)
                if scale <= self.settings.agree_pixels * pixel:
                    out[c] = -np.clip(np.minimum(a[c], b[c]) / scale, 0.0, INTENSITY_CLIP)
        return out

    def range_takeover(self, beyond: float) -> np.ndarray:
        """Per class, how far its intensity range decides ``beyond`` gaps past where the end penalty starts (0 to
        1; 0 for a class without a range, and within the end's reach): 1 past ``range_far`` gaps, 0 before; with
        ``range_ramp`` > 0, rising linearly from ``range_far - range_ramp`` to ``range_far`` gaps instead of at
        once."""
        st = self.settings
        if st.range_beyond <= 0 or not self.ranged.any() or beyond <= 0:   # within the end's reach: the shape
            return np.zeros(len(self.ranged))
        if st.range_ramp > 0:
            level = min(1.0, max(0.0, (beyond - st.range_far + st.range_ramp) / st.range_ramp))
        else:
            level = float(beyond > st.range_far)
        return self.ranged * level

    def log_odds(self, s: int) -> np.ndarray:
        st = self.settings
        s = int(s)
        lo, hi = int(self.below[s]), int(self.above[s])
        sdf = self.interpolated_sdf(s)
        d_mm = float(self.dist[s]) * self.dz
        outside = lo < 0 or hi < 0   # beyond the outermost labelled slice
        beyond = 0.0   # gaps past where the structure may still go on, past the end
        if outside and self.gap_mm:
            past = (self.ends[-1] - s) if lo < 0 else (s - self.ends[1])   # slices past the end
            beyond = max(0, past) * self.dz / self.gap_mm - st.end_reach
        # how far each class's intensity range has taken over here from the shape's extrapolation and the end
        # penalty: 0 or 1 past range_far gaps (a step), or rising linearly over the range_ramp gaps before it
        take = self.range_takeover(beyond)
        if outside:
            sdf = sdf + st.shrink_rate * self.rate * d_mm
        tau = st.tau_mm + st.tau_rate * self.rate * d_mm
        lo_odds = -sdf / tau
        if take.any():
            lo_odds = lo_odds * (1.0 - take)[:, None, None]
        if beyond > 0 and st.end_penalty > 0 and st.weight > 0:
            lo_odds = lo_odds - (st.end_penalty * beyond / st.weight * (1.0 - take))[:, None, None]
        if st.agree_beta > 0 and not outside and lo != hi and st.weight > 0:
            lo_odds += (st.agree_beta / st.weight) * self.agreement(lo, hi)
        if self.edges is not None:
            box, margins = self.edges
            along = box[self.axis]
            if along.start <= s < along.stop:
                inplane = tuple(b for a, b in enumerate(box) if a != self.axis)
                m = np.take(margins, s - along.start, axis=self.axis + 1)
                lo_odds[(slice(None),) + inplane] += (st.grow_beta / st.weight) * np.tanh(m / st.grow_scale)
        if self.intensity is not None:
            box, bins, ratios = self.intensity
            along = box[self.axis]
            inside = along.start <= s < along.stop
            if inside or st.intensity_beyond:
                inplane = tuple(b for a, b in enumerate(box) if a != self.axis)
                at = intensity_bin(bins, np.take(self.image, s, axis=self.axis)[inplane])
                votes = ratios[:, at] if inside else np.minimum(ratios[:, at], 0.0)
                lo_odds[(slice(None),) + inplane] += (st.intensity_beta / st.weight) * votes
        if self.ranged.any():
            values = np.take(self.image, s, axis=self.axis)
            for c in np.flatnonzero(self.ranged):
                low, high = self.ranges[c]
                beta = st.range_beta * (1.0 + (st.range_beyond - 1.0) * take[c])
                lo_odds[c] += np.where((values >= low) & (values < high), beta, -beta) / st.weight
        return lo_odds.astype(np.float32)


def intensity_range_notes(prior: SlicePrior, classes: Sequence[dict], mean: float = 0.0, std: float = 1.0
                          ) -> list[str]:
    """One line for the user per class whose painting one intensity range reproduces (``prior.ranges``): the
    range in the image's units (the prior's image is normalised as ``(value - mean) / std``), how well it
    reproduces the painted slices, what the segmentation does with it past them, and how to stop it where it
    runs on into tissue of the same intensity (a slice marked empty there: its pixels in the range then count
    against the range's IoU, and it is a painted slice of background the structure does not cross)."""
    def units(v: float) -> str:
        return f"{v * std + mean:.4g}"

    notes = []
    for c, (r, iou) in enumerate(zip(prior.ranges, prior.range_ious)):
        if r is None:
            continue
        name = classes[c].get("name", f"class {c + 1}") if c < len(classes) else f"class {c + 1}"
        low, high = (np.isfinite(v) for v in r)
        span = (f"the intensities {units(r[0])} to {units(r[1])}" if low and high else
                f"the intensities from {units(r[0])} up" if low else
                f"the intensities up to {units(r[1])}" if high else "every intensity")
        notes.append(f"{name}: {span} reproduce the painted slices "
                     f"(IoU {iou:.2f} on them), so the segmentation follows that range, far past the painted "
                     "slices too, as far as it stays connected to the painted voxels (as Threshold + Islands "
                     "would); where it runs on into tissue of the same intensity, mark a slice there as empty "
                     "(--empty-slices; the panel's Empty slices)")
    return notes


#: ``end_intensity``: the least :meth:`SlicePrior.intensity_support` of the network's foreground on a slice past the
#: painted range for that slice to count as the structure going on there
END_INTENSITY_MIN = 0.0

INTENSITY_BINS = 48
INTENSITY_CLIP = 4.0


def intensity_bin(bins: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The histogram bin of each of ``values`` for the bin edges ``bins`` (:func:`intensity_log_ratios`); values
    beyond the edges fall in the end bins."""
    return np.clip(np.searchsorted(bins, values, side="right") - 1, 0, len(bins) - 2)


def intensity_log_ratios(image: np.ndarray, sparse: np.ndarray, labelled: Sequence[int], axis: int, n_fg: int,
                         box: tuple[slice, ...], counts: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """How much likelier each intensity is inside each class than outside it, as the painted voxels in
    ``box`` show: ``(bin edges [B + 1], float32 log-ratios [n_fg, B])``.

    ``B`` = :data:`INTENSITY_BINS` bins between the box's 0.5th and 99.5th intensity percentiles (values
    beyond fall in the end bins). For class c, the histogram of its painted voxels against that of every
    other painted voxel in the box (background and the other classes), each with one count added to every
    bin and smoothed over neighbouring bins, their log ratio clipped to +-:data:`INTENSITY_CLIP`; the
    class's histogram also starts from ``counts`` voxels distributed as the rest's (a prior that says "no
    different", which a class painted on many voxels outweighs and one painted on few does not). A class
    not painted in the box gets no evidence (0)."""
    lab = np.unique(np.asarray(labelled, dtype=np.int64))
    rows = lab[(lab >= box[axis].start) & (lab < box[axis].stop)]
    inside = list(box)
    inside[axis] = rows
    values = np.asarray(image)[tuple(inside)].ravel()
    classes = np.asarray(sparse)[tuple(inside)].ravel()
    region = np.asarray(image)[box]
    step = max(1, int(np.ceil((region.size / 1e6) ** (1 / 3))))   # percentiles from at most ~1M voxels
    lo, hi = np.percentile(region[::step, ::step, ::step], [0.5, 99.5])
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, INTENSITY_BINS + 1)
    at = intensity_bin(bins, values)
    ratios = np.zeros((n_fg, INTENSITY_BINS), dtype=np.float32)

    def histogram(mask, start=0.0):
        h = np.bincount(at[mask], minlength=INTENSITY_BINS).astype(np.float64) + 1.0 + start
        h = np.convolve(h, [0.25, 0.5, 0.25], mode="same") + 1e-3
        return h / h.sum()

    for c in range(1, n_fg + 1):
        member = classes == c
        if member.any() and (~member).any():
            rest = histogram(~member)
            ratios[c - 1] = np.clip(np.log(histogram(member, counts * rest)) - np.log(rest),
                                    -INTENSITY_CLIP, INTENSITY_CLIP)
    return bins, ratios


#: the painted outlines' intensity vote is damped by ``1 / (1 + (z / BOUNDARY_GATE) ** 2)`` where the network and
#: the rest of the prior give combined log-odds ``z``: a full vote where they are in doubt, a tenth at 3 x this
BOUNDARY_GATE = 4.0


def gated_vote(z, vote, beta: float):
    """The painted outlines' vote ``beta * vote`` damped where the other experts' log-odds ``z`` (a class
    against the rest) are sure: ``/ (1 + (z / BOUNDARY_GATE) ** 2)``. Elementwise (numpy arrays or torch
    tensors)."""
    return beta * vote / (1 + (z / BOUNDARY_GATE) ** 2)


def boundary_threshold(image: np.ndarray, sparse: np.ndarray, labelled: Sequence[int], axis: int, n_fg: int,
                       band: float = 1.0, l2: float = 1.0) -> list[tuple[float, float] | None]:
    """Where, in intensity, the painted outlines lie: per foreground class, a logistic fit of "in the class" on
    the intensity of the painted slices' pixels within ``band`` pixels of the class's painted outline (inside
    and outside), ``(slope, threshold)`` with log-odds ``slope * (intensity - threshold)``; None for a class
    not painted, or painted with no pixel outside it on any slice. The fit is on standardised intensities
    with an L2 penalty ``l2`` on the slope (the log-odds stay finite where the two sides do not overlap), by
    Newton's method. A steep fit says the outline follows a clear intensity edge; a flat one (the two sides'
    intensities overlap, or the class lies between brighter and darker surroundings) says little."""
    lab = np.unique(np.asarray(labelled, dtype=np.int64))
    img = np.moveaxis(np.asarray(image), axis, 0)
    src = np.moveaxis(np.asarray(sparse), axis, 0)
    fits: list[tuple[float, float] | None] = []
    for c in range(1, n_fg + 1):
        xs, ys = [], []
        for k in lab:
            member = src[k] == c
            if not member.any() or member.all():
                continue
            near = (ndimage.distance_transform_edt(~member) <= band) & (ndimage.distance_transform_edt(member) <= band)
            xs.append(img[k][near])
            ys.append(member[near])
        x = np.concatenate(xs).astype(np.float64) if xs else np.zeros(0)
        y = np.concatenate(ys).astype(np.float64) if ys else np.zeros(0)
        if not x.size or y.min() == y.max():
            fits.append(None)
            continue
        mu, sd = float(x.mean()), float(x.std())
        if sd <= 0:
            fits.append(None)
            continue
        z = (x - mu) / sd
        w = np.zeros(2)   # log-odds w[0] * z + w[1]
        for _ in range(30):
            p = 0.5 * (1.0 + np.tanh(0.5 * (w[0] * z + w[1])))   # the logistic function, without overflow
            r = p * (1.0 - p)
            grad = np.array([((p - y) * z).sum() + l2 * w[0], (p - y).sum()])
            hess = np.array([[(r * z * z).sum() + l2, (r * z).sum()], [(r * z).sum(), r.sum() + 1e-9]])
            w = w - np.linalg.solve(hess, grad)
        if abs(w[0]) < 1e-9:
            fits.append(None)
            continue
        fits.append((float(w[0] / sd), float(mu - w[1] * sd / w[0])))
    return fits


#: intensity levels a bound of :func:`best_range` can sit at (between the image's 0.1st and 99.9th percentiles)
RANGE_BINS = 256


def best_range(values: np.ndarray, member: np.ndarray, edges: np.ndarray) -> tuple[float, float, float]:
    """The range ``(low, high, iou)`` of intensities whose mask ``low <= value < high`` best matches ``member``
    (bool, one per ``values``): ``low`` and ``high`` among ``edges`` or open (-inf / inf), ``iou`` the mask's
    IoU with ``member`` over ``values``. Exhaustive over every pair of bounds, from cumulative histograms."""
    values = np.asarray(values, dtype=np.float64).ravel()
    member = np.asarray(member, dtype=bool).ravel()
    if not member.any():
        raise ValueError("no member voxel: the class is not painted")
    bounds = np.concatenate([[-np.inf], np.asarray(edges, dtype=np.float64), [np.inf]])
    at = np.searchsorted(bounds, values, side="right") - 1            # value in [bounds[at], bounds[at + 1])
    n = len(bounds) - 1
    inside = np.concatenate([[0], np.cumsum(np.bincount(at[member], minlength=n))])   # members below bounds[k]
    outside = np.concatenate([[0], np.cumsum(np.bincount(at[~member], minlength=n))])
    tp = inside[None, :] - inside[:, None]    # [i, j]: members in [bounds[i], bounds[j])
    fp = outside[None, :] - outside[:, None]
    valid = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)   # low below high
    iou = np.full(valid.shape, -1.0)
    iou[valid] = tp[valid] / (member.sum() + fp[valid])
    i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
    return float(bounds[i]), float(bounds[j]), float(iou[i, j])


def range_edges(image: np.ndarray) -> np.ndarray:
    """The :data:`RANGE_BINS` + 1 intensity levels of :func:`best_range` for ``image``: evenly spaced between its
    0.1st and 99.9th percentiles (from at most ~1M voxels)."""
    image = np.asarray(image)
    step = max(1, int(np.ceil((image.size / 1e6) ** (1 / 3))))
    lo, hi = np.percentile(image[::step, ::step, ::step], [0.1, 99.9])
    return np.linspace(lo, hi if hi > lo else lo + 1.0, RANGE_BINS + 1)


def intensity_ranges(image: np.ndarray, sparse: np.ndarray, labelled: Sequence[int], axis: int, n_fg: int
                     ) -> list[tuple[float, float, float] | None]:
    """For each class 1 to ``n_fg``, the intensity range that best reproduces its painted voxels on the painted
    slices (:func:`best_range` over those slices' every pixel): ``(low, high, iou)``; None for a class not
    painted. The levels (:func:`range_edges`) and the painted slices' intensities are read once for all."""
    lab = np.unique(np.asarray(labelled, dtype=np.int64))
    painted = np.take(np.asarray(sparse), lab, axis=axis)
    values = np.take(np.asarray(image), lab, axis=axis)
    edges = range_edges(image)
    return [best_range(values, painted == c, edges) if (painted == c).any() else None for c in range(1, n_fg + 1)]


def painted_pieces(painted: np.ndarray, c: int, axis: int) -> float:
    """The mean number of separate pieces (2D 4-connected parts) of class ``c`` on the painted slices of
    ``painted`` (the painted slices stacked along ``axis``) that hold it; 0 where none does."""
    counts = [ndimage.label(p)[1] for p in np.moveaxis(painted == c, axis, 0) if p.any()]
    return float(np.mean(counts)) if counts else 0.0


def in_many_pieces(painted: np.ndarray, c: int, axis: int, many_parts: float) -> bool:
    """Whether class ``c`` is painted in ``many_parts`` or more pieces a painted slice on average
    (:func:`painted_pieces`); never with ``many_parts`` 0."""
    return many_parts > 0 and painted_pieces(painted, c, axis) >= many_parts


def joined_parts_per_slice(parts: np.ndarray, seeds: np.ndarray, axis: int) -> float:
    """How many separate 3D ``parts`` (a labelled array, as ``scipy.ndimage.label`` gives) the ``seeds`` of a
    slice along ``axis`` lie in, on average over the slices that hold seeds (0 where none does)."""
    counts = [np.unique(p[s]).size for p, s in zip(np.moveaxis(parts, axis, 0), np.moveaxis(seeds, axis, 0))
              if s.any()]
    return float(np.mean(counts)) if counts else 0.0


def keep_connected(pred: np.ndarray, sparse: np.ndarray, labelled: Sequence[int], axis: int = 0,
                   many_parts: float = 0.0, joined_parts: float = 0.0) -> np.ndarray:
    """``pred`` with, for each class, only the 3D-connected (6-neighbour) parts that touch a painted voxel of
    that class. A class painted nowhere is kept as predicted, and so is one painted in ``many_parts`` or more
    pieces a painted slice on average (:func:`painted_pieces`; 0: none is) whose pieces lie, a painted slice on
    average, in ``joined_parts`` or more separate parts of ``pred`` (:func:`joined_parts_per_slice`; 0: not
    asked): the ribs, each piece a rib of its own, and not the spine painted sagittally, whose processes are a
    dozen pieces of a section joined in 3D into one column. Each class's parts are found within the bounding
    box of its predicted voxels (no part reaches beyond it), not over the whole volume."""
    lab = _check(sparse, labelled, axis)
    sparse = np.asarray(sparse)
    out = np.array(pred, copy=True)
    painted = np.take(sparse, lab, axis=axis)
    for c in [int(v) for v in label_values(pred) if v != 0]:
        pieces = in_many_pieces(painted, c, axis, many_parts)
        if pieces and joined_parts <= 0:
            continue
        mask = pred == c
        box = _bounding_box(mask)
        m = mask[box]
        rows = lab[(lab >= box[axis].start) & (lab < box[axis].stop)]   # painted slices inside the box
        seeds = np.zeros(m.shape, dtype=bool)
        inside, source = list(box), [slice(None)] * 3
        inside[axis], source[axis] = rows, rows - box[axis].start
        seeds[tuple(source)] = sparse[tuple(inside)] == c
        seeds &= m
        if not seeds.any():
            if (painted == c).any() and not pieces:
                out[mask] = 0
            continue
        comp, _ = ndimage.label(m)
        if pieces and joined_parts_per_slice(comp, seeds, axis) >= joined_parts:
            continue
        keep = np.unique(comp[seeds])
        out[box][~np.isin(comp, keep) & m] = 0
    return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (a slice per axis) holding every True voxel of a non-empty 3D ``mask``."""
    box = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)
