"""DW: "A Dual Weighting Label Assignment Scheme for Object Detection" (Li et al., CVPR 2022).

Every candidate point of a GT box m (a point strictly inside it) is both a positive of m, with
weight w+, and a negative of m's class c_m, with weight w-. In the order of the paper, and as
the authors' official ``DWHead`` computes them (its quirks are kept, each for equal numbers):

1. Centre prior: ``G = exp(-|(p - centre_m) / s|^2 / (2 sigma^2))``, fixed (mean 0, sigma
   1.11 strides), and the joint score ``S = sigmoid(cls) * sigmoid(ctr)``, (N, R, C).
2. Positive weight: with ``p_loc = exp(-beta (1 - GIoU))`` and ``p = S[c_m] * p_loc``,
   ``w+ = exp(5 p) p G / sum_r exp(3 p) p G``. The numerator's 5 against the denominator's 3
   is the official code's (so one GT's weights do not sum to 1). w+ is detached.
3. Negative weight: ``t(iou) = (1 - iou^2) / (1 - 0.5^2)``, min-max normalised over each GT's
   candidates (its upper end at most 1), and 1 where ``iou < 0.5``; it replaces the weight 1
   of w- at (r, c_m). Detached; the IoU carries no gradient.
4. Losses, with torch's BCE on probabilities (its log clamped at -100, as the official code):
   ``loss_cls_pos = 0.25 sum w+ BCE(S[c_m], 1) / #GT``, ``loss_loc = 0.25 sum w+ BCE(p_loc, 1)
   / #GT`` and ``loss_cls_neg = sum w- S^2 BCE(S, 0) / sum(1 - w-)``, where the ``S^2`` factor
   keeps its gradient. The normalisers are averaged over distributed workers, then clamped
   at 1; the official code rounds the negative one to float32 (``.float()``), which is kept
   by default.
"""
import torch

from .candidates import find_candidate_pairs
from .center_prior import box_centers, center_prior
from .kernels.elementwise import bce_with_one_target, focal_negative_term
from .kernels.negative_term import focal_negative_sum
from .pipeline import (EPS, DenseBatch, autocast_disabled, gather_pairs, mean_over_workers,
                       normalise_per_gt, num_gt_normaliser, pair_overlaps, per_image_weight_maps,
                       prepare_batch, resolve_pair_values, score_entries, segment_sum)

__all__ = ["dual_weighting_loss", "dual_weighting_losses"]


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
    batch = prepare_batch((points, strides), cls_logits, box_dists, ctr_logits, gt_boxes,
                          gt_classes, score_name="ctr_logits", duplicate_rule=duplicate_rule)
    return dual_weighting_losses(
        batch, center_prior_sigma=center_prior_sigma, pos_num_exp=pos_num_exp,
        pos_den_exp=pos_den_exp, loc_beta=loc_beta, neg_iou_thresh=neg_iou_thresh,
        neg_gamma=neg_gamma, pos_loss_weight=pos_loss_weight, loc_loss_weight=loc_loss_weight,
        box_eps=box_eps, duplicate_rule=duplicate_rule,
        round_neg_normaliser_to_float32=round_neg_normaliser_to_float32,
        return_weights=return_weights)


def dual_weighting_losses(batch: DenseBatch, *, center_prior_sigma, pos_num_exp, pos_den_exp,
                          loc_beta, neg_iou_thresh, neg_gamma, pos_loss_weight, loc_loss_weight,
                          box_eps, duplicate_rule, round_neg_normaliser_to_float32,
                          return_weights):
    """:func:`dual_weighting_loss` of a prepared batch (the score logits are the centerness)."""
    gt = batch.gt
    with autocast_disabled(batch.device):
        # Centre prior: the candidates of each GT box and their fixed prior G.
        pairs = find_candidate_pairs(batch.points, gt)
        pair = gather_pairs(batch, pairs)
        sigma = torch.tensor(center_prior_sigma, dtype=batch.dtype, device=batch.device)
        prior = center_prior(pair.points, pair.strides, box_centers(pair.boxes), None, sigma)

        # Localisation quality of each candidate's prediction; the IoU learns nothing.
        iou, giou = pair_overlaps(pair, box_eps)
        iou = iou.detach()
        p_loc = torch.exp(-(1 - giou) * loc_beta)

        # Negative weight w-, at the entries (r, c_m) (1 everywhere else); it needs only the
        # IoU, and the negative term's sweep also gives S at the entries, which w+ needs.
        entries = score_entries(batch, pair)
        with torch.no_grad():
            neg_values = resolve_pair_values(
                _negative_values(iou, pairs, gt.num_boxes, neg_iou_thresh), entries,
                duplicate_rule)
        # sum over (N, R, C) of w- S**gamma BCE(S, 0), and S at the entries.
        neg_sum, entry_scores = focal_negative_sum(
            batch.cls_logits, batch.score_logits, entries.entries,
            lambda scores: neg_values * focal_negative_term(scores, neg_gamma), neg_gamma)
        p_cls = entry_scores.index_select(0, entries.entry_of_pair)  # S[r, c_m]

        # Positive weight w+, detached (as in the official head): scores and boxes learn
        # only through the BCE terms it weights, never by moving the weights themselves.
        with torch.no_grad():
            p_pos = p_cls * p_loc
            numerator = torch.exp(pos_num_exp * p_pos) * p_pos * prior
            denominator = segment_sum(torch.exp(pos_den_exp * p_pos) * p_pos * prior,
                                      pairs.per_gt).clamp(min=EPS)
            pos_weight = numerator / denominator.index_select(0, pairs.gt)

        # Losses and their normalisers.
        cls_pos_sum = (bce_with_one_target(p_cls) * pos_weight).sum()
        loc_sum = (bce_with_one_target(p_loc) * pos_weight).sum()
        pos_avg_factor = num_gt_normaliser(batch)
        # w- is 1 off the entries, so only they add to sum(1 - w-).
        neg_avg_factor = (1 - neg_values).sum()
        if round_neg_normaliser_to_float32:
            neg_avg_factor = neg_avg_factor.float()
        neg_avg_factor = mean_over_workers(neg_avg_factor).clamp(min=1)
        losses = {
            "loss_cls_pos": cls_pos_sum * pos_loss_weight / pos_avg_factor,
            "loss_loc": loc_sum * loc_loss_weight / pos_avg_factor,
            "loss_cls_neg": neg_sum / neg_avg_factor,
        }
        if gt.num_boxes == 0:
            # Without any GT box in the batch the official localisation loss is a constant 0
            # with no autograd graph (mmdet's IoU of no boxes is a fresh empty tensor).
            losses["loss_loc"] = losses["loss_loc"].detach()
        if not return_weights:
            return losses
        return losses, per_image_weight_maps(batch, pairs, prior, pos_weight, iou, entries,
                                             neg_values)


def _negative_values(iou, pairs, num_boxes, neg_iou_thresh):
    """(P,) the value of w- at each pair: t(iou) normalised per GT, 1 below the threshold."""
    # The official order of operations: t(x) = x**2 / (thr**2 - 1) - 1 / (thr**2 - 1).
    scale = 1 / (neg_iou_thresh ** 2 - 1)
    value = normalise_per_gt(scale * iou ** 2 - scale, pairs, num_boxes, max_high=1)
    return torch.where(iou < neg_iou_thresh, torch.ones_like(value), value)
