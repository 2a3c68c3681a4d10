"""Building blocks of the 2D U-Net backbone and of the MisMatch decoders.

Every block maps ``[B, C_in, H, W]`` to ``[B, C_out, H', W']``; normalisation is instance normalisation
with affine parameters (the paper's "normalisation layer"), activations ReLU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv3x3(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with 'same' padding for stride 1 (padding = dilation)."""
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation)


class _ChannelsLastInstanceNorm(torch.autograd.Function):
    """Instance normalisation of a channels-last float32 CPU tensor, with a backward written for that layout.

    The forward is torch's own (``native_group_norm``, one group per channel), fast in channels-last. Its
    backward in channels-last is not: it was the largest single cost of a MisMatch training step on a CPU,
    and the same arithmetic as a few whole-tensor operations makes the step 0.85 of the time
    (``docs/benchmarks.md``, "Training step"). The backward here is the textbook one, per sample n and
    channel c over the H x W pixels, with ``xhat = (x - mean) * rstd`` and ``a = weight * rstd``::

        dx = a * (dy - mean(dy) - xhat * mean(dy * xhat)),   dweight = sum(dy * xhat),   dbias = sum(dy)

    equal to torch's to float rounding (tested).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n, c = x.shape[:2]
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, x.numel() // (n * c), c, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        r = rstd.view(n, c, 1, 1)
        xhat = torch.addcmul(-mean.view(n, c, 1, 1) * r, x, r)
        sum_dy = dy.sum((2, 3))
        sum_dy_xhat = (dy * xhat).sum((2, 3))
        a = weight.view(1, c) * rstd
        dx = torch.addcmul((-a * sum_dy / (h * w)).view(n, c, 1, 1), dy, a.view(n, c, 1, 1))
        dx.addcmul_(xhat, (-a * sum_dy_xhat / (h * w)).view(n, c, 1, 1))
        return dx, sum_dy_xhat.sum(0), sum_dy.sum(0), None


class InstanceNorm(nn.GroupNorm):
    """Instance normalisation with per-channel affine parameters: ``GroupNorm`` with one group per channel.

    ``GroupNorm(C, C)`` is the same operation as ``InstanceNorm2d(C, affine=True)`` (statistics per sample
    and channel over H x W) but keeps channels-last tensors in place on the CPU, where ``InstanceNorm2d``
    copies them (3-8 x slower at 512 x 512). When training on the CPU in channels-last float32 (what the
    engine does there) the gradient is :class:`_ChannelsLastInstanceNorm`'s; anything else (inference, a
    GPU, other layouts or precisions) is ``GroupNorm``'s own. The parameters and a saved model's keys are
    ``GroupNorm``'s.
    """

    def __init__(self, channels: int):
        super().__init__(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32
                and self.affine and x.is_contiguous(memory_format=torch.channels_last)
                and not x.is_contiguous()):
            return _ChannelsLastInstanceNorm.apply(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def norm(c: int) -> nn.Module:
    """Instance normalisation with per-channel affine parameters (:class:`InstanceNorm`)."""
    return InstanceNorm(c)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by normalisation and ReLU: the standard U-Net block.

    ``[B, C_in, H, W] -> [B, C_out, H / stride, W / stride]``; ``stride=2`` makes the first convolution
    downsample (an encoder block).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(c_in, c_out, stride=stride), norm(c_out), nn.ReLU(inplace=True),
            conv3x3(c_out, c_out), norm(c_out), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Halve the channels with a 1x1 convolution at the coarse resolution, then upsample bilinearly x2.

    ``[B, C_in, H, W] -> [B, C_out, 2H, 2W]``. The 1x1 projection before the upsampling is the original
    U-Net's "up-convolution that halves the number of feature channels", done where it is cheap.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.project = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.project(x), size=size, mode="bilinear", align_corners=False)


class DecoderBlock(nn.Module):
    """Plain U-Net decoder stage: upsample the coarse features, concatenate the skip, :class:`ConvBlock`.

    ``forward(coarse [B, C_coarse, H/2, W/2], skip [B, C_skip, H, W]) -> [B, C_out, H, W]``. The skip is
    concatenated at exactly its own resolution (no cropping), so the features stay aligned.
    """

    def __init__(self, c_coarse: int, c_skip: int, c_out: int):
        super().__init__()
        self.up = Upsample(c_coarse, c_out)
        self.c_in = c_out + c_skip
        self.main = ConvBlock(self.c_in, c_out)

    def merge(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.up(coarse, skip.shape[-2:]), skip], dim=1)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.main(self.merge(coarse, skip))


class _ShiftingBlock(DecoderBlock):
    """A decoder stage whose main branch is modulated by a per-pixel, per-channel attention mask.

    ``output = main * mask + main`` (the paper's Sec. 2.1-2.2: the side branch's sigmoid mask perturbs the
    main branch, then a skip connection adds the unperturbed main branch back). Subclasses build
    ``self.side`` mapping the merged input ``[B, C_in, H, W]`` to mask logits ``[B, C_out, H, W]``.
    """

    side: nn.Module

    def attention(self, merged: torch.Tensor) -> torch.Tensor:
        """The attention mask in (0, 1), shape ``[B, C_out, H, W]``."""
        return self.side(merged).sigmoid_()  # in place: the side branch's last output is not needed again

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        merged = self.merge(coarse, skip)
        main = self.main(merged)
        return torch.addcmul(main, main, self.attention(merged))  # main * mask + main, one pass

    def reference_forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The block as the paper's Fig. 6 draws it, one operation at a time: the main branch, the side
        branch's sigmoid mask, ``main * mask + main``. :meth:`forward` computes the same numbers with fewer
        passes over memory (tested equal); this one is for reading against the paper."""
        merged = self.merge(coarse, skip)
        main = self.main(merged)
        mask = torch.sigmoid(self.side_reference(merged))
        return main * mask + main

    def side_reference(self, merged: torch.Tensor) -> torch.Tensor:
        """The side branch's mask logits, computed plainly."""
        return self.side(merged)


#: the narrowest side branch: below 8 channels, channels-last normalisation on the CPU takes a slow path
#: (about 7 x slower for 4 channels than for 8 at 512 x 512)
MIN_SIDE_WIDTH = 8
#: the PASB side branch's atrous convolutions (the paper's dilation)
DILATION = 5
#: the PASB side branches: ``factorised`` (what the engine trains) and ``paper`` (full-rank, as drawn; slower
#: on a CPU, docs/benchmarks.md)
PASB_SIDES = ("factorised", "paper")


def _side_width(c_out: int, side_ratio: float) -> int:
    return max(MIN_SIDE_WIDTH, int(round(c_out * side_ratio)))


class PositiveAttentionShiftingBlock(_ShiftingBlock):
    """PASB (paper Sec. 2.1, Fig. 6): the dilating decoder stage of f_d1.

    Side branch (``side="paper"``, the block's default): two consecutive atrous 3x3 convolutions with
    dilation 5, each followed by ReLU and instance normalisation, then a sigmoid. The large receptive
    field of the atrous convolutions spreads foreground evidence outwards, so the mask enlarges the
    foreground features (Sec. 2: "Atrous convolution can enlarge foreground features").
    ``side="factorised"`` (the default of :class:`~mismatch.models.networks.ArchitectureConfig`) is the
    same branch with the first atrous convolution's weight factorised as a 1x1 projection to the hidden
    width followed by an atrous 3x3 convolution at that width: still one atrous 3x3 convolution from the
    merged input (the composition of the two is one, with a weight of rank ``s`` over the input
    channels), but it reads the wide full-resolution input once with a cheap 1x1 instead of with a
    dilated 3x3 of few output channels, which the CPU convolution kernels run inefficiently (10 ms
    against 2.5 + 2 ms at 512 x 512 on 2 cores).

    ``side_ratio`` sets the width of the side branch's hidden layer relative to ``C_out`` (at least
    :data:`MIN_SIDE_WIDTH`).
    ``forward(coarse [B, C_coarse, H/2, W/2], skip [B, C_skip, H, W]) -> [B, C_out, H, W]``.
    """

    def __init__(self, c_coarse: int, c_skip: int, c_out: int, side: str = "paper", side_ratio: float = 0.5):
        super().__init__(c_coarse, c_skip, c_out)
        if side not in PASB_SIDES:
            raise ValueError(f"unknown PASB side branch {side!r}: use {' or '.join(map(repr, PASB_SIDES))}")
        s = _side_width(c_out, side_ratio)
        first = conv3x3(self.c_in, s, dilation=DILATION)  # built for both: a seed gives the same weights
        if side == "factorised":  # the same atrous convolution, its weight of rank s over the inputs
            first = nn.Sequential(nn.Conv2d(self.c_in, s, 1, bias=False), conv3x3(s, s, dilation=DILATION))
        self.side = nn.Sequential(
            first, nn.ReLU(inplace=True), norm(s),
            conv3x3(s, c_out, dilation=DILATION), nn.ReLU(inplace=True), norm(c_out),
        )


class _ResidualConv(nn.Module):
    """3x3 convolution with a skip connection around it, then ReLU and normalisation.

    ``[B, C_in, H, W] -> [B, C_out, H, W]``; the skip is the identity when ``C_in == C_out`` and a 1x1
    projection otherwise.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = conv3x3(c_in, c_out)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)
        self.post = nn.Sequential(nn.ReLU(inplace=True), norm(c_out))

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the one 3x3 convolution equal to ``conv(x) + skip(x)``: the skip (identity or
        1x1 projection) added to the centre tap. Gradients reach ``conv`` and ``skip`` as before."""
        w = self.conv.weight
        if isinstance(self.skip, nn.Identity):
            centre = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        else:
            centre = self.skip.weight[:, :, 0, 0]
        return w + F.pad(centre[:, :, None, None], (1, 1, 1, 1)), self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.fused_weight()  # conv(x) + skip(x) in one pass over x
        return self.post(F.conv2d(x, weight, bias, padding=1))

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``post(conv(x) + skip(x))`` as drawn; :meth:`forward` is the same with the skip folded in."""
        return self.post(self.conv(x) + self.skip(x))


class NegativeAttentionShiftingBlock(_ShiftingBlock):
    """NASB (paper Sec. 2.2, Fig. 6): the eroding decoder stage of f_d2.

    Side branch: like the main branch (two 3x3 convolutions, ReLU, normalisation) but with a skip
    connection around each convolution, then a sigmoid. Skip connections keep the receptive field
    small and centred ("skip-connections can shrink foreground features"), so the mask concentrates on
    the core of the foreground. The sigmoid is applied (the public 2D code omits it; a bug there).

    ``side_ratio`` sets the hidden width relative to ``C_out`` (at least :data:`MIN_SIDE_WIDTH`).
    ``forward(coarse [B, C_coarse, H/2, W/2], skip [B, C_skip, H, W]) -> [B, C_out, H, W]``.
    """

    def __init__(self, c_coarse: int, c_skip: int, c_out: int, side_ratio: float = 0.5):
        super().__init__(c_coarse, c_skip, c_out)
        s = _side_width(c_out, side_ratio)
        self.side = nn.Sequential(_ResidualConv(self.c_in, s), _ResidualConv(s, c_out))

    def side_reference(self, merged: torch.Tensor) -> torch.Tensor:
        h = merged
        for layer in self.side:   # two residual convolutions, each with its skip as a separate term
            h = layer.reference_forward(h)
        return h

    # forward: _ShiftingBlock.forward, each residual convolution of the side branch one 3x3 convolution with
    # its skip folded in (_ResidualConv.forward). Stacking the side's first convolution with the main
    # branch's (one pass over the merged input) was measured slower on a CPU at 512 x 512 (the two halves of
    # the stacked output are strided views that normalisation copies): 245 against 234 ms a MisMatch slice.
