"""Train, then segment: the model card of a training run and :func:`train_and_segment`, the one path from
normalised arrays and painted slices to a trained model and a segmented volume that ``mismatch train``
(:func:`mismatch.api.train_files`, the card), ``mismatch demo``, ``mismatch benchmark`` and ``mismatch
simulate`` share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np
import torch

from . import distributed
from .data import Normalisation, axis_index
from .events import Reporter
from .inference import OUTPUTS, VolumeSegmentation, segment_volume
from .prior import PriorSettings, SlicePrior
from .train import FitResult, TrainConfig, fit


def build_card(fitted: FitResult, config: TrainConfig, *, classes: list[dict], normalisation: Normalisation,
               channels: Sequence[str], labelled: Sequence[int], device, geometry=None,
               training: dict | None = None) -> dict:
    """The model card (``model.json``, docs/contract.md) of a training run: architecture, classes, channels
    (their file names), normalisation, slice axis, the training settings (``config`` and ``training``, what
    the caller adds: input file names, ...), the summary with the loss curve, the grid (``geometry``, a
    :class:`~mismatch.io.Geometry`) and the painted-slice prior settings."""
    last = fitted.history[-1] if fitted.history else {}
    return {
        "architecture": fitted.architecture.to_dict(),
        "classes": classes,
        "channels": [{"name": name} for name in channels],
        "normalisation": normalisation.to_dict(),
        "slice_axis": config.axis,
        "training": {**config.to_dict(), "device": str(device), **(training or {}),
                     "processes": distributed.current().world_size},
        "summary": {"steps": fitted.steps_done, "seconds": round(fitted.seconds, 1),
                    "final_losses": {k: v for k, v in last.items() if k not in ("step", "lr")},
                    "labelled_slices": [int(i) for i in labelled], "parameters": fitted.parameters,
                    "loss_curve": [{"step": h["step"], "loss": round(h["loss"], 5)} for h in fitted.history]},
        "geometry": geometry.to_dict() if geometry is not None else None,
        "prior": config.prior,
    }


def painted_slice_prior(labels: np.ndarray, labelled: Sequence[int], axis: str, spacing_kji: Sequence[float],
                        num_classes: int, settings: dict | None, volume: np.ndarray | None = None) -> SlicePrior:
    """What the painted slices ``labelled`` of ``labels`` (class indices ``[K, J, I]``) imply, with the prior
    ``settings`` of a card or a :class:`~mismatch.train.TrainConfig` (None: the painted slices are kept as
    painted and the others are left to the network). ``volume``: the normalised ``[C, K, J, I]`` volume,
    whose first channel's edges and intensities the prior follows (``grow_beta``, ``intensity_beta``)."""
    prior_settings = PriorSettings.from_dict(settings) if settings else PriorSettings(weight=0.0)
    image = None if volume is None else np.asarray(volume)[0]
    return SlicePrior(labels, labelled, axis_index(axis), spacing_kji, num_classes, prior_settings, image=image)


@dataclass
class TrainedSegmentation:
    """What :func:`train_and_segment` gives back."""

    fitted: FitResult
    networks: list
    card: dict
    prior: SlicePrior | None           # the painted slices' prior the volume was segmented with
    segmentation: VolumeSegmentation
    train_seconds: float
    segment_seconds: float


def train_and_segment(volume: np.ndarray, labels: np.ndarray, labelled: Sequence[int], classes: list[dict],
                      config: TrainConfig, *, normalisation: Normalisation, spacing_kji: Sequence[float],
                      geometry=None, channels: Sequence[str] = ("image",), device=None,
                      reporter: Reporter | None = None, init_state: dict[str, torch.Tensor] | None = None,
                      init_optimizer: dict[str, torch.Tensor] | None = None,
                      use_prior: bool = True, truth: np.ndarray | None = None,
                      eval_slices: Sequence[int] | None = None, outputs: Collection[str] = OUTPUTS,
                      training: dict | None = None) -> TrainedSegmentation:
    """Train on the painted slices of one volume and segment all of it, as the product does.

    ``volume``: normalised float32 ``[C, K, J, I]`` (by ``normalisation``); ``labels``: class indices
    ``[K, J, I]`` (0 = background; 1..N the ``classes`` in order) on the ``labelled`` slices along
    ``config.axis``; every other slice is unlabelled. From ``init_state`` (and the optimiser's state
    ``init_optimizer``, :attr:`~mismatch.train.FitResult.optimizer_state`) when given (a warm start). The
    volume is segmented with the painted slices' prior (:func:`painted_slice_prior`) when ``use_prior``, the
    network alone otherwise; ``truth`` (class indices) and ``eval_slices`` evaluate it, ``outputs`` as in
    :func:`~mismatch.inference.segment_volume`. The card (:func:`build_card`) is returned, not written."""
    device = device or torch.device("cpu")
    labelled = np.asarray(labelled)
    num_classes = len(classes) + 1
    t0 = time.monotonic()
    fitted = fit([volume], labels, labelled, num_classes, config, device=device, init_state=init_state,
                 init_optimizer=init_optimizer, reporter=reporter or Reporter(progress_bar=False, quiet=True))
    train_seconds = time.monotonic() - t0
    networks = fitted.networks()
    card = build_card(fitted, config, classes=classes, normalisation=normalisation, channels=channels,
                      labelled=labelled, device=device, geometry=geometry, training=training)
    prior = painted_slice_prior(labels, labelled, config.axis, spacing_kji, num_classes, config.prior, volume) \
        if use_prior else None
    t1 = time.monotonic()
    seg = segment_volume(networks, volume, axis=config.axis, batch_size=8, device=device, truth=truth,
                         eval_slices=eval_slices, prior=prior, outputs=outputs)
    return TrainedSegmentation(fitted=fitted, networks=networks, card=card, prior=prior, segmentation=seg,
                               train_seconds=train_seconds, segment_seconds=time.monotonic() - t1)
