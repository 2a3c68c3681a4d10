"""Image reconstruction as an extra task (after Chen et al. 2019, "MTA"), the paper's MTA baseline."""

from __future__ import annotations

import torch
from torch import nn

from .augment import gaussian_noise
from .base import Method, TrainingBatch, combine_losses


class MTAMethod(Method):
    """A U-Net with a second, plain decoder that reconstructs the input image from the shared encoder.

    Architecture ``mta``: the U-Net plus ``model.reconstruction`` (a plain decoder with ``C_in`` linear
    outputs). Inputs get Gaussian noise (``noise_std``, the paper's augmentation for MTA) and the
    reconstruction target is the clean slice, so the extra task is denoising.

    ``loss = Dice(seg(x_l + n), y_l) + recon_weight * MSE(recon(x + n), x)`` over labelled and unlabelled
    slices together (default weight 1, no ramp-up: the task is well posed from the first step).
    ``--alpha`` is not used. Inference runs the segmentation decoder only. Chen et al.'s attention
    mechanism (foreground / background attention-weighted reconstructions) is not included.
    """

    name = "mta"
    architecture = "mta"
    uses_unlabelled = True

    def __init__(self, architecture: str = "mta", recon_weight: float = 1.0, noise_std: float = 0.1,
                 **_ignored):
        super().__init__(architecture, recon_weight=recon_weight, noise_std=noise_std)
        self.recon_weight = recon_weight
        self.noise_std = noise_std

    def loss_terms(self, model: nn.Module, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        """``supervised`` and ``reconstruction`` (unweighted) tensors."""
        n_l = batch.n_labelled
        x = batch.inputs()
        clean = x.float()

        def heads(net: nn.Module, features: list[torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
            labelled = [f[:n_l] for f in features]
            seg = [net.decode(d, labelled, size) for d in net.decoders]
            terms = {"supervised": batch.supervised(seg)}
            if net.reconstruction is not None:
                recon = net.decode(net.reconstruction, features, size).float()
                terms["reconstruction"] = torch.mean((recon - clean) ** 2)
            return terms

        return model(gaussian_noise(x, self.noise_std), heads=heads)

    def loss(self, model: nn.Module, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, float]]:
        t = self.loss_terms(model, batch)
        extra = [("reconstruction", t["reconstruction"], self.recon_weight)] if "reconstruction" in t else []
        return combine_losses(t["supervised"], *extra)
