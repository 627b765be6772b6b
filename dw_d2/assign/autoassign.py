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

from .box_overlap import aligned_iou_and_giou, decode_distances, redecode_boxes
from .common import (EPS, autocast_disabled, check_class_range, check_dense_inputs,
                     mean_over_workers, resolve_pair_values, segment_max, segment_min,
                     segment_sum, weighting_dtype)
from .elementwise import bce_with_one_target
from .negative_term import joint_score_terms
from .pairs import (add_topk_pairs_for_empty_boxes, box_centers, center_prior, concat_ground_truth,
                    distinct_score_entries, expand_to_pairs, find_candidate_pairs,
                    gather_coordinates, gather_pair_inputs, per_image_weight_maps)

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

        pair = gather_pair_inputs(points, strides, box_dists, num_classes, gt, pairs)
        # Negative weight: the score is scaled down where the prediction localises a GT well.
        iou = _best_iou_at_candidates(points, box_dists, pair.rows, gt, num_points, box_eps)
        entries = distinct_score_entries(pair.score_entry, cls_logits.numel())
        neg_values = _negative_weight_values(iou, pairs, entries, gt.num_boxes, duplicate_rule)
        # p_cls = S[r, c_m] at the pairs, S = sigmoid(cls) * sigmoid(obj) (N, R, C); the
        # negative sum is sum (S w-)**2 BCE(S w-, 0).
        p_cls, neg_sum = joint_score_terms(cls_logits, obj_logits, entries.entries,
                                           entries.entry_of_pair, neg_values, 2.0,
                                           weight_scales_score=True)

        x, y = pair.points
        predicted = decode_distances(x, y, pair.distances)
        with torch.no_grad():
            target = redecode_boxes(x, y, pair.boxes)
        _, giou = aligned_iou_and_giou(predicted, target, box_eps)
        p_loc = torch.exp(-(giou_weight * (1 - giou)))
        gt_mean, gt_sigma = (gather_coordinates(p, gt.classes) for p in (prior_mean, prior_sigma))
        prior = center_prior(pair.points, pair.strides, box_centers(pair.boxes),
                             expand_to_pairs(gt_mean, pairs), expand_to_pairs(gt_sigma, pairs))

        # Positive: per GT, a confidence- and prior-weighted mean of p_pos (w+ keeps its graph).
        p_pos = p_cls * p_loc
        weighted_prior = torch.exp(p_pos * confidence_temperature) * prior
        weight_sum = segment_sum(weighted_prior, pairs.per_gt).clamp(min=EPS)
        pos_weight = weighted_prior / weight_sum.index_select(0, pairs.gt)
        gt_p_pos = segment_sum(p_pos * pos_weight, pairs.per_gt)
        # sum w+ can round to 1 + ulp where p_pos == 1 (saturated scores, exact boxes); the
        # official code would then fail BCE's [0, 1] input check.
        gt_p_pos = gt_p_pos.clamp(max=1)
        pos_sum = bce_with_one_target(gt_p_pos).sum()

        # Centre: M_i / sum G_i per image with candidates; 0 (still on the graph) otherwise.
        # Accumulated in float64: an image's ~10^5 pairs would drift by ~1e-5 in float32.
        image_prior_sum = segment_sum(prior.double(), pairs.per_image).to(dtype)
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
                                        entries.entries, neg_values, cls_logits.shape)
        return losses, weights


def _best_iou_at_candidates(points, box_dists, pair_rows, gt, num_points, box_eps):
    """Per pair, the IoU of the pair's prediction with the best-overlapping GT box of its image.

    The official code takes, for each point, the maximum IoU over all GT boxes of the image,
    including boxes the point is not a candidate of, and uses it only at candidates. It is
    therefore computed here only for the points that are a candidate of some box, against
    every GT box of their image: O(candidate points x M_i) work, no gradient.
    """
    with torch.no_grad():
        num_images = len(gt.counts)
        # The candidate points, ascending (so each image's are one slice), without a sort.
        is_candidate = torch.zeros(num_images * num_points, dtype=torch.bool,
                                   device=points.device)
        is_candidate.index_fill_(0, pair_rows, True)
        candidate_points = is_candidate.nonzero(as_tuple=True)[0]
        position = torch.empty(num_images * num_points, dtype=torch.long, device=points.device)
        position.index_copy_(0, candidate_points,
                             torch.arange(candidate_points.shape[0], device=points.device))
        points_per_image = is_candidate.view(num_images, num_points).sum(dim=1).tolist()
        point_of_candidate = candidate_points % num_points
        # A GT box re-decoded at a point depends only on the point's x (for x1, x2) and its y
        # (for y1, y2): one value per distinct x or y (a few hundred on a grid), gathered.
        column_x, column = torch.unique(points[:, 0], return_inverse=True)
        row_y, row = torch.unique(points[:, 1], return_inverse=True)
        predicted = decode_distances(
            *points.index_select(0, point_of_candidate).t(),
            box_dists.reshape(-1, 4).index_select(0, candidate_points).t())
        best = [
            _max_iou_with_boxes(column_x, row_y, columns, rows, prediction, boxes, box_eps)
            for columns, rows, prediction, boxes in zip(
                column.index_select(0, point_of_candidate).split(points_per_image),
                row.index_select(0, point_of_candidate).split(points_per_image),
                zip(*(c.split(points_per_image) for c in predicted)),
                gt.boxes.split(gt.counts))]
        return torch.cat(best).index_select(0, position.index_select(0, pair_rows))


# Point x box entries per block of the CPU max-IoU: its few buffers stay within L2.
_CPU_BLOCK_ENTRIES = 1 << 17


def _max_iou_with_boxes(column_x, row_y, columns, rows, predicted, boxes, eps):
    """max_m IoU(predicted[u], boxes[m] re-decoded at point u) -> (U,), each value as
    :func:`aligned_iou_and_giou` computes it.

    The (U, M) products are evaluated a block of points at a time (all at once on CUDA), in
    place, so that they stay in the cache.

    Args:
        column_x: (X,) distinct point x; row_y: (Y,) distinct point y.
        columns, rows: (U,) the point's index into column_x and row_y.
        predicted: 4 (U,) tensors, the predicted boxes XYXY.
        boxes: (M, 4) the image's GT boxes, XYXY.
    """
    num_points, num_boxes = columns.shape[0], boxes.shape[0]
    if num_points == 0 or num_boxes == 0:
        return column_x.new_zeros(num_points)
    pred_x1, pred_y1, pred_x2, pred_y2 = (c[:, None] for c in predicted)
    pred_area = (pred_x2 - pred_x1) * (pred_y2 - pred_y1)
    box_x1, box_y1, box_x2, box_y2 = boxes.t()
    # (X, M) and (Y, M): the GT boxes as the head sees them (encoded as distances, decoded).
    x, y = column_x[:, None], row_y[:, None]
    column_x1, column_x2 = x - (x - box_x1), x + (box_x2 - x)
    row_y1, row_y2 = y - (y - box_y1), y + (box_y2 - y)
    column_w, row_h = column_x2 - column_x1, row_y2 - row_y1

    if columns.device.type == "cpu":
        points_per_block = max(1, _CPU_BLOCK_ENTRIES // num_boxes)
    else:
        points_per_block = num_points
    best = column_x.new_empty(num_points)
    buffers = [column_x.new_empty(min(points_per_block, num_points), num_boxes)
               for _ in range(5)]
    for start in range(0, num_points, points_per_block):
        block = slice(start, start + points_per_block)
        block_columns, block_rows = columns[block], rows[block]
        x1, x2, y1, y2, area = (b[:block_columns.shape[0]] for b in buffers)
        torch.index_select(column_x1, 0, block_columns, out=x1)
        torch.index_select(column_x2, 0, block_columns, out=x2)
        torch.index_select(row_y1, 0, block_rows, out=y1)
        torch.index_select(row_y2, 0, block_rows, out=y2)
        overlap_w = torch.minimum(pred_x2[block], x2, out=x2).sub_(
            torch.maximum(pred_x1[block], x1, out=x1)).clamp_(min=0)
        overlap_h = torch.minimum(pred_y2[block], y2, out=y2).sub_(
            torch.maximum(pred_y1[block], y1, out=y1)).clamp_(min=0)
        overlap = overlap_w.mul_(overlap_h)
        torch.index_select(column_w, 0, block_columns, out=area)
        area.mul_(torch.index_select(row_h, 0, block_rows, out=y1))
        union = area.add_(pred_area[block]).sub_(overlap).clamp_(min=eps)
        torch.amax(overlap.div_(union), dim=1, out=best[block])
    return best


def _negative_weight_values(iou, pairs, entries, num_boxes, duplicate_rule):
    """The values of w- (N, R, C) at the entries (r, c_m) of candidates r of m (1 elsewhere):
    ``1 - normalise(1 / (1 - iou))``, one per entry as :func:`resolve_pair_values` keeps
    them."""
    with torch.no_grad():
        value = 1 / (1 - iou).clamp(min=EPS)
        low = segment_min(value, pairs.gt, num_boxes).index_select(0, pairs.gt)
        high = segment_max(value, pairs.gt, num_boxes).index_select(0, pairs.gt)
        value = (value - low + EPS) / (high - low + EPS)
        return resolve_pair_values(1 - value, entries, duplicate_rule)
