"""The method interface shared by MisMatch and the baselines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..losses import supervised_loss


@dataclass
class TrainingBatch:
    """One step's data. ``labelled_x [B, C, H, W]``, ``labelled_y [B, H, W]`` (long),
    ``unlabelled_x [B_u, C, H, W]`` or None for supervised methods; ``step`` counts from 0.

    ``batch_sum``: with several processes training one model, a differentiable sum over the processes
    (:attr:`mismatch.distributed.Context.batch_sum`) that the soft Dice applies to its sums so that they cover
    the global batch (:func:`mismatch.losses.soft_dice_loss`); None for one process."""

    labelled_x: torch.Tensor
    labelled_y: torch.Tensor
    unlabelled_x: torch.Tensor | None
    step: int
    total_steps: int
    batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def n_labelled(self) -> int:
        return self.labelled_x.shape[0]

    def inputs(self, labelled: torch.Tensor | None = None) -> torch.Tensor:
        """One input batch for the network: the labelled slices (or ``labelled``, a transformed copy of them)
        then the unlabelled ones, if any; its first :attr:`n_labelled` rows are the labelled."""
        x = self.labelled_x if labelled is None else labelled
        return x if self.unlabelled_x is None else torch.cat([x, self.unlabelled_x])

    def supervised(self, outputs: list[torch.Tensor], target: torch.Tensor | None = None,
                   cross_entropy: bool = False) -> torch.Tensor:
        """The supervised loss (:func:`mismatch.losses.supervised_loss`) of each decoder's logits, averaged over
        the decoders: the first :attr:`n_labelled` rows of each of ``outputs`` against ``target`` (default the
        labelled masks)."""
        target = self.labelled_y if target is None else target
        n_l = self.n_labelled
        return torch.stack([supervised_loss(o[:n_l], target, cross_entropy, self.batch_sum) for o in outputs]).mean()


def combine_losses(supervised: torch.Tensor, *extra: tuple[str, torch.Tensor, float]
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """``supervised + sum(weight * term)`` over the ``(name, term, weight)`` extras, and the progress terms:
    ``dice`` (the supervised loss) and each extra term by name, unweighted, as plain floats."""
    loss = supervised
    out = {"dice": float(supervised.detach())}
    for name, term, weight in extra:
        loss = loss + weight * term
        out[name] = float(term.detach())
    return loss, out


class Method:
    """How a batch becomes a loss. Subclasses set ``architecture`` and implement :meth:`loss`."""

    name: str = "method"
    architecture: str = "unet"
    uses_unlabelled: bool = False

    def __init__(self, architecture: str | None = None, **options):
        if architecture is not None:
            self.architecture = architecture
        self.options = options

    def loss(self, model: nn.Module, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss to minimise and its named terms (plain floats, for progress events)."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimiser step (e.g. an EMA teacher update)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the method keeps between steps (e.g. an EMA teacher), saved in training checkpoints so
        that ``--resume`` continues exactly; empty for stateless methods."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        """Restore :meth:`state_dict` after ``model`` (the student) has been restored."""
