"""Candidate (image, point, GT box) pairs of a batch, and the terms defined on them.

Both schemes only weight a point for a GT box when the point lies strictly inside the box.
The GT boxes of all images are concatenated (with their image index) so that the whole batch
is handled in one pass, and every pairwise quantity is a flat ``(P,)`` tensor over the
candidate pairs, reduced per GT box with segment operations.
"""
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import elementwise


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


def find_candidate_pairs(points: Tensor, gt: BatchGroundTruth,
                         strides: Optional[Tensor] = None) -> CandidatePairs:
    """Pairs (GT m, point r) with r strictly inside box m (an edge point is not a candidate).

    ``x > x1`` is the same test as the official ``x - x1 > 0`` (a float difference is zero
    only for equal operands). When ``strides`` is given and the points form per-level grids
    (see :func:`_point_grids`), the candidates of each (box, level) are a rectangle of grid
    cells found by binary search with the same strict comparisons, so that the cost grows with
    the number of pairs, not with points x boxes. Other layouts take the exact dense (G, R) test.

    Args:
        points: (R, 2) x, y.
        gt: the batch's GT boxes.
        strides: (R,) stride of each point, or None (dense test).
    Returns:
        the pairs, ordered by GT, then by point index.
    """
    grids = _point_grids(points, strides) if strides is not None else None
    if grids is not None and gt.num_boxes and bool(torch.isfinite(gt.boxes).all()):
        gt_index, point_index, per_gt = _pairs_in_grids(grids, gt.boxes)
    else:
        x, y = points[:, 0], points[:, 1]
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


class _PointGrids(NamedTuple):
    """Points laid out as L row-major grids, one per run of equal strides (an FPN level)."""

    start: Tensor  # (L,) int64 index of each level's first point
    width: Tensor  # (L,) int64 columns per level
    column_x: Tensor  # (L, W_max) x of each column, ascending, padded with +inf
    row_y: Tensor  # (L, H_max) y of each row, ascending, padded with +inf
    num_points: int  # R


def _point_grids(points: Tensor, strides: Tensor) -> Optional[_PointGrids]:
    """Recognise the layout of dense-detector points, or return None.

    Each run of equal strides must be a full row-major grid: every row repeats the first row's
    x values, which strictly increase, and each row has one y, strictly increasing over rows.
    Only that structure is needed for the rectangle search (not even uniform spacing), so any
    grid convention (with or without the half-stride offset) is recognised, in O(R).
    """
    num_points = points.shape[0]
    if num_points == 0 or not bool(torch.isfinite(points).all()):
        return None
    device = points.device
    x, y = points[:, 0], points[:, 1]
    level_change = torch.ones(num_points, dtype=torch.bool, device=device)
    level_change[1:] = strides[1:] != strides[:-1]
    level_of_point = torch.cumsum(level_change, 0) - 1
    start = level_change.nonzero(as_tuple=True)[0]
    num_levels = start.shape[0]
    size = torch.diff(start, append=start.new_tensor([num_points]))
    local = torch.arange(num_points, device=device) - start[level_of_point]
    in_first_row = y == y[start][level_of_point]
    width = torch.zeros(num_levels, dtype=torch.long, device=device).index_add_(
        0, level_of_point, in_first_row.long())
    point_width = width[level_of_point]
    row, column = local // point_width, local % point_width
    level_start = start[level_of_point]
    first_row_x = x[level_start + column]
    first_column_y = y[level_start + row * point_width]
    is_grid = ((size % width == 0).all() & (x == first_row_x).all() & (y == first_column_y).all()
               & (x[1:] > x[:-1])[(column[1:] > 0)].all()
               & (y[1:] > y[:-1])[(column[1:] == 0) & (row[1:] > 0)].all())
    if not bool(is_grid):
        return None
    height = size // width
    column_x = points.new_full((num_levels, int(width.max())), float("inf"))
    row_y = points.new_full((num_levels, int(height.max())), float("inf"))
    first_row = row == 0
    column_x[level_of_point[first_row], column[first_row]] = x[first_row]
    first_column = column == 0
    row_y[level_of_point[first_column], row[first_column]] = y[first_column]
    return _PointGrids(start, width, column_x, row_y, num_points)


def _pairs_in_grids(grids: _PointGrids, boxes: Tensor):
    """(gt_index, point_index, pairs per box) of the points strictly inside each box (G, 4),
    GT-major.

    Per (box, level), the columns with ``x1 < x < x2`` are ``[first x > x1, first x >= x2)`` of
    the ascending column coordinates (binary search), likewise the rows; the pairs of all
    (box, level) rectangles are then enumerated together with flat index arithmetic.
    """
    num_boxes, num_levels = boxes.shape[0], grids.start.shape[0]
    device = boxes.device
    level_boxes = boxes.t()[:, None, :].expand(4, num_levels, num_boxes).contiguous()
    x1, y1, x2, y2 = level_boxes  # each (L, G)
    first_column = torch.searchsorted(grids.column_x, x1, right=True)
    end_column = torch.searchsorted(grids.column_x, x2, right=False)
    first_row = torch.searchsorted(grids.row_y, y1, right=True)
    end_row = torch.searchsorted(grids.row_y, y2, right=False)
    # Box-major blocks (G, L) so that the pairs come out by GT, then level, row and column:
    # ascending point index within each GT, as the dense test's nonzero() orders them.
    columns = (end_column - first_column).clamp(min=0).t().reshape(-1)
    rows = (end_row - first_row).clamp(min=0).t().reshape(-1)
    first_column, first_row = first_column.t().reshape(-1), first_row.t().reshape(-1)
    # Enumerate rows of blocks, then cells of rows: no per-pair division or multiplication.
    # 32-bit indices (when they fit) keep the per-pair passes vectorised.
    index_dtype = torch.int32 if grids.num_points < torch.iinfo(torch.int32).max else torch.long
    level = torch.arange(num_levels, device=device).repeat(num_boxes)
    width = grids.width[level]
    first_point = grids.start[level] + first_row * width + first_column
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
        prior = center_prior(points.t()[:, :, None], strides[:, None],
                             box_centers(gt.boxes[empty_boxes].t())[:, None],
                             prior_mean[classes].t()[:, None], prior_sigma[classes].t()[:, None])
        # prior: (R, E)
        top_points = prior.topk(min(topk, points.shape[0]), dim=0).indices  # (k, E)
    new_gt = empty_boxes[None].expand_as(top_points).reshape(-1)
    gt_index = torch.cat([pairs.gt, new_gt])
    point_index = torch.cat([pairs.point, top_points.reshape(-1)])
    order = torch.argsort(gt_index * points.shape[0] + point_index)
    gt_index, point_index = gt_index[order], point_index[order]
    per_gt = pairs.per_gt.clone()
    per_gt[empty_boxes] = top_points.shape[0]
    return _candidate_pairs(gt_index, point_index, per_gt, gt)


class ScoreEntries(NamedTuple):
    """The distinct (image, point, class) entries of the (N, R, C) score map that the pairs
    address (E of them; E < P where a point is a candidate of two boxes of one class)."""

    entries: Tensor  # (E,) int64 flat entries, ascending
    entry_of_pair: Tensor  # (P,) int64 index into ``entries`` of each pair's entry
    last_pair_of_entry: Tensor  # (E,) int64 the last pair (in pair order) of each entry


def distinct_score_entries(pair_entries: Tensor, num_entries: int) -> ScoreEntries:
    """Group the pairs by score entry.

    Args:
        pair_entries: (P,) int64 flat (image, point, class) entry of each pair, the pairs in
            GT order (as :class:`CandidatePairs` are): the last pair of an entry then has the
            highest GT index.
        num_entries: N * R * C.
    """
    # A stable sort keeps the pairs of an entry in pair order; 32-bit keys sort faster.
    key = pair_entries.int() if num_entries <= torch.iinfo(torch.int32).max else pair_entries
    sorted_key, order = torch.sort(key, stable=True)
    entries, entry_of_sorted, pairs_per_entry = torch.unique_consecutive(
        sorted_key, return_inverse=True, return_counts=True)
    last = torch.cumsum(pairs_per_entry, 0) - 1
    entry_of_pair = torch.empty_like(order).index_copy_(0, order, entry_of_sorted)
    return ScoreEntries(entries.long(), entry_of_pair, order.index_select(0, last))


def box_centers(boxes) -> Tensor:
    """Coordinate-major boxes (4, ...) XYXY -> (2, ...) centres, as the official
    ``(x1 + x2) / 2``."""
    x1, y1, x2, y2 = boxes
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2))


def center_prior(points: Tensor, strides: Tensor, centers: Tensor, mean: Optional[Tensor],
                 sigma: Tensor) -> Tensor:
    """Gaussian centre prior ``prod_xy exp(-((p - c) / s - mean)^2 / (2 sigma^2))``.

    Coordinate-major arguments, broadcasting against each other: points (2, ...), strides
    (...), centers (2, ...), mean (2, ...) or None for a zero mean, sigma (2, ...) or a scalar.
    Returns (...).
    """
    offset = (points - centers) / strides
    if mean is not None:
        offset = offset - mean
    factor_x, factor_y = elementwise.exp(-offset ** 2 / (2 * sigma ** 2))
    return factor_x * factor_y


class PairInputs(NamedTuple):
    """The predictions and GT boxes at the candidate pairs (P of them), gathered once.

    Coordinates are coordinate-major (one contiguous (P,) row each), see
    :mod:`dw_d2.assign.box_overlap`.
    """

    classes: Tensor  # (P,) int64 class of the pair's GT box
    rows: Tensor  # (P,) int64 flat (image, point) row of the (N * R, ...) predictions
    score_entry: Tensor  # (P,) int64 flat (image, point, class) entry of the (N, R, C) scores
    points: Tensor  # (2, P) x, y of the pair's point
    strides: Tensor  # (P,) stride of the point's level
    distances: Tensor  # (4, P) predicted l, t, r, b (differentiable)
    boxes: Tensor  # (4, P) the GT box, XYXY


def gather_pair_inputs(points: Tensor, strides: Tensor, box_dists: Tensor, num_classes: int,
                       gt: BatchGroundTruth, pairs: CandidatePairs) -> PairInputs:
    """Gather what the losses need at the pairs from the dense (R, ...) / (N, R, ...) tensors.

    Args:
        points: (R, 2); strides: (R,); box_dists: (N, R, 4).
    """
    num_points = points.shape[0]
    classes = gt.classes.index_select(0, pairs.gt)
    rows = pairs.image * num_points + pairs.point
    return PairInputs(
        classes=classes,
        rows=rows,
        score_entry=rows * num_classes + classes,
        points=gather_coordinates(points, pairs.point),
        strides=strides.index_select(0, pairs.point),
        distances=gather_coordinates(box_dists.reshape(-1, 4), rows),
        boxes=gather_coordinates(gt.boxes, pairs.gt),
    )


def expand_to_pairs(per_gt: Tensor, pairs: CandidatePairs) -> Tensor:
    """Per-GT values (D, G) at the pairs, (D, P), differentiable.

    The pairs of a GT box are consecutive, so the backward pass sums segments instead of
    scattering P gradients into G (or C) bins, which contend on the CPU.
    """
    return _ExpandToPairs.apply(per_gt, pairs.gt, pairs.per_gt)


class _ExpandToPairs(torch.autograd.Function):

    @staticmethod
    def forward(ctx, per_gt, gt_index, pairs_per_gt):
        ctx.save_for_backward(pairs_per_gt)
        return per_gt.index_select(1, gt_index)

    @staticmethod
    def backward(ctx, grad):
        pairs_per_gt, = ctx.saved_tensors
        if pairs_per_gt.numel() == 0:
            return grad.new_zeros(grad.shape[0], 0), None, None
        return torch.stack([torch.segment_reduce(row, "sum", lengths=pairs_per_gt)
                            for row in grad]), None, None


def gather_coordinates(table: Tensor, index: Tensor) -> Tensor:
    """``table[index].t()`` as a contiguous, coordinate-major (D, P) tensor, differentiable;
    the gradient of ``table`` (K, D) comes back contiguous (a transposed view would reach
    the caller's tensors, and torch.distributed reduces raw storage)."""
    return _GatherCoordinates.apply(table, index)


class _GatherCoordinates(torch.autograd.Function):

    @staticmethod
    def forward(ctx, table, index):
        ctx.save_for_backward(index)
        ctx.table_shape = table.shape
        return table.t().contiguous().index_select(1, index)

    @staticmethod
    def backward(ctx, grad):
        index, = ctx.saved_tensors
        rows, columns = ctx.table_shape
        table_grad = grad.new_zeros(columns, rows).index_add_(1, index, grad)
        return table_grad.t().contiguous(), None


def dense_pair_map(values: Tensor, pairs: CandidatePairs, num_points: int, gt: BatchGroundTruth,
                   fill: float = 0.0) -> List[Tensor]:
    """Scatter per-pair values (P,) into per-image (R, M_i) maps (for inspection, not training)."""
    dense = torch.full((num_points, gt.num_boxes), fill, dtype=values.dtype, device=values.device)
    dense[pairs.point, pairs.gt] = values
    return list(dense.split(gt.counts, dim=1))


def per_image_weight_maps(pairs: CandidatePairs, gt: BatchGroundTruth, num_points: int,
                          prior: Tensor, pos_weight: Tensor, iou: Tensor, neg_entries: Tensor,
                          neg_values: Tensor, score_shape) -> List[dict]:
    """The dense, detached per-image weights that ``return_weights=True`` returns.

    Args:
        prior, pos_weight, iou: (P,) per candidate pair.
        neg_entries, neg_values: the flat (N * R * C) entries of w- that are not 1, and their
            values.
        score_shape: (N, R, C).

    Returns:
        one dict per image: ``candidates`` bool (R, M_i), ``center_prior``, ``pos_weight``,
        ``ious`` (R, M_i) (0 off candidates) and ``neg_weight`` (R, C).
    """
    neg_weight = prior.new_ones(score_shape)
    neg_weight.view(-1)[neg_entries] = neg_values.detach()
    candidates = dense_pair_map(torch.ones_like(prior, dtype=torch.bool), pairs, num_points, gt)
    per_pair = {
        "center_prior": dense_pair_map(prior.detach(), pairs, num_points, gt),
        "pos_weight": dense_pair_map(pos_weight.detach(), pairs, num_points, gt),
        "ious": dense_pair_map(iou.detach(), pairs, num_points, gt),
    }
    return [
        {"candidates": candidates[i], **{k: v[i] for k, v in per_pair.items()},
         "neg_weight": neg_weight[i]}
        for i in range(len(gt.counts))
    ]
