"""The stage every weighting scheme shares: everything around its formulas.

A scheme's loss function reads as::

    batch = prepare_batch(points, cls_logits, box_dists, score_logits, gt_boxes, gt_classes)
    with autocast_disabled(batch.device):
        pairs = find_candidate_pairs(batch.points, batch.gt)  # points strictly inside GT boxes
        pair = gather_pairs(batch, pairs)                      # predictions and GT at the pairs
        iou, giou = pair_overlaps(pair)                        # prediction vs GT box
        entries = score_entries(batch, pair)                   # (image, point, class) entries
        ... the scheme's formulas, per-GT reductions (segment_sum, normalise_per_gt) ...
        ... normalisers (num_gt_normaliser, mean_over_workers) ...

Naming, kept throughout: N images, R points, C classes, G GT boxes of the batch (M_i in image
i), P candidate pairs, E distinct (image, point, class) entries of the pairs. Every per-pair
quantity is a flat ``(P,)`` tensor; the pairs of one GT box are consecutive.
"""
import contextlib
from typing import List, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..points import PointLayout, recognise_point_layout
from .candidates import BatchGroundTruth, CandidatePairs, concat_ground_truth
from .kernels.box_overlap import aligned_iou_and_giou, decode_distances, redecode_boxes
from .kernels.gather import gather_coordinates

# Lower clamp of the official heads' normalisers (their ``EPS``).
EPS = 1e-12

# How a point that is a candidate of several GT boxes of the same class gets its negative
# weight in that class column; see :func:`resolve_pair_values`.
DUPLICATE_RULES = ("last_gt", "min")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
class DenseBatch(NamedTuple):
    """One call's inputs, in the working precision (see :func:`weighting_dtype`)."""

    points: PointLayout  # R points
    cls_logits: Tensor  # (N, R, C)
    box_dists: Tensor  # (N, R, 4) l, t, r, b >= 0 in pixels
    score_logits: Tensor  # (N, R, 1) centerness / objectness logits
    gt: BatchGroundTruth  # G boxes

    @property
    def num_images(self) -> int:
        return self.cls_logits.shape[0]

    @property
    def num_points(self) -> int:
        return self.cls_logits.shape[1]

    @property
    def num_classes(self) -> int:
        return self.cls_logits.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.cls_logits.dtype

    @property
    def device(self) -> torch.device:
        return self.cls_logits.device


def prepare_batch(points, cls_logits: Tensor, box_dists: Tensor, score_logits: Tensor,
                  gt_boxes: Sequence[Tensor], gt_classes: Sequence[Tensor], *,
                  score_name: str = "score_logits",
                  duplicate_rule: str = "last_gt") -> DenseBatch:
    """Check the inputs, bring them to the working precision and concatenate the GT boxes.

    Args:
        points: a :class:`~dw_d2.points.PointLayout`, or an ``(points (R, 2), strides (R,))``
            pair, whose layout is then recognised (see
            :func:`~dw_d2.points.recognise_point_layout`).
        cls_logits, box_dists, score_logits: (N, R, C), (N, R, 4), (N, R, 1).
        gt_boxes: N tensors (M_i, 4) XYXY; gt_classes: N integer tensors (M_i,) in [0, C).
        score_name: what the caller calls ``score_logits``, for error messages.
        duplicate_rule: checked against :data:`DUPLICATE_RULES`.
    """
    if not isinstance(points, PointLayout):
        points = PointLayout(*points)
    check_dense_inputs(points.points, points.strides, cls_logits, box_dists, score_logits,
                       score_name, gt_boxes, gt_classes, duplicate_rule)
    dtype = weighting_dtype(cls_logits, box_dists, score_logits)
    device = cls_logits.device
    with autocast_disabled(device):
        points = points.to(dtype)
        if points.level_shapes is None:
            points = recognise_point_layout(points.points, points.strides)
        gt = concat_ground_truth(gt_boxes, gt_classes, dtype, device)
        check_class_range(gt.classes, cls_logits.shape[-1])
        return DenseBatch(points, cls_logits.to(dtype), box_dists.to(dtype),
                          score_logits.to(dtype), gt)


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


# --------------------------------------------------------------------------------------------
# The candidate pairs
# --------------------------------------------------------------------------------------------
class PairInputs(NamedTuple):
    """The predictions and GT boxes at the candidate pairs, gathered once.

    Coordinates are coordinate-major (one contiguous (P,) row each), see
    :mod:`dw_d2.assign.kernels.box_overlap`.
    """

    classes: Tensor  # (P,) int64 class of the pair's GT box
    rows: Tensor  # (P,) int64 flat (image, point) row of the (N * R, ...) predictions
    score_entry: Tensor  # (P,) int64 flat (image, point, class) entry of the (N, R, C) scores
    points: Tensor  # (2, P) x, y of the pair's point
    strides: Tensor  # (P,) stride of the point's level
    distances: Tensor  # (4, P) predicted l, t, r, b (differentiable)
    boxes: Tensor  # (4, P) the GT box, XYXY


def gather_pairs(batch: DenseBatch, pairs: CandidatePairs) -> PairInputs:
    """Gather what the losses need at the pairs from the dense (R, ...) / (N, R, ...) tensors."""
    classes = batch.gt.classes.index_select(0, pairs.gt)
    rows = pairs.image * batch.num_points + pairs.point
    return PairInputs(
        classes=classes,
        rows=rows,
        score_entry=rows * batch.num_classes + classes,
        points=gather_coordinates(batch.points.points, pairs.point),
        strides=batch.points.strides.index_select(0, pairs.point),
        distances=gather_coordinates(batch.box_dists.reshape(-1, 4), rows),
        boxes=gather_coordinates(batch.gt.boxes, pairs.gt),
    )


def pair_overlaps(pair: PairInputs, box_eps: float = 1e-6):
    """IoU and GIoU of the predicted box and the GT box at each pair, (P,) each.

    Both boxes are decoded at the pair's point, as the official heads compare them (the GT
    box encoded as distances and decoded again); union and enclosing area are clamped at
    ``box_eps``. Both keep the prediction's gradient; detach what must not learn.
    """
    x, y = pair.points
    predicted = decode_distances(x, y, pair.distances)
    with torch.no_grad():
        target = redecode_boxes(x, y, pair.boxes)
    return aligned_iou_and_giou(predicted, target, box_eps)


class ScoreEntries(NamedTuple):
    """The distinct (image, point, class) entries of the (N, R, C) score map that the pairs
    address (E of them; E < P where a point is a candidate of two boxes of one class)."""

    entries: Tensor  # (E,) int64 flat entries, ascending
    entry_of_pair: Tensor  # (P,) int64 index into ``entries`` of each pair's entry
    last_pair_of_entry: Tensor  # (E,) int64 the last pair (in pair order) of each entry


def score_entries(batch: DenseBatch, pair: PairInputs) -> ScoreEntries:
    """The pairs grouped by score entry (see :func:`distinct_score_entries`)."""
    return distinct_score_entries(pair.score_entry, batch.cls_logits.numel())


def distinct_score_entries(pair_entries: Tensor, num_entries: int) -> ScoreEntries:
    """Group the pairs by score entry.

    Args:
        pair_entries: (P,) int64 flat (image, point, class) entry of each pair, the pairs in
            GT order (as :class:`~dw_d2.assign.candidates.CandidatePairs` are): the last pair
            of an entry then has the highest GT index.
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


# --------------------------------------------------------------------------------------------
# Per-GT and per-entry reductions
# --------------------------------------------------------------------------------------------
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


def normalise_per_gt(values: Tensor, pairs: CandidatePairs, num_boxes: int,
                     max_high=None) -> Tensor:
    """``(v - low + EPS) / (high - low + EPS)`` with low and high the minimum and maximum of
    ``values`` (P,) over each GT's pairs, ``high`` first clamped at ``max_high`` when given;
    the official heads' per-GT min-max normalisation. No gradient."""
    low = segment_min(values, pairs.gt, num_boxes).index_select(0, pairs.gt)
    high = segment_max(values, pairs.gt, num_boxes)
    if max_high is not None:
        high = high.clamp(max=max_high)
    high = high.index_select(0, pairs.gt)
    return (values - low + EPS) / (high - low + EPS)


def resolve_pair_values(values: Tensor, entries: ScoreEntries, duplicate_rule: str) -> Tensor:
    """The value each entry of a dense map keeps when several pairs write it.

    The official heads write the negative weight with an advanced-index assignment whose
    indices repeat where a point is a candidate of two GT boxes of the same class. That is
    formally undefined; torch on the CPU keeps the value of the highest GT index (on CUDA the
    winner is arbitrary). ``"last_gt"`` makes that CPU behaviour deterministic everywhere: the
    official reference cases follow it. ``"min"`` keeps the smallest value instead, which does
    not depend on the order of the GT boxes.

    Args:
        values: (P,) value of each pair.
        entries: the pairs grouped by entry.
        duplicate_rule: ``"last_gt"`` or ``"min"``.
    Returns:
        (E,) the value of each entry.
    """
    if duplicate_rule == "last_gt":
        return values.index_select(0, entries.last_pair_of_entry)
    return values.new_zeros(entries.entries.shape).scatter_reduce_(
        0, entries.entry_of_pair, values, "amin", include_self=False)


# --------------------------------------------------------------------------------------------
# Normalisers
# --------------------------------------------------------------------------------------------
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


def num_gt_normaliser(batch: DenseBatch) -> Tensor:
    """The positive terms' normaliser: the number of GT boxes of the batch, averaged over the
    workers, then clamped at 1 (after the mean, as the official heads: a worker may hold no
    GT box)."""
    count = torch.tensor(float(batch.gt.num_boxes), dtype=batch.dtype, device=batch.device)
    return mean_over_workers(count).clamp(min=1)


# --------------------------------------------------------------------------------------------
# Weights for inspection (return_weights=True)
# --------------------------------------------------------------------------------------------
def dense_pair_map(values: Tensor, pairs: CandidatePairs, num_points: int, gt: BatchGroundTruth,
                   fill: float = 0.0) -> List[Tensor]:
    """Scatter per-pair values (P,) into per-image (R, M_i) maps (for inspection, not training)."""
    dense = torch.full((num_points, gt.num_boxes), fill, dtype=values.dtype, device=values.device)
    dense[pairs.point, pairs.gt] = values
    return list(dense.split(gt.counts, dim=1))


def per_image_weight_maps(batch: DenseBatch, pairs: CandidatePairs, prior: Tensor,
                          pos_weight: Tensor, iou: Tensor, entries: ScoreEntries,
                          neg_values: Tensor) -> List[dict]:
    """The dense, detached per-image weights that ``return_weights=True`` returns.

    Args:
        prior, pos_weight, iou: (P,) per candidate pair.
        entries, neg_values: the entries of w- (N, R, C) that are not 1, and their (E,) values.

    Returns:
        one dict per image: ``candidates`` bool (R, M_i), ``center_prior``, ``pos_weight``,
        ``ious`` (R, M_i) (0 off candidates) and ``neg_weight`` (R, C).
    """
    gt, num_points = batch.gt, batch.num_points
    neg_weight = prior.new_ones(batch.cls_logits.shape)
    neg_weight.view(-1)[entries.entries] = neg_values.detach()
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
