"""Overlap metrics (foreground IoU and Dice per class) and whole-volume evaluation.

The paper reports foreground IoU; the authors' public code logged a Dice averaged over background and
foreground under that name. Here IoU and Dice are always of the foreground classes.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .calibration import CalibrationReport, _to_torch


class OverlapCounter:
    """True positives, false positives and false negatives per foreground class, accumulated slice by slice."""

    def __init__(self, classes: Iterable[int]):
        self.classes = [int(c) for c in classes]
        self.tp = {c: 0 for c in self.classes}
        self.fp = {c: 0 for c in self.classes}
        self.fn = {c: 0 for c in self.classes}

    def update(self, pred, truth) -> None:
        p, t = _to_torch(pred).long(), _to_torch(truth).long().to(_to_torch(pred).device)
        for c in self.classes:
            pc, tc = p == c, t == c
            self.tp[c] += int((pc & tc).sum())
            self.fp[c] += int((pc & ~tc).sum())
            self.fn[c] += int((~pc & tc).sum())

    def per_class(self) -> dict[int, dict[str, Any]]:
        out = {}
        for c in self.classes:
            tp, fp, fn = self.tp[c], self.fp[c], self.fn[c]
            empty = tp + fp + fn == 0
            out[c] = {"iou": None if empty else tp / (tp + fp + fn),
                      "dice": None if empty else 2 * tp / (2 * tp + fp + fn),
                      "pred_voxels": tp + fp, "true_voxels": tp + fn}
        return out

    def to_dict(self) -> dict[str, Any]:
        per = self.per_class()
        ious = [v["iou"] for v in per.values() if v["iou"] is not None]
        dices = [v["dice"] for v in per.values() if v["dice"] is not None]
        return {"classes": {str(c): v for c, v in per.items()},
                "iou": float(np.mean(ious)) if ious else None,
                "dice": float(np.mean(dices)) if dices else None}


def overlap(pred, truth, classes: Iterable[int] | None = None) -> dict[str, Any]:
    """Per-class foreground IoU / Dice (None where both are empty) and their means."""
    if classes is None:
        classes = sorted(set(np.unique(np.asarray(truth)).tolist()) | set(np.unique(np.asarray(pred)).tolist()) - {0})
    counter = OverlapCounter(classes)
    counter.update(pred, truth)
    return counter.to_dict()


def _slices_first(array: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(array, axis, 0)


def _evaluate(pred, truth, slices, axis, n_bins, band_radius, classes, calib_update) -> dict[str, Any]:
    pred_v, truth_v = _slices_first(np.asarray(pred), axis), _slices_first(np.asarray(truth), axis)
    n = pred_v.shape[0]
    chosen = list(range(n)) if slices is None else [int(s) for s in slices]
    bad = [s for s in chosen if not 0 <= s < n]
    if bad:
        from .errors import UserError

        raise UserError(f"slices {bad} are outside the volume (0 to {n - 1} along this axis)")
    if classes is None:
        classes = sorted((set(np.unique(truth_v).tolist()) | set(np.unique(pred_v).tolist())) - {0})
    counter = OverlapCounter(classes)
    report = CalibrationReport(n_bins, band_radius) if calib_update else None
    for start in range(0, len(chosen), 16):
        idx = chosen[start:start + 16]
        p, t = pred_v[idx], truth_v[idx]
        counter.update(p, t)
        if report is not None:
            calib_update(report, idx, p, t)
    out = {"slices": "all" if slices is None else chosen, **counter.to_dict()}
    if report is not None:
        out["calibration"] = report.to_dict()
    return out


def evaluate_arrays(pred, truth, probs=None, binary: bool = True, classes: Sequence[int] | None = None,
                    slices: Sequence[int] | None = None, axis: int = 0, n_bins: int = 15,
                    band_radius: int = 3) -> dict[str, Any]:
    """Overlap of ``pred`` against ``truth`` (label maps, same shape) on the chosen slices along ``axis``,
    and calibration when ``probs`` is given (foreground ``[K, J, I]`` if binary, else ``[C, K, J, I]``)."""
    update = None
    if probs is not None:
        probs = np.asarray(probs)
        probs_v = _slices_first(probs, axis) if binary else np.moveaxis(probs, axis + 1, 0)

        def update(report, idx, p, t):
            report.update(probs_v[idx], t, binary)
    return _evaluate(pred, truth, slices, axis, n_bins, band_radius, classes, update)


def evaluate_confidence(pred, truth, confidence, classes: Sequence[int] | None = None,
                        slices: Sequence[int] | None = None, axis: int = 0, n_bins: int = 15,
                        band_radius: int = 3) -> dict[str, Any]:
    """As :func:`evaluate_arrays`, from a saved confidence volume (probability of the predicted class)."""
    conf_v = _slices_first(np.asarray(confidence, dtype=np.float32), axis)

    def update(report, idx, p, t):
        report.update_confidence(p, t, conf_v[idx])
    return _evaluate(pred, truth, slices, axis, n_bins, band_radius, classes, update)


def mann_whitney_u(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided Mann-Whitney U test: ``(U of a, p)``. scipy's exact/asymptotic test when scipy is
    installed, else the normal approximation with tie and continuity correction."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    try:
        from scipy.stats import mannwhitneyu

        res = mannwhitneyu(a, b, alternative="two-sided")
        return float(res.statistic), float(res.pvalue)
    except ImportError:
        return _mann_whitney_normal(a, b)


def _mann_whitney_normal(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    n1, n2 = len(a), len(b)
    both = np.concatenate([a, b])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    i = 0
    while i < len(both):
        j = i
        while j + 1 < len(both) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    _, counts = np.unique(both, return_counts=True)
    n = n1 + n2
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - (counts ** 3 - counts).sum() / (n * (n - 1))))
    if sigma == 0:
        return float(u), 1.0
    z = (abs(u - n1 * n2 / 2) - 0.5) / sigma
    return float(u), float(min(1.0, math.erfc(max(z, 0) / math.sqrt(2))))
