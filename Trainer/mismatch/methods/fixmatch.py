"""FixMatch (Sohn et al. 2020) for segmentation, the paper's "FM" baseline on the U-Net backbone."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..calibration import top_label
from .augment import gaussian_noise, rand_augment
from .base import Method, TrainingBatch, combine_losses
from .mean_teacher import mean_probabilities


def pseudo_labels(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels and the confidence mask from probabilities.

    ``probs [B, 1, H, W]`` (binary, foreground) or ``[B, K, H, W]`` (softmax). Returns ``labels [B, H, W]``
    (long: 0/1 for binary, the argmax otherwise) and ``mask [B, H, W]`` (bool): the confidence of the
    predicted class, ``max(p, 1 - p)`` for binary and the maximum probability otherwise, is at least
    ``threshold``.
    """
    binary = probs.shape[1] == 1
    labels, conf = top_label(probs[:, 0] if binary else probs, binary, class_axis=1)
    return labels.long(), conf >= threshold


def masked_pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (BCE for one output channel) of ``logits [B, K, H, W]`` against ``labels [B, H, W]``,
    zero where ``mask`` is False, averaged over *all* pixels (FixMatch's normalisation: pixels below the
    threshold count as zeros, so the term grows as more pixels pass)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), reduction="none")
    else:
        per_pixel = F.cross_entropy(logits, labels, reduction="none")
    return (per_pixel * mask.to(per_pixel.dtype)).mean()


class FixMatchMethod(Method):
    """Pseudo-labels from a weak view of each unlabelled slice train the prediction on a strong view.

    - Labelled: ``Dice(f(x_l + n), y_l)`` (weak augmentation, as the paper's weak view: Gaussian noise).
    - Unlabelled: weak view ``x_u + n`` through the network without gradient -> pseudo-labels and a mask
      of pixels whose confidence is at least ``threshold`` (default 0.95); strong view =
      :func:`~mismatch.methods.augment.rand_augment` of ``x_u`` (photometric RandAugment without shear,
      plus Cutout) ``+ n'``; loss = masked cross-entropy (BCE for a binary model) of the strong view's
      logits against the pseudo-labels, weighted by ``lambda_u`` (default 1, as FixMatch; no ramp-up:
      the threshold keeps early, unconfident pseudo-labels out).

    ``--alpha`` is not used. Photometric strong augmentation needs no warping of the pseudo-labels.
    """

    name = "fixmatch"
    architecture = "unet"
    uses_unlabelled = True

    def __init__(self, architecture: str = "unet", threshold: float = 0.95, lambda_u: float = 1.0,
                 noise_std: float = 0.1, n_ops: int = 2, cutout_fraction: float = 0.5, **_ignored):
        super().__init__(architecture, threshold=threshold, lambda_u=lambda_u, noise_std=noise_std,
                         n_ops=n_ops, cutout_fraction=cutout_fraction)
        self.threshold = threshold
        self.lambda_u = lambda_u
        self.noise_std = noise_std
        self.n_ops = n_ops
        self.cutout_fraction = cutout_fraction

    def strong(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_noise(rand_augment(x, n_ops=self.n_ops, cutout_fraction=self.cutout_fraction),
                              self.noise_std)

    def loss_terms(self, model: nn.Module, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        """``supervised``, ``unlabelled`` (unweighted) and ``mask_fraction`` tensors."""
        n_l = batch.n_labelled
        x = gaussian_noise(batch.labelled_x, self.noise_std)
        xu = batch.unlabelled_x
        if xu is not None:
            with torch.no_grad():
                weak = mean_probabilities(model, model(gaussian_noise(xu, self.noise_std)))
                labels, mask = pseudo_labels(weak, self.threshold)
            x = torch.cat([x, self.strong(xu)])
        outputs = model(x)
        terms = {"supervised": batch.supervised(outputs)}
        if xu is not None:
            terms["unlabelled"] = torch.stack(
                [masked_pseudo_label_loss(o[n_l:], labels, mask) for o in outputs]).mean()
            terms["mask_fraction"] = mask.float().mean()
        return terms

    def loss(self, model: nn.Module, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, float]]:
        t = self.loss_terms(model, batch)
        if "unlabelled" not in t:
            return combine_losses(t["supervised"])
        loss, out = combine_losses(t["supervised"], ("pseudo_label", t["unlabelled"], self.lambda_u))
        out["mask_fraction"] = float(t["mask_fraction"])
        return loss, out
