"""Label-assignment schemes as modules: the registry, and the DW and AutoAssign schemes.

Each scheme's formulas are pure functions in :mod:`dw_d2.assign` (``dual_weighting.py``,
``autoassign.py``); the modules here own what a trained detector keeps: the hyper-parameters
from the config, the learnable parameters (AutoAssign's centre prior), and the reference
point offset and inference score of each scheme.
"""
from typing import List

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.utils.registry import Registry

from ..assign.autoassign import autoassign_losses
from ..assign.dual_weighting import dual_weighting_losses
from ..assign.pipeline import DUPLICATE_RULES, prepare_batch
from ..points import PointLayout

__all__ = ["ASSIGNER_REGISTRY", "build_assigner", "point_offset_from_config", "DW", "AutoAssign"]

ASSIGNER_REGISTRY = Registry("ASSIGNER")
ASSIGNER_REGISTRY.__doc__ = """
Label-assignment schemes of :class:`~dw_d2.modeling.DWDetector`, selected by
``MODEL.ASSIGNER.NAME`` (the class name, matched case-insensitively).

A registered object is an ``nn.Module`` class. It is built as ``cls(cfg)`` (give it
``@configurable`` and a ``from_config(cls, cfg)``; its hyper-parameters belong in a config node
of its own, ``MODEL.ASSIGNER.<NAME>``). In training the detector calls it as::

    losses = assigner(points, cls_logits, box_dists, ctr_logits, gt_boxes, gt_classes)

with ``points`` a :class:`~dw_d2.points.PointLayout` (R points, their strides and per-level
sizes), ``cls_logits`` (N, R, C), ``box_dists`` (N, R, 4) (l, t, r, b) >= 0 in pixels,
``ctr_logits`` (N, R, 1) (the second factor of the score), ``gt_boxes`` N tensors (M_i, 4) XYXY
and ``gt_classes`` N int64 tensors (M_i,), and gets a dict of 0-dim losses. The tools that draw
the assignment call it with ``return_weights=True`` too (see :class:`DW`).

Optional class attributes say what the scheme's reference implementation does elsewhere:

* ``reference_point_offset`` (default 0.5): where the point of a feature cell sits,
  ``((x + o) * s, (y + o) * s)``, when ``MODEL.ASSIGNER.POINT_OFFSET`` is None;
* ``inference_score`` (default ``"joint"``): how inference ranks (point, class) candidates,
  one of :data:`dw_d2.modeling.meta_arch.INFERENCE_SCORES`, unless
  ``MODEL.DW.INFERENCE_SCORE`` names one.
"""


def build_assigner(cfg) -> nn.Module:
    """The scheme ``MODEL.ASSIGNER.NAME``, built from the config."""
    name = str(cfg.MODEL.ASSIGNER.NAME)
    registered = [registered_name for registered_name, _ in ASSIGNER_REGISTRY]
    matches = [n for n in registered if n.lower() == name.lower()]
    if not matches:
        raise ValueError(f"MODEL.ASSIGNER.NAME {name!r} is not one of the registered "
                         f"assignment schemes {registered} (dw_d2.ASSIGNER_REGISTRY)")
    return ASSIGNER_REGISTRY.get(matches[0])(cfg)


def point_offset_from_config(cfg, assigner: nn.Module) -> float:
    """``MODEL.ASSIGNER.POINT_OFFSET``, or the scheme's reference offset when it is None."""
    offset = cfg.MODEL.ASSIGNER.POINT_OFFSET
    if offset is None:
        return float(getattr(assigner, "reference_point_offset", 0.5))
    if not isinstance(offset, (int, float)) or not 0.0 <= offset < 1.0:
        raise ValueError(
            f"MODEL.ASSIGNER.POINT_OFFSET must be None or a number in [0, 1), got {offset!r}")
    return float(offset)


def _duplicate_rule(rule: str) -> str:
    if rule not in DUPLICATE_RULES:
        raise ValueError(f"MODEL.ASSIGNER.DUPLICATE_RULE {rule!r} is not one of {DUPLICATE_RULES}")
    return rule


@ASSIGNER_REGISTRY.register()
class DW(nn.Module):
    """DW's dual weighting (:mod:`dw_d2.assign.dual_weighting`): losses ``loss_cls_pos``,
    ``loss_loc`` and ``loss_cls_neg``. Its centre prior is fixed (mean 0, sigma
    ``center_prior_sigma``): a hyper-parameter, not a parameter."""

    reference_point_offset = 0.5
    inference_score = "joint"

    @configurable
    def __init__(self, *, center_prior_sigma: float = 1.11, pos_num_exp: float = 5.0,
                 pos_den_exp: float = 3.0, loc_beta: float = 5.0, neg_iou_thresh: float = 0.5,
                 neg_gamma: float = 2.0, pos_loss_weight: float = 0.25,
                 loc_loss_weight: float = 0.25, duplicate_rule: str = "last_gt",
                 round_neg_normaliser_to_float32: bool = True):
        """The arguments of :func:`dw_d2.dual_weighting_loss`."""
        super().__init__()
        self.center_prior_sigma = center_prior_sigma
        self.pos_num_exp = pos_num_exp
        self.pos_den_exp = pos_den_exp
        self.loc_beta = loc_beta
        self.neg_iou_thresh = neg_iou_thresh
        self.neg_gamma = neg_gamma
        self.pos_loss_weight = pos_loss_weight
        self.loc_loss_weight = loc_loss_weight
        self.duplicate_rule = _duplicate_rule(duplicate_rule)
        self.round_neg_normaliser_to_float32 = round_neg_normaliser_to_float32

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.ASSIGNER.DW
        return {
            "center_prior_sigma": node.CENTER_PRIOR_SIGMA,
            "pos_num_exp": node.POS_NUM_EXP,
            "pos_den_exp": node.POS_DEN_EXP,
            "loc_beta": node.LOC_BETA,
            "neg_iou_thresh": node.NEG_IOU_THRESH,
            "neg_gamma": node.NEG_GAMMA,
            "pos_loss_weight": node.POS_LOSS_WEIGHT,
            "loc_loss_weight": node.LOC_LOSS_WEIGHT,
            "duplicate_rule": cfg.MODEL.ASSIGNER.DUPLICATE_RULE,
        }

    def forward(self, points: PointLayout, cls_logits: Tensor, box_dists: Tensor,
                ctr_logits: Tensor, gt_boxes: List[Tensor], gt_classes: List[Tensor],
                return_weights: bool = False):
        """The losses; with ``return_weights``, ``(losses, weights)``: one dict of detached
        dense maps per image, as :func:`dw_d2.dual_weighting_loss` returns them."""
        batch = prepare_batch(points, cls_logits, box_dists, ctr_logits, gt_boxes, gt_classes,
                              score_name="ctr_logits", duplicate_rule=self.duplicate_rule)
        return dual_weighting_losses(
            batch, center_prior_sigma=self.center_prior_sigma, pos_num_exp=self.pos_num_exp,
            pos_den_exp=self.pos_den_exp, loc_beta=self.loc_beta,
            neg_iou_thresh=self.neg_iou_thresh, neg_gamma=self.neg_gamma,
            pos_loss_weight=self.pos_loss_weight, loc_loss_weight=self.loc_loss_weight,
            box_eps=1e-6, duplicate_rule=self.duplicate_rule,
            round_neg_normaliser_to_float32=self.round_neg_normaliser_to_float32,
            return_weights=return_weights)

    def extra_repr(self) -> str:
        return (f"center_prior_sigma={self.center_prior_sigma}, loc_beta={self.loc_beta}, "
                f"neg_iou_thresh={self.neg_iou_thresh}, duplicate_rule={self.duplicate_rule!r}")


@ASSIGNER_REGISTRY.register()
class AutoAssign(nn.Module):
    """AutoAssign (:mod:`dw_d2.assign.autoassign`): losses ``loss_pos``, ``loss_neg`` and
    ``loss_center``. Its centre prior is learnt: ``prior_mean`` and ``prior_sigma``, (C, 2)
    parameters initialised at 0 and 1."""

    reference_point_offset = 0.0  # MMDetection's point generator: (x * s, y * s)
    # MMDetection's test path: threshold and top-k on sigmoid(cls), then times sigmoid(obj).
    inference_score = "class_then_joint"

    @configurable
    def __init__(self, *, num_classes: int, giou_weight: float = 5.0,
                 confidence_temperature: float = 3.0, pos_loss_weight: float = 0.25,
                 neg_loss_weight: float = 0.75, center_loss_weight: float = 0.75,
                 force_topk: bool = False, topk: int = 9, duplicate_rule: str = "last_gt"):
        """
        Args:
            num_classes: C, the rows of the centre prior's parameters.
            The others: the arguments of :func:`dw_d2.autoassign_loss`.
        """
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"AutoAssign needs num_classes >= 1, got {num_classes}")
        self.prior_mean = nn.Parameter(torch.zeros(num_classes, 2))
        self.prior_sigma = nn.Parameter(torch.ones(num_classes, 2))
        self.giou_weight = giou_weight
        self.confidence_temperature = confidence_temperature
        self.pos_loss_weight = pos_loss_weight
        self.neg_loss_weight = neg_loss_weight
        self.center_loss_weight = center_loss_weight
        self.force_topk = force_topk
        self.topk = topk
        self.duplicate_rule = _duplicate_rule(duplicate_rule)

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.ASSIGNER.AUTOASSIGN
        return {
            "num_classes": cfg.MODEL.DW.NUM_CLASSES,
            "giou_weight": node.GIOU_WEIGHT,
            "confidence_temperature": node.CONFIDENCE_TEMPERATURE,
            "pos_loss_weight": node.POS_LOSS_WEIGHT,
            "neg_loss_weight": node.NEG_LOSS_WEIGHT,
            "center_loss_weight": node.CENTER_LOSS_WEIGHT,
            "force_topk": node.FORCE_TOPK,
            "topk": node.TOPK,
            "duplicate_rule": cfg.MODEL.ASSIGNER.DUPLICATE_RULE,
        }

    def forward(self, points: PointLayout, cls_logits: Tensor, box_dists: Tensor,
                ctr_logits: Tensor, gt_boxes: List[Tensor], gt_classes: List[Tensor],
                return_weights: bool = False):
        """The losses (``ctr_logits`` are the objectness logits); with ``return_weights``,
        ``(losses, weights)`` as :func:`dw_d2.autoassign_loss` returns them."""
        batch = prepare_batch(points, cls_logits, box_dists, ctr_logits, gt_boxes, gt_classes,
                              score_name="obj_logits", duplicate_rule=self.duplicate_rule)
        return autoassign_losses(
            batch, self.prior_mean, self.prior_sigma, giou_weight=self.giou_weight,
            confidence_temperature=self.confidence_temperature,
            pos_loss_weight=self.pos_loss_weight, neg_loss_weight=self.neg_loss_weight,
            center_loss_weight=self.center_loss_weight, force_topk=self.force_topk,
            topk=self.topk, box_eps=1e-6, duplicate_rule=self.duplicate_rule,
            return_weights=return_weights)

    def extra_repr(self) -> str:
        return (f"num_classes={self.prior_mean.shape[0]}, force_topk={self.force_topk}, "
                f"duplicate_rule={self.duplicate_rule!r}")
