"""Whole-volume inference: batched slices at full resolution, snapshot and decoder averaging.

Only the outputs are kept for the whole volume (label map, confidence, disagreement: 1 + 4 + 4 bytes a
voxel); class probabilities exist one batch of slices at a time, so a 512 x 512 x 600 volume never has its
float probability tensors in memory at once. Calibration against a truth, when asked for, is accumulated
as histograms batch by batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .calibration import CalibrationReport
from .data import AXES
from .device import autocast
from .events import Reporter
from .metrics import OverlapCounter
from .models import SegmentationNetwork
from .prior import SlicePrior

#: a voxel counts as uncertain when the mean prediction's confidence is below this
UNCERTAIN_CONFIDENCE = 0.8


@dataclass
class VolumeSegmentation:
    """Outputs on the input grid, ``[K, J, I]``: ``labels`` (class indices, 0 = background), ``confidence``
    (probability of the predicted class under the mean prediction) and ``disagreement`` (between the two
    decoders: ``|p1 - p2|`` for a binary model, total variation ``0.5 sum_c |p1_c - p2_c|`` for a multi-class
    one; zero for a single-decoder network)."""

    labels: np.ndarray
    confidence: np.ndarray
    disagreement: np.ndarray
    slice_scores: list[dict] = field(default_factory=list)
    evaluation: dict | None = None
    seconds: float = 0.0


def _top_label(probs: torch.Tensor, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if binary:
        p = probs[:, 0]
        return (p >= 0.5).to(torch.uint8), torch.maximum(p, 1 - p)
    conf, pred = probs.max(dim=1)
    return pred.to(torch.uint8 if probs.shape[1] < 256 else torch.int32), conf


def _fuse(mean: torch.Tensor, prior: SlicePrior, slices: range, binary: bool) -> torch.Tensor:
    """The mean prediction combined with the painted slices' prior (a product of experts: network log-odds
    plus the prior's weighted log-odds); on a painted slice, the painted labels with probability 1."""
    eps = 1e-6
    out = torch.empty_like(mean, dtype=torch.float32)
    w = float(prior.settings.weight)
    for i, s in enumerate(slices):
        p = mean[i].float()
        if prior.is_labelled(s):
            painted = torch.from_numpy(np.ascontiguousarray(prior.labels(s))).to(p.device).long()
            out[i] = (painted > 0).float()[None] if binary else \
                torch.nn.functional.one_hot(painted, p.shape[0]).permute(2, 0, 1).float()
            continue
        lo = torch.from_numpy(prior.log_odds(s)).to(p.device)
        if binary:
            z = torch.log(p.clamp(eps, 1 - eps)) - torch.log1p(-p.clamp(eps, 1 - eps)) + w * lo
            out[i] = torch.sigmoid(z)
        else:
            prior_logp = torch.log_softmax(torch.cat([torch.zeros_like(lo[:1]), lo]), 0)
            out[i] = torch.softmax(torch.log(p.clamp_min(eps)) + w * prior_logp, 0)
    return out


def _disagreement(per_decoder: list[torch.Tensor], binary: bool) -> torch.Tensor:
    if len(per_decoder) < 2:
        return torch.zeros_like(per_decoder[0][:, 0])
    a, b = per_decoder[0], per_decoder[1]
    return (a[:, 0] - b[:, 0]).abs() if binary else 0.5 * (a - b).abs().sum(1)


@torch.inference_mode()
def segment_volume(networks: Sequence[SegmentationNetwork], volume: np.ndarray, axis: str = "k",
                   batch_size: int = 8, device: torch.device | str = "cpu", amp: bool = True,
                   truth: np.ndarray | None = None, eval_slices: Sequence[int] | None = None,
                   reporter: Reporter | None = None, n_bins: int = 15,
                   prior: SlicePrior | None = None) -> VolumeSegmentation:
    """Segment a normalised volume ``[C, K, J, I]`` slice by slice along ``axis``.

    ``prior``: what the user's painted slices of this volume imply (:class:`~mismatch.prior.SlicePrior`):
    the mean prediction is combined with it and the painted slices are kept as painted. The decoders'
    own outputs (their evaluation and disagreement) are the networks' alone.

    ``networks``: one per kept snapshot (their per-decoder probabilities are averaged). With ``truth``
    (class indices ``[K, J, I]``) and ``eval_slices``, the result's ``evaluation`` holds overlap and
    calibration of the mean prediction and of each decoder on those slices (paper Fig. 4).
    """
    device = torch.device(device)
    reporter = reporter or Reporter(progress_bar=False)
    config = networks[0].config
    binary = config.binary
    ax = AXES[axis]
    n_slices = volume.shape[1 + ax]
    out_shape = volume.shape[1:]
    labels = np.zeros(out_shape, dtype=np.uint8 if config.num_classes < 256 else np.int32)
    confidence = np.zeros(out_shape, dtype=np.float32)
    disagreement = np.zeros(out_shape, dtype=np.float32)
    # views with the slice axis first: writing into them fills the [K, J, I] arrays
    lab_v, conf_v, dis_v = (np.moveaxis(a, ax, 0) for a in (labels, confidence, disagreement))
    vol_v = np.moveaxis(volume, 1 + ax, 0)  # [S, C, H, W]
    truth_v = np.moveaxis(truth, ax, 0) if truth is not None else None
    eval_set = set(int(s) for s in (eval_slices if eval_slices is not None else
                                    (range(n_slices) if truth is not None else [])))
    names = ["mean"] + networks[0].decoder_names
    calib = {n: CalibrationReport(n_bins=n_bins) for n in names} if eval_set else {}
    overlap = {n: OverlapCounter(range(1, config.num_classes)) for n in names} if eval_set else {}
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    for net in networks:
        net.to(device).eval()

    scores = []
    t0 = time.monotonic()
    reporter.start("segment", total=n_slices)
    for start in range(0, n_slices, batch_size):
        stop = min(n_slices, start + batch_size)
        x = torch.from_numpy(np.ascontiguousarray(vol_v[start:stop])).to(device).contiguous(memory_format=fmt)
        per_decoder = None
        with autocast(device, amp):
            for net in networks:
                probs = [net.probabilities(l.float()) for l in net(x)]
                per_decoder = probs if per_decoder is None else [a + b for a, b in zip(per_decoder, probs)]
        per_decoder = [p / len(networks) for p in per_decoder]
        mean = torch.stack(per_decoder).mean(0)
        if prior is not None:
            mean = _fuse(mean, prior, range(start, stop), binary)
        pred, conf = _top_label(mean, binary)
        dis = _disagreement(per_decoder, binary)
        lab_v[start:stop] = pred.cpu().numpy()
        conf_v[start:stop] = conf.float().cpu().numpy()
        dis_v[start:stop] = dis.float().cpu().numpy()
        for i in range(stop - start):
            s = start + i
            scores.append({
                "slice": s,
                "disagreement": float(dis[i].mean()),
                "uncertain_fraction": float((conf[i] < UNCERTAIN_CONFIDENCE).float().mean()),
                "foreground_fraction": float((pred[i] > 0).float().mean()),
            })
        if eval_set:
            rows = [i for i in range(stop - start) if start + i in eval_set]
            if rows:
                t = torch.from_numpy(np.ascontiguousarray(truth_v[[start + i for i in rows]])).to(device)
                for name, p in zip(names, [mean] + per_decoder):
                    p_rows = p[rows]
                    calib[name].update(p_rows[:, 0] if binary else p_rows, t, binary=binary)
                    overlap[name].update(_top_label(p_rows, binary)[0], t)
        reporter.progress("segment", stop, n_slices)

    if prior is not None and prior.settings.connected:
        kept = prior.keep_connected(labels)
        removed = kept != labels
        if removed.any():
            # parts not connected to any painted voxel of their class: background, and no more sure of it
            # than a coin toss (the network was sure of the opposite); they stay visible as uncertain
            labels[removed] = 0
            confidence[removed] = 0.5 if binary else np.minimum(confidence[removed], 0.5)
            lab_v, conf_v = np.moveaxis(labels, ax, 0), np.moveaxis(confidence, ax, 0)
            for row in scores:
                s = row["slice"]
                row["removed_fraction"] = float(np.moveaxis(removed, ax, 0)[s].mean())
                row["foreground_fraction"] = float((lab_v[s] > 0).mean())
                row["uncertain_fraction"] = float((conf_v[s] < UNCERTAIN_CONFIDENCE).mean())
    evaluation = None
    if eval_set:
        evaluation = {"slices": sorted(eval_set)}
        for name in names:
            key = name.replace(" ", "_")
            evaluation[key] = {**overlap[name].to_dict(), "calibration": calib[name].to_dict()}
        if prior is not None and prior.settings.connected:   # the mean as written, after keep_connected
            from .metrics import evaluate_confidence

            ev = evaluate_confidence(labels, truth, confidence, classes=range(1, config.num_classes),
                                     slices=sorted(eval_set), axis=ax, n_bins=n_bins)
            evaluation["mean"] = {k: ev[k] for k in ("classes", "iou", "dice", "calibration")}
    return VolumeSegmentation(labels=labels, confidence=confidence, disagreement=disagreement,
                              slice_scores=scores, evaluation=evaluation, seconds=time.monotonic() - t0)


def rank_uncertain_slices(scores: list[dict], exclude: Sequence[int] = (), two_decoders: bool = True) -> list[dict]:
    """Slices sorted most uncertain first (decoder disagreement, or the uncertain fraction for a U-Net),
    leaving out ``exclude`` (e.g. the labelled slices)."""
    skip = set(int(s) for s in exclude)
    key = "disagreement" if two_decoders else "uncertain_fraction"
    rows = [s for s in scores if s["slice"] not in skip and math.isfinite(s[key])]
    return sorted(rows, key=lambda s: -s[key])
