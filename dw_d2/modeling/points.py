"""The points of a dense, anchor-free detector: one per feature cell, all levels concatenated."""
from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["level_points", "PointGrid"]


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


class PointGrid:
    """Builds (and caches) the points of all levels for the feature-map sizes of a batch.

    Points are concatenated level-major, each level row-major, so that point
    ``start_l + y * w_l + x`` matches the flattened head outputs of
    :meth:`DWDetector._flatten_levels`.
    """

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
        self._cache: "OrderedDict[tuple, Tuple[Tensor, Tensor]]" = OrderedDict()
        self._cache_size = cache_size

    def __call__(
        self, feature_sizes: List[Tuple[int, int]], dtype=torch.float32, device=None
    ) -> Tuple[Tensor, Tensor]:
        """
        Args:
            feature_sizes: (height, width) of each level's feature map.

        Returns:
            points: (R, 2) (x, y) coordinates in input-image pixels, R = sum of h * w.
            point_strides: (R,) the stride of each point's level, in ``dtype``.
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
        result = (torch.cat(points), torch.cat(point_strides))
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result
