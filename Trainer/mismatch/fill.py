"""``mismatch fill``: what the painted slices say on their own, in seconds, before any network is trained.

The product's prior (:class:`mismatch.prior.SlicePrior` at the default settings: the painted shapes
interpolated between the painted slices, the image's edges grown from them, the painted intensities, the
structure shrinking past the outermost painted slice) labels every unpainted slice by itself; the painted
slices stay as painted and only the parts connected to a painted voxel are kept, as ``segment`` does.
docs/benchmarks.md ("Before any training") measures it: above the free tools on most data sets, level with
the trained default on large smooth structures painted evenly, 6 to 18 points below it on tumours and thin
bone. Imports no torch (the report ranks with the torch-free :mod:`mismatch.ranking`).
"""

from __future__ import annotations

import json
import time
from typing import Sequence

import numpy as np

from .classes import choose_classes, class_values_lut, remap_labels
from .data import Normalisation, auto_window, axis_index, choose_axis, painted_slices, window_note
from .events import Reporter
from .prior import PriorSettings, SlicePrior, intensity_range_notes
from .ranking import rank_uncertain_slices


def fill_files(images: Sequence[str], labels_path: str, out: str, *, axis: str = "auto",
               hu_window="auto", explicit_slices: Sequence[int] | None = None,
               empty_slices: Sequence[int] | None = None, classes_path: str | None = None,
               report: str | None = None, reporter: Reporter | None = None) -> dict:
    """Fill the unpainted slices of IMAGE(s) from the painted label map ``labels_path`` and write the label map
    ``out`` on the image's grid (a ``*.seg.nrrd`` with named segments). ``axis`` and ``hu_window`` as for
    ``mismatch train`` (``"auto"``: the axis the labels were painted along; a CT in Hounsfield units clipped to
    the CT window); ``explicit_slices``: slices that count as labelled (painted empty) though all background.
    ``report``: a JSON file with the slices worth painting next, as ``segment --report`` ranks them by default
    (``gap``: the middle of the widest unpainted stretch of the filled structure, or two thirds of the way to its
    end beyond the outermost painted slice), from the filled label map and, past its ends, the painted
    intensities (:func:`next_slices`). Returns ``{"seconds", "slices", "labelled_slices"}``, and ``"notes"`` where an
    intensity range decides a class (:func:`mismatch.prior.intensity_range_notes`, also logged)."""
    from .io import (check_extension, check_outputs_not_inputs, check_writable, read_image, read_labels,
                     write_text_atomic, write_volume)

    reporter = reporter or Reporter(progress_bar=False)
    check_outputs_not_inputs([out] + ([report] if report else []), list(images) + [labels_path])
    check_writable(out, "--out")
    check_extension(out)
    if report:
        check_writable(report, "--report")
    t0 = time.monotonic()
    image, geometry = read_image(images)
    labels = read_labels(labels_path, geometry, log=reporter.log)
    classes = choose_classes(labels, labels_path, classes_path)
    mapped = remap_labels(labels, classes)
    axis = choose_axis(labels, axis, reporter.log)
    del labels
    labelled = painted_slices(mapped, axis, explicit_slices, labels_path, empty=empty_slices)
    window = auto_window(image) if hu_window == "auto" else hu_window
    stats: list = []
    volume = Normalisation(hu_window=tuple(window) if window else None).apply(image[:1], stats)[0]
    del image
    if hu_window == "auto" and window:
        reporter.log(window_note(window))
    reporter.log(f"filling {mapped.shape[axis_index(axis)] - len(labelled)} slice(s) along {axis} from "
                 f"{len(labelled)} painted slice(s): no network, the painted slices with the image's edges and "
                 "intensities")
    prior = SlicePrior(mapped, labelled, axis_index(axis), geometry.spacing[::-1], len(classes) + 1,
                       PriorSettings(), image=volume)
    notes = intensity_range_notes(prior, classes, *stats[0])
    for note in notes:
        reporter.log(note)
    filled = prior.label_map(mapped.shape)
    del volume, mapped
    write_volume(class_values_lut(classes)[filled], geometry, out, segments=classes)
    if report:
        write_text_atomic(report, json.dumps(next_slices(filled, axis, labelled, prior), indent=1) + "\n")
    summary = {"seconds": round(time.monotonic() - t0, 2), "slices": int(filled.shape[axis_index(axis)]),
               "labelled_slices": [int(s) for s in labelled]}
    if notes:   # the painted slices' intensity ranges that decide (intensity_range_notes), for the panel
        summary["notes"] = notes
    return summary


def next_slices(filled: np.ndarray, axis: str, labelled: Sequence[int], prior: SlicePrior | None = None) -> dict:
    """The report of a fill: the unpainted slices ranked by ``gap`` (:func:`mismatch.ranking.rank_uncertain_slices`)
    from each slice's share of filled voxels; no network, so no disagreement (0 on every slice). With the
    ``prior`` that filled them (and its painted intensities), the ranking also looks past the filled
    structure's ends where the image goes on looking like the painted structure (:func:`intensity_evidence`),
    as ``segment``'s does where the network alone sees it go on; such rows carry ``beyond_filled``."""
    a = axis_index(axis)
    fraction = np.count_nonzero(filled, axis=tuple(d for d in range(3) if d != a)) / \
        (filled.size / filled.shape[a])
    scores = [{"slice": s, "foreground_fraction": float(f), "disagreement": 0.0} for s, f in enumerate(fraction)]
    if prior is not None:
        for row, evidence in zip(scores, intensity_evidence(prior)):
            row.update(evidence)
    ranked = rank_uncertain_slices(scores, exclude=labelled, ranking="gap")
    for row in ranked:
        for key in ("network_box_fraction", "network_on_painted"):
            row.pop(key, None)
        if row.pop("beyond_prediction", False):
            row["beyond_filled"] = True
    return {"slice_axis": axis, "ranking": "gap", "filled": True, "uncertain_slices": ranked}


def intensity_evidence(prior: SlicePrior) -> list[dict]:
    """Per slice, what stands for the network alone in the ``gap`` ranking's look past the structure's end
    (``network_box_fraction``, ``network_on_painted``: :func:`mismatch.ranking.network_continues`), from the
    image instead: the share of the painted structure's in-plane box whose intensity is likelier inside a
    painted class than around it (the prior's painted-intensity log-ratios above 0), and the share of those
    voxels on the outermost painted slice's structure. Empty rows without the painted intensities."""
    n = prior.src.shape[0]
    if prior.intensity is None:
        return [{} for _ in range(n)]
    from .prior import intensity_bin

    box, bins, ratios = prior.intensity
    inplane = tuple(b for d, b in enumerate(box) if d != prior.axis)
    ends = {-1: prior.outermost(-1), 1: prior.outermost(1)}
    painted = {side: prior.labels(s)[inplane] > 0 for side, s in ends.items()}
    out = []
    for s in range(n):
        values = np.take(prior.image, s, axis=prior.axis)[inplane]
        looks = ratios[:, intensity_bin(bins, values)].max(0) > 0
        found = int(np.count_nonzero(looks))
        side = -1 if s < ends[-1] else 1
        on = int(np.count_nonzero(looks & painted[side]))
        out.append({"network_box_fraction": found / looks.size if looks.size else 0.0,
                    "network_on_painted": on / found if found else 0.0})
    return out
