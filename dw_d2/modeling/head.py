"""The dense head shared by DW and AutoAssign (FCOS-style, with DW's refinement offsets)."""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm

__all__ = ["DWHead"]

# Batch statistics would mix the levels, which share the towers; RetinaNet needs a special
# CycleBatchNormList for that. The official heads use GN.
_BATCH_NORMS = ("BN", "SyncBN", "FrozenBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N")
_GN_GROUPS = 32


class DWHead(nn.Module):
    """Per level: a classification tower and a regression tower (``num_convs`` x conv3x3-norm-
    ReLU, shared across levels), then a classification conv (C), a distance conv (l, t, r, b),
    a centerness/objectness conv and, optionally, DW's 8-channel refinement-offset conv, all
    3x3; the last three sit on the regression tower.

    Distances are ``relu(scale_l * x) * stride_l`` with a learnable scale per level, computed
    in at least float32 (the official head casts them with ``.float()``).
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_convs: int = 4,
        norm: str = "GN",
        prior_prob: float = 0.02,
        distance_bias_init: float = 4.0,
        box_refinement: bool = True,
    ):
        """
        Args:
            input_shape: one ShapeSpec per level (channels and stride), finest first. All levels
                must have the same number of channels.
            num_classes: C, the number of foreground classes.
            num_convs: depth of each tower.
            norm: normalisation in the towers: "GN" (32 groups) or "" (none).
            prior_prob: initial foreground probability of the classification conv.
            distance_bias_init: initial bias of the distance conv (distances start at
                ``relu(bias) * stride``).
            box_refinement: whether to add the refinement-offset conv.
        """
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"DWHead needs num_classes >= 1, got {num_classes}")
        if not input_shape:
            raise ValueError("DWHead needs at least one input feature level")
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                f"DWHead shares its towers across levels, so all levels need the same number of "
                f"channels; got {[s.channels for s in input_shape]}"
            )
        in_channels = channels.pop()
        if norm in _BATCH_NORMS:
            raise ValueError(
                f"DWHead norm {norm!r} is not supported: batch statistics would mix the FPN "
                f"levels that share the towers; use 'GN' or ''"
            )
        if norm == "GN" and in_channels % _GN_GROUPS != 0:
            raise ValueError(
                f"DWHead norm 'GN' uses {_GN_GROUPS} groups, which must divide the feature "
                f"channels ({in_channels}, MODEL.FPN.OUT_CHANNELS)"
            )
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"DWHead prior_prob must be in (0, 1), got {prior_prob}")

        self.num_classes = num_classes
        self.strides = [int(s.stride) for s in input_shape]
        self.cls_tower = self._make_tower(in_channels, num_convs, norm)
        self.reg_tower = self._make_tower(in_channels, num_convs, norm)
        self.cls_score = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.distance_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.centerness_pred = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.refine_offset_pred = (
            nn.Conv2d(in_channels, 8, 3, padding=1) if box_refinement else None
        )
        self.scales = nn.Parameter(torch.ones(len(input_shape)))

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(self.distance_pred.bias, distance_bias_init)

    @staticmethod
    def _make_tower(channels: int, num_convs: int, norm: str) -> nn.Sequential:
        layers = []
        for _ in range(num_convs):
            layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=True))
            norm_layer = get_norm(norm, channels)
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        head = cfg.MODEL.DW
        return {
            "input_shape": input_shape,
            "num_classes": head.NUM_CLASSES,
            "num_convs": head.NUM_CONVS,
            "norm": head.NORM,
            "prior_prob": head.PRIOR_PROB,
            "distance_bias_init": head.DISTANCE_BIAS_INIT,
            "box_refinement": head.BOX_REFINEMENT,
        }

    @property
    def box_refinement(self) -> bool:
        return self.refine_offset_pred is not None

    def forward(
        self, features: List[Tensor]
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], Optional[List[Tensor]]]:
        """
        Args:
            features: one (N, C_in, H_l, W_l) map per level, in the order of ``input_shape``.

        Returns:
            cls_logits: per level (N, C, H_l, W_l).
            box_dists: per level (N, 4, H_l, W_l) coarse distances (l, t, r, b) >= 0 in pixels,
                at least float32.
            ctr_logits: per level (N, 1, H_l, W_l) centerness/objectness logits.
            refine_offsets: per level (N, 8, H_l, W_l) raw refinement offsets (cells), or None
                without box refinement.
        """
        if len(features) != len(self.strides):
            raise ValueError(
                f"DWHead was built for {len(self.strides)} levels, got {len(features)} features"
            )
        cls_logits, box_dists, ctr_logits = [], [], []
        refine_offsets = [] if self.box_refinement else None
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            cls_feature = self.cls_tower(feature)
            reg_feature = self.reg_tower(feature)
            cls_logits.append(self.cls_score(cls_feature))
            raw_dists = self.distance_pred(reg_feature) * self.scales[level]
            raw_dists = raw_dists.to(torch.promote_types(raw_dists.dtype, torch.float32))
            box_dists.append(F.relu(raw_dists) * stride)
            ctr_logits.append(self.centerness_pred(reg_feature))
            if refine_offsets is not None:
                refine_offsets.append(self.refine_offset_pred(reg_feature))
        return cls_logits, box_dists, ctr_logits, refine_offsets
