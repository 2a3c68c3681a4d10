"""Supervised training on the labelled slices only: the paper's Sup1 (U-Net) and Sup2 (MisMatch network)."""

from __future__ import annotations

import torch
from torch import nn

from .augment import anatomy_preserving
from .base import Method, TrainingBatch


def flip_and_noise(x: torch.Tensor, y: torch.Tensor | None, noise_std: float = 0.1,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The paper's supervised augmentation: random horizontal / vertical flips and Gaussian noise.

    ``x [B, C, H, W]`` (normalised intensities, so ``noise_std`` is in units of the volume's standard
    deviation), ``y [B, H, W]`` flipped with ``x``. Each sample gets its own flips.
    """
    x = x.clone()
    y = None if y is None else y.clone()
    b = x.shape[0]
    flips = torch.rand(b, 2, generator=generator, device="cpu") < 0.5
    for i in range(b):
        dims = [d for d, f in zip((-1, -2), flips[i].tolist()) if f]
        if dims:
            x[i] = torch.flip(x[i], dims)
            if y is not None:
                y[i] = torch.flip(y[i], [d + 1 for d in dims])  # y has no channel axis
    noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
    return x + noise_std * noise, y


AUGMENTATIONS = ("paper", "anatomy", "none")


class SupervisedMethod(Method):
    """Dice (+ cross-entropy for multi-class, or with ``cross_entropy``) on each decoder, labelled slices only.

    ``augment``: ``"paper"`` (Sup1's flips and Gaussian noise), ``"anatomy"``
    (:func:`~mismatch.methods.augment.anatomy_preserving`: small rotations and scaling, intensity jitter, no
    flips) or ``"none"``.
    """

    name = "supervised"
    uses_unlabelled = False

    def __init__(self, architecture: str = "unet", augment: str = "paper", noise_std: float = 0.1,
                 cross_entropy: bool = False, name: str | None = None, **_ignored):
        augment = {True: "paper", False: "none"}.get(augment, augment)
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, not {augment!r}")
        super().__init__(architecture, augment=augment, noise_std=noise_std, cross_entropy=cross_entropy)
        self.name = name or ("unet" if architecture == "unet" else "sup2")
        self.augment = augment
        self.noise_std = noise_std
        self.cross_entropy = bool(cross_entropy)

    def loss(self, model: nn.Module, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch.labelled_x, batch.labelled_y
        if self.augment == "paper":
            x, y = flip_and_noise(x, y, self.noise_std)
        elif self.augment == "anatomy":
            x, y = anatomy_preserving(x, y)
        outputs = model(x)
        sup = batch.supervised(outputs, y, self.cross_entropy)
        return sup, {"dice": float(sup.detach())}
