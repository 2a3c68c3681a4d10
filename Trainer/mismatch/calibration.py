"""Calibration: expected and maximum calibration error, reliability bins (paper Sec. 3.4, Figs. 4-5).

Conventions (``docs`` and README): *top-label* confidence, i.e. the probability of the predicted class
(binary: ``max(p, 1 - p)`` with prediction ``p >= 0.5``); a voxel is correct when its predicted class is
the true class; 15 equal-width bins on [0, 1] (Guo et al. 2017), confidence 1.0 in the last bin.
``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|``, ``MCE = max_m |acc(B_m) - conf(B_m)|`` over non-empty
bins. Everything is accumulated as per-bin sums, never as a list of voxels, so volumes of 10^8 voxels are
evaluated slice by slice in constant memory.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

#: in-plane radius (voxels) of the foreground band used for the foreground-focused ECE
BAND_RADIUS = 3


def _to_torch(x) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))


def top_label(probs, binary: bool):
    """``(prediction, confidence)`` from foreground probabilities (binary, any shape) or class
    probabilities with the class axis first (``[K, ...]``). numpy in, numpy out; torch in, torch out."""
    is_np = not torch.is_tensor(probs)
    p = _to_torch(probs).float()
    if binary:
        pred, conf = (p >= 0.5).to(torch.uint8), torch.maximum(p, 1 - p)
    else:
        conf, pred = p.max(dim=0)
    return (pred.numpy(), conf.numpy()) if is_np else (pred, conf)


class CalibrationHistogram:
    """Per-bin voxel count, sum of confidence and number correct; mergeable with ``+``."""

    def __init__(self, n_bins: int = 15):
        self.n_bins = int(n_bins)
        self.count = np.zeros(self.n_bins, dtype=np.int64)
        self.conf_sum = np.zeros(self.n_bins, dtype=np.float64)
        self.correct = np.zeros(self.n_bins, dtype=np.int64)

    def update(self, confidence, correct, mask=None) -> "CalibrationHistogram":
        """Add voxels: ``confidence`` in [0, 1] and boolean ``correct`` (same shape), numpy or torch;
        ``mask`` keeps only the voxels where it is true."""
        conf = _to_torch(confidence).reshape(-1).double()
        ok = _to_torch(correct).reshape(-1)
        if mask is not None:
            keep = _to_torch(mask).reshape(-1).bool()
            conf, ok = conf[keep], ok[keep]
        if conf.numel() == 0:
            return self
        idx = torch.clamp((conf * self.n_bins).long(), 0, self.n_bins - 1)
        self.count += torch.bincount(idx, minlength=self.n_bins).cpu().numpy()
        self.conf_sum += torch.bincount(idx, weights=conf, minlength=self.n_bins).cpu().numpy()
        self.correct += torch.bincount(idx, weights=ok.double(), minlength=self.n_bins).cpu().numpy().round().astype(np.int64)
        return self

    def __add__(self, other: "CalibrationHistogram") -> "CalibrationHistogram":
        if other.n_bins != self.n_bins:
            raise ValueError("cannot merge histograms with different bin counts")
        out = CalibrationHistogram(self.n_bins)
        out.count = self.count + other.count
        out.conf_sum = self.conf_sum + other.conf_sum
        out.correct = self.correct + other.correct
        return out

    merge = __add__

    @property
    def total(self) -> int:
        return int(self.count.sum())

    def _gaps(self) -> np.ndarray:
        nz = self.count > 0
        return np.abs(self.correct[nz] / self.count[nz] - self.conf_sum[nz] / self.count[nz])

    def ece(self) -> float:
        if self.total == 0:
            return math.nan
        nz = self.count > 0
        return float((self.count[nz] / self.total * self._gaps()).sum())

    def mce(self) -> float:
        return float(self._gaps().max()) if self.total else math.nan

    def bins(self) -> list[dict[str, Any]]:
        out = []
        for m in range(self.n_bins):
            n = int(self.count[m])
            out.append({"lower": m / self.n_bins, "upper": (m + 1) / self.n_bins, "count": n,
                        "confidence": float(self.conf_sum[m] / n) if n else None,
                        "accuracy": float(self.correct[m] / n) if n else None})
        return out

    def to_dict(self) -> dict[str, Any]:
        ece, mce = self.ece(), self.mce()
        return {"n_bins": self.n_bins, "count": self.total, "ece": None if math.isnan(ece) else ece,
                "mce": None if math.isnan(mce) else mce, "bins": self.bins()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CalibrationHistogram":
        h = cls(d["n_bins"])
        for m, b in enumerate(d["bins"]):
            h.count[m] = b["count"]
            if b["count"]:
                h.conf_sum[m] = b["confidence"] * b["count"]
                h.correct[m] = round(b["accuracy"] * b["count"])
        return h


def foreground_band(pred_fg, truth_fg, radius: int = BAND_RADIUS) -> torch.Tensor:
    """The foreground band: the union of predicted and true foreground, dilated in-plane by ``radius``
    voxels with a square (Chebyshev) structuring element, slice by slice.

    Inputs are boolean ``[S, H, W]`` (slices first) or ``[H, W]``; the band never reaches into the
    neighbouring slices. Background voxels far from the structure have p close to 0 and would dominate an
    all-voxel ECE; the band's ECE measures calibration where it matters, at the structure's boundary.
    """
    union = (_to_torch(pred_fg).bool() | _to_torch(truth_fg).bool())
    squeeze = union.ndim == 2
    x = union.reshape(-1, 1, *union.shape[-2:]).float()
    if radius > 0:
        x = F.max_pool2d(x, kernel_size=2 * radius + 1, stride=1, padding=radius)
    band = x[:, 0] > 0
    return band[0] if squeeze else band.reshape(union.shape)


class CalibrationReport:
    """Two histograms updated together: every voxel (``all``) and the foreground band (``band``)."""

    def __init__(self, n_bins: int = 15, band_radius: int = BAND_RADIUS):
        self.all = CalibrationHistogram(n_bins)
        self.band = CalibrationHistogram(n_bins)
        self.band_radius = band_radius

    def update(self, probs, truth, binary: bool) -> None:
        """``probs``: foreground probability ``[S, H, W]`` (binary) or ``[S, K, H, W]`` (multi-class,
        slices first); ``truth``: class indices ``[S, H, W]``."""
        p = _to_torch(probs).float()
        t = _to_torch(truth).long().to(p.device)
        if binary:
            pred, conf = top_label(p, True)
        else:
            conf, pred = p.max(dim=1)
        correct = pred.long() == t
        self.all.update(conf, correct)
        band = foreground_band(pred > 0, t > 0, self.band_radius)
        self.band.update(conf, correct, band)

    def update_confidence(self, pred, truth, confidence) -> None:
        """From a saved prediction and its confidence (``[S, H, W]`` each)."""
        pred_t, t = _to_torch(pred).long(), _to_torch(truth).long()
        conf = _to_torch(confidence).float()
        correct = pred_t == t
        self.all.update(conf, correct)
        self.band.update(conf, correct, foreground_band(pred_t > 0, t > 0, self.band_radius))

    def to_dict(self) -> dict[str, Any]:
        return {"all": self.all.to_dict(), "band": self.band.to_dict(), "band_radius": self.band_radius,
                "confidence": "top-label"}
