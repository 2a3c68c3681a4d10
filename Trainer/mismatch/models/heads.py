"""Pieces the semi-supervised baselines add to the U-Net backbone.

- :class:`MorphologicalDecoderBlock`: a plain decoder stage followed by a fixed grey-scale dilation or
  erosion of its features (the paper's "Morph" baseline).
- Feature perturbations for the auxiliary decoders of Cross-Consistency Training (Ouali et al. 2020):
  :func:`feature_noise`, :func:`feature_dropout`, :func:`feature_cutout` and :func:`vat_perturbation`.
  Each takes the encoder's feature list ``[s0, s1, s2, bottom]`` (``[B, C_i, H_i, W_i]``) and returns a
  perturbed list of the same shapes; the same kind of perturbation is applied to every level (the skip
  connections too, otherwise a U-Net decoder could route around a perturbed bottleneck).

The heads themselves are plain :class:`~mismatch.models.networks.Decoder` objects, built by
:class:`~mismatch.models.networks.SegmentationNetwork` from ``ArchitectureConfig.auxiliary``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.nn import functional as F

from .blocks import DecoderBlock

#: morphological operations of the Morph baseline's decoders
MORPH_OPERATIONS = ("dilate", "erode")

#: feature perturbations of the CCT auxiliary decoders, one decoder each
PERTURBATIONS = ("feature-noise", "feature-dropout", "vat", "cutout")


def grey_dilate(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Grey-scale dilation with a ``size x size`` square: the maximum over each neighbourhood (stride 1,
    same shape; the padding never wins the maximum)."""
    return F.max_pool2d(x, size, stride=1, padding=size // 2)


def grey_erode(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Grey-scale erosion: the minimum over each ``size x size`` neighbourhood, ``-dilate(-x)``."""
    return -F.max_pool2d(-x, size, stride=1, padding=size // 2)


class MorphologicalDecoderBlock(DecoderBlock):
    """A plain U-Net decoder stage whose output features are dilated or eroded (3x3, not learnt).

    ``forward(coarse [B, C_coarse, H/2, W/2], skip [B, C_skip, H, W]) -> [B, C_out, H, W]``. The block has
    exactly the parameters of :class:`DecoderBlock`; the operation is fixed. Features are non-negative
    (ReLU), so dilation enlarges every activated region by one pixel at this stage's resolution and erosion
    shrinks it by one.
    """

    def __init__(self, c_coarse: int, c_skip: int, c_out: int, operation: str = "dilate"):
        super().__init__(c_coarse, c_skip, c_out)
        if operation not in MORPH_OPERATIONS:
            raise ValueError(f"unknown morphological operation {operation!r}: one of {MORPH_OPERATIONS}")
        self.operation = operation

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = super().forward(coarse, skip)
        return grey_dilate(x) if self.operation == "dilate" else grey_erode(x)


# -- CCT feature perturbations ---------------------------------------------------------------------------

def feature_noise(features: Sequence[torch.Tensor], magnitude: float = 0.3) -> list[torch.Tensor]:
    """Multiplicative uniform noise: ``f * (1 + u)``, ``u ~ U(-magnitude, magnitude)`` per element."""
    return [f * (1 + (torch.rand_like(f) * 2 - 1) * magnitude) for f in features]


def feature_dropout(features: Sequence[torch.Tensor], low: float = 0.7, high: float = 0.9) -> list[torch.Tensor]:
    """Drop the most activated regions: where a level's channel-mean activation exceeds a fraction
    ``gamma ~ U(low, high)`` (drawn per sample) of its per-sample maximum, every channel is set to zero."""
    out = []
    for f in features:
        attention = f.mean(1, keepdim=True)                                    # [B, 1, H, W]
        peak = attention.flatten(1).amax(1).view(-1, 1, 1, 1)
        gamma = torch.empty_like(peak).uniform_(low, high)
        out.append(f * (attention < gamma * peak).to(f.dtype))
    return out


def feature_cutout(features: Sequence[torch.Tensor], max_fraction: float = 0.5,
                   min_fraction: float = 0.2) -> list[torch.Tensor]:
    """Zero one random rectangle per sample, at the same relative place on every level; its sides are
    ``U(min_fraction, max_fraction)`` of the map's sides."""
    b = features[0].shape[0]
    dev = features[0].device
    size = torch.empty(b, 2, device=dev).uniform_(min_fraction, max_fraction)   # relative (h, w)
    corner = torch.rand(b, 2, device=dev) * (1 - size)                        # relative (top, left)
    out = []
    for f in features:
        h, w = f.shape[-2:]
        ys = (torch.arange(h, device=dev) + 0.5) / h
        xs = (torch.arange(w, device=dev) + 0.5) / w
        in_y = (ys[None] >= corner[:, :1]) & (ys[None] < corner[:, :1] + size[:, :1])     # [B, H]
        in_x = (xs[None] >= corner[:, 1:]) & (xs[None] < corner[:, 1:] + size[:, 1:])     # [B, W]
        hole = in_y[:, :, None] & in_x[:, None, :]
        out.append(f * (~hole)[:, None].to(f.dtype))
    return out


def _unit_per_sample(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Scale a list of ``[B, ...]`` tensors so that, per sample, their joint L2 norm is 1."""
    sq = sum(t.float().pow(2).flatten(1).sum(1) for t in tensors)
    norm = sq.sqrt().clamp_min(1e-12).view(-1, *([1] * (tensors[0].dim() - 1)))
    return [t / norm.to(t.dtype) for t in tensors]


def prediction_divergence(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || prediction) per pixel, averaged: Bernoulli for one output channel (sigmoid), categorical
    otherwise (softmax). ``logits`` and ``target_probs`` ``[B, K, H, W]``."""
    logits = logits.float()
    t = target_probs.float()
    if logits.shape[1] == 1:
        log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)
        kl = t * (torch.log(t.clamp_min(1e-8)) - log_p) + (1 - t) * (torch.log((1 - t).clamp_min(1e-8)) - log_q)
        return kl.mean()
    return (t * (torch.log(t.clamp_min(1e-8)) - torch.log_softmax(logits, 1))).sum(1).mean()


def vat_perturbation(decode: Callable[[list[torch.Tensor]], torch.Tensor], features: Sequence[torch.Tensor],
                     target_probs: torch.Tensor, xi: float = 1e-6, eps: float = 2.0) -> list[torch.Tensor]:
    """Virtual adversarial perturbation of the features (Miyato et al. 2018), one power iteration.

    A random unit direction ``d`` (joint L2 norm 1 per sample over all levels) is scaled by ``xi``; the
    gradient of ``KL(target || decode(f + xi d))`` with respect to it gives the adversarial direction,
    and the returned features are ``f + eps * unit(gradient)`` (``eps`` is a per-sample L2 norm over all
    levels). ``decode`` maps a feature list to logits; ``target_probs`` is the (detached) main decoder's
    prediction. The direction search runs in float32 without autocast (its tiny gradients underflow in
    float16), uses detached features and accumulates no parameter gradient; the returned perturbation is
    a constant, so the gradient of whatever is computed on the result reaches the features and the decoder.
    """
    base = [f.detach().float() for f in features]
    r = [(xi * d).requires_grad_(True) for d in _unit_per_sample([torch.randn_like(f) for f in base])]
    device_type = base[0].device.type
    with torch.enable_grad(), torch.autocast(device_type, enabled=False):
        div = prediction_divergence(decode([f + ri for f, ri in zip(base, r)]), target_probs.detach())
        grads = torch.autograd.grad(div, r)
    r_adv = _unit_per_sample([g.detach() for g in grads])
    return [f + (eps * ra).to(f.dtype) for f, ra in zip(features, r_adv)]
