"""The Gaussian centre prior of DW and AutoAssign: how far a point is from its GT box's centre,
in strides, weighted by a per-class Gaussian."""
from typing import Optional

import torch
from torch import Tensor

from .kernels import elementwise


def box_centers(boxes) -> Tensor:
    """Coordinate-major boxes (4, ...) XYXY -> (2, ...) centres, as the official
    ``(x1 + x2) / 2``."""
    x1, y1, x2, y2 = boxes
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2))


def center_prior(points: Tensor, strides: Tensor, centers: Tensor, mean: Optional[Tensor],
                 sigma: Tensor) -> Tensor:
    """``G = prod_xy exp(-((p - c) / s - mean)^2 / (2 sigma^2))``.

    Coordinate-major arguments, broadcasting against each other: points (2, ...), strides
    (...), centers (2, ...), mean (2, ...) or None for a zero mean, sigma (2, ...) or a scalar.
    Returns (...).
    """
    offset = (points - centers) / strides
    if mean is not None:
        offset = offset - mean
    factor_x, factor_y = elementwise.exp(-offset ** 2 / (2 * sigma ** 2))
    return factor_x * factor_y
