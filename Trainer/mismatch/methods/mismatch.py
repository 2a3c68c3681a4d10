"""MisMatch (paper Sec. 2.3): Dice on each decoder for labelled slices, consistency between the two
decoders on unlabelled slices, weighted by an annealed alpha."""

from __future__ import annotations

import torch
from torch import nn

from ..losses import STOP_GRADIENT_MODES, alpha_schedule, consistency_loss
from .augment import anatomy_preserving
from .base import Method, TrainingBatch


class MisMatchMethod(Method):
    """Semi-supervised training of a two-decoder network.

    ``loss = mean_d Dice(decoder_d(x_l), y_l) + alpha(step) * MSE(p_1(x_u), p_2(x_u))``.
    No data augmentation (the paper trains MisMatch without any). Labelled and unlabelled slices go
    through the network in one forward pass (instance normalisation has no batch statistics, so this
    is the same as two passes, and faster).
    """

    name = "mismatch"
    architecture = "mismatch"
    uses_unlabelled = True

    def __init__(self, architecture: str = "mismatch", alpha: float = 0.002, alpha_rampup: float = 0.4,
                 stop_gradient: str = "none", cross_entropy: bool = False, augment: bool = False, **_ignored):
        if stop_gradient not in STOP_GRADIENT_MODES:
            raise ValueError(f"unknown stop-gradient mode {stop_gradient!r}: one of {STOP_GRADIENT_MODES}")
        super().__init__(architecture, alpha=alpha, alpha_rampup=alpha_rampup, stop_gradient=stop_gradient,
                         cross_entropy=cross_entropy, augment=augment)
        self.name = architecture
        self.alpha = alpha
        self.alpha_rampup = alpha_rampup
        self.stop_gradient = stop_gradient
        self.cross_entropy = bool(cross_entropy)
        self.augment = bool(augment)

    def loss(self, model: nn.Module, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, float]]:
        n_l = batch.n_labelled
        x, y = batch.labelled_x, batch.labelled_y
        if self.augment:
            x, y = anatomy_preserving(x, y)
        outputs = model(batch.inputs(x))
        sup = batch.supervised(outputs, y, self.cross_entropy)
        terms = {"dice": float(sup.detach())}
        loss = sup
        alpha = alpha_schedule(batch.step, batch.total_steps, self.alpha, self.alpha_rampup)
        if batch.unlabelled_x is not None and len(outputs) == 2:
            probs = [model.probabilities(o[n_l:].float()) for o in outputs]
            cons = consistency_loss(probs[0], probs[1], self.stop_gradient)
            loss = loss + alpha * cons
            terms["consistency"] = float(cons.detach())
        terms["alpha"] = alpha
        return loss, terms
