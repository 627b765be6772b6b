"""Candidate (image, point, GT box) pairs of a batch, and the terms defined on them.

Both schemes only weight a point for a GT box when the point lies strictly inside the box.
The GT boxes of all images are concatenated (with their image index) so that the whole batch
is handled in one pass, and every pairwise quantity is a flat ``(P,)`` tensor over the
candidate pairs, reduced per GT box with segment operations.
"""
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor


class BatchGroundTruth(NamedTuple):
    """The GT boxes of a batch, concatenated over images (G = sum of M_i)."""

    boxes: Tensor  # (G, 4) XYXY, in the weighting dtype
    classes: Tensor  # (G,) int64
    image: Tensor  # (G,) int64, image of each box
    counts: List[int]  # M_i per image
    counts_tensor: Tensor  # (N,) int64

    @property
    def num_boxes(self) -> int:
        return self.boxes.shape[0]


class CandidatePairs(NamedTuple):
    """Candidate pairs, ordered GT-major (by GT, then by point)."""

    gt: Tensor  # (P,) int64 index into BatchGroundTruth
    point: Tensor  # (P,) int64 index in [0, R)
    image: Tensor  # (P,) int64

    @property
    def num_pairs(self) -> int:
        return self.gt.shape[0]


def concat_ground_truth(gt_boxes: Sequence[Tensor], gt_classes: Sequence[Tensor],
                        dtype: torch.dtype, device: torch.device) -> BatchGroundTruth:
    """Concatenate per-image GT boxes (M_i, 4) and classes (M_i,) with their image index."""
    counts = [int(b.shape[0]) for b in gt_boxes]
    counts_tensor = torch.tensor(counts, dtype=torch.long, device=device)
    boxes = torch.cat([b.to(device=device, dtype=dtype) for b in gt_boxes]) if counts else \
        torch.zeros(0, 4, dtype=dtype, device=device)
    classes = torch.cat([c.to(device=device, dtype=torch.long) for c in gt_classes]) if counts \
        else torch.zeros(0, dtype=torch.long, device=device)
    image = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_tensor)
    return BatchGroundTruth(boxes.reshape(-1, 4), classes, image, counts, counts_tensor)


def find_candidate_pairs(points: Tensor, gt: BatchGroundTruth) -> CandidatePairs:
    """Pairs (GT m, point r) with r strictly inside box m (an edge point is not a candidate).

    ``x > x1`` is the same test as the official ``x - x1 > 0`` (a float difference is zero
    only for equal operands). The (G, R) boolean test costs one byte per point and GT box of the
    batch, several times less than one (N, R, C) float map of the loss, and keeps the test exact
    for arbitrary point layouts.

    Args:
        points: (R, 2) x, y.
        gt: the batch's GT boxes.
    """
    x, y = points[:, 0], points[:, 1]
    boxes = gt.boxes
    inside = ((x[None] > boxes[:, 0:1]) & (y[None] > boxes[:, 1:2])
              & (x[None] < boxes[:, 2:3]) & (y[None] < boxes[:, 3:4]))
    gt_index, point_index = inside.nonzero(as_tuple=True)
    return CandidatePairs(gt_index, point_index, gt.image[gt_index])


def add_topk_pairs_for_empty_boxes(pairs: CandidatePairs, points: Tensor, strides: Tensor,
                                   gt: BatchGroundTruth, prior_mean: Tensor, prior_sigma: Tensor,
                                   topk: int) -> CandidatePairs:
    """MMDetection's ``force_topk``: a GT box without candidates gets its ``topk`` points of
    highest centre prior (over all points, inside the box or not) as candidates.

    Args:
        prior_mean, prior_sigma: (C, 2).
    Returns:
        the pairs with the added ones, GT-major again.
    """
    pairs_per_box = torch.bincount(pairs.gt, minlength=gt.num_boxes)
    empty_boxes = (pairs_per_box == 0).nonzero(as_tuple=True)[0]
    if empty_boxes.numel() == 0:
        return pairs
    with torch.no_grad():
        classes = gt.classes[empty_boxes]
        prior = center_prior(points[:, None, :], strides[:, None],
                             box_centers(gt.boxes[empty_boxes])[None],
                             prior_mean[classes][None], prior_sigma[classes][None])  # (R, E)
        top_points = prior.topk(min(topk, points.shape[0]), dim=0).indices  # (k, E)
    new_gt = empty_boxes[None].expand_as(top_points).reshape(-1)
    gt_index = torch.cat([pairs.gt, new_gt])
    point_index = torch.cat([pairs.point, top_points.reshape(-1)])
    order = torch.argsort(gt_index * points.shape[0] + point_index)
    gt_index, point_index = gt_index[order], point_index[order]
    return CandidatePairs(gt_index, point_index, gt.image[gt_index])


def box_centers(boxes: Tensor) -> Tensor:
    """(..., 4) XYXY -> (..., 2) centres, as the official ``(x1 + x2) / 2``."""
    return torch.stack(((boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2),
                       dim=-1)


def center_prior(points: Tensor, strides: Tensor, centers: Tensor, mean: Optional[Tensor],
                 sigma: Tensor) -> Tensor:
    """Gaussian centre prior ``prod_xy exp(-((p - c) / s - mean)^2 / (2 sigma^2))``.

    All arguments broadcast against each other: points (..., 2), strides (...),
    centers (..., 2), mean (..., 2) or None for a zero mean, sigma (..., 2) or scalar.
    Returns (...).
    """
    offset = (points - centers) / strides[..., None]
    if mean is not None:
        offset = offset - mean
    return torch.exp(-offset ** 2 / (2 * sigma ** 2)).prod(dim=-1)


def dense_pair_map(values: Tensor, pairs: CandidatePairs, num_points: int, gt: BatchGroundTruth,
                   fill: float = 0.0) -> List[Tensor]:
    """Scatter per-pair values (P,) into per-image (R, M_i) maps (for inspection, not training)."""
    dense = torch.full((num_points, gt.num_boxes), fill, dtype=values.dtype, device=values.device)
    dense[pairs.point, pairs.gt] = values
    return list(dense.split(gt.counts, dim=1))
