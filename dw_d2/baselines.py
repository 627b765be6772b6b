"""Detectron2's FCOS as a baseline built from a dw-d2 config, for like-for-like ablations.

Detectron2 ships ``FCOS`` (``detectron2.modeling.meta_arch.fcos``) but does not register it in
``META_ARCH_REGISTRY`` and gives it no ``from_config``, so a YAML config cannot select it.
This module registers :class:`FCOSBaseline` (``MODEL.META_ARCHITECTURE: "FCOSBaseline"``).
It reads the same ``MODEL.DW.*`` head keys as the DW detector (classes, input features, tower
depth, norm, prior probability, inference thresholds) and the same backbone builder, so a
comparison run differs from a DW run only in ``MODEL.META_ARCHITECTURE``: FCOS keeps its own
label assignment (centre sampling radius 1.5, scale ranges), focal loss, GIoU loss and
centerness, and its inference score sqrt(sigmoid(cls) * sigmoid(ctr)).
"""
from typing import List

import torch

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.structures import Boxes, Instances

from .compat import fcos_matched_boxes, group_norm

__all__ = ["FCOSBaseline", "FCOS_META_ARCHITECTURE"]


@META_ARCH_REGISTRY.register()
class FCOSBaseline(FCOS):
    """Detectron2's FCOS, configurable from the backbone and ``MODEL.DW`` keys of a dw-d2 config.

    In training its losses are ``loss_fcos_cls``, ``loss_fcos_loc`` and ``loss_fcos_ctr``.
    """

    @configurable
    def __init__(self, **kwargs):
        """Takes FCOS's own arguments; see :class:`detectron2.modeling.meta_arch.fcos.FCOS`."""
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg):
        if not hasattr(cfg.MODEL, "DW"):
            raise ValueError(
                f"MODEL.META_ARCHITECTURE {cls.__name__!r} reads the MODEL.DW keys; "
                "call dw_d2.add_dw_config(cfg) before merging the config file"
            )
        head_cfg = cfg.MODEL.DW
        backbone = build_backbone(cfg)
        backbone_shapes = backbone.output_shape()
        missing = [f for f in head_cfg.IN_FEATURES if f not in backbone_shapes]
        if missing:
            raise ValueError(
                f"MODEL.DW.IN_FEATURES {list(head_cfg.IN_FEATURES)} names features {missing} "
                f"that the backbone {cfg.MODEL.BACKBONE.NAME!r} does not produce "
                f"(it produces {sorted(backbone_shapes)})"
            )
        input_shape = [backbone_shapes[f] for f in head_cfg.IN_FEATURES]
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                f"FCOS shares one head across levels, but the features "
                f"{list(head_cfg.IN_FEATURES)} have different channel counts {sorted(channels)}"
            )
        head = FCOSHead(
            input_shape=input_shape,
            conv_dims=[input_shape[0].channels] * head_cfg.NUM_CONVS,
            num_classes=head_cfg.NUM_CLASSES,
            norm=group_norm if head_cfg.NORM == "GN" else head_cfg.NORM,
            prior_prob=head_cfg.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(head_cfg.IN_FEATURES),
            "num_classes": head_cfg.NUM_CLASSES,
            "test_score_thresh": head_cfg.SCORE_THRESH_TEST,
            "test_topk_candidates": head_cfg.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": head_cfg.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }


    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances]):
        """FCOS's labelling, image by image, also for images without GT boxes.

        The 2021 Detectron2's FCOS reduces over the GT dimension and indexes the GT with the
        result, which fails when an image has no GT box; dw-d2 trains on such images
        (``DATALOADER.FILTER_EMPTY_ANNOTATIONS False``). Later versions handle them and take
        the matched boxes as tensors: :func:`dw_d2.compat.fcos_matched_boxes` gives them in
        the form this Detectron2's ``FCOS.losses`` reads.

        Returns:
            (list of N (R,) int64 labels, num_classes for background;
            list of N matched GT boxes (R, 4), zeros where unmatched, as
            :func:`~dw_d2.compat.fcos_matched_boxes` returns them)
        """
        num_points = sum(len(a) for a in anchors)
        device = anchors[0].tensor.device
        labels, matched_boxes = [], []
        for gt_per_image in gt_instances:
            if len(gt_per_image) > 0:
                (label,), (boxes,) = super().label_anchors(anchors, [gt_per_image])
                boxes = boxes.tensor if isinstance(boxes, Boxes) else boxes
            else:
                label = torch.full((num_points,), self.num_classes, dtype=torch.long,
                                   device=device)
                boxes = torch.zeros((num_points, 4), device=device)
            labels.append(label)
            matched_boxes.append(fcos_matched_boxes(boxes))
        return labels, matched_boxes


FCOS_META_ARCHITECTURE = FCOSBaseline.__name__
