"""Which slice to label next: the rankings of ``mismatch segment --report`` (and ``mismatch fill --report``),
from per-slice scores gathered during a segmentation. Imports nothing heavy (no torch), so that ``mismatch
fill`` ranks without loading the networks' library."""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

import numpy as np

from .prior import END_INTENSITY_MIN


#: how :func:`rank_uncertain_slices` can order the slices (``mismatch segment --ranking``):
#:
#: - ``disagreement``: the mean disagreement of the two decoders (the uncertain fraction for a one-decoder
#:   network);
#: - ``disagreement-distance``: the same, weighted by the slice's distance to the nearest labelled slice
#:   (:func:`distance_weight`): a slice next to a painted one adds little that the painted one does not say;
#: - ``expected-error``: the expected fraction of wrong voxels under the prediction's own confidence (the mean of
#:   1 - confidence: the confidence mass missing, which lies along the predicted boundaries);
#: - ``expected-error-distance``: the same, weighted by the distance;
#: - ``gap``: coverage first: among the slices where the structure is predicted (a cross-section at least
#:   :data:`GAP_EXTENT_FRACTION` of the largest), the middle of the widest gap between labelled slices, or
#:   where the stretch beyond the outermost labelled slice is wider, two thirds of the way to its end
#:   (:func:`_coverage`), the decoders' disagreement breaking ties; every slice when none is predicted.
#:   ``mismatch simulate`` found evenly spaced slices and the largest gap ahead of the disagreement
#:   (docs/loop.md); this is the largest gap as the engine can see it, from the prediction instead of the
#:   true extent.
RANKINGS = ("disagreement", "disagreement-distance", "expected-error", "expected-error-distance", "gap")
#: ``gap``: a slice counts as holding the structure when its predicted foreground is at least this fraction of
#: the largest slice's (the extent over which the benchmark draws labelled slices uses the same share)
GAP_EXTENT_FRACTION = 0.1
#: the ranking ``mismatch segment`` writes unless told otherwise: ``gap``, what ``mismatch simulate`` found best of
#: the engine's rankings (docs/loop.md: on grey matter ahead of the disagreement on 3 of 3 draws, +3.8 points of
#: mean IoU over the rounds; level on a brain tumour; still behind evenly spaced slices everywhere)
DEFAULT_RANKING = "gap"


def distance_weight(distance: float | None, n_slices: int, n_labelled: int) -> float:
    """``1 - exp(-d / r)`` for a slice ``d`` slices from the nearest labelled one, with ``r`` half the gap between
    evenly spaced labelled slices (``n_slices / (2 (n_labelled + 1))``): 0 on a labelled slice, 0.63 at ``r``,
    near 1 from twice that. 1 when no slice is labelled."""
    if distance is None or n_labelled <= 0:
        return 1.0
    r = max(1.0, n_slices / (2.0 * (n_labelled + 1)))
    return float(1.0 - math.exp(-float(distance) / r))


def _coverage(s: int, distance: int | None, labelled: np.ndarray, extent: set[int] | None) -> float:
    """The ``gap`` ranking's score of slice ``s``: between labelled slices its distance to the nearest one (the
    middle of the widest gap first); beyond the outermost labelled slice, where the structure ends ``D`` slices
    further, ``D`` at two thirds of the way to the end and less either side. Labelled there, the new slice is
    a third of its gap from the end and two thirds from the labelled one: the spacing the README advises
    (evenly spaced slices with the outermost about half a gap inside the ends), where the farthest slice
    would be the end itself, a cross-section at a tenth of the largest that tells the prior little."""
    if distance is None or extent is None or labelled[0] <= s <= labelled[-1]:
        return float(distance or 0)
    l, end = (labelled[0], min(extent)) if s < labelled[0] else (labelled[-1], max(extent))
    reach = abs(int(l) - int(end))
    return float(reach) - abs(abs(s - int(l)) - 2.0 * reach / 3.0)


#: ``gap``: beyond where the prediction ends, a slice still counts as holding the structure while the network alone
#: (before the painted slices' prior) predicts, in the painted structure's box, a cross-section within this factor
#: of its own on the outermost painted slice (:func:`_network_continues`)
GAP_CONTINUE_FACTOR = 2.0
#: ... and at least this share of it lies where the outermost painted slice's structure was painted: the same
#: structure going on, not something else of about its size (grey matter painted at one end: 0.42 to 0.86 over
#: the ten slices past the painted range; a brain tumour's neighbourhood past its end: 0.0 to 0.35)
GAP_CONTINUE_OVERLAP = 0.3


def network_continues(reference: float, fraction: float, on_painted: float, intensity: float | None = None,
                      floor: float = 0.0) -> bool:
    """Whether the network alone sees, on a slice past the painted range, the structure of the outermost
    painted slice go on: its foreground in the painted structure's box (``fraction``) within
    :data:`GAP_CONTINUE_FACTOR` of its own on that painted slice (``reference``), at least
    :data:`GAP_CONTINUE_OVERLAP` of it on that slice's painted structure (``on_painted``), and, when
    ``intensity`` (:meth:`~mismatch.prior.SlicePrior.intensity_support`) is given, with the painted
    structure's intensities (at least :data:`~mismatch.prior.END_INTENSITY_MIN` and ``floor``: the inference's
    share of that support on the painted slice itself, ``PriorSettings.end_intensity_share``)."""
    return reference / GAP_CONTINUE_FACTOR <= fraction <= reference * GAP_CONTINUE_FACTOR \
        and on_painted >= GAP_CONTINUE_OVERLAP and (intensity is None or intensity >= max(END_INTENSITY_MIN, floor))


def continuing_stretch(outward: Iterable[tuple]) -> int:
    """How many slices, read outwards from an outermost painted slice, the network alone sees its structure go
    on: ``outward`` yields ``(reference, fraction, on_painted[, intensity[, floor]])`` per slice
    (:func:`network_continues`'s arguments; a reference of 0 or None: nothing on the painted slice, no
    stretch), and is read no further than the first slice where it does not."""
    stretch = 0
    for reference, *rest in outward:
        if not reference or not network_continues(reference, *rest):
            break
        stretch += 1
    return stretch


def _network_continues(scores: list[dict], extent: set[int], labelled: Sequence[int]) -> set[int]:
    """The slices beyond each end of the predicted ``extent`` where the network alone sees the structure go on:
    from the end outwards, while the network's foreground in the painted structure's box
    (``network_box_fraction``) is within :data:`GAP_CONTINUE_FACTOR` of its own on the outermost painted slice
    of that side and at least :data:`GAP_CONTINUE_OVERLAP` of it lies on that slice's painted structure
    (``network_on_painted``).

    The prior ends the structure about half a gap beyond the outermost painted slices (the spacing of slices
    painted as advised); painted slices clustered at one part of a long structure make that gap short, and
    the prediction then stops far before the structure does (grey matter painted on slices 58, 63 and 68 of
    a brain reaching from 6 to 75: predicted down to 50 only, where the network alone still saw it at 1.1 to
    1.2 times its cross-section on slice 58, 42 to 86 % of it on slice 58's painted grey matter). Past a
    lesion's end the network finds little in that box, or something else of about its size beside it. The
    ``gap`` ranking then looks there too, so that the next slice painted tells the prior where the structure
    really ends. A stretch no longer than the mean gap between painted slices is left out: the painting's own
    spacing allows for it."""
    if len(labelled) < 2:   # one painted slice: the prior has no end rule (it needs a gap)
        return set()
    by_slice = {int(r["slice"]): r for r in scores}
    gap = (max(labelled) - min(labelled)) / (len(labelled) - 1)
    out: set[int] = set()
    for side, painted, end in ((-1, min(labelled), min(extent)), (1, max(labelled), max(extent))):
        ref = by_slice.get(int(painted), {}).get("network_box_fraction")
        slices = itertools.takewhile(lambda s: s in by_slice, itertools.count(end + side, side))
        stretch = continuing_stretch((ref, by_slice[s].get("network_box_fraction", 0.0),
                                      by_slice[s].get("network_on_painted", 0.0),
                                      by_slice[s].get("network_intensity")) for s in slices)
        if stretch > gap:
            out |= {end + side * k for k in range(1, stretch + 1)}
    return out


def rank_uncertain_slices(scores: list[dict], exclude: Sequence[int] = (), two_decoders: bool = True,
                          ranking: str = DEFAULT_RANKING) -> list[dict]:
    """Slices sorted most worth labelling first by ``ranking`` (:data:`RANKINGS`), leaving out ``exclude`` (the
    labelled slices). Each row is the slice's scores plus ``distance`` (slices to the nearest excluded slice,
    None when none is) and ``score`` (what it was ranked by)."""
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {', '.join(RANKINGS)}")
    skip = sorted(set(int(s) for s in exclude))
    base = "expected_error" if ranking.startswith("expected-error") else \
        ("disagreement" if two_decoders else "uncertain_fraction")
    weighted = ranking.endswith("-distance")
    n_slices = len(scores)
    labelled = np.asarray(skip, dtype=np.int64)
    extent, beyond = None, set()
    if ranking == "gap":
        largest = max((float(r.get("foreground_fraction", 0.0)) for r in scores), default=0.0)
        if largest > 0:
            extent = {int(r["slice"]) for r in scores
                      if float(r.get("foreground_fraction", 0.0)) >= GAP_EXTENT_FRACTION * largest}
            if not extent - set(skip):
                extent = None
        if extent is not None and skip:
            beyond = _network_continues(scores, extent, skip)
            extent |= beyond
    rows = []
    for row in scores:
        if row["slice"] in skip or base not in row or not math.isfinite(row[base]):
            continue
        if extent is not None and int(row["slice"]) not in extent:
            continue
        distance = int(np.min(np.abs(labelled - int(row["slice"])))) if len(labelled) else None
        if ranking == "gap":   # the coverage in slices first; the disagreement (below 1) orders equal ones
            score = _coverage(int(row["slice"]), distance, labelled, extent) + min(float(row[base]), 0.999)
        else:
            score = float(row[base]) * (distance_weight(distance, n_slices, len(labelled)) if weighted else 1.0)
        rows.append({**row, "distance": distance, "score": score,
                     **({"beyond_prediction": True} if int(row["slice"]) in beyond else {})})
    return sorted(rows, key=lambda r: -r["score"])
