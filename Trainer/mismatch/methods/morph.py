"""The paper's "Morph" baseline: fixed erosion and dilation of the features in two plain decoders."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .augment import gaussian_noise
from .base import TrainingBatch
from .mismatch import MisMatchMethod


class MorphMethod(MisMatchMethod):
    """Architecture ``morph``: the shared encoder and two plain decoders; after each of its three stages
    one decoder dilates its features (3x3 max filter) and the other erodes them (3x3 min filter), where
    MisMatch's decoders learn these perturbations with attention. Prediction = mean of the two decoders.

    Trained exactly like MisMatch (:class:`~mismatch.methods.mismatch.MisMatchMethod`: Dice on each decoder
    for labelled slices, ``alpha(step) * MSE`` between the decoders on unlabelled slices, ``--alpha``,
    ``--alpha-rampup`` and ``--stop-gradient`` apply), with Gaussian noise on the inputs (``noise_std``),
    as the paper trains Morph.
    """

    name = "morph"
    architecture = "morph"
    uses_unlabelled = True

    def __init__(self, architecture: str = "morph", alpha: float = 0.002, alpha_rampup: float = 0.4,
                 stop_gradient: str = "none", noise_std: float = 0.1, **_ignored):
        super().__init__(architecture, alpha=alpha, alpha_rampup=alpha_rampup, stop_gradient=stop_gradient)
        self.name = "morph"
        self.noise_std = noise_std
        self.options["noise_std"] = noise_std

    def loss(self, model: nn.Module, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, float]]:
        noisy = dataclasses.replace(
            batch, labelled_x=gaussian_noise(batch.labelled_x, self.noise_std),
            unlabelled_x=None if batch.unlabelled_x is None else gaussian_noise(batch.unlabelled_x, self.noise_std))
        return super().loss(model, noisy)
