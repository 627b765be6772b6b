"""Aligned IoU / GIoU between predicted and GT boxes, as the official heads compute them.

The heads compare boxes decoded at the point: the prediction as ``(x - l, y - t, x + r, y + b)``
and the GT box re-decoded from its own distance targets (``x - (x - x1)``, ...), which can
differ from the stored box in the last bit. The overlap follows mmdet's ``bbox_overlaps``:
union and enclosing area are clamped below at ``eps``.
"""
from typing import Tuple

import torch
from torch import Tensor


def decode_distances(points: Tensor, distances: Tensor) -> Tensor:
    """(..., 2) points and (..., 4) distances (l, t, r, b) -> (..., 4) XYXY boxes."""
    x, y = points[..., 0], points[..., 1]
    return torch.stack((x - distances[..., 0], y - distances[..., 1],
                        x + distances[..., 2], y + distances[..., 3]), dim=-1)


def redecode_boxes(points: Tensor, boxes: Tensor) -> Tensor:
    """GT boxes (..., 4) as the heads see them: encoded as distances from the points, decoded."""
    x, y = points[..., 0], points[..., 1]
    distances = torch.stack((x - boxes[..., 0], y - boxes[..., 1],
                             boxes[..., 2] - x, boxes[..., 3] - y), dim=-1)
    return decode_distances(points, distances)


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float) -> Tensor:
    """IoU of (..., 4) XYXY box pairs -> (...)."""
    return _aligned_overlaps(boxes1, boxes2, eps, with_giou=False)[0]


def aligned_iou_and_giou(boxes1: Tensor, boxes2: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """IoU and generalised IoU of (..., 4) XYXY box pairs -> ((...), (...)), differentiable."""
    return _aligned_overlaps(boxes1, boxes2, eps, with_giou=True)


def _aligned_overlaps(boxes1, boxes2, eps, with_giou):
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    top_left = torch.max(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    overlap_wh = (bottom_right - top_left).clamp(min=0)
    overlap = overlap_wh[..., 0] * overlap_wh[..., 1]
    eps_tensor = area1.new_tensor([eps])
    union = torch.max(area1 + area2 - overlap, eps_tensor)
    iou = overlap / union
    if not with_giou:
        return iou, None
    enclose_wh = (torch.max(boxes1[..., 2:], boxes2[..., 2:])
                  - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    enclose = torch.max(enclose_wh[..., 0] * enclose_wh[..., 1], eps_tensor)
    return iou, iou - (enclose - union) / enclose
