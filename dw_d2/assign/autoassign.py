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

from .box_overlap import aligned_iou, aligned_iou_and_giou, decode_distances, redecode_boxes
from .common import (EPS, autocast_disabled, check_class_range, check_dense_inputs,
                     mean_over_workers, segment_max, segment_min, segment_sum, weighting_dtype,
                     write_pair_values)
from .pairs import (add_topk_pairs_for_empty_boxes, box_centers, center_prior, concat_ground_truth,
                    dense_pair_map, find_candidate_pairs)

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
        pairs = find_candidate_pairs(points, gt)
        if force_topk:
            pairs = add_topk_pairs_for_empty_boxes(pairs, points, strides, gt, prior_mean,
                                                   prior_sigma, topk)

        joint_score = cls_logits.sigmoid() * obj_logits.sigmoid()  # (N, R, C)
        pair_class = gt.classes[pairs.gt]
        pair_prediction = pairs.image * num_points + pairs.point
        pair_score_index = pair_prediction * num_classes + pair_class
        p_cls = joint_score.reshape(-1)[pair_score_index]

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

        # Negative: the score, scaled down where the prediction localises a GT box well.
        iou = _best_iou_at_candidates(points, box_dists, pairs, gt, num_points, box_eps)
        neg_weight = _negative_weight(iou, pairs, pair_score_index, joint_score.shape,
                                      gt.num_boxes, duplicate_rule)
        neg_score = joint_score * neg_weight
        neg_sum = (neg_score ** 2 * F.binary_cross_entropy(
            neg_score, torch.zeros_like(neg_score), reduction="none")).sum()

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

        candidates = dense_pair_map(torch.ones_like(prior, dtype=torch.bool), pairs, num_points, gt)
        per_pair = {
            "center_prior": dense_pair_map(prior.detach(), pairs, num_points, gt),
            "pos_weight": dense_pair_map(pos_weight.detach(), pairs, num_points, gt),
            "ious": dense_pair_map(iou, pairs, num_points, gt),
        }
        weights = [
            {"candidates": candidates[i], **{k: v[i] for k, v in per_pair.items()},
             "neg_weight": neg_weight[i]}
            for i in range(num_images)
        ]
        return losses, weights


def _best_iou_at_candidates(points, box_dists, pairs, gt, num_points, box_eps):
    """Per pair, the IoU of the pair's prediction with the best-overlapping GT box of its image.

    The official code takes, for each point, the maximum IoU over all GT boxes of the image,
    including boxes the point is not a candidate of, and uses it only at candidates. It is
    therefore computed here only for the points that are a candidate of some box, against
    every GT box of their image (padded to the batch's largest M): memory O(candidate points x
    max M_i), no gradient.
    """
    with torch.no_grad():
        point_key = pairs.image * num_points + pairs.point
        candidate_points, pair_to_point = torch.unique(point_key, return_inverse=True)
        if candidate_points.numel() == 0:
            return box_dists.new_zeros(0)
        image = candidate_points // num_points
        point = points[candidate_points % num_points][:, None, :]  # (U, 1, 2)
        predicted = decode_distances(point, box_dists.reshape(-1, 4)[candidate_points][:, None, :])
        padded_boxes, valid = _pad_boxes_per_image(gt)  # (N, M_max, 4), (N, M_max)
        iou = aligned_iou(predicted, redecode_boxes(point, padded_boxes[image]), box_eps)
        iou = iou.masked_fill(~valid[image], -1)  # (U, M_max)
        return iou.max(dim=1).values[pair_to_point]


def _pad_boxes_per_image(gt):
    """The batch's GT boxes as (N, M_max, 4), with a (N, M_max) mask of the real ones."""
    num_images, max_boxes = len(gt.counts), max(gt.counts)
    first_box = torch.cumsum(gt.counts_tensor, 0) - gt.counts_tensor
    slot = torch.arange(gt.num_boxes, device=gt.boxes.device) - first_box[gt.image]
    padded = gt.boxes.new_zeros(num_images, max_boxes, 4)
    padded[gt.image, slot] = gt.boxes
    valid = torch.zeros(num_images, max_boxes, dtype=torch.bool, device=gt.boxes.device)
    valid[gt.image, slot] = True
    return padded, valid


def _negative_weight(iou, pairs, pair_score_index, score_shape, num_boxes, duplicate_rule):
    """w- (N, R, C): 1, except ``1 - normalise(1 / (1 - iou))`` at (r, c_m) for candidates."""
    with torch.no_grad():
        value = 1 / (1 - iou).clamp(min=EPS)
        low = segment_min(value, pairs.gt, num_boxes)[pairs.gt]
        high = segment_max(value, pairs.gt, num_boxes)[pairs.gt]
        value = (value - low + EPS) / (high - low + EPS)
        neg_weight = torch.ones(score_shape, dtype=iou.dtype, device=iou.device)
        write_pair_values(neg_weight.view(-1), pair_score_index, 1 - value, pairs.gt,
                          duplicate_rule)
    return neg_weight
