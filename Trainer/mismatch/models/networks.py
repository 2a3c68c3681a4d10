"""The 2D networks: the U-Net backbone (Sup1), MisMatch (encoder + two attention-shifting decoders) and
the baselines' variants of the backbone.

All networks share one interface: ``forward(x [B, C_in, H, W]) -> list of logits [B, K, H, W]``, one entry
per *segmentation* decoder (1 for the U-Net, 2 for MisMatch: positive then negative). ``K`` is 1 for a
binary (sigmoid) model and the number of classes including background for a multi-class (softmax) model.
H and W may be any size: the input is padded to a multiple of 8 and the output cropped back.

Training-only heads (``ArchitectureConfig.auxiliary``: CCT's auxiliary decoders, MTA's reconstruction
decoder) are part of the network, so that the optimiser trains them and a saved model loads strictly, but
``forward`` and ``predict`` never run them: inference sees the segmentation decoders only. Methods reach
them through ``forward(x, heads=fn)``, which runs ``fn(network, features, size)`` on the encoder's features
(with :meth:`SegmentationNetwork.decode`) inside the one forward call, so that a DistributedDataParallel
wrapper sees every parameter used in its forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from .blocks import (
    DILATION,
    MIN_SIDE_WIDTH,
    PASB_SIDES,
    ConvBlock,
    DecoderBlock,
    NegativeAttentionShiftingBlock,
    PositiveAttentionShiftingBlock,
)
from .heads import PERTURBATIONS, MorphologicalDecoderBlock

#: decoder block kinds: "plain" U-Net stage, "positive" (PASB), "negative" (NASB), and the Morph
#: baseline's plain stages followed by a fixed 3x3 grey-scale "dilate" or "erode"
BLOCK_KINDS = ("plain", "positive", "negative", "dilate", "erode")

#: architectures by name: the decoders each one has
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "unet": ("plain",),
    "mismatch": ("positive", "negative"),
    # the paper's decoder ablations (Sec. 3.3)
    "mm-a": ("plain", "plain"),
    "mm-b": ("plain", "negative"),
    "mm-c": ("plain", "positive"),
    # baselines (paper Sec. 3.1) that change the network; Mean Teacher and FixMatch train a "unet"
    "cct": ("plain",),
    "mta": ("plain",),
    "morph": ("dilate", "erode"),
}

#: training-only heads by architecture: CCT's auxiliary decoders (one per feature perturbation, see
#: :mod:`mismatch.models.heads`) and MTA's image reconstruction decoder. Not run at inference.
AUXILIARY_HEADS: dict[str, tuple[str, ...]] = {
    "cct": PERTURBATIONS,
    "mta": ("reconstruction",),
}

DOWNSAMPLING = 8  # three stride-2 encoder blocks

#: the attention side branches' widths in the decoder stages (coarse to fine), as fractions of the stage's
#: width, and the bottleneck's width as a multiple of ``8 * width``. The layout docs/benchmarks.md measured:
#: side branches at least :data:`~mismatch.models.blocks.MIN_SIDE_WIDTH` wide, the coarsest a quarter of its
#: stage's width, and the parameters that frees in a 1.25 x bottleneck, where they cost least; both networks
#: stay within 10 % of the paper's parameter counts.
SIDE_RATIOS = (0.25, 0.25, 0.125)
BOTTLENECK_RATIO = 1.25

#: that layout as every model card records it (under the names of the settings it once had), and as a card
#: read back must state it
CARD_LAYOUT: dict[str, Any] = {"side_ratio": SIDE_RATIOS, "dilation": DILATION,
                               "bottleneck_ratio": BOTTLENECK_RATIO, "min_side_width": MIN_SIDE_WIDTH}
#: what a card that does not record them was built with: the first engine's layout
_FIRST_LAYOUT: dict[str, Any] = {"side_ratio": (1.0, 0.25, 0.125), "dilation": DILATION, "bottleneck_ratio": 1.0,
                                 "min_side_width": 4}


class UnsupportedArchitecture(UserError, ValueError):
    """A network this engine does not build (a model card of an earlier layout, an unknown PASB side)."""


def _layout_value(key: str, value: Any) -> Any:
    """A card's layout entry in the form of :data:`CARD_LAYOUT` (the side ratios as a tuple of 3 floats)."""
    if key == "side_ratio":
        return tuple(float(r) for r in (value if isinstance(value, (list, tuple)) else (value,) * 3))
    return float(value)


def bottom_channels(width: int) -> int:
    """Channels of the bottleneck block: ``8 * width * BOTTLENECK_RATIO``."""
    return max(1, int(round(8 * width * BOTTLENECK_RATIO)))


@dataclass
class ArchitectureConfig:
    """Everything needed to rebuild a network; stored in the model card (with :data:`CARD_LAYOUT`)."""

    name: str = "mismatch"
    in_channels: int = 1
    num_classes: int = 2  # including background
    width: int = 24
    pasb_side: str = "factorised"  # one of PASB_SIDES; only networks with a positive decoder use it
    context: int = 0               # neighbouring slices on each side given with each slice (2.5D input)

    def __post_init__(self):
        try:   # a card is read back through here: a damaged value is one clear error, not a traceback
            whole = not isinstance(self.context, bool) and int(self.context) == self.context >= 0
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise UserError(f"context {self.context!r}: give a whole number of neighbouring slices, 0 or more")
        self.context = int(self.context)
        if "positive" in ARCHITECTURES.get(self.name, ()) and self.pasb_side not in PASB_SIDES:
            raise UnsupportedArchitecture(
                f"PASB side branch {self.pasb_side!r} is not one this engine builds "
                f"({' or '.join(map(repr, PASB_SIDES))}); a model trained with it must be trained again")

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def input_channels(self) -> int:
        """The network's input channels: each image channel of the slice and of its ``context`` neighbours on
        either side (:func:`mismatch.data.slice_with_context`)."""
        return self.in_channels * (1 + 2 * self.context)

    @property
    def output(self) -> str:
        return "sigmoid" if self.binary else "softmax"

    @property
    def out_channels(self) -> int:
        return 1 if self.binary else self.num_classes

    @property
    def decoders(self) -> tuple[str, ...]:
        return ARCHITECTURES[self.name]

    @property
    def auxiliary(self) -> tuple[str, ...]:
        """The training-only heads (empty for every architecture but ``cct`` and ``mta``)."""
        return AUXILIARY_HEADS.get(self.name, ())

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(CARD_LAYOUT)
        d["output"] = self.output
        d["decoders"] = list(self.decoders)
        if self.auxiliary:  # absent for the other architectures, so their cards are unchanged
            d["auxiliary_heads"] = list(self.auxiliary)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ArchitectureConfig":
        """The configuration a model card's ``architecture`` describes; :class:`UnsupportedArchitecture` for
        a layout other than :data:`CARD_LAYOUT` (a key a card does not record stands for the first
        engine's layout, :data:`_FIRST_LAYOUT`)."""
        for key, layout in CARD_LAYOUT.items():
            stored = d.get(key, _FIRST_LAYOUT[key])
            try:
                same = _layout_value(key, stored) == _layout_value(key, layout)
            except (TypeError, ValueError):
                same = False
            if not same:
                if key in d:
                    raise UnsupportedArchitecture(f"the card's {key} is {stored!r}; this engine builds {key} "
                                                  f"{layout!r} only: train the model again")
                raise UnsupportedArchitecture(f"the card does not record {key}: it was written by an early engine "
                                              f"({key} {stored!r}), whose networks this engine no longer builds: "
                                              "train the model again")
        keys = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in keys})


class Encoder(nn.Module):
    """f_e: a full-resolution stem, three stride-2 blocks and a bottleneck block.

    ``[B, C_in, H, W] -> [s0 [B, w, H, W], s1 [B, 2w, H/2, W/2], s2 [B, 4w, H/4, W/4],
    bottom [B, b, H/8, W/8]]`` (the first three are the skip connections; ``b`` is
    :func:`bottom_channels`, ``1.25 * 8w``). Parameters are cheapest at the bottleneck (each weight is
    applied at 1/64 of the pixels), which is where the layout puts its extra width.
    """

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        w = width
        self.stem = ConvBlock(in_channels, w)
        self.down1 = ConvBlock(w, 2 * w, stride=2)
        self.down2 = ConvBlock(2 * w, 4 * w, stride=2)
        self.down3 = ConvBlock(4 * w, 8 * w, stride=2)
        self.bottleneck = ConvBlock(8 * w, bottom_channels(w))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s0 = self.stem(x)
        s1 = self.down1(s0)
        s2 = self.down2(s1)
        bottom = self.bottleneck(self.down3(s2))
        return [s0, s1, s2, bottom]


class Decoder(nn.Module):
    """Three decoder stages at the U-Net decoder's resolutions (H/4, H/2, H) and a 1x1 classifier.

    ``forward(features from Encoder) -> logits [B, K, H, W]``. ``kind`` picks the stage: plain, positive
    (PASB, f_d1) or negative (NASB, f_d2), or a plain stage followed by a fixed 3x3 dilation / erosion
    (``dilate`` / ``erode``, the Morph baseline).
    """

    def __init__(self, kind: str, width: int, out_channels: int, pasb_side: str = "factorised"):
        super().__init__()
        w = width
        stages = [(bottom_channels(w), 4 * w, 4 * w), (4 * w, 2 * w, 2 * w), (2 * w, w, w)]  # (coarse, skip, out)
        blocks = []
        for (c_coarse, c_skip, c_out), ratio in zip(stages, SIDE_RATIOS):
            if kind == "plain":
                blocks.append(DecoderBlock(c_coarse, c_skip, c_out))
            elif kind == "positive":
                blocks.append(PositiveAttentionShiftingBlock(c_coarse, c_skip, c_out, side=pasb_side,
                                                             side_ratio=ratio))
            elif kind == "negative":
                blocks.append(NegativeAttentionShiftingBlock(c_coarse, c_skip, c_out, side_ratio=ratio))
            elif kind in ("dilate", "erode"):
                blocks.append(MorphologicalDecoderBlock(c_coarse, c_skip, c_out, operation=kind))
            else:
                raise ValueError(f"unknown decoder kind {kind!r}: one of {BLOCK_KINDS}")
        self.kind = kind
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Conv2d(w, out_channels, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        s0, s1, s2, x = features
        for block, skip in zip(self.blocks, (s2, s1, s0)):
            x = block(x, skip)
        return self.classifier(x)


class SegmentationNetwork(nn.Module):
    """Shared encoder and one or more segmentation decoders (``ArchitectureConfig.decoders``), plus the
    training-only heads of ``ArchitectureConfig.auxiliary``.

    ``forward(x [B, C_in, H, W]) -> list of logits [B, K, H, W]``, one per segmentation decoder; ``C_in`` is
    :attr:`ArchitectureConfig.input_channels` (the slice's channels, then its neighbours' with ``context``).

    - ``aux_decoders``: CCT's auxiliary decoders, plain, one per perturbation in ``config.auxiliary``
      (empty otherwise, so other architectures' weights are unchanged).
    - ``reconstruction``: MTA's image decoder, plain, ``C_in`` linear outputs (``None`` otherwise).
    """

    def __init__(self, config: ArchitectureConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.input_channels, config.width)
        self.decoders = nn.ModuleList(
            Decoder(kind, config.width, config.out_channels, config.pasb_side) for kind in config.decoders)
        aux = config.auxiliary
        self.aux_decoders = nn.ModuleList(
            Decoder("plain", config.width, config.out_channels) for kind in aux if kind in PERTURBATIONS)
        self.reconstruction = (Decoder("plain", config.width, config.input_channels)
                               if "reconstruction" in aux else None)

    @property
    def decoder_names(self) -> list[str]:
        names = {"plain": "plain decoder", "positive": "positive decoder", "negative": "negative decoder",
                 "dilate": "dilation decoder", "erode": "erosion decoder"}
        return [names[d.kind] for d in self.decoders]

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """The encoder's features of ``x`` padded to a multiple of 8, and the original ``(H, W)``."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % DOWNSAMPLING, (-w) % DOWNSAMPLING
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.encoder(x), (h, w)

    @staticmethod
    def decode(decoder: nn.Module, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Run one decoder (segmentation or training-only) on :meth:`encode`'s features, cropped to ``size``."""
        return decoder(features)[..., :size[0], :size[1]]

    def forward(self, x: torch.Tensor,
                heads: Callable[["SegmentationNetwork", list[torch.Tensor], tuple[int, int]], Any] | None = None):
        """The segmentation decoders' logits, one ``[B, K, H, W]`` per decoder.

        ``heads`` (training only): instead, return ``heads(self, features, size)``, where ``features`` are
        :meth:`encode`'s and ``size`` the input's ``(H, W)``; the function runs whichever decoders and
        heads it needs with :meth:`decode`. Calling it through ``forward`` keeps a method's whole
        computation inside one call of the network (or of its DistributedDataParallel wrapper).
        """
        features, size = self.encode(x)
        if heads is not None:
            return heads(self, features, size)
        return [self.decode(decoder, features, size) for decoder in self.decoders]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` -> probabilities: foreground ``[B, 1, H, W]`` (binary) or ``[B, K, H, W]``."""
        return torch.sigmoid(logits) if self.config.binary else torch.softmax(logits, dim=1)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The prediction: the mean of the decoders' probabilities, and each decoder's probabilities."""
        per_decoder = [self.probabilities(l.float()) for l in self(x)]
        return torch.stack(per_decoder).mean(0), per_decoder


def build_model(name: str = "mismatch", in_channels: int = 1, num_classes: int = 2, width: int = 24,
                **options) -> SegmentationNetwork:
    """A network by architecture name (a key of :data:`ARCHITECTURES`: ``unet``, ``mismatch``, ``mm-a``,
    ``mm-b``, ``mm-c``, ``cct``, ``mta``, ``morph``)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}: one of {sorted(ARCHITECTURES)}")
    return SegmentationNetwork(ArchitectureConfig(name=name, in_channels=in_channels,
                                                  num_classes=num_classes, width=width, **options))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
