"""The slow oracle: DW and AutoAssign losses computed one image and one GT box at a time.

This module is the test oracle of :func:`dw_d2.dual_weighting_loss` and
:func:`dw_d2.autoassign_loss`, and the baseline that ``tools/benchmark.py`` times them against
(the "per-GT-loop" approach). It is written the way the official implementations (the DW
authors' ``DWHead``, MMDetection 2.x's ``AutoAssignHead``) organise the computation, and is
kept deliberately plain, with no speed tricks, so that it is easy to check by eye:

* a Python loop over the images of the batch;
* dense ``(R, M)`` point-by-GT tensors per image (candidate mask, centre prior, IoU, GIoU);
* a Python loop over the GT boxes of an image for the per-GT normalisation of the negative
  weights and for writing them into the ``(R, C)`` negative-weight map.

It replicates the official code's quirks that the fast functions replicate too (each is
explained where it is applied: BCE on probabilities with its log clamp, strict candidates,
the float32 rounding of DW's negative normaliser, AutoAssign's best IoU over all GT boxes, the
zero losses without GT boxes, ...), so that in float64 it reproduces the official reference
cases, gradients included, to rounding. Nothing in the training path imports it.

Both functions take the same arguments as their ``dw_d2`` counterparts:

* ``points`` (R, 2): x, y in input pixels, all levels concatenated (level-major, row-major).
* ``strides`` (R,): the stride of the level of each point.
* ``cls_logits`` (N, R, C), ``box_dists`` (N, R, 4) = (l, t, r, b) >= 0 in pixels,
  ``ctr_logits`` / ``obj_logits`` (N, R, 1).
* ``gt_boxes``: list of N tensors (M_i, 4), XYXY pixels; ``gt_classes``: list of N int64 (M_i,).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .pipeline import DUPLICATE_RULES

# Clamp of the official code's normalisers (``EPS`` in both official heads).
EPS = 1e-12
# mmdet's IoU/GIoU guard on the union and the enclosing area.
BOX_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------
def _bce(prob, target_value):
    """Element-wise ``F.binary_cross_entropy`` on probabilities, as every official loss term:
    torch clamps its log at -100, so saturated scores give 100, not infinity (nor the value of a
    BCE-with-logits formulation)."""
    return F.binary_cross_entropy(prob, torch.full_like(prob, target_value), reduction="none")


def _mean_over_workers(value):
    """The official ``reduce_mean``: identity in one process, mean over workers otherwise."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
    return value


def _decode(points, dists):
    """(..., 2) points and (..., 4) l, t, r, b distances -> (..., 4) x1, y1, x2, y2 boxes."""
    x, y = points[..., 0], points[..., 1]
    return torch.stack(
        (x - dists[..., 0], y - dists[..., 1], x + dists[..., 2], y + dists[..., 3]), dim=-1
    )


def _aligned_iou_and_giou(pred, target):
    """IoU and GIoU of aligned (K, 4) XYXY boxes, as mmdet 2.x's ``bbox_overlaps``: union and
    enclosing area clamped below at 1e-6, ``GIoU = IoU - (enclose - union) / enclose``."""
    area_pred = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_target = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    inter_wh = (torch.min(pred[:, 2:], target[:, 2:]) - torch.max(pred[:, :2], target[:, :2]))
    inter_wh = inter_wh.clamp(min=0)
    overlap = inter_wh[:, 0] * inter_wh[:, 1]
    union = torch.clamp(area_pred + area_target - overlap, min=BOX_EPS)
    iou = overlap / union
    enclose_wh = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2]))
    enclose_wh = enclose_wh.clamp(min=0)
    enclose = torch.clamp(enclose_wh[:, 0] * enclose_wh[:, 1], min=BOX_EPS)
    giou = iou - (enclose - union) / enclose
    return iou, giou


def _gt_distance_targets(points, boxes):
    """(R, M, 4) distances from every point to the four edges of every GT box."""
    x = points[:, 0, None]
    y = points[:, 1, None]
    return torch.stack(
        (x - boxes[None, :, 0], y - boxes[None, :, 1],
         boxes[None, :, 2] - x, boxes[None, :, 3] - y),
        dim=-1,
    )


def _center_prior(points, strides, boxes, classes, prior_mean, prior_sigma):
    """(R, M) Gaussian centre prior of every point for every GT box, not yet masked:
    ``prod_xy exp(-((p - c) / s - mean_c)^2 / (2 sigma_c^2))`` with c the box centre and s the
    point's stride."""
    centers = torch.stack(((boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2), 1)
    in_strides = (points[:, None, :] - centers[None]) / strides[:, None, None]
    offsets = (in_strides - prior_mean[classes][None]) ** 2
    return torch.exp(-offsets / (2 * prior_sigma[classes][None] ** 2)).prod(dim=-1)


def _pairwise_box_terms(points, box_dists, boxes):
    """Point-by-GT box terms of one image.

    Returns ``inside`` (R, M) bool (strictly inside: a point on an edge is no candidate),
    ``iou`` (R, M) without gradient and ``giou`` (R, M) with gradient, for every (r, m) pair.
    Both compare decoded boxes, as the official heads do: the prediction
    ``(x - l, y - t, x + r, y + b)`` and the GT box encoded as distances from the point and
    decoded again (which can differ from the stored box in the last bit).
    """
    num_points, num_gts = points.shape[0], boxes.shape[0]
    targets = _gt_distance_targets(points, boxes)
    if num_gts:
        inside = targets.min(dim=-1).values > 0
    else:
        inside = targets.new_zeros((num_points, 0), dtype=torch.bool)
    expanded_points = points[:, None, :].expand(num_points, num_gts, 2).reshape(-1, 2)
    expanded_dists = box_dists[:, None, :].expand(num_points, num_gts, 4).reshape(-1, 4)
    pred_boxes = _decode(expanded_points, expanded_dists)
    target_boxes = _decode(expanded_points, targets.reshape(-1, 4))
    iou, giou = _aligned_iou_and_giou(pred_boxes, target_boxes)
    return inside, iou.detach().reshape(num_points, num_gts), giou.reshape(num_points, num_gts)


def _write_negative_weight(neg_weight, written, rows, column, values, duplicate_rule):
    """Write one GT's negative weights into its class column.

    A point inside two GT boxes of the same class is written twice. The official code does it
    with one advanced-index assignment whose indices repeat, which is formally undefined; on
    the CPU the highest GT index wins.

    "last_gt": later GT boxes overwrite earlier ones, i.e. the highest GT index wins, as the
    official scatter does on the CPU. "min": the smallest weight over the GT boxes of that class
    that contain the point, whatever their order.
    """
    if duplicate_rule == "min":
        previous = neg_weight[rows, column]
        values = torch.where(written[rows, column], torch.minimum(previous, values), values)
    neg_weight[rows, column] = values
    written[rows, column] = True


def _check_inputs(points, strides, cls_logits, box_dists, score_logits, gt_boxes, gt_classes,
                  duplicate_rule):
    """Shapes and options, each bad one named in a ValueError."""
    n, r, _ = cls_logits.shape
    if points.shape != (r, 2) or strides.shape != (r,):
        raise ValueError(
            f"points {tuple(points.shape)} / strides {tuple(strides.shape)} do not match R={r}"
        )
    if box_dists.shape != (n, r, 4) or score_logits.shape != (n, r, 1):
        raise ValueError(
            f"box_dists {tuple(box_dists.shape)} / second-score logits {tuple(score_logits.shape)} "
            f"do not match (N, R) = ({n}, {r})"
        )
    if len(gt_boxes) != n or len(gt_classes) != n:
        raise ValueError(
            f"gt_boxes ({len(gt_boxes)}) and gt_classes ({len(gt_classes)}) need N={n} entries"
        )
    if duplicate_rule not in DUPLICATE_RULES:
        raise ValueError(f"duplicate_rule={duplicate_rule!r}: expected one of {DUPLICATE_RULES}")


# --------------------------------------------------------------------------------------------
# DW
# --------------------------------------------------------------------------------------------
def reference_dual_weighting_loss(
    points,
    strides,
    cls_logits,
    box_dists,
    ctr_logits,
    gt_boxes,
    gt_classes,
    *,
    center_prior_sigma=1.11,
    pos_num_exp=5.0,
    pos_den_exp=3.0,
    loc_beta=5.0,
    neg_iou_thresh=0.5,
    neg_gamma=2.0,
    pos_loss_weight=0.25,
    loc_loss_weight=0.25,
    duplicate_rule="last_gt",
    round_neg_normaliser_to_float32=True,
    return_intermediates=False,
):
    """DW losses, one image and one GT box at a time.

    Args: see the module docstring; hyper-parameters mirror ``MODEL.ASSIGNER.DW.*``.
        round_neg_normaliser_to_float32: replicate the official ``.float()`` on the summed
            negative normaliser (the official code calls ``.float()`` on it, which rounds a
            float64 run's normaliser); a no-op in float32.
        return_intermediates: also return, per image, the dense intermediate tensors (the
            keys of the official reference cases).

    Returns:
        dict with 0-dim ``loss_cls_pos``, ``loss_loc``, ``loss_cls_neg`` (and ``per_image``, a
        list of dicts, when ``return_intermediates``).
    """
    _check_inputs(points, strides, cls_logits, box_dists, ctr_logits, gt_boxes, gt_classes,
                  duplicate_rule)
    num_classes = cls_logits.shape[-1]
    prior_mean = cls_logits.new_zeros(num_classes, 2)
    prior_sigma = cls_logits.new_full((num_classes, 2), center_prior_sigma)
    # t(x) = (x^2 - 1) / (thr^2 - 1): 1 at the IoU threshold, 0 at IoU 1; computed as the
    # official code does, x^2 / (thr^2 - 1) - 1 / (thr^2 - 1).
    denominator = neg_iou_thresh ** 2 - 1

    cls_pos_sums, loc_sums, neg_sums, neg_factors, per_image = [], [], [], [], []
    for i in range(cls_logits.shape[0]):
        boxes, classes = gt_boxes[i], gt_classes[i]
        inside, iou, giou = _pairwise_box_terms(points, box_dists[i], boxes)
        iou = iou.masked_fill(~inside, 0)
        prior = _center_prior(points, strides, boxes, classes, prior_mean, prior_sigma)
        prior = prior.masked_fill(~inside, 0)

        joint = cls_logits[i].sigmoid() * ctr_logits[i].sigmoid()  # (R, C)
        reg_loss = 1 - giou
        p_loc = torch.exp(-loc_beta * reg_loss)
        p_cls = joint[:, classes]
        p_pos = p_cls * p_loc

        neg_weight = torch.ones_like(joint).detach()
        written = torch.zeros_like(neg_weight, dtype=torch.bool)
        neg_metrics = torch.full_like(iou, -1.0)
        for m in range(boxes.shape[0]):
            rows = inside[:, m].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            gt_iou = iou[rows, m]
            t = gt_iou ** 2 / denominator - 1 / denominator
            t_low = t.min()
            t_high = torch.clamp(t.max(), max=1.0)
            value = (t - t_low + EPS) / (t_high - t_low + EPS)
            value = torch.where(gt_iou < neg_iou_thresh, torch.ones_like(value), value)
            neg_metrics[rows, m] = value
            _write_negative_weight(neg_weight, written, rows, classes[m], value, duplicate_rule)

        neg_factor = (1 - neg_weight).sum()
        neg_sum = (neg_weight * joint ** neg_gamma * _bce(joint, 0.0)).sum()

        pos_score = p_pos * prior
        pos_weight = (torch.exp(pos_num_exp * p_pos) * pos_score) / torch.clamp(
            (torch.exp(pos_den_exp * p_pos) * pos_score).sum(0, keepdim=True), min=EPS
        )
        pos_weight = pos_weight.detach()
        cls_pos_sum = (_bce(p_cls, 1.0) * pos_weight).sum() * pos_loss_weight
        loc_sum = (_bce(p_loc, 1.0) * pos_weight).sum() * loc_loss_weight

        cls_pos_sums.append(cls_pos_sum)
        loc_sums.append(loc_sum)
        neg_sums.append(neg_sum)
        neg_factors.append(neg_factor)
        if return_intermediates:
            per_image.append(
                dict(
                    inside_gt_bbox_mask=inside,
                    center_prior_weights=prior,
                    ious=iou,
                    reg_loss=reg_loss,
                    p_pos_weight=pos_weight,
                    neg_metrics=neg_metrics,
                    p_neg_weight=neg_weight,
                    cls_loss_sum=cls_pos_sum,
                    loc_loss_sum=loc_sum,
                    neg_loss_sum=neg_sum,
                    neg_avg_factor=neg_factor,
                )
            )

    total_gts = sum(len(b) for b in gt_boxes)
    pos_normaliser = _mean_over_workers(cls_logits.new_tensor(float(total_gts))).clamp(min=1)
    neg_normaliser = sum(f.detach() for f in neg_factors)
    if round_neg_normaliser_to_float32:
        neg_normaliser = neg_normaliser.float().to(neg_normaliser.dtype)
    neg_normaliser = _mean_over_workers(neg_normaliser).clamp(min=1)
    losses = {
        "loss_cls_pos": sum(cls_pos_sums) / pos_normaliser,
        "loss_loc": sum(loc_sums) / pos_normaliser,
        "loss_cls_neg": sum(neg_sums) / neg_normaliser,
    }
    if return_intermediates:
        losses["per_image"] = per_image
    return losses


# --------------------------------------------------------------------------------------------
# AutoAssign
# --------------------------------------------------------------------------------------------
def reference_autoassign_loss(
    points,
    strides,
    cls_logits,
    box_dists,
    obj_logits,
    gt_boxes,
    gt_classes,
    prior_mean,
    prior_sigma,
    *,
    giou_weight=5.0,
    confidence_temperature=3.0,
    pos_loss_weight=0.25,
    neg_loss_weight=0.75,
    center_loss_weight=0.75,
    force_topk=False,
    topk=9,
    duplicate_rule="last_gt",
    return_intermediates=False,
):
    """AutoAssign losses, one image and one GT box at a time (MMDetection 2.25 behaviour).

    Args: see the module docstring; ``prior_mean`` / ``prior_sigma`` (C, 2) are the learnable
        centre-prior parameters; hyper-parameters mirror ``MODEL.ASSIGNER.AUTOASSIGN.*``.

    Returns:
        dict with 0-dim ``loss_pos``, ``loss_neg``, ``loss_center`` (and ``per_image`` when
        ``return_intermediates``).
    """
    _check_inputs(points, strides, cls_logits, box_dists, obj_logits, gt_boxes, gt_classes,
                  duplicate_rule)
    pos_sums, neg_sums, prior_sums, center_terms, per_image = [], [], [], [], []
    for i in range(cls_logits.shape[0]):
        boxes, classes = gt_boxes[i], gt_classes[i]
        num_gts = boxes.shape[0]
        inside, iou, giou = _pairwise_box_terms(points, box_dists[i], boxes)
        prior = _center_prior(points, strides, boxes, classes, prior_mean, prior_sigma)
        if force_topk:
            # MMDetection's force_topk: GT boxes that contain no point take their top-k points
            # by centre prior, computed over all points.
            for m in range(num_gts):
                if not inside[:, m].any():
                    inside[prior[:, m].topk(topk).indices, m] = True
        prior = prior.masked_fill(~inside, 0)
        # The negative weight uses each point's best IoU over all GT boxes of the image, not
        # only those it is a candidate of (MMDetection's choice, kept for equal numbers).
        if num_gts:
            iou = iou.max(dim=1, keepdim=True).values.expand(-1, num_gts)
        iou = iou.masked_fill(~inside, 0)

        joint = cls_logits[i].sigmoid() * obj_logits[i].sigmoid()  # (R, C)
        reg_loss = giou_weight * (1 - giou)
        p_loc = torch.exp(-reg_loss)
        p_pos = joint[:, classes] * p_loc
        confidence = torch.exp(confidence_temperature * p_pos) * prior
        pos_weight = confidence / torch.clamp(confidence.sum(0, keepdim=True), min=EPS)
        reweighted_p_pos = (p_pos * pos_weight).sum(0)
        pos_sum = _bce(reweighted_p_pos, 1.0).sum() * pos_loss_weight

        neg_weight = torch.ones_like(joint).detach()
        written = torch.zeros_like(neg_weight, dtype=torch.bool)
        for m in range(num_gts):
            rows = inside[:, m].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            value = 1 / torch.clamp(1 - iou[rows, m], min=EPS)
            value = (value - value.min() + EPS) / (value.max() - value.min() + EPS)
            _write_negative_weight(neg_weight, written, rows, classes[m], 1 - value, duplicate_rule)
        weighted_joint = joint * neg_weight
        neg_sum = (weighted_joint ** 2 * _bce(weighted_joint, 0.0)).sum() * neg_loss_weight

        if inside.any():
            center_term = num_gts / torch.clamp(prior.sum(), min=EPS)
        else:
            center_term = prior.sum() * 0

        pos_sums.append(pos_sum)
        neg_sums.append(neg_sum)
        prior_sums.append(prior.detach().sum())
        center_terms.append(center_term)
        if return_intermediates:
            per_image.append(
                dict(
                    inside_gt_bbox_mask=inside,
                    center_prior_weights=prior,
                    ious=iou,
                    reg_loss=reg_loss,
                    p_pos_weight=pos_weight,
                    reweighted_p_pos=reweighted_p_pos,
                    p_neg_weight=neg_weight,
                    pos_loss=pos_sum,
                    neg_loss=neg_sum,
                    center_loss_term=center_term,
                )
            )

    total_gts = sum(len(b) for b in gt_boxes)
    pos_normaliser = _mean_over_workers(cls_logits.new_tensor(float(total_gts))).clamp(min=1)
    neg_normaliser = _mean_over_workers(sum(prior_sums)).clamp(min=1)
    if total_gts == 0:
        # Zero-valued losses that still touch every parameter, as the official code does, so
        # that distributed training does not wait for their gradients.
        loss_pos = box_dists[0].sum() * 0
        loss_center = obj_logits[0].sum() * 0 + prior_mean.sum() * 0 + prior_sigma.sum() * 0
    else:
        loss_pos = sum(pos_sums) / pos_normaliser
        loss_center = torch.stack(center_terms).mean() * center_loss_weight
    losses = {
        "loss_pos": loss_pos,
        "loss_neg": sum(neg_sums) / neg_normaliser,
        "loss_center": loss_center,
    }
    if return_intermediates:
        losses["per_image"] = per_image
    return losses


# The oracle of each built-in scheme, by its name in dw_d2.ASSIGNER_REGISTRY. Each takes the
# arguments of the scheme's public function; learnable parameters (AutoAssign's prior_mean and
# prior_sigma) by the names the scheme's module gives them.
REFERENCE_LOSSES = {
    "DW": reference_dual_weighting_loss,
    "AutoAssign": reference_autoassign_loss,
}
