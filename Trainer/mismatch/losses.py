"""Loss functions: soft Dice on labelled slices, the decoders' consistency on unlabelled slices.

Shapes: probabilities are ``[B, 1, H, W]`` (binary, foreground) or ``[B, K, H, W]`` (multi-class, softmax,
class 0 = background); targets are integer label maps ``[B, H, W]``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.nn import functional as F

STOP_GRADIENT_MODES = ("none", "one-sided")

#: A differentiable sum over the processes that train one model (:attr:`mismatch.distributed.Context.batch_sum`)
BatchSum = Callable[[torch.Tensor], torch.Tensor]


def _global_sums(batch_sum: BatchSum | None, *sums: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if batch_sum is None:
        return sums
    return tuple(batch_sum(torch.stack(sums)).unbind(0))


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-5,
                   batch_sum: BatchSum | None = None) -> torch.Tensor:
    """1 - soft Dice (Milletari et al. 2016), averaged over the foreground classes.

    The Dice of each class is computed over the whole batch (sums over every pixel of every sample),
    so a labelled slice that is all background still gives a well-defined loss that pushes its
    foreground probability down. ``Dice_c = (2 sum p_c t_c + eps) / (sum p_c + sum t_c + eps)``.
    ``batch_sum``: with several processes, their sum, applied to the sums so that they cover the global batch
    (as one process would compute them); None (one process): the sums are this process's own.
    """
    if probs.shape[1] == 1:
        p = probs[:, 0]
        t = (target > 0).to(p.dtype)
        inter, total = _global_sums(batch_sum, (p * t).sum(), p.sum() + t.sum())
        dice = (2 * inter + eps) / (total + eps)
        return 1 - dice
    k = probs.shape[1]
    t = F.one_hot(target.long(), k).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter, total = _global_sums(batch_sum, (probs * t).sum(dims), probs.sum(dims) + t.sum(dims))
    dice = (2 * inter + eps) / (total + eps)
    return 1 - dice[1:].mean()


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, cross_entropy: bool = False,
                    batch_sum: BatchSum | None = None) -> torch.Tensor:
    """Dice for a binary model (the paper's loss), plus binary cross-entropy with ``cross_entropy``;
    Dice + cross-entropy for a multi-class model (``logits [B, K, H, W]``).

    Dice alone is a set-level loss: it rewards overlap and barely penalises a few confident false-positive
    pixels. Cross-entropy scores every pixel, which keeps the probabilities calibrated and the background of
    the few labelled slices learned; it is what the product's default uses. ``batch_sum``: see
    :func:`soft_dice_loss`.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        dice = soft_dice_loss(torch.sigmoid(logits), target, batch_sum=batch_sum)
        if not cross_entropy:
            return dice
        return dice + F.binary_cross_entropy_with_logits(logits[:, 0], (target > 0).to(logits.dtype))
    return (soft_dice_loss(torch.softmax(logits, 1), target, batch_sum=batch_sum)
            + F.cross_entropy(logits, target.long()))


def consistency_loss(probs_a: torch.Tensor, probs_b: torch.Tensor, stop_gradient: str = "none") -> torch.Tensor:
    """Mean squared error between two decoders' probabilities (paper Sec. 2.3).

    ``stop_gradient``:
    - ``"none"``: both decoders (and the encoder through both) receive the gradient. For an MSE this is
      what the authors' public code computes in effect: detaching each side in one of two symmetric
      terms only halves the gradient, it cuts nothing.
    - ``"one-sided"``: ``probs_b`` is a fixed target (detached, as SimSiam's stop-gradient): only the first
      decoder, and the encoder through it, learn from the consistency term.
    """
    if stop_gradient == "one-sided":
        probs_b = probs_b.detach()
    elif stop_gradient != "none":
        raise ValueError(f"unknown stop-gradient mode {stop_gradient!r}: one of {STOP_GRADIENT_MODES}")
    return F.mse_loss(probs_a.float(), probs_b.float())


def alpha_schedule(step: int, total: int, alpha: float, rampup: float = 0.4) -> float:
    """The consistency weight at ``step``: a sigmoid-shaped ramp-up over the first ``rampup`` of training.

    ``alpha * exp(-5 (1 - t)^2)`` with ``t = step / (rampup * total)`` clipped to 1 (Laine and Aila 2017),
    then constant at ``alpha``: the paper anneals alpha but does not give the schedule; a ramp-up keeps the
    consistency of two untrained decoders from dominating the first steps. ``rampup = 0`` is constant.
    """
    if rampup <= 0 or total <= 0:
        return alpha
    t = min(1.0, step / max(1.0, rampup * total))
    return alpha * math.exp(-5.0 * (1.0 - t) ** 2)
