"""The points of a dense, anchor-free detector: one per feature cell, all levels concatenated.

The head builds them once per batch (:class:`PointGrid`) and hands them on, with the per-level
layout they come from, as a :class:`PointLayout`: refinement, the losses and inference all
read that one object. Pure PyTorch (no Detectron2), like the weighting functions that use it.
"""
from collections import OrderedDict
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["level_points", "PointLayout", "PointGrid", "recognise_point_layout"]


def level_points(
    height: int, width: int, stride: float, offset: float, dtype=torch.float32, device=None
) -> Tensor:
    """The points of one feature level, row-major (y outer, x fastest).

    Args:
        height, width: the feature map's size.
        stride: the level's stride in pixels.
        offset: the point of cell (y, x) sits at ((x + offset) * stride, (y + offset) * stride).

    Returns:
        (height * width, 2) tensor of (x, y) pixel coordinates.
    """
    ys = (torch.arange(height, dtype=dtype, device=device) + offset) * stride
    xs = (torch.arange(width, dtype=dtype, device=device) + offset) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1)


class PointLayout(NamedTuple):
    """The points of a batch's feature maps, and the per-level layout they come from.

    Levels are concatenated level-major, each level row-major, so that point
    ``level_starts[l] + y * w_l + x`` is cell (y, x) of level l, the order of the flattened
    head outputs. ``level_shapes`` is None for points whose layout is unknown (a caller of the
    public weighting functions may pass any points); code that needs the grid then falls back
    to a dense computation.
    """

    points: Tensor  # (R, 2) x, y in input pixels
    strides: Tensor  # (R,) the stride of each point's level
    level_shapes: Optional[Tuple[Tuple[int, int], ...]] = None  # (h_l, w_l) per level

    @property
    def num_points(self) -> int:
        return self.points.shape[0]

    @property
    def level_starts(self) -> Tuple[int, ...]:
        """The index of each level's first point."""
        starts, start = [], 0
        for height, width in self.level_shapes:
            starts.append(start)
            start += height * width
        return tuple(starts)

    def split_levels(self, tensor: Tensor, dim: int = 0) -> List[Tensor]:
        """``tensor`` cut along ``dim`` (of size R) into its levels."""
        return list(tensor.split([h * w for h, w in self.level_shapes], dim=dim))

    def to(self, dtype=None, device=None) -> "PointLayout":
        """The same layout with points and strides in another dtype or on another device."""
        return self._replace(points=self.points.to(dtype=dtype, device=device),
                             strides=self.strides.to(dtype=dtype, device=device))


class PointGrid:
    """Builds (and caches) the :class:`PointLayout` of all levels for a batch's feature sizes."""

    def __init__(self, strides: Sequence[int], offset: float, cache_size: int = 16):
        """
        Args:
            strides: the stride of each level, in the order of the head's levels.
            offset: where the point sits inside its cell (see :func:`level_points`).
            cache_size: how many distinct (sizes, dtype, device) keys to keep; multi-scale
                training produces a new key for every padded input size.
        """
        self.strides = tuple(int(s) for s in strides)
        self.offset = float(offset)
        self._cache: "OrderedDict[tuple, PointLayout]" = OrderedDict()
        self._cache_size = cache_size

    def __call__(
        self, feature_sizes: List[Tuple[int, int]], dtype=torch.float32, device=None
    ) -> PointLayout:
        """
        Args:
            feature_sizes: (height, width) of each level's feature map.

        Returns:
            the layout: points (R, 2) in input-image pixels, R = sum of h * w, and the (R,)
            strides, in ``dtype``.
        """
        if len(feature_sizes) != len(self.strides):
            raise ValueError(
                f"got {len(feature_sizes)} feature maps for {len(self.strides)} strides "
                f"{self.strides}"
            )
        sizes = tuple((int(h), int(w)) for h, w in feature_sizes)
        key = (sizes, dtype, torch.device(device or "cpu"))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        points = [
            level_points(h, w, stride, self.offset, dtype, device)
            for (h, w), stride in zip(sizes, self.strides)
        ]
        point_strides = [
            torch.full((len(p),), float(stride), dtype=dtype, device=device)
            for p, stride in zip(points, self.strides)
        ]
        layout = PointLayout(torch.cat(points), torch.cat(point_strides), sizes)
        self._cache[key] = layout
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return layout


def recognise_point_layout(points: Tensor, strides: Tensor) -> PointLayout:
    """The layout of flat points, for callers that pass only ``points`` and ``strides`` (the
    public weighting functions).

    Each run of equal strides must be a full row-major grid: every row repeats the first row's
    x values, which strictly increase, and each row has one y, strictly increasing over rows
    (uniform spacing is not needed). Any other arrangement (or non-finite points) gives a
    layout with ``level_shapes`` None. O(R).
    """
    unknown = PointLayout(points, strides)
    num_points = points.shape[0]
    if num_points == 0 or not bool(torch.isfinite(points).all()):
        return unknown
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
        return unknown
    shapes = tuple(zip((size // width).tolist(), width.tolist()))
    return PointLayout(points, strides, shapes)
