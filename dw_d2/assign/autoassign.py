"""AutoAssign: "Differentiable Label Assignment for Dense Object Detection" (Zhu et al., 2020).

Every candidate point of a GT box m (a point strictly inside it) contributes to m's positive
probability with a weight w+, and is a negative of m's class c_m with a weight w-. In the
order of the paper, and as MMDetection 2.25's ``AutoAssignHead`` computes them (its quirks are
kept, each for equal numbers):

1. Centre prior: ``G = prod_xy exp(-((p - centre_m) / s - mu_c)^2 / (2 sigma_c^2))`` with a
   learnable mean and sigma per class (initialised at 0 and 1), and the joint score
   ``S = sigmoid(cls) * sigmoid(obj)``, (N, R, C).
2. Positive weight: with ``p_pos = S[c_m] * exp(-5 (1 - GIoU))``, the confidence weighting
   ``w+ = exp(T p_pos) G / sum_r exp(T p_pos) G`` (T = 3). w+ is *not* detached: the prior's
   mean and sigma learn through it. ``P_m = sum_r w+ p_pos``, and ``loss_pos = 0.25 sum_m
   BCE(P_m, 1) / #GT``.
3. Negative weight: ``w- = 1 - normalise(1 / (1 - iou))`` at (r, c_m), min-max normalised over
   each GT's candidates, where iou is the point's best IoU with *any* GT box of its image
   (MMDetection's choice); ``loss_neg = 0.75 sum (S w-)^2 BCE(S w-, 0) / sum G``.
4. Centre loss: ``M_i / sum G`` per image with candidates (0 otherwise), ``loss_center = 0.75
   mean over images``: it keeps the prior from spreading over the whole box.

Losses use torch's BCE on probabilities (its log clamped at -100). Without any GT box in the
batch the positive and centre losses are zeros that keep a graph to the boxes, the objectness
and the prior, as the official code, so that distributed training does not wait for their
gradients.
"""
import torch

from .candidates import add_topk_pairs_for_empty_boxes, find_candidate_pairs
from .center_prior import box_centers, center_prior
from .kernels.box_overlap import best_iou_at_candidates
from .kernels.elementwise import bce_with_one_target, focal_negative_term
from .kernels.gather import expand_per_gt, gather_coordinates
from .kernels.negative_term import focal_negative_sum
from .pipeline import (EPS, DenseBatch, autocast_disabled, gather_pairs, mean_over_workers,
                       normalise_per_gt, num_gt_normaliser, pair_overlaps, per_image_weight_maps,
                       prepare_batch, resolve_pair_values, score_entries, segment_sum)

__all__ = ["autoassign_loss", "autoassign_losses"]


def autoassign_loss(points, strides, cls_logits, box_dists, obj_logits, gt_boxes, gt_classes,
                    prior_mean, prior_sigma, *, giou_weight=5.0, confidence_temperature=3.0,
                    pos_loss_weight=0.25, neg_loss_weight=0.75, center_loss_weight=0.75,
                    force_topk=False, topk=9, box_eps=1e-6, duplicate_rule="last_gt",
                    return_weights=False):
    """AutoAssign losses of a batch, computed in one vectorised pass over all images.

    Args:
        points: (R, 2) x, y of every point in input pixels, all levels concatenated
            (MMDetection's AutoAssign places them at (x s, y s), without a half-stride offset).
        strides: (R,) stride of the level of each point.
        cls_logits: (N, R, C) classification logits.
        box_dists: (N, R, 4) predicted distances (l, t, r, b) >= 0 in pixels.
        obj_logits: (N, R, 1) objectness logits.
        gt_boxes: N tensors (M_i, 4), XYXY in pixels (M_i may be 0).
        gt_classes: N int64 tensors (M_i,) in [0, C).
        prior_mean, prior_sigma: (C, 2) learnable centre-prior parameters, in strides; they get
            gradients from ``loss_pos`` and ``loss_center``.
        giou_weight: ``p_loc = exp(-giou_weight * (1 - GIoU))``.
        confidence_temperature: T of the confidence weight ``exp(T * p_pos)``.
        pos_loss_weight, neg_loss_weight, center_loss_weight: weights of the three losses.
        force_topk, topk: give a GT box without candidates its ``topk`` points of highest
            centre prior as candidates (MMDetection's option, off by default).
        box_eps: lower clamp of union and enclosing area in IoU / GIoU.
        duplicate_rule: the negative weight of a point that is a candidate of several GT boxes
            of the same class: ``"last_gt"`` (the official CPU behaviour: the highest GT index
            of the image wins) or ``"min"`` (the smallest; independent of GT order).
        return_weights: also return the per-image weights.

    Returns:
        dict of 0-dim tensors ``loss_pos``, ``loss_neg``, ``loss_center``; with
        ``return_weights``, ``(losses, weights)`` where ``weights`` holds one dict per image of
        detached dense tensors: ``candidates`` bool (R, M_i) (after ``force_topk``),
        ``center_prior`` (R, M_i), ``pos_weight`` (R, M_i) (w+, 0 off candidates),
        ``neg_weight`` (R, C) (w-), ``ious`` (R, M_i) (the point's best IoU over the image's
        GT boxes, at candidates; 0 elsewhere).

    Float16 / bfloat16 inputs are computed in float32, outside autocast.
    """
    batch = prepare_batch((points, strides), cls_logits, box_dists, obj_logits, gt_boxes,
                          gt_classes, score_name="obj_logits", duplicate_rule=duplicate_rule)
    return autoassign_losses(
        batch, prior_mean, prior_sigma, giou_weight=giou_weight,
        confidence_temperature=confidence_temperature, pos_loss_weight=pos_loss_weight,
        neg_loss_weight=neg_loss_weight, center_loss_weight=center_loss_weight,
        force_topk=force_topk, topk=topk, box_eps=box_eps, duplicate_rule=duplicate_rule,
        return_weights=return_weights)


def autoassign_losses(batch: DenseBatch, prior_mean, prior_sigma, *, giou_weight,
                      confidence_temperature, pos_loss_weight, neg_loss_weight,
                      center_loss_weight, force_topk, topk, box_eps, duplicate_rule,
                      return_weights):
    """:func:`autoassign_loss` of a prepared batch (the score logits are the objectness)."""
    for name, tensor in (("prior_mean", prior_mean), ("prior_sigma", prior_sigma)):
        if tuple(tensor.shape) != (batch.num_classes, 2):
            raise ValueError(f"weighting loss: {name} must have shape ({batch.num_classes}, 2) "
                             f"(C from cls_logits), got {tuple(tensor.shape)}")
    gt = batch.gt
    with autocast_disabled(batch.device):
        prior_mean, prior_sigma = prior_mean.to(batch.dtype), prior_sigma.to(batch.dtype)
        # Centre prior: the candidates of each GT box (with MMDetection's force_topk for boxes
        # that contain no point) and their learnable prior G.
        pairs = find_candidate_pairs(batch.points, gt)
        if force_topk:
            pairs = add_topk_pairs_for_empty_boxes(pairs, batch.points, gt, prior_mean,
                                                   prior_sigma, topk)
        pair = gather_pairs(batch, pairs)
        gt_mean, gt_sigma = (expand_per_gt(gather_coordinates(p, gt.classes), pairs.gt,
                                           pairs.per_gt) for p in (prior_mean, prior_sigma))
        prior = center_prior(pair.points, pair.strides, box_centers(pair.boxes), gt_mean,
                             gt_sigma)

        # Negative weight w-, at the entries (r, c_m), from each candidate's best IoU over its
        # image's GT boxes (no gradient); 1 everywhere else. The negative term's sweep also
        # gives S at the entries, which the positive needs.
        iou = best_iou_at_candidates(batch.points.points, batch.box_dists, pair.rows, gt.boxes,
                                     gt.counts, box_eps)
        entries = score_entries(batch, pair)
        with torch.no_grad():
            value = normalise_per_gt(1 / (1 - iou).clamp(min=EPS), pairs, gt.num_boxes)
            neg_values = resolve_pair_values(1 - value, entries, duplicate_rule)
        # sum over (N, R, C) of (S w-)**2 BCE(S w-, 0), and S at the entries.
        neg_sum, entry_scores = focal_negative_sum(
            batch.cls_logits, batch.score_logits, entries.entries,
            lambda scores: focal_negative_term(scores * neg_values, 2.0), 2.0)
        p_cls = entry_scores.index_select(0, entries.entry_of_pair)  # S[r, c_m]

        # Positive: per GT, a confidence- and prior-weighted mean of p_pos (w+ keeps its
        # graph).
        _, giou = pair_overlaps(pair, box_eps)
        p_pos = p_cls * torch.exp(-(giou_weight * (1 - giou)))
        weighted_prior = torch.exp(p_pos * confidence_temperature) * prior
        weight_sum = segment_sum(weighted_prior, pairs.per_gt).clamp(min=EPS)
        pos_weight = weighted_prior / weight_sum.index_select(0, pairs.gt)
        gt_p_pos = segment_sum(p_pos * pos_weight, pairs.per_gt)
        # sum w+ can round to 1 + ulp where p_pos == 1 (saturated scores, exact boxes); the
        # official code would then fail BCE's [0, 1] input check.
        gt_p_pos = gt_p_pos.clamp(max=1)
        pos_sum = bce_with_one_target(gt_p_pos).sum()

        # Centre loss: M_i / sum G_i per image with candidates; 0 (still on the graph)
        # otherwise.
        # Accumulated in float64: an image's ~10^5 pairs would drift by ~1e-5 in float32.
        image_prior_sum = segment_sum(prior.double(), pairs.per_image).to(batch.dtype)
        has_candidates = torch.bincount(pairs.image, minlength=batch.num_images) > 0
        center_terms = torch.where(has_candidates,
                                   gt.counts_tensor.to(batch.dtype)
                                   / image_prior_sum.clamp(min=EPS),
                                   image_prior_sum * 0)

        pos_avg_factor = num_gt_normaliser(batch)
        neg_avg_factor = mean_over_workers(prior.detach().sum())
        if gt.num_boxes > 0:
            loss_pos = pos_sum * pos_loss_weight / pos_avg_factor
            loss_center = center_terms.mean() * center_loss_weight
        else:
            loss_pos = batch.box_dists[0].sum() * 0
            loss_center = (batch.score_logits[0].sigmoid().sum() * 0 + prior_mean.sum() * 0
                           + prior_sigma.sum() * 0)
        losses = {
            "loss_pos": loss_pos,
            "loss_neg": neg_sum * neg_loss_weight / neg_avg_factor.clamp(min=1),
            "loss_center": loss_center,
        }
        if not return_weights:
            return losses
        return losses, per_image_weight_maps(batch, pairs, prior, pos_weight, iou, entries,
                                             neg_values)
