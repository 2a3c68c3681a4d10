"""MisMatch: semi-supervised 2D segmentation from a few labelled slices.

Implements Xu et al., "Learning Morphological Feature Perturbations for Calibrated Semi-Supervised
Segmentation" (MIDL 2022): a U-Net encoder with a dilating (positive attention shifting) and an eroding
(negative attention shifting) decoder, trained with Dice on labelled slices and a consistency loss between
the two decoders on unlabelled slices.
"""

__version__ = "0.1.0"
