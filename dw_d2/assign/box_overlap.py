"""Aligned IoU / GIoU between predicted and GT boxes at candidate pairs, as the official heads
compute them.

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

    When only ``boxes1`` needs a gradient (predictions against GT boxes), one autograd node with a hand-written backward
    replaces the ~25 of the op-by-op graph; it follows torch's rules, ties of ``min`` / ``max``
    splitting the gradient in halves included.
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
