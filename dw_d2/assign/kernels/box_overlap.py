"""IoU / GIoU between predicted and GT boxes, as the official heads compute them, with a
hand-written backward, and AutoAssign's best IoU of a point over its image's GT boxes.

The heads compare boxes decoded at the point: the prediction as ``(x - l, y - t, x + r, y + b)``
and the GT box re-decoded from its own distance targets (``x - (x - x1)``, ...), which can
differ from the stored box in the last bit. The overlap follows mmdet's ``bbox_overlaps``:
union and enclosing area are clamped below at ``eps``.

Boxes here are coordinate-major: a (4, ...) tensor or a sequence of four (...) tensors
x1, y1, x2, y2, so that every step is a plain element-wise pass over contiguous pairs (a
``(..., 4)`` layout would make every column a strided view and every result a ``stack``).
"""
from typing import Sequence, Tuple

import torch
from torch import Tensor


Boxes = Sequence[Tensor]


def decode_distances(x: Tensor, y: Tensor, distances: Boxes) -> Tuple[Tensor, ...]:
    """Points ``x``, ``y`` (...) and distances (4, ...) (l, t, r, b) -> XYXY boxes (4-tuple)."""
    left, top, right, bottom = distances
    return x - left, y - top, x + right, y + bottom


def redecode_boxes(x: Tensor, y: Tensor, boxes: Boxes) -> Tuple[Tensor, ...]:
    """GT boxes (4, ...) as the heads see them at points ``x``, ``y`` (...): encoded as
    distances from the point, then decoded (4-tuple)."""
    x1, y1, x2, y2 = boxes
    return decode_distances(x, y, (x - x1, y - y1, x2 - x, y2 - y))


def aligned_iou_and_giou(boxes1: Boxes, boxes2: Boxes, eps: float) -> Tuple[Tensor, Tensor]:
    """IoU and generalised IoU of box pairs (4, ...) XYXY -> ((...), (...)), differentiable.

    When only ``boxes1`` needs a gradient (predictions against GT boxes), one autograd node
    with a hand-written backward replaces the ~25 of the op-by-op graph; it follows torch's
    rules, ties of ``min`` / ``max`` splitting the gradient in halves included. Otherwise the
    plain op-by-op graph runs (same values).
    """
    if (torch.is_grad_enabled() and not any(b.requires_grad for b in boxes2)
            and any(b.requires_grad for b in boxes1)):
        return tuple(_AlignedIoUAndGIoU.apply(*boxes1, *boxes2, eps))
    return _aligned_overlaps(boxes1, boxes2, eps)


def _aligned_overlaps(boxes1, boxes2, eps):
    """The op-by-op graph of :func:`aligned_iou_and_giou` (mmdet's ``bbox_overlaps``)."""
    b1_x1, b1_y1, b1_x2, b1_y2 = boxes1
    b2_x1, b2_y1, b2_x2, b2_y2 = boxes2
    area1 = (b1_x2 - b1_x1) * (b1_y2 - b1_y1)
    area2 = (b2_x2 - b2_x1) * (b2_y2 - b2_y1)
    overlap_w = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(min=0)
    overlap_h = (torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)).clamp(min=0)
    overlap = overlap_w * overlap_h
    eps_tensor = area1.new_tensor([eps])
    union = torch.max(area1 + area2 - overlap, eps_tensor)
    iou = overlap / union
    enclose_w = (torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)).clamp(min=0)
    enclose_h = (torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)).clamp(min=0)
    enclose = torch.max(enclose_w * enclose_h, eps_tensor)
    return iou, iou - (enclose - union) / enclose


# The gradient masks are built from ``sign``: torch's comparison and ``heaviside`` kernels with
# boolean or mixed outputs are not vectorised on the CPU (~30x slower per pair).
def _max_shares(a: Tensor, b: Tensor, half: Tensor) -> Tuple[Tensor, Tensor]:
    """The parts of the gradients of ``max(a, b)`` and of ``min(a, b)`` that go to ``a``:
    1, 1/2 on ties (as torch splits them), else 0; and 0, 1/2, 1 for the minimum."""
    direction = torch.sub(a, b).sign_()
    return torch.add(half, direction, alpha=0.5), torch.add(half, direction, alpha=-0.5)


def _passes_clamp(raw: Tensor) -> Tensor:
    """``clamp(raw, min=0)``'s gradient mask as torch computes it: 1 where ``raw > 0`` (0 at
    the bound itself)."""
    return torch.sign(raw).clamp_(min=0)


class _AlignedIoUAndGIoU(torch.autograd.Function):
    """:func:`_aligned_overlaps` with GIoU, the gradient w.r.t. the first boxes only."""

    @staticmethod
    def forward(ctx, x1, y1, x2, y2, gt_x1, gt_y1, gt_x2, gt_y2, eps):
        width, height = x2 - x1, y2 - y1
        area = width * height
        gt_area = (gt_x2 - gt_x1) * (gt_y2 - gt_y1)
        overlap_w_raw = torch.min(x2, gt_x2) - torch.max(x1, gt_x1)
        overlap_h_raw = torch.min(y2, gt_y2) - torch.max(y1, gt_y1)
        overlap_w, overlap_h = overlap_w_raw.clamp(min=0), overlap_h_raw.clamp(min=0)
        overlap = overlap_w * overlap_h
        union_raw = area + gt_area - overlap
        union = union_raw.clamp(min=eps)
        iou = overlap / union
        enclose_w_raw = torch.max(x2, gt_x2) - torch.min(x1, gt_x1)
        enclose_h_raw = torch.max(y2, gt_y2) - torch.min(y1, gt_y1)
        enclose_w, enclose_h = enclose_w_raw.clamp(min=0), enclose_h_raw.clamp(min=0)
        enclose_raw = enclose_w * enclose_h
        enclose = enclose_raw.clamp(min=eps)
        gap = (enclose - union) / enclose
        ctx.save_for_backward(x1, y1, x2, y2, gt_x1, gt_y1, gt_x2, gt_y2, width, height,
                              overlap_w_raw, overlap_h_raw, overlap_w, overlap_h, overlap,
                              union_raw, union, iou, enclose_w_raw, enclose_h_raw, enclose_w,
                              enclose_h, enclose_raw, enclose, gap)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        return iou, iou - gap

    @staticmethod
    def backward(ctx, grad_iou, grad_giou):
        (x1, y1, x2, y2, gt_x1, gt_y1, gt_x2, gt_y2, width, height, overlap_w_raw,
         overlap_h_raw, overlap_w, overlap_h, overlap, union_raw, union, iou, enclose_w_raw,
         enclose_h_raw, enclose_w, enclose_h, enclose_raw, enclose, gap) = ctx.saved_tensors
        half = x1.new_tensor(0.5)
        # giou = iou - gap, gap = (enclose - union) / enclose; grad_iou is None when the IoU
        # itself is not used (DW detaches it).
        grad_iou = grad_giou if grad_iou is None else grad_giou + grad_iou
        grad_difference = -grad_giou / enclose
        grad_enclose = grad_giou * (gap / enclose) + grad_difference
        grad_union = -grad_difference - grad_iou * (iou / union)
        grad_overlap = grad_iou / union
        # max(raw, eps): the whole gradient above eps, half at eps.
        eps = x1.new_tensor(ctx.eps)
        grad_union_raw = grad_union * _max_shares(union_raw, eps, half)[0]
        grad_enclose_raw = grad_enclose * _max_shares(enclose_raw, eps, half)[0]
        grad_overlap = grad_overlap - grad_union_raw
        grad_overlap_w = grad_overlap * overlap_h * _passes_clamp(overlap_w_raw)
        grad_overlap_h = grad_overlap * overlap_w * _passes_clamp(overlap_h_raw)
        grad_enclose_w = grad_enclose_raw * enclose_h * _passes_clamp(enclose_w_raw)
        grad_enclose_h = grad_enclose_raw * enclose_w * _passes_clamp(enclose_h_raw)
        grad_width = grad_union_raw * height
        grad_height = grad_union_raw * width
        # overlap: min(x2, gt_x2) - max(x1, gt_x1); enclose: max(x2, gt_x2) - min(x1, gt_x1).
        grads = []
        for low, high, gt_low, gt_high, grad_overlap_side, grad_enclose_side, grad_side in (
                (x1, x2, gt_x1, gt_x2, grad_overlap_w, grad_enclose_w, grad_width),
                (y1, y2, gt_y1, gt_y2, grad_overlap_h, grad_enclose_h, grad_height)):
            low_of_max, low_of_min = _max_shares(low, gt_low, half)
            high_of_max, high_of_min = _max_shares(high, gt_high, half)
            grad_low = (-grad_overlap_side * low_of_max - grad_enclose_side * low_of_min
                        - grad_side)
            grad_high = grad_overlap_side * high_of_min + grad_enclose_side * high_of_max \
                + grad_side
            grads.append((grad_low, grad_high))
        (grad_x1, grad_x2), (grad_y1, grad_y2) = grads
        return grad_x1, grad_y1, grad_x2, grad_y2, None, None, None, None, None


def best_iou_at_candidates(points: Tensor, box_dists: Tensor, pair_rows: Tensor,
                           gt_boxes: Tensor, gt_counts, box_eps: float) -> Tensor:
    """Per candidate pair, the IoU of the pair's prediction with the best-overlapping GT box of
    its image, without gradient.

    Only the points that are a candidate of some box are evaluated, against every GT box of
    their image: O(candidate points x M_i) work.

    Args:
        points: (R, 2); box_dists: (N, R, 4) predicted distances.
        pair_rows: (P,) the flat (image, point) row of each pair.
        gt_boxes: (G, 4) the batch's GT boxes, image by image; gt_counts: M_i per image.
    Returns:
        (P,) the IoU, each value as :func:`aligned_iou_and_giou` computes it.
    """
    with torch.no_grad():
        num_images, num_points = len(gt_counts), points.shape[0]
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
                gt_boxes.split(list(gt_counts)))]
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
