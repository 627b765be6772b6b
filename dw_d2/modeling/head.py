"""The dense head shared by the assignment schemes (FCOS-style, with DW's box refinement)."""
import math
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm

from ..box_refinement import refine_box_distances_at
from ..layers import ModulatedDeformConvWithOffsets
from ..points import PointGrid, PointLayout

__all__ = ["DWHead", "HeadOutputs"]

# Batch statistics would mix the levels, which share the towers; RetinaNet needs a special
# CycleBatchNormList for that. The official heads use GN.
_BATCH_NORMS = ("BN", "SyncBN", "FrozenBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N")
_GN_GROUPS = 32


class HeadOutputs(NamedTuple):
    """What the head predicts for a batch: what the losses and inference use."""

    cls_logits: List[Tensor]  # per level (N, C, H_l, W_l)
    box_dists: List[Tensor]  # per level (N, 4, H_l, W_l) l, t, r, b >= 0 in pixels, refined
    ctr_logits: List[Tensor]  # per level (N, 1, H_l, W_l) centerness / objectness logits
    points: PointLayout  # the points of these levels (R = sum of H_l * W_l)


class DWHead(nn.Module):
    """Per level: a classification tower and a regression tower (``num_convs`` x conv3x3-norm-
    ReLU, shared across levels), then a classification conv (C), a distance conv (l, t, r, b),
    a centerness/objectness conv and, optionally, DW's 8-channel refinement-offset conv, all
    3x3; the last three sit on the regression tower.

    Distances are ``relu(scale_l * x) * stride_l`` with a learnable scale per level, computed
    in at least float32 (the official head casts them with ``.float()``). With box refinement,
    they are then refined by :func:`dw_d2.box_refinement.refine_box_distances_at`, as in the
    official head: losses and inference see the refined distances only.

    With ``deformable_last_conv``, the last conv of each tower is a modulated deformable conv
    (DCNv2, :class:`~dw_d2.layers.ModulatedDeformConvWithOffsets`) predicting its own offsets
    and mask, as in the official DCN model's heads (MMDetection's ``dcn_on_last_conv``); it is
    initialised as there: its weight uniform in +-1/sqrt(fan_in), its offset conv like the other
    convs.

    The head builds the batch's points (one per feature cell, at ``point_offset`` inside it)
    and returns them with its predictions.
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
        deformable_last_conv: bool = False,
        point_offset: float = 0.5,
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
            deformable_last_conv: whether the last conv of each tower is deformable (DCNv2).
            point_offset: the point of cell (y, x) sits at ((x + o) * s, (y + o) * s).
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
        self.cls_tower = self._make_tower(in_channels, num_convs, norm, deformable_last_conv)
        self.reg_tower = self._make_tower(in_channels, num_convs, norm, deformable_last_conv)
        self.cls_score = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.distance_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.centerness_pred = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.refine_offset_pred = (
            nn.Conv2d(in_channels, 8, 3, padding=1) if box_refinement else None
        )
        self.scales = nn.Parameter(torch.ones(len(input_shape)))
        self.point_grid = PointGrid(self.strides, point_offset)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(self.distance_pred.bias, distance_bias_init)

    @staticmethod
    def _make_tower(channels: int, num_convs: int, norm: str,
                    deformable_last_conv: bool) -> nn.Sequential:
        layers = []
        for index in range(num_convs):
            conv_class = (ModulatedDeformConvWithOffsets
                          if deformable_last_conv and index == num_convs - 1 else nn.Conv2d)
            layers.append(conv_class(channels, channels, 3, padding=1, bias=True))
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
            "deformable_last_conv": head.DCN_ON_LAST_CONV,
        }

    @property
    def box_refinement(self) -> bool:
        return self.refine_offset_pred is not None

    @property
    def point_offset(self) -> float:
        return self.point_grid.offset

    def forward(self, features: List[Tensor]) -> HeadOutputs:
        """
        Args:
            features: one (N, C_in, H_l, W_l) map per level, in the order of ``input_shape``.

        Returns:
            the per-level predictions and the batch's points; the distances are at least
            float32, and so are the points.
        """
        if len(features) != len(self.strides):
            raise ValueError(
                f"DWHead was built for {len(self.strides)} levels, got {len(features)} features"
            )
        points = self.point_grid(
            [tuple(f.shape[-2:]) for f in features],
            dtype=torch.promote_types(features[0].dtype, torch.float32),
            device=features[0].device,
        )
        cls_logits, box_dists, ctr_logits, refine_offsets = zip(
            *(self.level_outputs(feature, level) for level, feature in enumerate(features)))
        if self.box_refinement:
            box_dists = [
                refine_box_distances_at(dists, offsets, stride, level_points)
                for dists, offsets, stride, level_points in zip(
                    box_dists, refine_offsets, self.strides, points.split_levels(points.points))
            ]
        return HeadOutputs(list(cls_logits), list(box_dists), list(ctr_logits), points)

    def level_outputs(
        self, feature: Tensor, level: int
    ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """The head's convolutions on one level, before refinement.

        Returns:
            cls_logits (N, C, H, W); box_dists (N, 4, H, W), the coarse distances (l, t, r, b)
            >= 0 in pixels, at least float32; ctr_logits (N, 1, H, W); and refine_offsets
            (N, 8, H, W), the raw refinement offsets (cells), or None without box refinement.
        """
        cls_feature = self.cls_tower(feature)
        reg_feature = self.reg_tower(feature)
        cls_logits = self.cls_score(cls_feature)
        raw_dists = self.distance_pred(reg_feature) * self.scales[level]
        raw_dists = raw_dists.to(torch.promote_types(raw_dists.dtype, torch.float32))
        box_dists = F.relu(raw_dists) * self.strides[level]
        ctr_logits = self.centerness_pred(reg_feature)
        refine_offsets = (self.refine_offset_pred(reg_feature) if self.box_refinement
                          else None)
        return cls_logits, box_dists, ctr_logits, refine_offsets
