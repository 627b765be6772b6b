"""DW's box refinement: re-sample each coarse box edge near where that edge lies.

The official DW head decodes the coarse distance map of one FPN level into a map of absolute
box coordinates (x1, y1, x2, y2), then reads each coordinate back from its own channel at the
cell where that box edge lies, moved by a learned offset (a 1x1 deformable convolution with
one group per channel). The refined distances are measured from each point to the sampled
box. This module does the same with plain bilinear sampling, so it runs on any device without
compiled ops and is differentiable with respect to both the distances and the offsets.

All helpers work on one level and are vectorised over the batch and the map. The detector's
head refines with :func:`refine_box_distances_at`, which takes the level's points from the
head's :class:`~dw_d2.points.PointLayout`; :func:`refine_box_distances` places the points
itself.
"""
import torch
from torch import Tensor

from .points import level_points

__all__ = [
    "refine_box_distances",
    "refine_box_distances_at",
    "decode_box_map",
    "box_to_distance_map",
    "edge_sampling_offsets",
    "sample_bilinear_per_channel",
]


def _check_level_inputs(box_dists: Tensor, offsets: Tensor, stride) -> None:
    if box_dists.dim() != 4 or box_dists.shape[1] != 4:
        raise ValueError(
            f"box_dists must have shape (N, 4, H, W), got {tuple(box_dists.shape)}"
        )
    n, _, h, w = box_dists.shape
    if tuple(offsets.shape) != (n, 8, h, w):
        raise ValueError(
            f"offsets must have shape (N, 8, H, W) = {(n, 8, h, w)} to match box_dists, "
            f"got {tuple(offsets.shape)}"
        )
    if not float(stride) > 0:
        raise ValueError(f"stride must be positive, got {stride!r}")


def _cell_grid(height: int, width: int, dtype, device):
    """Cell indices (ys, xs), each of shape (H, W)."""
    ys = torch.arange(height, dtype=dtype, device=device)
    xs = torch.arange(width, dtype=dtype, device=device)
    return torch.meshgrid(ys, xs, indexing="ij")


def _point_maps(points: Tensor, height: int, width: int):
    """(H * W, 2) row-major points -> their x and y, each (H, W)."""
    if tuple(points.shape) != (height * width, 2):
        raise ValueError(f"points must have shape (H * W, 2) = {(height * width, 2)} to match "
                         f"the map, got {tuple(points.shape)}")
    point_x, point_y = points.t().reshape(2, height, width)
    return point_x, point_y


def decode_box_map(box_dists: Tensor, stride: float, point_offset: float = 0.5) -> Tensor:
    """Turn a distance map into a map of absolute boxes.

    Args:
        box_dists: (N, 4, H, W) distances (l, t, r, b) in pixels from each cell's point.
        stride: the level's stride in pixels.
        point_offset: the point of cell (y, x) sits at ((x + o) * s, (y + o) * s).

    Returns:
        (N, 4, H, W) boxes (x1, y1, x2, y2) in pixels: (px - l, py - t, px + r, py + b).
    """
    _, _, h, w = box_dists.shape
    points = level_points(h, w, stride, point_offset, box_dists.dtype, box_dists.device)
    return _decode(box_dists, *_point_maps(points, h, w))


def _decode(box_dists: Tensor, point_x: Tensor, point_y: Tensor) -> Tensor:
    left, top, right, bottom = box_dists.unbind(dim=1)
    return torch.stack(
        (point_x - left, point_y - top, point_x + right, point_y + bottom), dim=1
    )


def edge_sampling_offsets(box_dists: Tensor, offsets: Tensor, stride: float) -> Tensor:
    """Where, relative to its own cell, each box coordinate is sampled.

    Each coordinate is looked up at its box edge (the left edge lies l / s cells to the left
    of the cell, and so on), moved by the learned offset.

    Args:
        box_dists: (N, 4, H, W) distances (l, t, r, b) in pixels.
        offsets: (N, 8, H, W) raw output of the refinement conv, in cells.
        stride: the level's stride in pixels.

    Returns:
        (N, 8, H, W) (dy, dx) pairs in cells for the channels x1, y1, x2, y2, in that order:
        ``[o0, o1 - l/s, o2 - t/s, o3, o4, o5 + r/s, o6 + b/s, o7]``.
    """
    left, top, right, bottom = (box_dists / stride).unbind(dim=1)
    o = offsets.unbind(dim=1)
    return torch.stack(
        (o[0], o[1] - left, o[2] - top, o[3], o[4], o[5] + right, o[6] + bottom, o[7]), dim=1
    )


def sample_bilinear_per_channel(values: Tensor, sampling_offsets: Tensor) -> Tensor:
    """Bilinearly sample every channel at its own displaced position, zero outside the map.

    Channel k of cell (y, x) is read at (y + dy_k, x + dx_k). Neighbours outside the map count
    as 0, so a sample fades to 0 between -1 and 0 and between H - 1 and H, and is 0 beyond
    (the rule of mmcv's and torchvision's deformable convolution). Gathering the four
    neighbours directly, rather than through ``grid_sample``, keeps 1-cell-wide maps exact.

    Args:
        values: (N, K, H, W) map to sample.
        sampling_offsets: (N, 2K, H, W) (dy, dx) pairs in cells, one pair per channel.

    Returns:
        (N, K, H, W) sampled values, differentiable with respect to both inputs.
    """
    n, k, h, w = values.shape
    if tuple(sampling_offsets.shape) != (n, 2 * k, h, w):
        raise ValueError(
            f"sampling_offsets must have shape (N, 2K, H, W) = {(n, 2 * k, h, w)}, "
            f"got {tuple(sampling_offsets.shape)}"
        )
    ys, xs = _cell_grid(h, w, values.dtype, values.device)
    sample_y = ys + sampling_offsets[:, 0::2]
    sample_x = xs + sampling_offsets[:, 1::2]
    # floor() has no gradient, so the offsets' gradient flows through the blend weights only.
    y0 = sample_y.floor()
    x0 = sample_x.floor()
    frac_y = sample_y - y0
    frac_x = sample_x - x0
    y0 = y0.long()
    x0 = x0.long()

    flat_values = values.reshape(n, k, h * w)
    sampled = values.new_zeros(n, k, h * w)
    for dy, weight_y in ((0, 1 - frac_y), (1, frac_y)):
        for dx, weight_x in ((0, 1 - frac_x), (1, frac_x)):
            y = y0 + dy
            x = x0 + dx
            inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            index = (y.clamp(0, h - 1) * w + x.clamp(0, w - 1)).reshape(n, k, h * w)
            neighbour = flat_values.gather(2, index)
            weight = (weight_y * weight_x * inside).reshape(n, k, h * w)
            sampled = sampled + weight * neighbour
    return sampled.reshape(n, k, h, w)


def refine_box_distances(
    box_dists: Tensor, offsets: Tensor, stride: float, point_offset: float = 0.5
) -> Tensor:
    """Apply DW's box refinement to the distance map of one FPN level.

    Args:
        box_dists: (N, 4, H, W) coarse distances (l, t, r, b) >= 0 in pixels, i.e.
            ``relu(scale(x)) * stride``.
        offsets: (N, 8, H, W) raw output of the refinement conv (cells).
        stride: the level's stride in pixels.
        point_offset: the point of cell (y, x) sits at ((x + o) * s, (y + o) * s); DW uses 0.5.

    Returns:
        (N, 4, H, W) refined distances >= 0 in pixels, in the input's floating dtype, or
        float32 when the input is half precision: the official head computes the refinement
        in float32, and ``x - x1'`` cancels badly in half precision. Autocast is turned off
        inside for the same reason.
    """
    _check_level_inputs(box_dists, offsets, stride)
    _, _, h, w = box_dists.shape
    compute_dtype = torch.promote_types(box_dists.dtype, torch.float32)
    points = level_points(h, w, stride, point_offset, compute_dtype, box_dists.device)
    return refine_box_distances_at(box_dists, offsets, stride, points)


def refine_box_distances_at(box_dists: Tensor, offsets: Tensor, stride: float,
                            points: Tensor) -> Tensor:
    """:func:`refine_box_distances` at given points.

    Args:
        points: (H * W, 2) the level's points, row-major: the level's part of the head's
            :class:`~dw_d2.points.PointLayout`.
        The others as in :func:`refine_box_distances`.
    """
    _check_level_inputs(box_dists, offsets, stride)
    _, _, h, w = box_dists.shape
    compute_dtype = torch.promote_types(box_dists.dtype, torch.float32)
    with torch.autocast(device_type=box_dists.device.type, enabled=False):
        box_dists = box_dists.to(compute_dtype)
        offsets = offsets.to(compute_dtype)
        point_x, point_y = _point_maps(points.to(compute_dtype), h, w)
        coarse_boxes = _decode(box_dists, point_x, point_y)
        sampling_offsets = edge_sampling_offsets(box_dists, offsets, stride)
        # The samples are absolute coordinates: a sample outside the map reads 0, not the
        # point's own coordinate (as in the official head).
        refined_boxes = sample_bilinear_per_channel(coarse_boxes, sampling_offsets)
        return torch.relu(_to_distances(refined_boxes, point_x, point_y))


def box_to_distance_map(boxes: Tensor, stride: float, point_offset: float = 0.5) -> Tensor:
    """The inverse of :func:`decode_box_map`.

    Args:
        boxes: (N, 4, H, W) boxes (x1, y1, x2, y2) in pixels, one per cell.
        stride, point_offset: as in :func:`decode_box_map`.

    Returns:
        (N, 4, H, W) distances (px - x1, py - y1, x2 - px, y2 - py); negative where the point
        lies outside its box.
    """
    _, _, h, w = boxes.shape
    points = level_points(h, w, stride, point_offset, boxes.dtype, boxes.device)
    return _to_distances(boxes, *_point_maps(points, h, w))


def _to_distances(boxes: Tensor, point_x: Tensor, point_y: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    return torch.stack((point_x - x1, point_y - y1, x2 - point_x, y2 - point_y), dim=1)
