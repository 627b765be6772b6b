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
from typing import Optional, Sequence, Tuple

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


def aligned_iou_and_giou(boxes1: Boxes, boxes2: Boxes, eps: float,
                         with_giou: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """IoU and generalised IoU of box pairs (4, ...) XYXY -> ((...), (...)), differentiable.

    With ``with_giou=False`` the GIoU is not computed (None).
    """
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
    if not with_giou:
        return iou, None
    enclose_w = (torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)).clamp(min=0)
    enclose_h = (torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)).clamp(min=0)
    enclose = torch.max(enclose_w * enclose_h, eps_tensor)
    return iou, iou - (enclose - union) / enclose
