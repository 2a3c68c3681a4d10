"""Whole-volume inference: batched slices at full resolution, snapshot and decoder averaging.

Only the outputs the caller asks for are kept for the whole volume (``outputs``: label map, confidence,
disagreement: 1 + 4 + 4 bytes a voxel); the others exist one batch of slices at a time, and ``stream``
hands any of them to the caller batch by batch (``mismatch segment`` writes them to temporary files, so a
512 x 512 x 600 volume never has them in memory during inference). Class probabilities exist one batch at a
time too, and so do the per-slice scores and the evaluation against a truth (overlap counts and
calibration histograms accumulated batch by batch). On the CPU a batch holds at most
:data:`CPU_BATCH_PIXELS` pixels: the network's feature maps take about 200 bytes a pixel.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
import torch

from .calibration import CalibrationReport, top_label
from .data import AXES, context_slices
from .device import autocast
from .events import Reporter
from .grow import painted_box
from .metrics import OverlapCounter
from .models import SegmentationNetwork
from .prior import SlicePrior, gated_vote
from .ranking import continuing_stretch

#: at most this many bytes of the networks' outputs computed while finding where the structure ends
#: (:meth:`VolumeInference._find_ends`) are kept for the pass; batches beyond are computed again
END_CACHE_BYTES = 256 * 2 ** 20

#: a voxel counts as uncertain when the mean prediction's confidence is below this
UNCERTAIN_CONFIDENCE = 0.8

#: the volumes :func:`segment_volume` can keep (``outputs``) or hand over batch by batch (``stream``)
OUTPUTS = ("labels", "confidence", "disagreement")

#: on the CPU, at most this many pixels in one batch of slices (1 slice of 512 x 512, 4 of 256 x 256): the
#: network's feature maps take about 200 bytes a pixel (MisMatch, width 16), so 8 slices of 512 x 512 held
#: 1.5 GB; and a batch of about this many pixels is the fastest on a 2-core CPU (MisMatch, width 16, ms per
#: slice: 256 x 256 at batch 1/2/4/8 about 76/64/60/62-74, 512 x 512 at batch 1/2 about the same, batch 4
#: slower; measurements/bench_segment.py). Instance normalisation is per slice: the results are the same
CPU_BATCH_PIXELS = 512 * 512


def batch_slices(batch_size: int, plane: int, max_batch_pixels: int | None) -> int:
    """Slices per batch: ``batch_size``, fewer when ``plane``-pixel slices would exceed ``max_batch_pixels``
    (none: no limit), at least 1."""
    batch = max(1, int(batch_size))
    return max(1, min(batch, int(max_batch_pixels) // max(1, plane))) if max_batch_pixels else batch


@dataclass
class VolumeSegmentation:
    """Outputs on the input grid, ``[K, J, I]``: ``labels`` (class indices, 0 = background), ``confidence``
    (probability of the predicted class under the mean prediction) and ``disagreement`` (between the two
    decoders: ``|p1 - p2|`` for a binary model, total variation ``0.5 sum_c |p1_c - p2_c|`` for a multi-class
    one; zero for a single-decoder network). Each is ``None`` unless asked for (``outputs`` of
    :func:`segment_volume`).

    ``removed``: bool ``[K, J, I]``, the voxels that the painted slices' connectivity
    (:meth:`~mismatch.prior.SlicePrior.keep_connected`) set to background after the network had predicted a
    class there; ``None`` when none was. ``labels`` and ``confidence`` hold it already; a *streamed*
    confidence does not: :meth:`unsure_where_removed` applies it.

    ``extended_ends``: ``{side: slice}`` for each side of the painted range (-1 below, 1 above) where the
    network alone saw the painted structure go on for more than a gap between painted slices, and the
    prior's end was moved out to that slice (:meth:`VolumeInference._find_ends`)."""

    labels: np.ndarray | None
    confidence: np.ndarray | None
    disagreement: np.ndarray | None
    slice_scores: list[dict] = field(default_factory=list)
    evaluation: dict | None = None
    seconds: float = 0.0
    removed: np.ndarray | None = None
    binary: bool = True
    extended_ends: dict[int, int] = field(default_factory=dict)

    def unsure_where_removed(self, confidence: np.ndarray) -> np.ndarray:
        """``confidence [K, J, I]`` (streamed, as computed batch by batch) made what ``confidence`` is: where
        a part was removed, no more sure than a coin toss. In place; returns it."""
        if self.removed is not None:
            unsure_where_removed(confidence, self.removed, self.binary)
        return confidence


def unsure_where_removed(confidence: np.ndarray, removed: np.ndarray, binary: bool) -> None:
    """Parts not connected to any painted voxel of their class become background, and no more sure of it
    than a coin toss (the network was sure of the opposite): confidence 0.5 for a binary model, at most 0.5
    for a multi-class one. They stay visible as uncertain. In place."""
    confidence[removed] = 0.5 if binary else np.minimum(confidence[removed], 0.5)


def _return_freed_memory() -> None:
    """Give the memory that the C heap holds free back to the system (glibc ``malloc_trim``): the feature
    maps of the last batches are freed but kept by the allocator (:func:`mismatch.allocator.tune_cpu_allocator`
    raises its trim threshold), and the connectivity pass after the loop needs volume-sized temporaries."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def _top_label(probs: torch.Tensor, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs [B, C, H, W]`` -> :func:`~mismatch.calibration.top_label` with the label map's dtype (uint8,
    int32 for 256 classes or more)."""
    pred, conf = top_label(probs[:, 0] if binary else probs, binary, class_axis=1)
    return (pred if binary else pred.to(torch.uint8 if probs.shape[1] < 256 else torch.int32)), conf


def _fuse(mean: torch.Tensor, prior: SlicePrior, slices: range, binary: bool) -> torch.Tensor:
    """The mean prediction combined with the painted slices' prior (a product of experts: network log-odds
    plus the prior's weighted log-odds, then the painted outlines' intensity vote where those two leave the
    label in doubt (:meth:`SlicePrior.boundary_vote`), divided by its ``temperature``); on a painted slice, the
    painted labels with probability 1."""
    eps = 1e-6
    out = torch.empty_like(mean, dtype=torch.float32)
    t = prior.temperature
    for i, s in enumerate(slices):
        p = mean[i].float()
        if prior.is_labelled(s):
            painted = torch.from_numpy(np.ascontiguousarray(prior.labels(s))).to(p.device).long()
            out[i] = (painted > 0).float()[None] if binary else \
                torch.nn.functional.one_hot(painted, p.shape[0]).permute(2, 0, 1).float()
            continue
        lo = torch.from_numpy(prior.log_odds(s)).to(p.device)
        w = prior.weight(s)
        vote = prior.boundary_vote(s)
        beta = float(prior.settings.boundary_beta)
        if binary:
            z = torch.log(p.clamp(eps, 1 - eps)) - torch.log1p(-p.clamp(eps, 1 - eps)) + w * lo
            if vote is not None:
                z = z + gated_vote(z, torch.from_numpy(vote).to(p.device), beta)
            out[i] = torch.sigmoid(z / t)
        else:
            prior_logp = torch.log_softmax(torch.cat([torch.zeros_like(lo[:1]), lo]), 0)
            logits = torch.log(p.clamp_min(eps)) + w * prior_logp
            if vote is not None:   # each class against the others, as in the binary case
                fg = logits[1:]
                z = fg - torch.stack([torch.logsumexp(torch.cat([logits[:c + 1], logits[c + 2:]]), 0)
                                      for c in range(fg.shape[0])])
                logits = torch.cat([logits[:1], fg + gated_vote(z, torch.from_numpy(vote).to(p.device), beta)])
            out[i] = torch.softmax(logits / t, 0)
    return out


def _disagreement(per_decoder: list[torch.Tensor], binary: bool) -> torch.Tensor:
    if len(per_decoder) < 2:
        return torch.zeros_like(per_decoder[0][:, 0])
    a, b = per_decoder[0], per_decoder[1]
    return (a[:, 0] - b[:, 0]).abs() if binary else 0.5 * (a - b).abs().sum(1)


def segment_volume(networks: Sequence[SegmentationNetwork], volume: np.ndarray | list[np.ndarray],
                   **options) -> VolumeSegmentation:
    """Segment a normalised volume ``[C, K, J, I]`` slice by slice along ``axis`` (the options are
    :class:`VolumeInference`'s, with its defaults). A one-element list holding the volume hands it over: the
    list is emptied after the networks have run, so that the volume's memory is freed before the
    connectivity pass of ``prior`` (when the list held the last reference).

    ``prior``: what the user's painted slices of this volume imply (:class:`~mismatch.prior.SlicePrior`):
    the mean prediction is combined with it and the painted slices are kept as painted. The decoders'
    own outputs (their evaluation and disagreement) are the networks' alone.

    ``networks``: one per kept snapshot (their per-decoder probabilities are averaged). With ``truth``
    (class indices ``[K, J, I]``) and ``eval_slices``, the result's ``evaluation`` holds overlap and
    calibration of the mean prediction and of each decoder on those slices (paper Fig. 4).

    ``outputs``: the volumes of :data:`OUTPUTS` to keep for the whole volume (the others are ``None`` in
    the result; the per-slice scores and the evaluation are there either way). ``stream``: ``{name:
    callback}`` for names of :data:`OUTPUTS`, called as ``callback(start, block)`` for each batch in slice
    order, ``block`` holding slices ``start, start + 1, ...`` with the slice axis first (``[b, ...]``,
    float32; class indices for ``labels``) as computed, before the connectivity pass of a ``prior``: see
    :attr:`VolumeSegmentation.removed`. ``max_batch_pixels``: at most this many pixels in a batch (default
    :data:`CPU_BATCH_PIXELS` on the CPU, no limit elsewhere; ``batch_size`` is the most slices either way).
    ``scores=False``: no per-slice scores (``slice_scores`` empty; what only the ranking needs is not
    computed).

    Memory beyond the outputs kept: a batch of slices; the label map when a prior with ``connected`` is
    given (its connectivity pass needs it), and the confidence too when that is combined with an
    evaluation; one bit a voxel for the scores after that pass.
    """
    array = volume[0] if isinstance(volume, list) else volume
    run = VolumeInference(networks, array.shape, **options)
    run.segment(array)
    del array
    if isinstance(volume, list):
        volume.clear()
    return run.finish()


class VolumeInference:
    """:func:`segment_volume` in two steps: :meth:`segment` runs the networks over ``volume``, :meth:`finish`
    applies the painted slices' connectivity and completes the scores and the evaluation. Between the two
    the volume can be freed (the connectivity pass needs volume-sized temporaries). The arguments are those
    of :func:`segment_volume`, ``shape`` the volume's."""

    def __init__(self, networks: Sequence[SegmentationNetwork], shape: Sequence[int], axis: str = "k",
                 batch_size: int = 8, device: torch.device | str = "cpu", amp: bool = True,
                 truth: np.ndarray | None = None, eval_slices: Sequence[int] | None = None,
                 reporter: Reporter | None = None, n_bins: int = 15, prior: SlicePrior | None = None,
                 outputs: Collection[str] = OUTPUTS,
                 stream: Mapping[str, Callable[[int, np.ndarray], None]] | None = None,
                 max_batch_pixels: int | None = None, scores: bool = True):
        unknown = sorted(set(outputs).union(stream or {}) - set(OUTPUTS))
        if unknown:
            raise ValueError(f"unknown output(s) {unknown}; choose from {', '.join(OUTPUTS)}")
        self.networks = list(networks)
        self.device = torch.device(device)
        self.amp, self.n_bins, self.prior, self.truth = amp, n_bins, prior, truth
        self.reporter = reporter or Reporter(progress_bar=False)
        self.config = self.networks[0].config
        self.binary = self.config.binary
        self.axis = axis
        self.ax = AXES[axis]
        self.shape = tuple(int(n) for n in shape[1:])          # [K, J, I]
        self.n_slices = self.shape[self.ax]
        plane = math.prod(n for a, n in enumerate(self.shape) if a != self.ax)
        if max_batch_pixels is None and self.device.type == "cpu":
            max_batch_pixels = CPU_BATCH_PIXELS
        self.batch_size = batch_slices(batch_size, plane, max_batch_pixels)
        self.outputs = tuple(outputs)
        self.stream = dict(stream or {})
        self.connected = prior is not None and prior.settings.connected
        self.want_scores = bool(scores)
        self.eval_set = set(int(s) for s in (eval_slices if eval_slices is not None else
                                             (range(self.n_slices) if truth is not None else [])))
        # what is kept for the whole volume: what was asked for, and what the connectivity pass needs
        keep = set(self.outputs)
        if self.connected:
            keep.add("labels")
            if self.eval_set:   # the evaluation of the mean as written, after the pass
                keep.add("confidence")
        label_dtype = np.uint8 if self.config.num_classes < 256 else np.int32
        self.labels = np.zeros(self.shape, dtype=label_dtype) if "labels" in keep else None
        self.confidence = np.zeros(self.shape, dtype=np.float32) if "confidence" in keep else None
        self.disagreement = np.zeros(self.shape, dtype=np.float32) if "disagreement" in keep else None
        # one bit a voxel (confidence below UNCERTAIN_CONFIDENCE) for the scores after the pass
        self.uncertain_bits = (np.zeros((self.n_slices, (plane + 7) // 8), dtype=np.uint8)
                               if self.connected and self.confidence is None and self.want_scores else None)
        self.names = ["mean"] + self.networks[0].decoder_names
        self.calib = {n: CalibrationReport(n_bins=n_bins) for n in self.names} if self.eval_set else {}
        self.overlap = ({n: OverlapCounter(range(1, self.config.num_classes)) for n in self.names}
                        if self.eval_set else {})
        self.scores: list[dict] = []
        self.seconds = 0.0
        # in-plane, the painted structure's box (grown as the prior grows it): where the scores look at what
        # the network alone predicts (network_box_fraction)
        self.score_box, self.outer_painted = None, {}
        # batches of the networks' outputs computed before the pass (_find_ends), by first slice
        self._cache: dict[int, list[torch.Tensor]] = {}
        if prior is not None:
            box = painted_box(prior.sparse, prior.lab, prior.axis)
            if box is not None:
                self.score_box = (slice(None),) + tuple(b for a, b in enumerate(box) if a != self.ax)
                # the outermost painted slices' structure in that box: past them, how much of what the
                # network finds lies where they were painted (network_on_painted)
                self.outer_painted = {end: torch.from_numpy(np.ascontiguousarray(
                    prior.labels(end)[self.score_box[1:]] > 0)) for end in (int(prior.lab[0]), int(prior.lab[-1]))}

    def _view(self, array: np.ndarray | None) -> np.ndarray | None:
        """``array [K, J, I]`` with the slice axis first (a view: writing into it fills the array)."""
        return None if array is None else np.moveaxis(array, self.ax, 0)

    def _probabilities(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each decoder's probabilities for the batch ``x``, averaged over the networks."""
        per_decoder = None
        with autocast(self.device, self.amp):
            for net in self.networks:
                probs = [net.probabilities(l.float()) for l in net(x)]
                per_decoder = probs if per_decoder is None else [a + b for a, b in zip(per_decoder, probs)]
        return [p / len(self.networks) for p in per_decoder]

    def _on_painted(self, s: int, mask: torch.Tensor) -> dict:
        """Past the outermost painted slice of a side: ``network_on_painted``, the share of the network's
        foreground ``mask`` (in the painted box) that lies on that slice's painted structure, and (with the
        prior's ``end_intensity`` and intensities) ``network_intensity``, how much that foreground has the
        painted structure's intensities (:meth:`~mismatch.prior.SlicePrior.intensity_support`)."""
        lo, hi = min(self.outer_painted), max(self.outer_painted)
        if lo <= s <= hi:
            return {}
        found = int(mask.sum())
        on = int((mask & self.outer_painted[lo if s < lo else hi]).sum())
        out = {"network_on_painted": on / found if found else 0.0}
        if self.prior.settings.end_intensity:
            support = self.prior.intensity_support(s, self.score_box[1:], mask.numpy())
            if support is not None:
                out["network_intensity"] = support
        return out

    def _intensity_floor(self, s: int, mask: torch.Tensor) -> float:
        """On the outermost painted slice ``s``: the least intensity support the network's foreground past it
        must have for the structure to go on there, the prior's ``end_intensity_share`` of that support on ``s``
        itself (0 without a share or an intensity model)."""
        share = self.prior.settings.end_intensity_share
        if share <= 0 or not self.prior.settings.end_intensity:
            return 0.0
        support = self.prior.intensity_support(s, self.score_box[1:], mask.numpy())
        return share * support if support is not None and support > 0 else 0.0

    def _batch(self, start: int, vol_v: np.ndarray, fmt: torch.memory_format) -> list[torch.Tensor]:
        """Each decoder's probabilities for the batch of slices from ``start``: computed before and kept
        (:meth:`_find_ends`), or now."""
        cached = self._cache.pop(start, None)
        if cached is not None:
            return cached
        stop = min(self.n_slices, start + self.batch_size)
        if self.config.context:   # each slice with its neighbours' channels, as the network was trained
            rows = np.array([context_slices(s, self.n_slices, self.config.context) for s in range(start, stop)])
            batch = vol_v[rows].reshape(len(rows), -1, *vol_v.shape[2:])   # [b, neighbours x C, H, W]
        else:
            batch = np.ascontiguousarray(vol_v[start:stop])
        x = torch.from_numpy(batch).to(self.device).contiguous(memory_format=fmt)
        return self._probabilities(x)

    def _in_box(self, mean: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """The network alone's foreground (before the prior) in the painted structure's box, for the batch's
        mean prediction ``mean``: the mask ``[b, h, w]`` (on the CPU) and each slice's fraction of the box."""
        mask = (_top_label(mean, self.binary)[0][self.score_box] > 0).cpu()
        return mask, mask.float().mean((1, 2)).tolist()

    def _outward(self, side: int, painted: int, vol_v: np.ndarray,
                 fmt: torch.memory_format) -> Iterator[tuple[float, float, float, float | None, float]]:
        """From the painted slice ``painted`` outwards on ``side``, one slice at a time, as far as the caller
        reads: ``(reference, fraction, on_painted, intensity, floor)``, the network alone's fraction of the
        painted box on the painted slice and on this one, its share on the painted structure, its intensities'
        support and the least support that counts (:meth:`_intensity_floor`;
        :func:`~mismatch.ranking.network_continues`'s arguments). Batches are run as needed and kept for the pass
        while the kept ones take at most :data:`END_CACHE_BYTES`."""
        bs, n = self.batch_size, self.n_slices
        reference, floor = None, 0.0
        start = (painted // bs) * bs
        while 0 <= start < n:
            per_decoder = self._batch(start, vol_v, fmt)
            if sum(t.numel() * t.element_size() for batch in [*self._cache.values(), per_decoder]
                   for t in batch) <= END_CACHE_BYTES:
                self._cache[start] = per_decoder
            mask, fraction = self._in_box(torch.stack(per_decoder).mean(0))
            stop = min(n, start + bs)
            for s in (range(start, stop) if side > 0 else range(stop - 1, start - 1, -1)):
                if s == painted:
                    reference = fraction[s - start]
                    floor = self._intensity_floor(s, mask[s - start])
                elif side * (s - painted) > 0:
                    on = self._on_painted(s, mask[s - start])
                    yield reference, fraction[s - start], on.get("network_on_painted", 0.0), \
                        on.get("network_intensity"), floor
            start += side * bs

    def _find_ends(self, vol_v: np.ndarray, fmt: torch.memory_format) -> None:
        """Before the pass: on each side of the painted range, where the network alone sees the painted
        structure go on (:func:`~mismatch.ranking.continuing_stretch`), slice by slice outwards; a stretch longer than the mean
        gap between painted slices moves the prior's end there (:meth:`SlicePrior.extend_end`). Painted slices
        close together at one part of a long structure otherwise end it a fraction of that short gap past
        them (grey matter painted on slices 58, 63 and 68 of a brain reaching from 6 to 75: segmented down to
        50 only). The batches computed on the way are kept for the pass (up to :data:`END_CACHE_BYTES`), so
        that a stretch costs no second run of the networks unless it is long."""
        prior = self.prior
        st = prior.settings
        if self.score_box is None or len(prior.lab) < 2 or st.end_penalty <= 0 or st.weight <= 0 \
                or not st.end_follows_network:
            return
        gap = (int(prior.lab[-1]) - int(prior.lab[0])) / (len(prior.lab) - 1)
        for side in (-1, 1):
            painted = prior.outermost(side)
            prior.extend_end(side, painted)   # from these networks alone (a prior used before keeps no end)
            stretch = continuing_stretch(self._outward(side, painted, vol_v, fmt))
            if stretch > gap:
                prior.extend_end(side, painted + side * stretch)

    @property
    def extended_ends(self) -> dict[int, int]:
        """``{side: slice}`` (-1 below, 1 above): where :meth:`_find_ends` moved the prior's end."""
        return self.prior.moved_ends() if self.prior is not None else {}

    def _moved_end(self, s: int, moved: Mapping[int, int]) -> bool:
        """Whether slice ``s`` lies between the outermost painted slice and an end in ``moved``
        (:attr:`extended_ends`)."""
        return any(0 < side * (s - self.prior.outermost(side)) <= side * (end - self.prior.outermost(side))
                   for side, end in moved.items())

    @torch.inference_mode()
    def segment(self, volume: np.ndarray) -> None:
        """Run the networks over every slice of ``volume [C, K, J, I]`` (the shape given at construction)."""
        if tuple(volume.shape[1:]) != self.shape:
            raise ValueError(f"volume of shape {volume.shape[1:]} given to an inference set up for {self.shape}")
        device, binary, prior, n_slices = self.device, self.binary, self.prior, self.n_slices
        lab_v, conf_v, dis_v = (self._view(a) for a in (self.labels, self.confidence, self.disagreement))
        vol_v = np.moveaxis(volume, 1 + self.ax, 0)  # [S, C, H, W]
        truth_v = np.moveaxis(self.truth, self.ax, 0) if self.truth is not None else None
        fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        for net in self.networks:   # weights in the input's layout: otherwise reordered at every convolution
            net.to(device, memory_format=fmt).eval()

        # only what is kept, streamed or scored is computed and copied out
        needed = {name for name, view in (("labels", lab_v), ("confidence", conf_v), ("disagreement", dis_v))
                  if view is not None} | set(self.stream)
        if self.uncertain_bits is not None:
            needed.add("confidence")

        t0 = time.monotonic()
        self.reporter.start("segment", total=n_slices)
        if prior is not None:
            self._find_ends(vol_v, fmt)
        moved = self.extended_ends   # what the rows past the painted range say (structure_goes_on)
        for start in range(0, n_slices, self.batch_size):
            stop = min(n_slices, start + self.batch_size)
            per_decoder = self._batch(start, vol_v, fmt)
            mean = torch.stack(per_decoder).mean(0)
            net_box = None
            if prior is not None:
                if self.score_box is not None and self.want_scores:   # the network alone in the painted box
                    net_mask, net_box = self._in_box(mean)
                mean = _fuse(mean, prior, range(start, stop), binary)
            pred, conf = _top_label(mean, binary)
            dis = _disagreement(per_decoder, binary) if self.want_scores or "disagreement" in needed else None
            blocks = {}
            if "labels" in needed:
                blocks["labels"] = pred.cpu().numpy()
            if "confidence" in needed:
                blocks["confidence"] = conf.float().cpu().numpy()
            if "disagreement" in needed:
                blocks["disagreement"] = dis.float().cpu().numpy()
            for view, name in ((lab_v, "labels"), (conf_v, "confidence"), (dis_v, "disagreement")):
                if view is not None:
                    view[start:stop] = blocks[name]
            for name, callback in self.stream.items():
                callback(start, blocks[name])
            if self.uncertain_bits is not None:
                low = blocks["confidence"] < UNCERTAIN_CONFIDENCE
                self.uncertain_bits[start:stop] = np.packbits(low.reshape(stop - start, -1), axis=1)
            differ = (_top_label(per_decoder[0], binary)[0] != _top_label(per_decoder[1], binary)[0]
                      if len(per_decoder) >= 2 and self.want_scores else None)
            for i in range(stop - start if self.want_scores else 0):
                s = start + i
                self.scores.append({
                    "slice": s,
                    "disagreement": float(dis[i].mean()),
                    "uncertain_fraction": float((conf[i] < UNCERTAIN_CONFIDENCE).float().mean()),
                    "foreground_fraction": float((pred[i] > 0).float().mean()),
                    # the network alone's (before the painted slices' prior), in the painted structure's box
                    **({"network_box_fraction": net_box[i]} if net_box is not None else {}),
                    **(self._on_painted(s, net_mask[i]) if net_box is not None else {}),
                    # past the painted range, where the network alone saw the structure go on (_find_ends)
                    **({"structure_goes_on": True} if self._moved_end(s, moved) else {}),
                    # the decoders' labels differ (what the panel's hint quotes)
                    "disagreeing_fraction": float(differ[i].float().mean()) if differ is not None else 0.0,
                    # the expected fraction of wrong voxels under the prediction's own confidence (before
                    # the connectivity pass; removed parts are in removed_fraction)
                    "expected_error": float((1 - conf[i].float()).mean()),
                })
            if self.eval_set:
                rows = [i for i in range(stop - start) if start + i in self.eval_set]
                if rows:
                    t = torch.from_numpy(np.ascontiguousarray(truth_v[[start + i for i in rows]])).to(device)
                    for name, p in zip(self.names, [mean] + per_decoder):
                        p_rows = p[rows]
                        self.calib[name].update(p_rows[:, 0] if binary else p_rows, t, binary=binary)
                        self.overlap[name].update(_top_label(p_rows, binary)[0], t)
            self.reporter.progress("segment", stop, n_slices)
        self.seconds += time.monotonic() - t0

    def finish(self) -> VolumeSegmentation:
        """The connectivity pass of the prior, the scores after it, the evaluation; the result holds the
        volumes asked for (``outputs``) and nothing else."""
        t0 = time.monotonic()
        binary, ax, labels, confidence = self.binary, self.ax, self.labels, self.confidence
        removed = None
        if self.connected:
            _return_freed_memory()
            kept = self.prior.keep_connected(labels)
            removed = kept != labels
            del kept
            if removed.any():
                labels[removed] = 0
                if confidence is not None:
                    unsure_where_removed(confidence, removed, binary)
                lab_v, conf_v, rem_v = self._view(labels), self._view(confidence), self._view(removed)
                for row in self.scores:
                    s = row["slice"]
                    row["removed_fraction"] = float(rem_v[s].mean())
                    row["foreground_fraction"] = float((lab_v[s] > 0).mean())
                    if conf_v is not None:
                        uncertain = conf_v[s] < UNCERTAIN_CONFIDENCE
                    else:   # below the threshold before, or removed (at most 0.5 now)
                        n = rem_v[s].size
                        uncertain = np.unpackbits(self.uncertain_bits[s], count=n).astype(bool) | rem_v[s].ravel()
                    row["uncertain_fraction"] = float(uncertain.mean())
            else:
                removed = None
        evaluation = None
        if self.eval_set:
            evaluation = {"slices": sorted(self.eval_set)}
            for name in self.names:
                key = name.replace(" ", "_")
                evaluation[key] = {**self.overlap[name].to_dict(), "calibration": self.calib[name].to_dict()}
            if self.connected:   # the mean as written, after keep_connected
                from .metrics import evaluate_confidence

                ev = evaluate_confidence(labels, self.truth, confidence, classes=range(1, self.config.num_classes),
                                         slices=sorted(self.eval_set), axis=ax, n_bins=self.n_bins)
                evaluation["mean"] = {k: ev[k] for k in ("classes", "iou", "dice", "calibration")}
        asked = {name: getattr(self, name) if name in self.outputs else None for name in OUTPUTS}
        self.labels = self.confidence = self.disagreement = self.uncertain_bits = None
        self._cache.clear()
        self.seconds += time.monotonic() - t0
        return VolumeSegmentation(labels=asked["labels"], confidence=asked["confidence"],
                                  disagreement=asked["disagreement"], slice_scores=self.scores,
                                  evaluation=evaluation, seconds=self.seconds, removed=removed, binary=binary,
                                  extended_ends=self.extended_ends)
