"""The 2D networks: the U-Net backbone (Sup1) and MisMatch (encoder + two attention-shifting decoders).

All networks share one interface: ``forward(x [B, C_in, H, W]) -> list of logits [B, K, H, W]``, one entry
per decoder (1 for the U-Net, 2 for MisMatch: positive then negative). ``K`` is 1 for a binary (sigmoid)
model and the number of classes including background for a multi-class (softmax) model. H and W may be
any size: the input is padded to a multiple of 8 and the output cropped back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import (
    ConvBlock,
    DecoderBlock,
    NegativeAttentionShiftingBlock,
    PositiveAttentionShiftingBlock,
)

#: decoder block kinds: "plain" U-Net stage, "positive" (PASB), "negative" (NASB)
BLOCK_KINDS = ("plain", "positive", "negative")

#: architectures by name: the decoders each one has
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "unet": ("plain",),
    "mismatch": ("positive", "negative"),
    # the paper's decoder ablations (Sec. 3.3)
    "mm-a": ("plain", "plain"),
    "mm-b": ("plain", "negative"),
    "mm-c": ("plain", "positive"),
}

DOWNSAMPLING = 8  # three stride-2 encoder blocks


@dataclass
class ArchitectureConfig:
    """Everything needed to rebuild a network; stored in the model card."""

    name: str = "mismatch"
    in_channels: int = 1
    num_classes: int = 2  # including background
    width: int = 24
    pasb_side: str = "paper"
    side_ratio: tuple[float, float, float] = (1.0, 0.25, 0.125)
    dilation: int = 5

    def __post_init__(self):
        if isinstance(self.side_ratio, (int, float)):
            self.side_ratio = (float(self.side_ratio),) * 3
        self.side_ratio = tuple(float(r) for r in self.side_ratio)

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def output(self) -> str:
        return "sigmoid" if self.binary else "softmax"

    @property
    def out_channels(self) -> int:
        return 1 if self.binary else self.num_classes

    @property
    def decoders(self) -> tuple[str, ...]:
        return ARCHITECTURES[self.name]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = self.output
        d["decoders"] = list(self.decoders)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ArchitectureConfig":
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in keys})


class Encoder(nn.Module):
    """f_e: a full-resolution stem, three stride-2 blocks and a bottleneck block.

    ``[B, C_in, H, W] -> [s0 [B, w, H, W], s1 [B, 2w, H/2, W/2], s2 [B, 4w, H/4, W/4],
    bottom [B, 8w, H/8, W/8]]`` (the first three are the skip connections).
    """

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        w = width
        self.stem = ConvBlock(in_channels, w)
        self.down1 = ConvBlock(w, 2 * w, stride=2)
        self.down2 = ConvBlock(2 * w, 4 * w, stride=2)
        self.down3 = ConvBlock(4 * w, 8 * w, stride=2)
        self.bottleneck = ConvBlock(8 * w, 8 * w)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s0 = self.stem(x)
        s1 = self.down1(s0)
        s2 = self.down2(s1)
        bottom = self.bottleneck(self.down3(s2))
        return [s0, s1, s2, bottom]


class Decoder(nn.Module):
    """Three decoder stages at the U-Net decoder's resolutions (H/4, H/2, H) and a 1x1 classifier.

    ``forward(features from Encoder) -> logits [B, K, H, W]``. ``kind`` picks the stage: plain, positive
    (PASB, f_d1) or negative (NASB, f_d2).
    """

    def __init__(self, kind: str, width: int, out_channels: int, pasb_side: str = "paper",
                 side_ratio: tuple[float, float, float] = (1.0, 0.25, 0.125), dilation: int = 5):
        super().__init__()
        w = width
        stages = [(8 * w, 4 * w, 4 * w), (4 * w, 2 * w, 2 * w), (2 * w, w, w)]  # (coarse, skip, out)
        blocks = []
        for (c_coarse, c_skip, c_out), ratio in zip(stages, side_ratio):
            if kind == "plain":
                blocks.append(DecoderBlock(c_coarse, c_skip, c_out))
            elif kind == "positive":
                blocks.append(PositiveAttentionShiftingBlock(
                    c_coarse, c_skip, c_out, side=pasb_side, side_ratio=ratio, dilation=dilation))
            elif kind == "negative":
                blocks.append(NegativeAttentionShiftingBlock(c_coarse, c_skip, c_out, side_ratio=ratio))
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
    """Shared encoder and one or more decoders (``ArchitectureConfig.decoders``).

    ``forward(x [B, C_in, H, W]) -> list of logits [B, K, H, W]``, one per decoder.
    """

    def __init__(self, config: ArchitectureConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.in_channels, config.width)
        self.decoders = nn.ModuleList(
            Decoder(kind, config.width, config.out_channels, config.pasb_side, config.side_ratio,
                    config.dilation)
            for kind in config.decoders
        )

    @property
    def decoder_names(self) -> list[str]:
        names = {"plain": "plain decoder", "positive": "positive decoder", "negative": "negative decoder"}
        return [names[d.kind] for d in self.decoders]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        ph, pw = (-h) % DOWNSAMPLING, (-w) % DOWNSAMPLING
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        features = self.encoder(x)
        return [decoder(features)[..., :h, :w] for decoder in self.decoders]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` -> probabilities: foreground ``[B, 1, H, W]`` (binary) or ``[B, K, H, W]``."""
        return torch.sigmoid(logits) if self.config.binary else torch.softmax(logits, dim=1)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The prediction: the mean of the decoders' probabilities, and each decoder's probabilities."""
        per_decoder = [self.probabilities(l.float()) for l in self(x)]
        return torch.stack(per_decoder).mean(0), per_decoder


def build_model(name: str = "mismatch", in_channels: int = 1, num_classes: int = 2, width: int = 24,
                **options) -> SegmentationNetwork:
    """A network by architecture name (``unet``, ``mismatch``, ``mm-a``, ``mm-b``, ``mm-c``)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}: one of {sorted(ARCHITECTURES)}")
    return SegmentationNetwork(ArchitectureConfig(name=name, in_channels=in_channels,
                                                  num_classes=num_classes, width=width, **options))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
