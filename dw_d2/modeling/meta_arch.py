"""The dense detector of dw-d2: Detectron2's DenseDetector with a pluggable label assignment."""
from typing import List, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances

from .assigners import build_assigner, point_offset_from_config
from .head import DWHead, HeadOutputs

__all__ = ["DWDetector", "INFERENCE_SCORES"]

# How inference ranks the (point, class) candidates of a level, by the name an assignment
# scheme declares as its ``inference_score`` (its reference implementation's test path) or
# MODEL.DW.INFERENCE_SCORE names:
#   "joint": threshold and top-k on sigmoid(cls) * sigmoid(ctr), the official DW test path;
#   "class_then_joint": threshold and top-k on sigmoid(cls) alone; the kept candidates' scores
#     are then multiplied by sigmoid(ctr), before NMS (MMDetection's FCOS/AutoAssign test path).
# Both end with the joint score sigmoid(cls) * sigmoid(ctr) on the detections.
INFERENCE_SCORES = ("joint", "class_then_joint")

# Checkpoints written before the assignment schemes became modules kept the centre prior on
# the detector (AutoAssign's learnable one was saved; DW's fixed one was not): old key -> new.
_RENAMED_KEYS = {"center_prior.mean": "assigner.prior_mean",
                 "center_prior.sigma": "assigner.prior_sigma"}


@META_ARCH_REGISTRY.register()
class DWDetector(DenseDetector):
    """A dense, anchor-free detector trained with a soft label-assignment scheme.

    Per FPN level, :class:`DWHead` predicts class logits, distances (l, t, r, b) (refined, with
    DW's box refinement) and a centerness/objectness logit at every point, and builds the
    batch's points. The assigner (``MODEL.ASSIGNER.NAME``, from
    :data:`~dw_d2.modeling.assigners.ASSIGNER_REGISTRY`: DW or AutoAssign built in) turns them
    and the GT boxes into the training losses; the detector does not know which scheme it runs.
    Inference ranks candidates as the scheme's reference implementation does (DW: by
    ``sigmoid(cls) * sigmoid(ctr)``; AutoAssign: by ``sigmoid(cls)``, as MMDetection) or as
    ``MODEL.DW.INFERENCE_SCORE`` says, then applies class-wise NMS.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: DWHead,
        head_in_features: List[str],
        assigner: nn.Module,
        inference_score: str = "joint",
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
            assigner: the label-assignment scheme, called as the registry's docstring says.
            inference_score: how inference ranks candidates, one of :data:`INFERENCE_SCORES`.
            test_score_thresh: minimum score kept at inference.
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
        if inference_score not in INFERENCE_SCORES:
            raise ValueError(f"inference_score {inference_score!r} is not one of "
                             f"{INFERENCE_SCORES}")
        self.assigner = assigner
        self.inference_score = inference_score
        self.num_classes = head.num_classes
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format
        self.register_load_state_dict_pre_hook(_load_renamed_keys)

    @classmethod
    def from_config(cls, cfg):
        if "DW" not in cfg.MODEL or "ASSIGNER" not in cfg.MODEL:
            raise ValueError(
                "the config has no MODEL.DW / MODEL.ASSIGNER section; call "
                "dw_d2.add_dw_config(cfg) before merging a dw-d2 config file"
            )
        head_cfg = cfg.MODEL.DW
        if head_cfg.NUM_CLASSES < 1:
            raise ValueError(f"MODEL.DW.NUM_CLASSES must be >= 1, got {head_cfg.NUM_CLASSES}")
        assigner = build_assigner(cfg)
        inference_score = (head_cfg.INFERENCE_SCORE
                           or getattr(assigner, "inference_score", "joint"))
        if inference_score not in INFERENCE_SCORES:
            raise ValueError(f"MODEL.DW.INFERENCE_SCORE {head_cfg.INFERENCE_SCORE!r} is not one "
                             f"of {INFERENCE_SCORES} or '' (the scheme's reference)")

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
        head = DWHead(cfg, [backbone_shapes[f] for f in in_features],
                      point_offset=point_offset_from_config(cfg, assigner))
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": in_features,
            "assigner": assigner,
            "inference_score": inference_score,
            "test_score_thresh": head_cfg.SCORE_THRESH_TEST,
            "test_topk_candidates": head_cfg.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": head_cfg.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    @property
    def strides(self) -> List[int]:
        return self.head.strides

    @property
    def point_offset(self) -> float:
        return self.head.point_offset

    def flatten_predictions(self, predictions: HeadOutputs):
        """Per-level head outputs -> per-level (N, H_l * W_l, K), row-major like the points.

        Returns:
            cls_logits (K = C), box_dists (K = 4), ctr_logits (K = 1).
        """
        return tuple(self._transpose_dense_predictions(
            [predictions.cls_logits, predictions.box_dists, predictions.ctr_logits],
            [self.num_classes, 4, 1]))

    def forward_training(self, images: ImageList, features, predictions: HeadOutputs,
                         gt_instances, return_weights: bool = False):
        """The assigner's losses; with ``return_weights``, ``(losses, weights)`` where
        ``weights`` holds the per-image assignment weights (what
        ``tools/visualize_assignment.py`` draws)."""
        cls_logits, box_dists, ctr_logits = (
            cat(level_outputs, dim=1) for level_outputs in self.flatten_predictions(predictions)
        )
        # The official losses run in float32 (mmcv's force_fp32) even under mixed precision.
        loss_dtype = torch.promote_types(box_dists.dtype, torch.float32)
        cls_logits, box_dists, ctr_logits = (
            x.to(loss_dtype) for x in (cls_logits, box_dists, ctr_logits)
        )
        gt_boxes = [x.gt_boxes.tensor.to(loss_dtype) for x in gt_instances]
        gt_classes = [x.gt_classes for x in gt_instances]
        # Only schemes that draw their weights need to accept the argument.
        inspect = {"return_weights": True} if return_weights else {}
        result = self.assigner(predictions.points, cls_logits, box_dists, ctr_logits, gt_boxes,
                               gt_classes, **inspect)
        losses = result[0] if return_weights else result
        # DistributedDataParallel waits for a gradient of every parameter from every process.
        # A process whose images hold no GT box may leave predictions (DW: the distances) or
        # the scheme's own parameters out of every loss, and the other processes would hang in
        # the gradient all-reduce. An empty slice of each keeps them in the graph with a zero
        # gradient (and, unlike 0 * sum, cannot turn a non-finite value into a NaN loss).
        unused = sum(x.reshape(-1)[:0].sum() for x in
                     (cls_logits, box_dists, ctr_logits, *self.assigner.parameters()))
        first = next(iter(losses))
        losses[first] = losses[first] + unused
        return result

    @torch.no_grad()
    def forward_inference(self, images: ImageList, features: List[Tensor],
                          predictions: HeadOutputs):
        """Scores, per-level top-k, class-wise NMS; vectorised over the batch up to NMS.

        Returns:
            list of N Instances (pred_boxes, scores, pred_classes) in the padded-input frame,
            boxes clipped to each image's size.
        """
        cls_logits, box_dists, ctr_logits = self.flatten_predictions(predictions)
        level_points = predictions.points.split_levels(predictions.points.points)
        candidates = [
            self._top_candidates_per_level(*level)
            for level in zip(cls_logits, box_dists, ctr_logits, level_points)
        ]
        scores, classes, boxes, above_threshold = (cat(parts, dim=1)
                                                   for parts in zip(*candidates))

        results = []
        for image_index, image_size in enumerate(images.image_sizes):
            keep = above_threshold[image_index]
            image_boxes = _clip_to_image(boxes[image_index][keep], image_size)
            image_scores = scores[image_index][keep]
            image_classes = classes[image_index][keep]
            # NMS in the model's precision, at least float32: Detectron2's Boxes and batched_nms
            # cast the boxes to float32 (and batched_nms not the scores, which then fails for
            # a float64 model).
            nms_dtype = torch.promote_types(image_boxes.dtype, torch.float32)
            kept = batched_nms(image_boxes.to(nms_dtype), image_scores.to(nms_dtype),
                               image_classes, self.test_nms_thresh)
            kept = kept[: self.max_detections_per_image]
            results.append(
                Instances(
                    image_size,
                    pred_boxes=Boxes(image_boxes[kept]),
                    scores=image_scores[kept],
                    pred_classes=image_classes[kept],
                )
            )
        return results

    def _top_candidates_per_level(
        self, cls_logits: Tensor, box_dists: Tensor, ctr_logits: Tensor, points: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The ``test_topk_candidates`` best (point, class) pairs of one level, per image, as
        ranked by ``self.inference_score`` (see :data:`INFERENCE_SCORES`).

        Args:
            cls_logits: (N, P, C); box_dists: (N, P, 4); ctr_logits: (N, P, 1); points: (P, 2).

        Returns:
            scores (N, k) (the joint scores), classes (N, k) int64, boxes (N, k, 4) XYXY and
            above_threshold (N, k) bool, whether the ranking score exceeds the score threshold,
            with k <= topk. The top-k of the pairs above the threshold are the pairs above the
            threshold among the top-k, so this equals thresholding first (as MMDetection does).
        """
        num_images, num_points, num_classes = cls_logits.shape
        cls_scores = cls_logits.sigmoid()
        ctr_scores = ctr_logits.sigmoid()
        if self.inference_score == "joint":
            ranking = (cls_scores * ctr_scores).reshape(num_images, -1)
        else:  # class_then_joint
            ranking = cls_scores.reshape(num_images, -1)
        k = min(self.test_topk_candidates, ranking.shape[1])
        ranking, flat_index = ranking.topk(k, dim=1)
        point_index = flat_index // num_classes
        classes = flat_index % num_classes
        if self.inference_score == "joint":
            scores = ranking
        else:
            scores = ranking * ctr_scores.squeeze(-1).gather(1, point_index)
        dists = box_dists.gather(1, point_index.unsqueeze(-1).expand(-1, -1, 4))
        centres = points[point_index].to(dists.dtype)
        boxes = torch.cat((centres - dists[..., :2], centres + dists[..., 2:]), dim=-1)
        return scores, classes, boxes, ranking > self.test_score_thresh


def _clip_to_image(boxes: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """(K, 4) XYXY boxes clipped to an image of (height, width), in their own precision
    (``Boxes.clip`` would round them to float32 first)."""
    height, width = image_size
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    return torch.stack((x1.clamp(min=0, max=width), y1.clamp(min=0, max=height),
                        x2.clamp(min=0, max=width), y2.clamp(min=0, max=height)), dim=1)


def _load_renamed_keys(module, state_dict, prefix, *args):
    """Load-state-dict pre-hook: a checkpoint's keys from before the move of the centre prior
    into the assigner, renamed (where this model has the new key, with the same shape)."""
    own = module.state_dict()
    for old, new in _RENAMED_KEYS.items():
        if (prefix + old in state_dict and prefix + new not in state_dict and new in own
                and own[new].shape == state_dict[prefix + old].shape):
            state_dict[prefix + new] = state_dict.pop(prefix + old)
