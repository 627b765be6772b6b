"""Candidate (image, point, GT box) pairs of a batch: the points strictly inside each GT box.

Both schemes only weight a point for a GT box when the point lies strictly inside the box (a
point on an edge is not a candidate; there are no scale ranges and no centre sampling). The GT
boxes of all images are concatenated (with their image index), so that the whole batch is
searched at once, and the pairs come out GT-major, each GT's pairs consecutive, so that per-GT
quantities are segment reductions over flat ``(P,)`` tensors.
"""
from typing import List, NamedTuple, Sequence

import torch
from torch import Tensor

from ..points import PointLayout
from .center_prior import box_centers, center_prior


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
    per_gt: Tensor  # (G,) int64 number of pairs of each GT box (consecutive)
    per_image: Tensor  # (N,) int64 number of pairs of each image (consecutive)

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


def find_candidate_pairs(points: PointLayout, gt: BatchGroundTruth) -> CandidatePairs:
    """Pairs (GT m, point r) with r strictly inside box m.

    ``x > x1`` is the same test as the official ``x - x1 > 0`` (a float difference is zero
    only for equal operands). Where the layout of the points is known, the candidates of each
    (box, level) are a rectangle of grid cells, found by binary search with the same strict
    comparisons, so that the cost grows with the number of pairs, not with points x boxes;
    otherwise the exact dense (G, R) test runs. Both give the same pairs.

    Returns:
        the pairs, ordered by GT, then by point index.
    """
    if (points.level_shapes is not None and gt.num_boxes
            and bool(torch.isfinite(gt.boxes).all())):
        gt_index, point_index, per_gt = _pairs_in_grids(points, gt.boxes)
    else:
        x, y = points.points[:, 0], points.points[:, 1]
        boxes = gt.boxes
        inside = ((x[None] > boxes[:, 0:1]) & (y[None] > boxes[:, 1:2])
                  & (x[None] < boxes[:, 2:3]) & (y[None] < boxes[:, 3:4]))
        gt_index, point_index = inside.nonzero(as_tuple=True)
        per_gt = inside.sum(dim=1)
    return _candidate_pairs(gt_index, point_index, per_gt, gt)


def _candidate_pairs(gt_index: Tensor, point_index: Tensor, per_gt: Tensor,
                     gt: BatchGroundTruth) -> CandidatePairs:
    per_image = torch.zeros(len(gt.counts), dtype=torch.long, device=per_gt.device)
    per_image.index_add_(0, gt.image, per_gt)
    return CandidatePairs(gt_index, point_index, gt.image.index_select(0, gt_index), per_gt,
                          per_image)


def _grid_axes(points: PointLayout):
    """Per level: the first point's index, the width, and the ascending x of the columns and y
    of the rows, padded with +inf to (L, W_max) and (L, H_max)."""
    shapes, starts = points.level_shapes, points.level_starts
    xy = points.points
    column_x = xy.new_full((len(shapes), max(w for _, w in shapes)), float("inf"))
    row_y = xy.new_full((len(shapes), max(h for h, _ in shapes)), float("inf"))
    for level, ((height, width), start) in enumerate(zip(shapes, starts)):
        column_x[level, :width] = xy[start:start + width, 0]
        row_y[level, :height] = xy[start:start + height * width:width, 1]
    device = xy.device
    return (torch.tensor(starts, device=device), torch.tensor([w for _, w in shapes],
                                                              device=device), column_x, row_y)


def _pairs_in_grids(points: PointLayout, boxes: Tensor):
    """(gt_index, point_index, pairs per box) of the points strictly inside each box (G, 4),
    GT-major.

    Per (box, level), the columns with ``x1 < x < x2`` are ``[first x > x1, first x >= x2)`` of
    the ascending column coordinates (binary search), likewise the rows; the pairs of all
    (box, level) rectangles are then enumerated together with flat index arithmetic.
    """
    level_start, level_width, column_x, row_y = _grid_axes(points)
    num_boxes, num_levels = boxes.shape[0], level_start.shape[0]
    device = boxes.device
    level_boxes = boxes.t()[:, None, :].expand(4, num_levels, num_boxes).contiguous()
    x1, y1, x2, y2 = level_boxes  # each (L, G)
    first_column = torch.searchsorted(column_x, x1, right=True)
    end_column = torch.searchsorted(column_x, x2, right=False)
    first_row = torch.searchsorted(row_y, y1, right=True)
    end_row = torch.searchsorted(row_y, y2, right=False)
    # Box-major blocks (G, L) so that the pairs come out by GT, then level, row and column:
    # ascending point index within each GT, as the dense test's nonzero() orders them.
    columns = (end_column - first_column).clamp(min=0).t().reshape(-1)
    rows = (end_row - first_row).clamp(min=0).t().reshape(-1)
    first_column, first_row = first_column.t().reshape(-1), first_row.t().reshape(-1)
    # Enumerate rows of blocks, then cells of rows: no per-pair division or multiplication.
    # 32-bit indices (when they fit) keep the per-pair passes vectorised.
    num_points = points.num_points
    index_dtype = torch.int32 if num_points < torch.iinfo(torch.int32).max else torch.long
    level = torch.arange(num_levels, device=device).repeat(num_boxes)
    width = level_width[level]
    first_point = level_start[level] + first_row * width + first_column
    row_block = torch.repeat_interleave(torch.arange(rows.shape[0], device=device), rows)
    row_in_block = (torch.arange(row_block.shape[0], device=device)
                    - (torch.cumsum(rows, 0) - rows)[row_block])
    row_start = (first_point[row_block] + row_in_block * width[row_block]).to(index_dtype)
    row_length = columns[row_block]
    row_gt = torch.div(row_block, num_levels, rounding_mode="floor").to(index_dtype)
    row_first_cell = (torch.cumsum(row_length, 0) - row_length).to(index_dtype)
    cell_row = torch.repeat_interleave(
        torch.arange(row_length.shape[0], dtype=index_dtype, device=device), row_length)
    point_index = torch.arange(cell_row.shape[0], dtype=index_dtype, device=device)
    point_index.sub_(row_first_cell.index_select(0, cell_row)).add_(
        row_start.index_select(0, cell_row))
    per_gt = (columns * rows).view(num_boxes, num_levels).sum(dim=1)
    return row_gt.index_select(0, cell_row).long(), point_index.long(), per_gt


def add_topk_pairs_for_empty_boxes(pairs: CandidatePairs, points: PointLayout,
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
    xy, strides = points.points, points.strides
    with torch.no_grad():
        classes = gt.classes[empty_boxes]
        prior = center_prior(xy.t()[:, :, None], strides[:, None],
                             box_centers(gt.boxes[empty_boxes].t())[:, None],
                             prior_mean[classes].t()[:, None], prior_sigma[classes].t()[:, None])
        # prior: (R, E)
        top_points = prior.topk(min(topk, xy.shape[0]), dim=0).indices  # (k, E)
    new_gt = empty_boxes[None].expand_as(top_points).reshape(-1)
    gt_index = torch.cat([pairs.gt, new_gt])
    point_index = torch.cat([pairs.point, top_points.reshape(-1)])
    order = torch.argsort(gt_index * xy.shape[0] + point_index)
    gt_index, point_index = gt_index[order], point_index[order]
    per_gt = pairs.per_gt.clone()
    per_gt[empty_boxes] = top_points.shape[0]
    return _candidate_pairs(gt_index, point_index, per_gt, gt)
