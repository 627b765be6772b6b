"""Helpers shared by the DW and AutoAssign weighting functions.

Input checks, the working precision, per-segment reductions over candidate pairs, the
distributed mean of normalisers and the duplicate-aware write of negative weights.
"""
import contextlib
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Lower clamp of the official heads' normalisers (their ``EPS``).
EPS = 1e-12

# How a point that is a candidate of several GT boxes of the same class gets its negative
# weight in that class column; see :func:`resolve_pair_values`.
DUPLICATE_RULES = ("last_gt", "min")


def weighting_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the weighting runs in: the inputs' common dtype, half types raised to float32.

    The exponentials of the positive weights and the per-GT min-max normalisations lose too
    much in float16 / bfloat16, so autocast outputs are upcast.
    """
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def autocast_disabled(device: torch.device):
    """A context that turns autocast off on ``device``.

    Inside autocast, ``F.binary_cross_entropy`` refuses half inputs (CUDA) and matmul-like ops
    would silently drop to half precision; the weighting is therefore always run outside it.
    """
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def mean_over_workers(value: Tensor) -> Tensor:
    """Average a normaliser over distributed workers (mmdet's ``reduce_mean``).

    Every worker must call it for the same normalisers in the same order, whether or not its
    own images hold GT boxes, or the collective blocks.

    Args:
        value: 0-dim tensor (detached).
    Returns:
        0-dim tensor: the mean over workers, or ``value`` itself without ``torch.distributed``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.clone()
    dist.all_reduce(value.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
    return value


def segment_sum(values: Tensor, lengths: Tensor) -> Tensor:
    """Differentiable sums of consecutive segments: (P,) values, (S,) int64 lengths summing to
    P -> (S,), 0 for empty segments."""
    if lengths.numel() == 0:
        return values.new_zeros(0)
    return torch.segment_reduce(values, "sum", lengths=lengths)


def segment_min(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Per-segment minimum (no gradient needed): (P,) -> (S,), 0 for empty segments."""
    return values.new_zeros(num_segments).scatter_reduce_(
        0, segment_ids, values, "amin", include_self=False)


def segment_max(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Per-segment maximum (no gradient needed): (P,) -> (S,), 0 for empty segments."""
    return values.new_zeros(num_segments).scatter_reduce_(
        0, segment_ids, values, "amax", include_self=False)


def resolve_pair_values(values: Tensor, entries, duplicate_rule: str) -> Tensor:
    """The value each entry of a dense map keeps when several pairs write it.

    The official heads write the negative weight with an advanced-index assignment whose
    indices repeat where a point is a candidate of two GT boxes of the same class. That is
    formally undefined; torch on the CPU keeps the value of the highest GT index (on CUDA the
    winner is arbitrary). ``"last_gt"`` makes that CPU behaviour deterministic everywhere: the
    golden cases follow it. ``"min"`` keeps the smallest value instead, which does not depend
    on the order of the GT boxes.

    Args:
        values: (P,) value of each pair.
        entries: the pairs grouped by entry, a :class:`~dw_d2.assign.pairs.ScoreEntries`.
        duplicate_rule: ``"last_gt"`` or ``"min"``.
    Returns:
        (E,) the value of each entry.
    """
    if duplicate_rule == "last_gt":
        return values.index_select(0, entries.last_pair_of_entry)
    return values.new_zeros(entries.entries.shape).scatter_reduce_(
        0, entries.entry_of_pair, values, "amin", include_self=False)


def check_dense_inputs(points: Tensor, strides: Tensor, cls_logits: Tensor, box_dists: Tensor,
                       score_logits: Tensor, score_name: str, gt_boxes: Sequence[Tensor],
                       gt_classes: Sequence[Tensor], duplicate_rule: str) -> None:
    """Raise a ``ValueError`` naming the argument, the expected and the received layout."""

    def fail(message):
        raise ValueError(f"weighting loss: {message}")

    for name, tensor in (("points", points), ("strides", strides), ("cls_logits", cls_logits),
                         ("box_dists", box_dists), (score_name, score_logits)):
        if not isinstance(tensor, Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            fail(f"{name} must be floating point, got {tensor.dtype}")
    if cls_logits.dim() != 3:
        fail(f"cls_logits must be (N, R, C), got shape {tuple(cls_logits.shape)}")
    num_images, num_points, _ = cls_logits.shape
    expected = {
        "points": (points, (num_points, 2)),
        "strides": (strides, (num_points,)),
        "box_dists": (box_dists, (num_images, num_points, 4)),
        score_name: (score_logits, (num_images, num_points, 1)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            fail(f"{name} must have shape {shape} (N={num_images} images, R={num_points} "
                 f"points from cls_logits), got {tuple(tensor.shape)}")
    if len(gt_boxes) != num_images or len(gt_classes) != num_images:
        fail(f"gt_boxes and gt_classes must hold one tensor per image ({num_images}), got "
             f"{len(gt_boxes)} and {len(gt_classes)}")
    for i, (boxes, classes) in enumerate(zip(gt_boxes, gt_classes)):
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            fail(f"gt_boxes[{i}] must be (M, 4) XYXY, got shape {tuple(boxes.shape)}")
        if classes.shape != (boxes.shape[0],):
            fail(f"gt_classes[{i}] must be ({boxes.shape[0]},) to match gt_boxes[{i}], got "
                 f"{tuple(classes.shape)}")
        if classes.is_floating_point() or classes.dtype == torch.bool:
            fail(f"gt_classes[{i}] must hold integer class indices, got {classes.dtype}")
    if duplicate_rule not in DUPLICATE_RULES:
        fail(f"duplicate_rule must be one of {DUPLICATE_RULES}, got {duplicate_rule!r}")


def check_class_range(classes: Tensor, num_classes: int) -> None:
    """Raise a ``ValueError`` if a GT class is outside [0, C)."""
    if classes.numel() == 0:
        return
    low, high = int(classes.min()), int(classes.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"weighting loss: gt_classes must lie in [0, {num_classes}) "
                         f"(C from cls_logits), got values in [{low}, {high}]")
