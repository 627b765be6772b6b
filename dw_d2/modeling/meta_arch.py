"""The DW / AutoAssign detector: a Detectron2 dense detector with soft label assignment."""
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances

from ..assign import autoassign_loss, dual_weighting_loss
from ..assign.pipeline import DUPLICATE_RULES
from ..box_refinement import refine_box_distances
from .center_prior import CenterPrior
from .head import DWHead
from ..points import PointGrid

__all__ = ["DWDetector", "ASSIGNERS", "DUPLICATE_RULES"]

# Canonical names of the label-assignment schemes; MODEL.DW.ASSIGNER matches them
# case-insensitively.
ASSIGNERS = ("DW", "AutoAssign")
# Where each scheme's reference implementation puts the point inside its cell.
_REFERENCE_POINT_OFFSET = {"DW": 0.5, "AutoAssign": 0.0}


@META_ARCH_REGISTRY.register()
class DWDetector(DenseDetector):
    """A dense, anchor-free detector trained with DW (dual weighting) or AutoAssign.

    Per FPN level, :class:`DWHead` predicts class logits, distances (l, t, r, b) and a
    centerness/objectness logit at every point; with box refinement (DW), the distances are
    refined by :func:`dw_d2.refine_box_distances` and both the loss and inference use the
    refined ones, as in the official head. The score of a class at a point is
    ``sigmoid(cls) * sigmoid(ctr)``.

    Training returns the loss dict of :func:`dw_d2.dual_weighting_loss`
    (``loss_cls_pos``, ``loss_loc``, ``loss_cls_neg``) or :func:`dw_d2.autoassign_loss`
    (``loss_pos``, ``loss_neg``, ``loss_center``).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: DWHead,
        head_in_features: List[str],
        center_prior: CenterPrior,
        assigner: str = "DW",
        point_offset: float = 0.5,
        loss_hyperparams: Dict[str, object],
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        input_format: str = "BGR",
    ):
        """
        Args:
            backbone: produces the features named in ``head_in_features``.
            head: the dense head, built for those features (finest first).
            head_in_features: backbone outputs fed to the head, in order.
            center_prior: the per-class centre prior parameters.
            assigner: "DW" or "AutoAssign".
            point_offset: point of cell (y, x) at ((x + o) * s, (y + o) * s).
            loss_hyperparams: keyword arguments of the scheme's loss function.
            test_score_thresh: minimum joint score kept at inference.
            test_topk_candidates: per level and image, at most this many (point, class) pairs
                are kept before NMS.
            test_nms_thresh: IoU threshold of the class-wise NMS.
            max_detections_per_image: detections kept per image after NMS.
            pixel_mean, pixel_std: input normalisation, as in Detectron2's RetinaNet.
            input_format: channel order of the input images (for visualize_training).
        """
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        if assigner not in ASSIGNERS:
            raise ValueError(f"unknown assigner {assigner!r}; expected one of {ASSIGNERS}")
        self.assigner = assigner
        self.num_classes = head.num_classes
        self.center_prior = center_prior
        self.point_offset = float(point_offset)
        self.loss_hyperparams = dict(loss_hyperparams)
        shapes = backbone.output_shape()
        self.strides = [shapes[f].stride for f in head_in_features]
        self.point_grid = PointGrid(self.strides, self.point_offset)

        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format

    @classmethod
    def from_config(cls, cfg):
        if "DW" not in cfg.MODEL:
            raise ValueError(
                "the config has no MODEL.DW section; call dw_d2.add_dw_config(cfg) before "
                "merging a dw-d2 config file"
            )
        head_cfg = cfg.MODEL.DW
        assigner = canonical_assigner(head_cfg.ASSIGNER)
        if head_cfg.NUM_CLASSES < 1:
            raise ValueError(f"MODEL.DW.NUM_CLASSES must be >= 1, got {head_cfg.NUM_CLASSES}")
        if head_cfg.DUPLICATE_RULE not in DUPLICATE_RULES:
            raise ValueError(
                f"MODEL.DW.DUPLICATE_RULE {head_cfg.DUPLICATE_RULE!r} is not one of "
                f"{DUPLICATE_RULES}"
            )
        point_offset = head_cfg.POINT_OFFSET
        if point_offset is None:
            point_offset = _REFERENCE_POINT_OFFSET[assigner]
        elif not isinstance(point_offset, (int, float)) or not 0.0 <= point_offset < 1.0:
            raise ValueError(
                f"MODEL.DW.POINT_OFFSET must be None or a number in [0, 1), got {point_offset!r}"
            )

        backbone = build_backbone(cfg)
        backbone_shapes = backbone.output_shape()
        in_features = list(head_cfg.IN_FEATURES)
        missing = [f for f in in_features if f not in backbone_shapes]
        if missing:
            raise ValueError(
                f"MODEL.DW.IN_FEATURES {in_features} names {missing}, which the backbone "
                f"{cfg.MODEL.BACKBONE.NAME!r} does not produce (it produces "
                f"{sorted(backbone_shapes)})"
            )
        head = DWHead(cfg, [backbone_shapes[f] for f in in_features])

        if assigner == "DW":
            center_prior = CenterPrior(
                head_cfg.NUM_CLASSES, learnable=False, init_mean=0.0,
                init_sigma=head_cfg.CENTER_PRIOR_SIGMA,
            )
        else:
            center_prior = CenterPrior(
                head_cfg.NUM_CLASSES, learnable=True, init_mean=0.0, init_sigma=1.0
            )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": in_features,
            "center_prior": center_prior,
            "assigner": assigner,
            "point_offset": point_offset,
            "loss_hyperparams": loss_hyperparams_from_config(cfg, assigner),
            "test_score_thresh": head_cfg.SCORE_THRESH_TEST,
            "test_topk_candidates": head_cfg.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": head_cfg.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    def final_box_distances(self, box_dists: List[Tensor], refine_offsets) -> List[Tensor]:
        """The distances the loss and inference use: refined when the head has refinement.

        Args:
            box_dists: per level (N, 4, H_l, W_l) coarse distances in pixels.
            refine_offsets: per level (N, 8, H_l, W_l) raw offsets, or None.

        Returns:
            per level (N, 4, H_l, W_l) distances in pixels.
        """
        if refine_offsets is None:
            return box_dists
        return [
            refine_box_distances(dists, offsets, stride, self.point_offset)
            for dists, offsets, stride in zip(box_dists, refine_offsets, self.strides)
        ]

    def flatten_predictions(self, predictions) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per-level head outputs -> per-level (N, H_l * W_l, K), row-major like the points.

        Returns:
            cls_logits (K = C), box_dists (K = 4, final distances), ctr_logits (K = 1).
        """
        cls_logits, box_dists, ctr_logits, refine_offsets = predictions
        box_dists = self.final_box_distances(box_dists, refine_offsets)
        return tuple(
            self._transpose_dense_predictions(
                [cls_logits, box_dists, ctr_logits], [self.num_classes, 4, 1]
            )
        )

    def points(self, features: List[Tensor], dtype) -> Tuple[Tensor, Tensor]:
        """(R, 2) points and (R,) strides of all levels, for these feature-map sizes."""
        sizes = [tuple(f.shape[-2:]) for f in features]
        layout = self.point_grid(sizes, dtype=dtype, device=features[0].device)
        return layout.points, layout.strides

    def forward_training(self, images: ImageList, features, predictions, gt_instances,
                         return_weights: bool = False):
        """The scheme's losses; with ``return_weights``, ``(losses, weights)`` where
        ``weights`` holds the per-image assignment weights of the loss function (what
        ``tools/visualize_assignment.py`` draws)."""
        cls_logits, box_dists, ctr_logits = (
            cat(level_outputs, dim=1) for level_outputs in self.flatten_predictions(predictions)
        )
        # The official loss runs in float32 (mmcv's force_fp32) even under mixed precision.
        loss_dtype = torch.promote_types(box_dists.dtype, torch.float32)
        cls_logits, box_dists, ctr_logits = (
            x.to(loss_dtype) for x in (cls_logits, box_dists, ctr_logits)
        )
        points, point_strides = self.points(features, loss_dtype)
        gt_boxes = [x.gt_boxes.tensor.to(loss_dtype) for x in gt_instances]
        gt_classes = [x.gt_classes for x in gt_instances]
        if self.assigner == "DW":
            return dual_weighting_loss(
                points, point_strides, cls_logits, box_dists, ctr_logits, gt_boxes, gt_classes,
                **self.loss_hyperparams, return_weights=return_weights,
            )
        prior_mean, prior_sigma = self.center_prior()
        return autoassign_loss(
            points, point_strides, cls_logits, box_dists, ctr_logits, gt_boxes, gt_classes,
            prior_mean.to(loss_dtype), prior_sigma.to(loss_dtype), **self.loss_hyperparams,
            return_weights=return_weights,
        )

    @torch.no_grad()
    def forward_inference(self, images: ImageList, features: List[Tensor], predictions):
        """Joint scores, per-level top-k, class-wise NMS; vectorised over the batch up to NMS.

        Returns:
            list of N Instances (pred_boxes, scores, pred_classes) in the padded-input frame,
            boxes clipped to each image's size.
        """
        cls_logits, box_dists, ctr_logits = self.flatten_predictions(predictions)
        level_points = self.points(features, box_dists[0].dtype)[0].split(
            [x.shape[1] for x in box_dists]
        )
        candidates = [
            self._top_candidates_per_level(*level)
            for level in zip(cls_logits, box_dists, ctr_logits, level_points)
        ]
        scores, classes, boxes = (cat(parts, dim=1) for parts in zip(*candidates))

        results = []
        for image_index, image_size in enumerate(images.image_sizes):
            keep = scores[image_index] > self.test_score_thresh
            image_boxes = Boxes(boxes[image_index][keep])
            image_boxes.clip(image_size)
            image_scores = scores[image_index][keep]
            image_classes = classes[image_index][keep]
            kept = batched_nms(
                image_boxes.tensor, image_scores, image_classes, self.test_nms_thresh
            )[: self.max_detections_per_image]
            results.append(
                Instances(
                    image_size,
                    pred_boxes=image_boxes[kept],
                    scores=image_scores[kept],
                    pred_classes=image_classes[kept],
                )
            )
        return results

    def _top_candidates_per_level(
        self, cls_logits: Tensor, box_dists: Tensor, ctr_logits: Tensor, points: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """The ``test_topk_candidates`` best (point, class) pairs of one level, per image.

        Args:
            cls_logits: (N, P, C); box_dists: (N, P, 4); ctr_logits: (N, P, 1); points: (P, 2).

        Returns:
            scores (N, k), classes (N, k) int64 and boxes (N, k, 4) XYXY, k <= topk; pairs at
            or below the score threshold have their score but are filtered by the caller.
        """
        num_images, num_points, num_classes = cls_logits.shape
        scores = (cls_logits.sigmoid() * ctr_logits.sigmoid()).reshape(num_images, -1)
        k = min(self.test_topk_candidates, scores.shape[1])
        scores, flat_index = scores.topk(k, dim=1)
        point_index = flat_index // num_classes
        classes = flat_index % num_classes
        dists = box_dists.gather(1, point_index.unsqueeze(-1).expand(-1, -1, 4))
        centres = points[point_index].to(dists.dtype)
        boxes = torch.cat((centres - dists[..., :2], centres + dists[..., 2:]), dim=-1)
        return scores, classes, boxes


def canonical_assigner(name: str) -> str:
    """``MODEL.DW.ASSIGNER`` -> "DW" or "AutoAssign" (case-insensitive), else a ValueError."""
    for assigner in ASSIGNERS:
        if str(name).lower() == assigner.lower():
            return assigner
    raise ValueError(f"MODEL.DW.ASSIGNER {name!r} is not one of {ASSIGNERS}")


def loss_hyperparams_from_config(cfg, assigner: str) -> Dict[str, object]:
    """The keyword arguments of the scheme's loss function, from ``MODEL.DW`` /
    ``MODEL.AUTOASSIGN``."""
    head_cfg = cfg.MODEL.DW
    if assigner == "DW":
        return {
            "pos_num_exp": head_cfg.POS_NUM_EXP,
            "pos_den_exp": head_cfg.POS_DEN_EXP,
            "loc_beta": head_cfg.LOC_BETA,
            "pos_loss_weight": head_cfg.POS_LOSS_WEIGHT,
            "loc_loss_weight": head_cfg.LOC_LOSS_WEIGHT,
            "center_prior_sigma": head_cfg.CENTER_PRIOR_SIGMA,
            "neg_iou_thresh": head_cfg.NEG_IOU_THRESH,
            "neg_gamma": head_cfg.NEG_GAMMA,
            "duplicate_rule": head_cfg.DUPLICATE_RULE,
        }
    aa_cfg = cfg.MODEL.AUTOASSIGN
    return {
        "giou_weight": aa_cfg.GIOU_WEIGHT,
        "confidence_temperature": aa_cfg.CONFIDENCE_TEMPERATURE,
        "pos_loss_weight": aa_cfg.POS_LOSS_WEIGHT,
        "neg_loss_weight": aa_cfg.NEG_LOSS_WEIGHT,
        "center_loss_weight": aa_cfg.CENTER_LOSS_WEIGHT,
        "force_topk": aa_cfg.FORCE_TOPK,
        "topk": aa_cfg.TOPK,
        "duplicate_rule": head_cfg.DUPLICATE_RULE,
    }
