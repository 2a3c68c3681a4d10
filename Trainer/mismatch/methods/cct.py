"""Cross-Consistency Training (Ouali et al. 2020), the paper's "CCT" baseline on the U-Net backbone."""

from __future__ import annotations

import torch
from torch import nn

from ..losses import alpha_schedule
from ..models.heads import feature_cutout, feature_dropout, feature_noise, vat_perturbation
from .base import Method, TrainingBatch, combine_losses


class CCTMethod(Method):
    """The U-Net's (main) decoder plus auxiliary decoders that see perturbed encoder features.

    Architecture ``cct``: the U-Net and four plain auxiliary decoders (``model.aux_decoders``), one per
    perturbation of :data:`~mismatch.models.heads.PERTURBATIONS`: multiplicative feature noise
    (U(-0.3, 0.3)), feature dropout (regions above 0.7-0.9 of the peak channel-mean activation), VAT
    (one power iteration, ``xi`` 1e-6, ``eps`` 2.0 per-sample L2 norm over all levels) and random
    cutout (one rectangle, 20-50 % of each side). Each perturbation is applied to every encoder level,
    the skip connections included.

    ``loss = Dice(main(x_l), y_l) + w(step) * mean_k MSE(p_aux_k(perturb_k(f(x_u))), sg(p_main(x_u)))``
    with ``sg`` a stop-gradient: the main decoder learns from the labelled slices only, the auxiliary
    decoders from the consistency term only, and the encoder from both. ``w`` ramps up to
    ``consistency_weight`` (default 0.1) with the alpha schedule's shape over ``alpha_rampup``;
    ``--alpha`` is not used. Inference runs the main decoder only. No input augmentation.
    """

    name = "cct"
    architecture = "cct"
    uses_unlabelled = True

    def __init__(self, architecture: str = "cct", consistency_weight: float = 0.1, alpha_rampup: float = 0.4,
                 vat_xi: float = 1e-6, vat_eps: float = 2.0, **_ignored):
        super().__init__(architecture, consistency_weight=consistency_weight, alpha_rampup=alpha_rampup,
                         vat_xi=vat_xi, vat_eps=vat_eps)
        self.consistency_weight = consistency_weight
        self.alpha_rampup = alpha_rampup
        self.vat_xi = vat_xi
        self.vat_eps = vat_eps

    def perturb(self, kind: str, model: nn.Module, decoder: nn.Module, features: list[torch.Tensor],
                size: tuple[int, int], target: torch.Tensor) -> list[torch.Tensor]:
        if kind == "feature-noise":
            return feature_noise(features)
        if kind == "feature-dropout":
            return feature_dropout(features)
        if kind == "cutout":
            return feature_cutout(features)
        if kind == "vat":
            return vat_perturbation(lambda f: model.decode(decoder, f, size), features, target,
                                    xi=self.vat_xi, eps=self.vat_eps)
        raise ValueError(f"unknown perturbation {kind!r}")

    def loss_terms(self, model: nn.Module, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        """``supervised`` and ``consistency`` (unweighted, mean over the auxiliary decoders) tensors."""
        n_l = batch.n_labelled
        x = batch.inputs()

        def heads(net: nn.Module, features: list[torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
            main = net.decode(net.decoders[0], features, size)
            terms = {"supervised": batch.supervised([main])}
            if batch.unlabelled_x is not None and len(net.aux_decoders):
                target = net.probabilities(main[n_l:].float()).detach()
                unlabelled = [f[n_l:] for f in features]
                cons = []
                for kind, decoder in zip(net.config.auxiliary, net.aux_decoders):
                    perturbed = self.perturb(kind, net, decoder, unlabelled, size, target)
                    probs = net.probabilities(net.decode(decoder, perturbed, size).float())
                    cons.append(torch.mean((probs - target) ** 2))
                terms["consistency"] = torch.stack(cons).mean()
            return terms

        return model(x, heads=heads)

    def loss(self, model: nn.Module, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, float]]:
        t = self.loss_terms(model, batch)
        w = alpha_schedule(batch.step, batch.total_steps, self.consistency_weight, self.alpha_rampup)
        extra = [("consistency", t["consistency"], w)] if "consistency" in t else []
        loss, out = combine_losses(t["supervised"], *extra)
        out["weight"] = w
        return loss, out
