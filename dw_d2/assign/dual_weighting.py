"""DW (Dual Weighting, Li et al., CVPR 2022) soft label assignment and its losses.

Every candidate point of a GT box (a point strictly inside it) is both a positive, with weight
w+, and a negative, with weight w- at the GT's class. Both weights are computed from the
joint score ``S = sigmoid(cls) * sigmoid(ctr)``, the localisation quality
``p_loc = exp(-beta * (1 - GIoU))`` and a fixed Gaussian centre prior G, exactly as the
official ``DWHead`` (strongwolf/DW) computes them, quirks included (see the golden README):

* ``w+ = exp(5 p) p G / sum_r exp(3 p) p G`` with ``p = S[c_m] * p_loc`` (5 vs 3 on purpose),
  detached;
* the negative value ``t(iou) = (1 - iou^2) / (1 - 0.5^2)``, min-max normalised per GT over
  its candidates (upper end at most 1), and 1 where ``iou < 0.5``; it replaces the weight 1 of
  w- at (r, c_m), detached;
* losses on probabilities with ``F.binary_cross_entropy`` (log clamped at -100).
"""
import torch

from .box_overlap import aligned_iou_and_giou, decode_distances, redecode_boxes
from .common import (EPS, autocast_disabled, check_class_range, check_dense_inputs,
                     mean_over_workers, resolve_pair_values, segment_max, segment_min,
                     segment_sum, weighting_dtype)
from .elementwise import bce_with_one_target
from .negative_term import joint_score_terms
from .pairs import (box_centers, center_prior, concat_ground_truth, distinct_score_entries,
                    find_candidate_pairs, gather_pair_inputs, per_image_weight_maps)

__all__ = ["dual_weighting_loss"]

# Exponent of the IoU in the official negative value t(iou).
_NEG_IOU_EXPONENT = 2


def dual_weighting_loss(points, strides, cls_logits, box_dists, ctr_logits, gt_boxes, gt_classes, *,
                        center_prior_sigma=1.11, pos_num_exp=5.0, pos_den_exp=3.0, loc_beta=5.0,
                        neg_iou_thresh=0.5, neg_gamma=2.0, pos_loss_weight=0.25,
                        loc_loss_weight=0.25, box_eps=1e-6, duplicate_rule="last_gt",
                        round_neg_normaliser_to_float32=True, return_weights=False):
    """DW losses of a batch, computed in one vectorised pass over all images.

    Args:
        points: (R, 2) x, y of every point in input pixels, all levels concatenated.
        strides: (R,) stride of the level of each point.
        cls_logits: (N, R, C) classification logits.
        box_dists: (N, R, 4) predicted distances (l, t, r, b) >= 0 in pixels.
        ctr_logits: (N, R, 1) centerness logits.
        gt_boxes: N tensors (M_i, 4), XYXY in pixels (M_i may be 0).
        gt_classes: N int64 tensors (M_i,) in [0, C).
        center_prior_sigma: sigma of the fixed centre prior, in strides (its mean is 0).
        pos_num_exp, pos_den_exp: exponents of the numerator and denominator of w+.
        loc_beta: ``p_loc = exp(-loc_beta * (1 - GIoU))``.
        neg_iou_thresh: candidates with a lower IoU keep the full negative weight 1.
        neg_gamma: exponent of the joint score in the negative loss's importance ``S**gamma``.
        pos_loss_weight, loc_loss_weight: weights of the classification and localisation
            positive losses.
        box_eps: lower clamp of union and enclosing area in IoU / GIoU.
        duplicate_rule: the negative weight of a point that is a candidate of several GT boxes
            of the same class: ``"last_gt"`` (the official CPU behaviour: the highest GT index
            of the image wins) or ``"min"`` (the smallest; independent of GT order).
        round_neg_normaliser_to_float32: round the summed negative normaliser to float32 as the
            official code's ``.float()`` does (changes float64 results by up to ~6e-8 relative;
            a no-op in float32).
        return_weights: also return the per-image weights.

    Returns:
        dict of 0-dim tensors ``loss_cls_pos``, ``loss_loc``, ``loss_cls_neg``; with
        ``return_weights``, ``(losses, weights)`` where ``weights`` holds one dict per image of
        detached dense tensors: ``candidates`` bool (R, M_i), ``center_prior`` (R, M_i),
        ``pos_weight`` (R, M_i) (w+, 0 off candidates), ``neg_weight`` (R, C) (w-, before the
        ``S**gamma`` factor), ``ious`` (R, M_i) (0 off candidates).

    Float16 / bfloat16 inputs are computed in float32, outside autocast.
    """
    check_dense_inputs(points, strides, cls_logits, box_dists, ctr_logits, "ctr_logits",
                       gt_boxes, gt_classes, duplicate_rule)
    dtype = weighting_dtype(cls_logits, box_dists, ctr_logits)
    device = cls_logits.device
    with autocast_disabled(device):
        num_images, num_points, num_classes = cls_logits.shape
        points, strides = points.to(dtype), strides.to(dtype)
        cls_logits, box_dists = cls_logits.to(dtype), box_dists.to(dtype)
        ctr_logits = ctr_logits.to(dtype)
        gt = concat_ground_truth(gt_boxes, gt_classes, dtype, device)
        check_class_range(gt.classes, num_classes)
        pairs = find_candidate_pairs(points, gt, strides)

        pair = gather_pair_inputs(points, strides, box_dists, num_classes, gt, pairs)

        x, y = pair.points
        predicted = decode_distances(x, y, pair.distances)
        with torch.no_grad():
            target = redecode_boxes(x, y, pair.boxes)
        iou, giou = aligned_iou_and_giou(predicted, target, box_eps)
        iou = iou.detach()
        p_loc = torch.exp(-(1 - giou) * loc_beta)
        entries = distinct_score_entries(pair.score_entry, cls_logits.numel())
        neg_values = _negative_weight_values(iou, pairs, entries, gt.num_boxes, neg_iou_thresh,
                                             duplicate_rule)
        # p_cls = S[r, c_m] at the pairs, S = sigmoid(cls) * sigmoid(ctr) (N, R, C); loss_cls_neg
        # = sum w- S**gamma BCE(S, 0).
        p_cls, neg_sum = joint_score_terms(cls_logits, ctr_logits, entries.entries,
                                           entries.entry_of_pair, neg_values, neg_gamma,
                                           weight_scales_score=False)
        prior = center_prior(pair.points, pair.strides, box_centers(pair.boxes), None,
                             torch.tensor(center_prior_sigma, dtype=dtype, device=device))

        # w+ is detached (as in the official head): scores and boxes learn only through the
        # BCE terms it weights, never by moving the weights themselves.
        with torch.no_grad():
            p_pos = p_cls * p_loc
            numerator = torch.exp(pos_num_exp * p_pos) * p_pos * prior
            denominator = segment_sum(torch.exp(pos_den_exp * p_pos) * p_pos * prior,
                                      pairs.per_gt).clamp(min=EPS)
            pos_weight = numerator / denominator.index_select(0, pairs.gt)

        cls_pos_sum = (bce_with_one_target(p_cls) * pos_weight).sum()
        loc_sum = (bce_with_one_target(p_loc) * pos_weight).sum()

        # w- is 1 off the written entries, so only they add to sum(1 - w-).
        neg_avg_factor = (1 - neg_values).sum()

        pos_avg_factor = mean_over_workers(
            torch.tensor(float(gt.num_boxes), dtype=dtype, device=device)).clamp(min=1)
        if round_neg_normaliser_to_float32:
            neg_avg_factor = neg_avg_factor.float()
        neg_avg_factor = mean_over_workers(neg_avg_factor).clamp(min=1)

        losses = {
            "loss_cls_pos": cls_pos_sum * pos_loss_weight / pos_avg_factor,
            "loss_loc": loc_sum * loc_loss_weight / pos_avg_factor,
            "loss_cls_neg": neg_sum / neg_avg_factor,
        }
        if gt.num_boxes == 0:
            # Official quirk (D10): without any GT box in the batch the localisation loss is a
            # constant 0 with no autograd graph (mmdet's empty IoU is a fresh tensor).
            losses["loss_loc"] = losses["loss_loc"].detach()
        if not return_weights:
            return losses

        weights = per_image_weight_maps(pairs, gt, num_points, prior, pos_weight, iou,
                                        entries.entries, neg_values, cls_logits.shape)
        return losses, weights


def _negative_weight_values(iou, pairs, entries, num_boxes, neg_iou_thresh, duplicate_rule):
    """The values of w- (N, R, C) at the entries (r, c_m) of candidates r of m (1 elsewhere):
    the normalised negative values, one per entry as :func:`resolve_pair_values` keeps them."""
    with torch.no_grad():
        # The official order of operations: t(x) = x**2 / (thr**2 - 1) - 1 / (thr**2 - 1).
        scale = 1 / (neg_iou_thresh ** _NEG_IOU_EXPONENT - 1)
        value = scale * iou ** _NEG_IOU_EXPONENT - scale
        low = segment_min(value, pairs.gt, num_boxes).index_select(0, pairs.gt)
        high = segment_max(value, pairs.gt, num_boxes).clamp(max=1).index_select(0, pairs.gt)
        value = (value - low + EPS) / (high - low + EPS)
        # torch.where(iou < thr, 1, value) as arithmetic: the CPU's boolean kernels are not
        # vectorised. keep is exactly 1 or 0 and value is finite, so the blend is exact.
        keep = torch.sub(iou, neg_iou_thresh).sign_().add_(1).clamp_(max=1)
        value = value.mul_(keep).add_(1 - keep)
        return resolve_pair_values(value, entries, duplicate_rule)
