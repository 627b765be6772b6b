"""AutoAssign (Zhu et al., 2020) differentiable label assignment and its losses.

As MMDetection 2.25's ``AutoAssignHead`` computes them, quirks included (see the golden
README): every candidate point of a GT box (strictly inside it) contributes to that box's
positive probability with a weight ``w+`` built from a learnable per-class Gaussian centre
prior G and the confidence ``exp(T * p_pos)``, with ``p_pos = S[c_m] * exp(-5 (1 - GIoU))``;
``w+`` is not detached, so the prior's mean and sigma learn through it. The negative weight at
(r, c_m) is ``1 - normalise(1 / (1 - iou))``, where iou is the point's best IoU with any GT box
of the image. A centre loss ``M / sum G`` keeps the prior from collapsing.
"""
import torch
import torch.nn.functional as F

from .box_overlap import aligned_iou_and_giou, decode_distances, redecode_boxes
from .common import (EPS, autocast_disabled, check_class_range, check_dense_inputs,
                     mean_over_workers, resolve_pair_values, segment_max, segment_min,
                     segment_sum, weighting_dtype)
from .negative_term import joint_score_terms
from .pairs import (add_topk_pairs_for_empty_boxes, box_centers, center_prior, concat_ground_truth,
                    per_image_weight_maps, find_candidate_pairs)

__all__ = ["autoassign_loss"]


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
    check_dense_inputs(points, strides, cls_logits, box_dists, obj_logits, "obj_logits",
                       gt_boxes, gt_classes, duplicate_rule)
    num_images, num_points, num_classes = cls_logits.shape
    for name, tensor in (("prior_mean", prior_mean), ("prior_sigma", prior_sigma)):
        if tuple(tensor.shape) != (num_classes, 2):
            raise ValueError(f"weighting loss: {name} must have shape ({num_classes}, 2) (C from "
                             f"cls_logits), got {tuple(tensor.shape)}")
    dtype = weighting_dtype(cls_logits, box_dists, obj_logits)
    device = cls_logits.device
    with autocast_disabled(device):
        points, strides = points.to(dtype), strides.to(dtype)
        cls_logits, box_dists = cls_logits.to(dtype), box_dists.to(dtype)
        obj_logits = obj_logits.to(dtype)
        prior_mean, prior_sigma = prior_mean.to(dtype), prior_sigma.to(dtype)
        gt = concat_ground_truth(gt_boxes, gt_classes, dtype, device)
        check_class_range(gt.classes, num_classes)
        pairs = find_candidate_pairs(points, gt, strides)
        if force_topk:
            pairs = add_topk_pairs_for_empty_boxes(pairs, points, strides, gt, prior_mean,
                                                   prior_sigma, topk)

        pair_class = gt.classes[pairs.gt]
        pair_prediction = pairs.image * num_points + pairs.point
        pair_score_index = pair_prediction * num_classes + pair_class
        # Negative weight: the score is scaled down where the prediction localises a GT well.
        iou = _best_iou_at_candidates(points, box_dists, pairs, gt, num_points, box_eps)
        neg_entries, neg_values = _negative_weight_entries(iou, pairs, pair_score_index,
                                                           gt.num_boxes, duplicate_rule)
        # p_cls = S[r, c_m] at the pairs, S = sigmoid(cls) * sigmoid(obj) (N, R, C); the
        # negative sum is sum (S w-)**2 BCE(S w-, 0).
        p_cls, neg_sum = joint_score_terms(cls_logits, obj_logits, pair_score_index, neg_entries,
                                           neg_values, 2.0, weight_scales_score=True)

        pair_points = points[pairs.point]
        predicted = decode_distances(pair_points, box_dists.reshape(-1, 4)[pair_prediction])
        target = redecode_boxes(pair_points, gt.boxes[pairs.gt])
        _, giou = aligned_iou_and_giou(predicted, target, box_eps)
        p_loc = torch.exp(-(giou_weight * (1 - giou)))
        prior = center_prior(pair_points, strides[pairs.point], box_centers(gt.boxes)[pairs.gt],
                             prior_mean[pair_class], prior_sigma[pair_class])

        # Positive: per GT, a confidence- and prior-weighted mean of p_pos (w+ keeps its graph).
        p_pos = p_cls * p_loc
        weighted_prior = torch.exp(p_pos * confidence_temperature) * prior
        weight_sum = segment_sum(weighted_prior, pairs.gt, gt.num_boxes).clamp(min=EPS)
        pos_weight = weighted_prior / weight_sum[pairs.gt]
        gt_p_pos = segment_sum(p_pos * pos_weight, pairs.gt, gt.num_boxes)
        # sum w+ can round to 1 + ulp where p_pos == 1 (saturated scores, exact boxes); the
        # official code would then fail BCE's [0, 1] input check.
        gt_p_pos = gt_p_pos.clamp(max=1)
        pos_sum = F.binary_cross_entropy(gt_p_pos, torch.ones_like(gt_p_pos),
                                         reduction="none").sum()

        # Centre: M_i / sum G_i per image with candidates; 0 (still on the graph) otherwise.
        image_prior_sum = segment_sum(prior, pairs.image, num_images)
        has_candidates = torch.bincount(pairs.image, minlength=num_images) > 0
        center_terms = torch.where(has_candidates,
                                   gt.counts_tensor.to(dtype) / image_prior_sum.clamp(min=EPS),
                                   image_prior_sum * 0)

        # Clamped after the mean over workers, as the official code: a worker may hold no GT.
        pos_avg_factor = mean_over_workers(
            torch.tensor(float(gt.num_boxes), dtype=dtype, device=device)).clamp(min=1)
        neg_avg_factor = mean_over_workers(prior.detach().sum())
        if gt.num_boxes > 0:
            loss_pos = pos_sum * pos_loss_weight / pos_avg_factor
            loss_center = center_terms.mean() * center_loss_weight
        else:
            # Official (A9): zero losses that keep a graph to the head and the prior, so that
            # distributed training does not wait for their gradients forever.
            loss_pos = box_dists[0].sum() * 0
            loss_center = (obj_logits[0].sigmoid().sum() * 0 + prior_mean.sum() * 0
                           + prior_sigma.sum() * 0)
        losses = {
            "loss_pos": loss_pos,
            "loss_neg": neg_sum * neg_loss_weight / neg_avg_factor.clamp(min=1),
            "loss_center": loss_center,
        }
        if not return_weights:
            return losses

        weights = per_image_weight_maps(pairs, gt, num_points, prior, pos_weight, iou,
                                        neg_entries, neg_values, cls_logits.shape)
        return losses, weights


def _best_iou_at_candidates(points, box_dists, pairs, gt, num_points, box_eps):
    """Per pair, the IoU of the pair's prediction with the best-overlapping GT box of its image.

    The official code takes, for each point, the maximum IoU over all GT boxes of the image,
    including boxes the point is not a candidate of, and uses it only at candidates. It is
    therefore computed here only for the points that are a candidate of some box, against
    every GT box of their image: O(candidate points x M_i) work and memory, no gradient. This
    (U_i, M_i) product dominates AutoAssign's cost at many GT boxes, so it is evaluated one
    coordinate at a time, in place, without the (U, M, 4) stacks of the generic box functions.
    """
    with torch.no_grad():
        point_key = pairs.image * num_points + pairs.point
        candidate_points, pair_to_point = torch.unique(point_key, return_inverse=True)
        if candidate_points.numel() == 0:
            return box_dists.new_zeros(0)
        # candidate_points is sorted, so each image's points are one slice.
        points_per_image = torch.bincount(candidate_points // num_points,
                                          minlength=len(gt.counts)).tolist()
        point = points[candidate_points % num_points]
        predicted = decode_distances(point, box_dists.reshape(-1, 4)[candidate_points])
        best = [_max_iou_with_boxes(point_slice, predicted_slice, boxes, box_eps)
                for point_slice, predicted_slice, boxes in zip(
                    point.split(points_per_image), predicted.split(points_per_image),
                    gt.boxes.split(gt.counts))]
        return torch.cat(best)[pair_to_point]


def _max_iou_with_boxes(points, predicted, boxes, eps):
    """max_m IoU(predicted[u], boxes[m] re-decoded at points[u]) -> (U,), as
    :func:`aligned_iou` with :func:`redecode_boxes` computes each value.

    Args:
        points: (U, 2); predicted: (U, 4) XYXY; boxes: (M, 4) XYXY.
    """
    if points.shape[0] == 0 or boxes.shape[0] == 0:
        return points.new_zeros(points.shape[0])
    x, y = points[:, 0:1], points[:, 1:2]
    box_x1, box_y1, box_x2, box_y2 = boxes.t()[:, None, :]
    # The GT box as the head sees it at each point (encoded as distances, decoded).
    x1 = x - (x - box_x1)
    y1 = y - (y - box_y1)
    x2 = x + (box_x2 - x)
    y2 = y + (box_y2 - y)
    box_area = (x2 - x1).mul_(y2 - y1)
    pred_x1, pred_y1, pred_x2, pred_y2 = predicted[:, :, None].unbind(1)
    pred_area = (pred_x2 - pred_x1) * (pred_y2 - pred_y1)
    overlap_w = torch.minimum(pred_x2, x2).sub_(torch.maximum(pred_x1, x1)).clamp_(min=0)
    overlap_h = torch.minimum(pred_y2, y2).sub_(torch.maximum(pred_y1, y1)).clamp_(min=0)
    overlap = overlap_w.mul_(overlap_h)
    union = box_area.add_(pred_area).sub_(overlap).clamp_(min=eps)
    return overlap.div_(union).max(dim=1).values


def _negative_weight_entries(iou, pairs, pair_score_index, num_boxes, duplicate_rule):
    """The entries of w- (N, R, C) that are not 1: the flat (image, point, class) entries
    (r, c_m) of candidates r of m and their values ``1 - normalise(1 / (1 - iou))``, as
    :func:`resolve_pair_values` returns them."""
    with torch.no_grad():
        value = 1 / (1 - iou).clamp(min=EPS)
        low = segment_min(value, pairs.gt, num_boxes)[pairs.gt]
        high = segment_max(value, pairs.gt, num_boxes)[pairs.gt]
        value = (value - low + EPS) / (high - low + EPS)
        return resolve_pair_values(pair_score_index, 1 - value, pairs.gt, duplicate_rule)
