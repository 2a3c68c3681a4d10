"""Calibration: expected and maximum calibration error, reliability bins (paper Sec. 4,
"MisMatch Is Better Calibrated", Figs. 4, 5 and 7).

Definitions used throughout the project (they are stated here because the paper and its public code leave
them open):

- **Top-label confidence.** The confidence of a voxel is the probability of its *predicted* class. Binary
  models give the foreground probability ``p``: prediction ``p >= 0.5``, confidence ``max(p, 1 - p)`` (so
  it is never below 0.5 and the bins under 0.5 stay empty). Multi-class models give class probabilities
  with the class axis first (``[C, ...]``, class index = label value, 0 = background): prediction
  ``argmax`` (first class on ties), confidence the maximum. A voxel is *correct* when its predicted class
  equals the true class.
- **Bins.** ``n_bins`` (default 15, as Guo et al. 2017 and torchmetrics) equal-width bins on [0, 1]:
  bin ``m`` is ``[m / n_bins, (m + 1) / n_bins)``, edges compared in float64 against the correctly
  rounded ``m / n_bins``; a confidence exactly on an inner edge goes to the bin above it; confidence
  exactly 1.0 goes to the last bin.
- **ECE** (paper Sec. 4 and Fig. 5, following Guo et al. 2017):
  ``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|``, with ``acc(B_m)`` the fraction of correct voxels
  in bin ``m`` and ``conf(B_m)`` their mean confidence. **MCE** = ``max_m |acc(B_m) - conf(B_m)|`` over
  the non-empty bins. Both are NaN (``null`` in JSON) for an empty histogram.
- **Regions.** An all-voxel ECE is dominated by the many background voxels far from the structure, which
  are predicted background with ``p ~ 0`` (confidence ~ 1, correct): it rewards any model for the easy
  background. :class:`CalibrationReport` therefore keeps two histograms, ``all`` (every evaluated voxel)
  and ``band`` (the foreground band, :func:`foreground_band`): where a model can actually be over- or
  under-confident.

Everything is accumulated as per-bin sums (count, sum of confidence, number correct) with ``bincount``,
never as a list of voxels, so a 512 x 512 x 600 volume is evaluated slice by slice or chunk by chunk in
constant memory; histograms of chunks add up exactly (counts) or to rounding (confidence sums).

Only numpy and torch are needed (no scipy, no Slicer).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

#: in-plane radius (voxels) of the foreground band used for the foreground-focused ECE
BAND_RADIUS = 3

#: voxels processed at once inside :meth:`CalibrationHistogram.update` (bounds the temporary memory)
_CHUNK = 1 << 22

#: confidences this far outside [0, 1] are rounding (e.g. float16) and are clipped; further out is an error
_RANGE_TOLERANCE = 1e-3


def _to_torch(x) -> torch.Tensor:
    """A tensor view of ``x`` (numpy array, tensor, or anything ``np.asarray`` takes). Unsigned integer
    types torch handles poorly (uint16/32/64) become int64; negative strides are made contiguous."""
    if torch.is_tensor(x):
        return x
    a = np.asarray(x)
    if a.dtype.kind == "u" and a.dtype.itemsize > 1:
        a = a.astype(np.int64)
    elif a.dtype.kind == "i" and a.dtype.byteorder not in ("=", "|"):
        a = a.astype(a.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(a)
    except ValueError:  # negative strides (e.g. a flipped view)
        return torch.from_numpy(np.ascontiguousarray(a))


def top_label(probs, binary: bool, class_axis: int = 0):
    """Top-label prediction and confidence (module docstring); inference, calibration and FixMatch's
    pseudo-labels all take it from here.

    ``probs``: foreground probability of any shape ``[...]`` (``binary=True``) or class probabilities with
    the class axis at ``class_axis`` (default first: ``[C, ...]``; ``binary=False``). Returns
    ``(pred, confidence)``, the shape of ``probs`` without the class axis: ``pred`` integer (uint8 for
    binary, int64 class indices for multi-class), ``confidence`` float32. numpy in, numpy out; torch in,
    torch out (same device).
    """
    is_np = not torch.is_tensor(probs)
    p = _to_torch(probs).float()
    if binary:
        pred, conf = (p >= 0.5).to(torch.uint8), torch.maximum(p, 1 - p)
    else:
        if p.ndim < 1 or p.shape[class_axis] < 2:
            raise ValueError(f"multi-class probabilities need a class axis ({class_axis}) with >= 2 classes, got "
                             f"{tuple(p.shape)}")
        conf, pred = p.max(dim=class_axis)
    return (pred.cpu().numpy(), conf.cpu().numpy()) if is_np else (pred, conf)


class CalibrationHistogram:
    """Per-bin voxel count, sum of confidence and number correct (see the module docstring for the bins).

    Attributes (numpy, length ``n_bins``): ``count`` int64, ``conf_sum`` float64, ``correct`` int64.
    ``h1 + h2`` gives a new histogram; ``h1.merge(h2)`` adds ``h2`` into ``h1``.
    """

    def __init__(self, n_bins: int = 15):
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be at least 1, got {n_bins}")
        self.n_bins = int(n_bins)
        self.count = np.zeros(self.n_bins, dtype=np.int64)
        self.conf_sum = np.zeros(self.n_bins, dtype=np.float64)
        self.correct = np.zeros(self.n_bins, dtype=np.int64)
        # inner edges 1/n .. (n-1)/n, each the correctly rounded float64 of m / n
        self._inner_edges = torch.tensor([m / self.n_bins for m in range(1, self.n_bins)], dtype=torch.float64)

    # -- accumulation -------------------------------------------------------------------------------------

    def bin_index(self, confidence) -> torch.Tensor:
        """Bin of each confidence (float64 comparison with the edges), int64 tensor of the same shape."""
        conf = _to_torch(confidence).double()
        return torch.bucketize(conf, self._inner_edges.to(conf.device), right=True)

    def update(self, confidence, correct, mask=None) -> "CalibrationHistogram":
        """Add voxels and return ``self``.

        ``confidence``: top-label confidence in [0, 1], any shape (float, numpy or torch, any device);
        ``correct``: bool, same shape; ``mask`` (optional, bool, same shape): only voxels where it is true
        are added. NaN or a confidence clearly outside [0, 1] raises ``ValueError`` (probabilities were
        expected; logits are a common mistake); values within 1e-3 outside are clipped.
        """
        conf = _to_torch(confidence)
        ok = _to_torch(correct)
        if conf.shape != ok.shape:
            raise ValueError(f"confidence {tuple(conf.shape)} and correct {tuple(ok.shape)} differ in shape")
        if conf.device.type not in ("cpu", "cuda"):  # e.g. mps: no float64 there
            conf = conf.cpu()
        keep = None
        if mask is not None:
            keep = _to_torch(mask)
            if keep.shape != conf.shape:
                raise ValueError(f"mask {tuple(keep.shape)} and confidence {tuple(conf.shape)} differ in shape")
            keep = keep.reshape(-1).to(conf.device).bool()
        conf, ok = conf.reshape(-1), ok.reshape(-1).to(conf.device)
        for start in range(0, conf.numel(), _CHUNK):
            c = conf[start:start + _CHUNK].double()
            o = ok[start:start + _CHUNK].bool()
            if keep is not None:
                k = keep[start:start + _CHUNK]
                c, o = c[k], o[k]
            if c.numel() == 0:
                continue
            lo, hi = float(c.min()), float(c.max())
            if math.isnan(lo) or math.isnan(hi) or lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
                raise ValueError(f"confidence must lie in [0, 1] (found {lo:.4g} to {hi:.4g}): pass probabilities, "
                                 "not logits, and no NaN")
            c = c.clamp(0.0, 1.0)
            idx = self.bin_index(c)
            self.count += torch.bincount(idx, minlength=self.n_bins).cpu().numpy()
            self.conf_sum += torch.bincount(idx, weights=c, minlength=self.n_bins).cpu().numpy()
            self.correct += torch.bincount(idx[o], minlength=self.n_bins).cpu().numpy()
        return self

    def _check_compatible(self, other: "CalibrationHistogram") -> None:
        if not isinstance(other, CalibrationHistogram):
            raise TypeError(f"cannot merge a CalibrationHistogram with {type(other).__name__}")
        if other.n_bins != self.n_bins:
            raise ValueError(f"cannot merge histograms with {self.n_bins} and {other.n_bins} bins")

    def merge(self, other: "CalibrationHistogram") -> "CalibrationHistogram":
        """Add ``other``'s voxels into this histogram (in place) and return ``self``."""
        self._check_compatible(other)
        self.count += other.count
        self.conf_sum += other.conf_sum
        self.correct += other.correct
        return self

    def __add__(self, other: "CalibrationHistogram") -> "CalibrationHistogram":
        """A new histogram holding the voxels of both."""
        self._check_compatible(other)
        return self.copy().merge(other)

    def copy(self) -> "CalibrationHistogram":
        out = CalibrationHistogram(self.n_bins)
        out.count, out.conf_sum, out.correct = self.count.copy(), self.conf_sum.copy(), self.correct.copy()
        return out

    # -- summaries ----------------------------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Number of voxels added."""
        return int(self.count.sum())

    def ece(self) -> float:
        """``sum_m |B_m| / n * |acc(B_m) - conf(B_m)|`` (paper Fig. 5); NaN when empty.

        Computed as ``sum_m |correct_m - conf_sum_m| / n``, the same quantity without per-bin divisions.
        """
        n = self.total
        if n == 0:
            return math.nan
        return float(np.abs(self.correct - self.conf_sum).sum() / n)

    def mce(self) -> float:
        """``max_m |acc(B_m) - conf(B_m)|`` over non-empty bins; NaN when empty."""
        nz = self.count > 0
        if not nz.any():
            return math.nan
        return float(np.max(np.abs(self.correct[nz] - self.conf_sum[nz]) / self.count[nz]))

    def bins(self) -> list[dict[str, Any]]:
        """One dict per bin: ``{"lower", "upper", "count", "confidence", "accuracy"}``; ``confidence`` (mean
        confidence) and ``accuracy`` are None for an empty bin."""
        out = []
        for m in range(self.n_bins):
            n = int(self.count[m])
            out.append({"lower": m / self.n_bins, "upper": (m + 1) / self.n_bins, "count": n,
                        "confidence": float(self.conf_sum[m] / n) if n else None,
                        "accuracy": float(self.correct[m] / n) if n else None})
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"n_bins": int, "count": int, "ece": float|None, "mce": float|None,
        "bins": [{"lower", "upper", "count", "confidence", "accuracy"}, ...]}`` (None = empty)."""
        ece, mce = self.ece(), self.mce()
        return {"n_bins": self.n_bins, "count": self.total,
                "ece": None if math.isnan(ece) else ece, "mce": None if math.isnan(mce) else mce,
                "bins": self.bins()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CalibrationHistogram":
        """Inverse of :meth:`to_dict` (counts exactly, confidence sums to float rounding)."""
        h = cls(d["n_bins"])
        if len(d["bins"]) != h.n_bins:
            raise ValueError(f"{len(d['bins'])} bins listed for n_bins = {h.n_bins}")
        for m, b in enumerate(d["bins"]):
            n = int(b["count"])
            h.count[m] = n
            if n:
                h.conf_sum[m] = float(b["confidence"]) * n
                h.correct[m] = int(round(float(b["accuracy"]) * n))
        return h

    def __repr__(self) -> str:
        return f"CalibrationHistogram(n_bins={self.n_bins}, count={self.total}, ece={self.ece():.4g})"


def _dilate_lines(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Boolean 1D dilation of ``x`` along ``dim`` by ``radius`` voxels (OR of shifted copies, no wrap)."""
    out = x.clone()
    n = x.shape[dim]
    for d in range(1, min(radius, n - 1) + 1):
        out.narrow(dim, d, n - d).logical_or_(x.narrow(dim, 0, n - d))
        out.narrow(dim, 0, n - d).logical_or_(x.narrow(dim, d, n - d))
    return out


def foreground_band(pred_fg, truth_fg, radius: int = BAND_RADIUS, axis: int = 0):
    """The foreground band: union of predicted and true foreground, dilated **in-plane** by ``radius``.

    ``pred_fg``, ``truth_fg``: boolean arrays of the same shape, 2D ``[H, W]`` or 3D with the slices along
    ``axis`` (e.g. ``[K, J, I]`` with ``axis=0``). The dilation is 2D, slice by slice, with a *square*
    ``(2 radius + 1)^2`` structuring element (Chebyshev distance <= radius), done as two 1D dilations (rows, then
    columns; boolean shifts in torch, no scipy): the band never reaches into neighbouring slices, so evaluating a subset of slices sees exactly
    the band of those slices. ``radius=0`` gives the union itself.

    Why: background voxels far from the structure are predicted background with ``p ~ 0`` and dominate an
    all-voxel ECE; the ECE inside this band measures calibration at the structure and its boundary, where
    the paper's two decoders dilate and erode. The band is this project's addition: the paper's Fig. 4
    bins every pixel of a test image. numpy in, numpy out;
    torch in, torch out. Returns a bool mask of the input shape.
    """
    radius = int(radius)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    is_np = not torch.is_tensor(pred_fg)
    union = _to_torch(pred_fg).bool() | _to_torch(truth_fg).bool().to(_to_torch(pred_fg).device)
    if union.ndim not in (2, 3):
        raise ValueError(f"foreground_band expects a 2D slice or a 3D volume, got shape {tuple(union.shape)}")
    if union.ndim == 2:
        vol = union[None]
    else:
        vol = union.movedim(axis, 0)
    if radius > 0:
        vol = _dilate_lines(_dilate_lines(vol, radius, 1), radius, 2)
    band = vol[0] if union.ndim == 2 else vol.movedim(0, axis)
    return band.cpu().numpy() if is_np else band


class CalibrationReport:
    """Two histograms updated together: ``all`` (every voxel given) and ``band`` (voxels inside the
    :func:`foreground_band` of the union of predicted and true foreground; multi-class: any non-background
    class)."""

    def __init__(self, n_bins: int = 15, band_radius: int = BAND_RADIUS):
        self.all = CalibrationHistogram(n_bins)
        self.band = CalibrationHistogram(n_bins)
        self.band_radius = int(band_radius)

    def update(self, probs, truth, binary: bool, class_axis: int = 1) -> "CalibrationReport":
        """Add a batch of slices from probabilities.

        ``truth``: label map ``[S, H, W]`` (slices first; 0 = background; binary: any non-zero value is
        foreground). ``probs``: foreground probability ``[S, H, W]`` (binary) or class probabilities with the
        class axis at ``class_axis`` (default 1, the network batch layout ``[S, C, H, W]``; pass 0 for
        ``[C, S, H, W]``). A single slice ``[H, W]`` (``[C, H, W]`` with ``class_axis=0``) is accepted too.
        """
        p = _to_torch(probs)
        t = _to_torch(truth).to(p.device)
        if binary:
            pred, conf = top_label(p, True)
            truth_cls = t > 0
            pred_cls = pred.bool()
        else:
            pred, conf = top_label(p, False, class_axis)
            truth_cls, pred_cls = t.long(), pred
        if pred.shape != t.shape:
            raise ValueError(f"probabilities {tuple(p.shape)} do not match the truth {tuple(t.shape)}")
        correct = pred_cls == truth_cls
        self.all.update(conf, correct)
        self.band.update(conf, correct, foreground_band(pred > 0, t > 0, self.band_radius))
        return self

    def update_confidence(self, pred, truth, confidence) -> "CalibrationReport":
        """Add a batch of slices from a saved prediction (label map) and its confidence (probability of the
        predicted class), each ``[S, H, W]`` or ``[H, W]``: correct = ``pred == truth``."""
        pred_t = _to_torch(pred)
        t = _to_torch(truth).to(pred_t.device)
        conf = _to_torch(confidence).to(pred_t.device)
        if not (pred_t.shape == t.shape == conf.shape):
            raise ValueError(f"prediction {tuple(pred_t.shape)}, truth {tuple(t.shape)} and confidence "
                             f"{tuple(conf.shape)} differ in shape")
        correct = pred_t.long() == t.long()
        self.all.update(conf, correct)
        self.band.update(conf, correct, foreground_band(pred_t != 0, t != 0, self.band_radius))
        return self

    def to_dict(self) -> dict[str, Any]:
        """``{"all": histogram dict, "band": histogram dict, "band_radius": int, "confidence": "top-label"}``
        (histogram dict: :meth:`CalibrationHistogram.to_dict`)."""
        return {"all": self.all.to_dict(), "band": self.band.to_dict(), "band_radius": self.band_radius,
                "confidence": "top-label"}
