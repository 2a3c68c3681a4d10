"""Networks: the U-Net backbone and MisMatch (paper Sec. 2, Fig. 6)."""

from .blocks import (
    ConvBlock,
    DecoderBlock,
    NegativeAttentionShiftingBlock,
    PositiveAttentionShiftingBlock,
)
from .networks import (
    ARCHITECTURES,
    ArchitectureConfig,
    Decoder,
    Encoder,
    SegmentationNetwork,
    UnsupportedArchitecture,
    build_model,
    count_parameters,
)

__all__ = [
    "ARCHITECTURES", "ArchitectureConfig", "ConvBlock", "Decoder", "DecoderBlock", "Encoder",
    "NegativeAttentionShiftingBlock", "PositiveAttentionShiftingBlock", "SegmentationNetwork",
    "UnsupportedArchitecture", "build_model", "count_parameters",
]
