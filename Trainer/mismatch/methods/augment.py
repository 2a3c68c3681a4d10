"""Input augmentations of the semi-supervised baselines.

- :func:`gaussian_noise`: the paper's "Gaussian noise" (Mean Teacher, FixMatch's weak view, MTA, Morph).
- :func:`rand_augment`: FixMatch's strong view, RandAugment (Cubuk et al. 2020) without shear, adapted to
  normalised single- or multi-channel medical slices. Photometric operations only, plus Cutout: a
  geometric operation would move the pixels away from the pseudo-labels taken on the weak view.

All take ``x [B, C, H, W]`` (z-scored intensities) and return a new tensor of the same shape. Random
numbers are drawn on the CPU from torch's global generator (as :func:`~mismatch.methods.supervised.flip_and_noise`
does), so a seed gives the same augmentations on every device.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def gaussian_noise(x: torch.Tensor, std: float = 0.1) -> torch.Tensor:
    """``x + std * N(0, 1)``; ``std`` is in units of the volume's standard deviation."""
    if std <= 0:
        return x
    return x + std * torch.randn(x.shape).to(x.device, x.dtype)


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 binomial smoothing of ``[C, H, W]`` (edges replicated)."""
    c = x.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    k = (k[:, None] * k[None, :] / 16).expand(c, 1, 3, 3)
    return F.conv2d(F.pad(x[None], (1, 1, 1, 1), mode="replicate"), k, groups=c)[0]


def _equalise(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel: each value becomes its rank, scaled to [0, 1]."""
    flat = x.flatten(1)
    ranks = flat.argsort(1).argsort(1).to(x.dtype)
    return (ranks / max(1, flat.shape[1] - 1)).view_as(x)


# Photometric operations on one sample ``[C, H, W]`` rescaled to [0, 1]; ``m`` in [0, 1] is the magnitude.
def _brightness(x, m):
    return (x + _uniform(-1, 1) * 0.3 * m).clamp(0, 1)


def _contrast(x, m):
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (mean + (1 + _uniform(-1, 1) * 0.7 * m) * (x - mean)).clamp(0, 1)


def _gamma(x, m):
    return x.clamp_min(0).pow(float(torch.exp(torch.tensor(_uniform(-1, 1) * 0.7 * m))))


def _sharpness(x, m):
    return (x + 1.5 * m * (x - _blur(x))).clamp(0, 1)


def _smooth(x, m):
    return torch.lerp(x, _blur(_blur(x)), m)


def _posterise(x, m):
    levels = 2 ** round(8 - 4 * m)  # 256 .. 16 grey levels
    return torch.round(x * (levels - 1)) / (levels - 1)


def _solarise(x, m):
    threshold = 1 - 0.7 * m
    return torch.where(x < threshold, x, 1 - x)


def _equalise_op(x, m):
    return torch.lerp(x, _equalise(x), m)


#: RandAugment's photometric operations (no shear, no geometric operation), by name
OPERATIONS = {
    "brightness": _brightness, "contrast": _contrast, "gamma": _gamma, "sharpness": _sharpness,
    "blur": _smooth, "posterise": _posterise, "solarise": _solarise, "equalise": _equalise_op,
}


def cutout(x: torch.Tensor, max_fraction: float = 0.5) -> torch.Tensor:
    """One square hole per sample, side ``U(0, max_fraction)`` of the shorter image side, filled with the
    sample's mean intensity (per channel)."""
    x = x.clone()
    b, _, h, w = x.shape
    for i in range(b):
        side = int(round(_uniform(0, max_fraction) * min(h, w)))
        if side < 1:
            continue
        top = int(torch.randint(0, h - side + 1, ()))
        left = int(torch.randint(0, w - side + 1, ()))
        x[i, :, top:top + side, left:left + side] = x[i].mean(dim=(-2, -1), keepdim=True)
    return x


def rand_augment(x: torch.Tensor, n_ops: int = 2, probability: float = 0.5, cutout_fraction: float = 0.5,
                 operations: dict | None = None) -> torch.Tensor:
    """FixMatch's strong augmentation ("RandAugment without shear").

    Per sample: ``n_ops`` operations drawn uniformly from :data:`OPERATIONS` (with replacement), each
    applied with ``probability`` at a magnitude drawn from U(0, 1) (FixMatch's RandAugment variant, no
    global magnitude to tune); then :func:`cutout` always. The operations act on each channel rescaled to
    [0, 1] by its min and max, and the result is mapped back to the original range, so they work on
    z-scored intensities of any scale.
    """
    ops = list((operations or OPERATIONS).values())
    out = x.clone()
    for i in range(x.shape[0]):
        s = x[i].float()
        lo = s.amin(dim=(-2, -1), keepdim=True)
        span = (s.amax(dim=(-2, -1), keepdim=True) - lo).clamp_min(1e-6)
        u = (s - lo) / span
        for _ in range(n_ops):
            op = ops[int(torch.randint(0, len(ops), ()))]
            if float(torch.rand(())) < probability:
                u = op(u, float(torch.rand(())))
        out[i] = (u * span + lo).to(x.dtype)
    return cutout(out, cutout_fraction) if cutout_fraction > 0 else out


def anatomy_preserving(x: torch.Tensor, y: torch.Tensor, max_rotation: float = 15.0,
                       scale: tuple[float, float] = (0.85, 1.15), intensity: float = 0.1,
                       noise_std: float = 0.05, probability: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmentation that does not invent anatomy, for labelled slices ``x [B, C, H, W]``, ``y [B, H, W]``.

    With ``probability`` per sample: a small rotation (``+-max_rotation`` degrees) and isotropic scaling
    about the centre (image bilinear, labels nearest, the border replicated), a random intensity gain and
    offset (``1 +- intensity``, ``+- intensity`` standard deviations, per channel) and Gaussian noise. No
    flips: a mirrored slice is a body that does not exist (situs inversus, a tumour on the wrong side), and
    the volume's other slices show the network the real orientation.
    """
    b = x.shape[0]
    apply = torch.rand(b) < probability
    if not bool(apply.any()):
        return x, y
    angle = (torch.rand(b) * 2 - 1) * max_rotation * torch.pi / 180
    zoom = torch.empty(b).uniform_(*scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[~apply] = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    theta = theta.to(x.device, torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    xf = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    yf = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False)
    gain = 1 + (torch.rand(b, x.shape[1], 1, 1) * 2 - 1) * intensity
    offset = (torch.rand(b, x.shape[1], 1, 1) * 2 - 1) * intensity
    keep = (~apply).view(b, 1, 1, 1)
    gain, offset = torch.where(keep, 1.0, gain), torch.where(keep, 0.0, offset)
    xf = xf * gain.to(x.device) + offset.to(x.device)
    if noise_std > 0:
        xf = xf + noise_std * torch.randn(xf.shape).to(x.device) * (~keep).to(x.device)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return xf.to(x.dtype).contiguous(memory_format=fmt), yf[:, 0].round().to(y.dtype)
