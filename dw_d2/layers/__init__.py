"""Layers dw-d2 adds to Detectron2's: deformable convolutions without compiled operators, and
BatchNorm with frozen statistics and a trainable affine transform (config name
``FrozenStatsBN``)."""
from .batch_norm import (NORM_LAYERS, FrozenStatisticsBatchNorm2d, get_norm,
                         has_frozen_statistics, resolve_norm)
from .deform_conv import DeformConv, ModulatedDeformConvWithOffsets, split_offsets_and_mask

__all__ = [
    "DeformConv",
    "ModulatedDeformConvWithOffsets",
    "split_offsets_and_mask",
    "FrozenStatisticsBatchNorm2d",
    "NORM_LAYERS",
    "resolve_norm",
    "get_norm",
    "has_frozen_statistics",
]
