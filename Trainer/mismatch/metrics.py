"""Overlap metrics (per-class foreground IoU and Dice), whole-volume evaluation, Mann-Whitney U test.

The paper reports the foreground IoU (Table 1, "Intersection over Union") and compares methods with a
Mann-Whitney U test (Table 1's p values); its calibration analysis (Sec. 4, Figs. 4-5) is in
:mod:`mismatch.calibration`. The authors' public code logged a Dice averaged over background and
foreground under the name IoU; here IoU and Dice are always of the foreground classes:

    IoU_c  = TP_c / (TP_c + FP_c + FN_c)          Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c)

per class value ``c != 0``, None when class ``c`` is absent from both prediction and truth; means are over
the classes that have a value. Everything is accumulated slice by slice (:class:`OverlapCounter`,
:class:`~mismatch.calibration.CalibrationReport`), so volumes of 10^8 voxels need no more memory than a
few slices.

Array conventions: label maps are integer ``[K, J, I]`` (0 = background); ``axis`` is the numpy axis the
slices are taken along (0 = k, 1 = j, 2 = i).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from .calibration import BAND_RADIUS, CalibrationReport, _to_torch

#: voxels compared at once by :meth:`OverlapCounter.update`
_CHUNK = 1 << 22
#: slices processed at once by :func:`evaluate_arrays` / :func:`evaluate_confidence`
_SLICE_BATCH = 16


class OverlapCounter:
    """True positives, false positives and false negatives per foreground class, accumulated over updates.

    ``classes``: the foreground label values to count (0 is ignored if listed).
    """

    def __init__(self, classes: Iterable[int]):
        self.classes = [int(c) for c in classes if int(c) != 0]
        self.tp = {c: 0 for c in self.classes}
        self.fp = {c: 0 for c in self.classes}
        self.fn = {c: 0 for c in self.classes}

    def update(self, pred, truth) -> "OverlapCounter":
        """Add a prediction and its truth (label maps of the same shape, numpy or torch); returns ``self``."""
        p, t = _to_torch(pred), _to_torch(truth)
        if p.shape != t.shape:
            raise ValueError(f"prediction {tuple(p.shape)} and truth {tuple(t.shape)} differ in shape")
        p, t = p.reshape(-1), t.reshape(-1).to(p.device)
        for start in range(0, p.numel(), _CHUNK):
            pc_all, tc_all = p[start:start + _CHUNK].long(), t[start:start + _CHUNK].long()
            for c in self.classes:
                pc, tc = pc_all == c, tc_all == c
                tp = int((pc & tc).sum())
                self.tp[c] += tp
                self.fp[c] += int(pc.sum()) - tp
                self.fn[c] += int(tc.sum()) - tp
        return self

    def merge(self, other: "OverlapCounter") -> "OverlapCounter":
        """Add ``other``'s counts into this counter (in place; classes are united); returns ``self``."""
        for c in other.classes:
            if c not in self.tp:
                self.classes.append(c)
                self.tp[c] = self.fp[c] = self.fn[c] = 0
            self.tp[c] += other.tp[c]
            self.fp[c] += other.fp[c]
            self.fn[c] += other.fn[c]
        return self

    def per_class(self) -> dict[int, dict[str, Any]]:
        """``{class_value: {"iou": float|None, "dice": float|None, "pred_voxels": int, "true_voxels": int,
        "tp": int, "fp": int, "fn": int}}`` (None when the class is in neither prediction nor truth)."""
        out = {}
        for c in self.classes:
            tp, fp, fn = self.tp[c], self.fp[c], self.fn[c]
            empty = tp + fp + fn == 0
            out[c] = {"iou": None if empty else tp / (tp + fp + fn),
                      "dice": None if empty else 2 * tp / (2 * tp + fp + fn),
                      "pred_voxels": tp + fp, "true_voxels": tp + fn, "tp": tp, "fp": fp, "fn": fn}
        return out

    def mean(self) -> dict[str, float | None]:
        """``{"iou": mean over classes with a value or None, "dice": likewise}``."""
        return _mean_of(self.per_class())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"classes": {"<value>": per-class dict}, "iou": mean IoU|None, "dice": mean Dice|None}``."""
        per = self.per_class()
        return {"classes": {str(c): v for c, v in per.items()}, **_mean_of(per)}


def _mean_of(per: dict[int, dict[str, Any]]) -> dict[str, float | None]:
    ious = [v["iou"] for v in per.values() if v["iou"] is not None]
    dices = [v["dice"] for v in per.values() if v["dice"] is not None]
    return {"iou": float(np.mean(ious)) if ious else None, "dice": float(np.mean(dices)) if dices else None}


def _present_classes(*label_maps) -> list[int]:
    values: set[int] = set()
    for a in label_maps:
        a = np.asarray(a)
        if a.dtype in (np.uint8, np.bool_):  # the usual label map: a histogram is much faster than unique
            values |= set(np.flatnonzero(np.bincount(a.reshape(-1).view(np.uint8), minlength=2)).tolist())
        else:
            values |= set(np.unique(a).tolist())
    return sorted(int(v) for v in values - {0})


def overlap(pred, truth, classes: Iterable[int] | None = None) -> dict[Any, dict[str, Any]]:
    """Per-class foreground IoU and Dice of two label maps of the same shape (numpy or torch).

    ``classes``: foreground label values (default: every non-zero value in either map). Returns
    ``{class_value (int): {"iou", "dice", "pred_voxels", "true_voxels", "tp", "fp", "fn"}, ...,
    "mean": {"iou", "dice"}}``; ``iou``/``dice`` None where the class is in neither map, the mean over the
    classes with a value (None if there are none).
    """
    if classes is None:
        classes = _present_classes(_to_torch(pred).cpu().numpy(), _to_torch(truth).cpu().numpy())
    counter = OverlapCounter(classes).update(pred, truth)
    per: dict[Any, dict[str, Any]] = dict(counter.per_class())
    per["mean"] = counter.mean()
    return per


def _slice_selection(n: int, slices: Sequence[int] | None) -> list[int]:
    if slices is None:
        return list(range(n))
    chosen = sorted({int(s) for s in slices})
    bad = [s for s in chosen if not 0 <= s < n]
    if bad:
        from .errors import UserError

        raise UserError(f"slices {bad} are outside the volume (0 to {n - 1} along this axis)")
    if not chosen:
        from .errors import UserError

        raise UserError("no slices to evaluate: give at least one slice index")
    return chosen


def _evaluate(pred, truth, slices, axis, n_bins, band_radius, classes, calib_update) -> dict[str, Any]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    if pred.ndim != 3:
        raise ValueError(f"label maps must be 3D [K, J, I], got shape {pred.shape}")
    pred_v, truth_v = np.moveaxis(pred, axis, 0), np.moveaxis(truth, axis, 0)
    chosen = _slice_selection(pred_v.shape[0], slices)
    counter = OverlapCounter(_present_classes(pred_v[chosen], truth_v[chosen]) if classes is None else classes)
    report = CalibrationReport(n_bins, band_radius) if calib_update is not None else None
    for start in range(0, len(chosen), _SLICE_BATCH):
        idx = chosen[start:start + _SLICE_BATCH]
        p, t = pred_v[idx], truth_v[idx]
        counter.update(p, t)
        if report is not None:
            calib_update(report, idx, p, t)
    out: dict[str, Any] = {"slices": "all" if slices is None else chosen, "axis": int(axis), **counter.to_dict()}
    if report is not None:
        out["calibration"] = report.to_dict()
    return out


def evaluate_arrays(pred, truth, classes: Sequence[int] | None = None, slices: Sequence[int] | None = None,
                    axis: int = 0) -> dict[str, Any]:
    """Overlap of a prediction with the truth on the chosen slices.

    ``pred``, ``truth``: label maps ``[K, J, I]`` (numpy). ``slices``: indices along ``axis`` (numpy axis of
    the label map) to evaluate, default all; duplicates are dropped, an index outside the volume is a
    :class:`~mismatch.errors.UserError`. ``classes``: foreground values (default: those present in the chosen
    slices of either map). Work is done ``16`` slices at a time. Returns::

        {"slices": [sorted indices] | "all", "axis": int,
         "classes": {"<value>": {"iou", "dice", "pred_voxels", "true_voxels", "tp", "fp", "fn"}},
         "iou": mean foreground IoU | None, "dice": mean foreground Dice | None}

    :func:`evaluate_confidence` adds the calibration of a confidence volume.
    """
    return _evaluate(pred, truth, slices, axis, 15, BAND_RADIUS, classes, None)


def evaluate_confidence(pred, truth, confidence, classes: Sequence[int] | None = None,
                        slices: Sequence[int] | None = None, axis: int = 0, n_bins: int = 15,
                        band_radius: int = BAND_RADIUS) -> dict[str, Any]:
    """:func:`evaluate_arrays`, and the calibration of a saved confidence volume ``[K, J, I]`` (probability of
    the predicted class, as ``mismatch segment --confidence`` writes it): correct = ``pred == truth``,
    confidence = ``confidence``. This is what ``mismatch evaluate --confidence`` uses. The return dict also
    has ``"calibration": {"all": histogram, "band": histogram, "band_radius": int, "confidence":
    "top-label"}``, with histogram = :meth:`~mismatch.calibration.CalibrationHistogram.to_dict`."""
    confidence = np.asarray(confidence)
    if confidence.shape != np.shape(pred):
        raise ValueError(f"confidence {confidence.shape} and prediction {np.shape(pred)} differ in shape")
    conf_v = np.moveaxis(confidence, axis, 0)

    def update(report: CalibrationReport, idx, p, t) -> None:
        report.update_confidence(p, t, conf_v[idx])
    return _evaluate(pred, truth, slices, axis, n_bins, band_radius, classes, update)


def mann_whitney_u(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided Mann-Whitney U test (paper Table 1's p values): ``(U, p)``.

    ``U`` is the statistic of ``a``: the number of pairs ``(x in a, y in b)`` with ``x > y``, ties counted
    1/2; ``scipy.stats.mannwhitneyu(a, b, alternative="two-sided")`` (exact p for small samples without ties,
    else the normal approximation). Empty samples raise ``ValueError``.
    """
    from scipy.stats import mannwhitneyu

    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if len(a) == 0 or len(b) == 0:
        raise ValueError("mann_whitney_u needs two non-empty samples")
    res = mannwhitneyu(a, b, alternative="two-sided")
    return float(res.statistic), float(res.pvalue)
