"""What a dataset looks like to a dense detector: counts, box sizes, and FPN levels.

:func:`summarize_dataset` measures a dataset's boxes in the image's pixels and at the network's
input scale (Detectron2's ``ResizeShortestEdge`` under the config's ``INPUT.MIN_SIZE_*`` and
``INPUT.MAX_SIZE_*``), and relates them to the points of the FPN levels (strides 8 to 128 for
P3-P7):

* **The FCOS level** of a box is where FCOS's scale ranges put it: Detectron2's FCOS makes a
  point of stride s a positive only when its largest distance to the box's sides lies in
  (4s, 8s) (0 for the finest level, infinity for the coarsest). At the box's centre that
  distance is half the longer side, so a box goes to the level with 8s < max(w, h) <= 16s:
  P3 up to 128 px, P4 up to 256, P5 up to 512, P6 up to 1024, P7 beyond. It is shown for
  orientation only: **DW and AutoAssign have no scale ranges**; every point strictly inside a
  box, on every level, is a candidate, and the weighting decides.
* **Points inside a box.** A level of stride s has its points at ((x + o)s, (y + o)s) for
  integer x, y >= 0 (o is ``MODEL.ASSIGNER.POINT_OFFSET``: 0.5 for DW, 0 for AutoAssign). The points
  strictly inside a box [x1, x2] x [y1, y2] are the integers x with x1/s - o < x < x2/s - o
  (likewise for y): ``ceil(x2/s - o) - floor(x1/s - o) - 1`` columns. A box wider and higher
  than s always contains a point of that level; a box whose width or height is at most s
  may contain none, depending on where it lies. A box that contains no point of any level is
  never a candidate: the detector cannot learn it (AutoAssign's
  ``MODEL.ASSIGNER.AUTOASSIGN.FORCE_TOPK`` gives such boxes their nearest points instead).

Training resizes to several sizes when ``INPUT.MIN_SIZE_TRAIN`` has several; the summary uses
the smallest and the largest, and the test size. It ignores the horizontal flip (with o = 0.5
and an image width that is not a multiple of s, a flipped box can gain or lose a column of
points) and ``INPUT.CROP``.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.structures import BoxMode

__all__ = ["InputScale", "ScaleSummary", "DatasetSummary", "input_scales", "fcos_levels",
           "points_inside", "summarize_dataset", "format_summary"]

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class InputScale:
    """One input size of the network: Detectron2's ``ResizeShortestEdge(short_edge, max_size)``
    (``short_edge`` 0: the image is not resized)."""

    name: str
    short_edge: int
    max_size: int

    def resized_shape(self, height: int, width: int) -> Tuple[int, int]:
        if self.short_edge == 0:
            return height, width
        return ResizeShortestEdge.get_output_shape(height, width, self.short_edge, self.max_size)


def input_scales(cfg) -> List[InputScale]:
    """The test input size and the smallest and largest training sizes of a config (sizes
    that coincide are measured once, under a name that lists them)."""
    train_sizes = [int(s) for s in cfg.INPUT.MIN_SIZE_TRAIN]
    named = {(int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)): ["test"]}
    for size in sorted({min(train_sizes), max(train_sizes)}):
        named.setdefault((size, int(cfg.INPUT.MAX_SIZE_TRAIN)), []).append("train")
    return [InputScale(f"{' and '.join(roles)} ({short}, max {longest})", short, longest)
            for (short, longest), roles in named.items()]


def fcos_levels(max_side: np.ndarray, strides: Sequence[int]) -> np.ndarray:
    """The FCOS level index (0 = finest) of boxes whose longer side is ``max_side`` (B,):
    level l takes 8 s_l < max_side <= 16 s_l, the first from 0, the last to infinity."""
    upper = np.array([16 * s for s in strides[:-1]], dtype=np.float64)
    return np.searchsorted(upper, np.asarray(max_side, dtype=np.float64), side="left")


def points_inside(low: np.ndarray, high: np.ndarray, stride: float, offset: float) -> np.ndarray:
    """How many grid coordinates (k + offset) * stride, k integer, lie strictly between
    ``low`` and ``high`` (arrays of the same shape): one axis of a box."""
    count = np.ceil(high / stride - offset) - np.floor(low / stride - offset) - 1
    return np.maximum(count, 0).astype(np.int64)


@dataclass
class ScaleSummary:
    """A dataset's (non-crowd) boxes at one input scale: (B,) arrays, and (B, L) per level."""

    scale: InputScale
    box_width: np.ndarray
    box_height: np.ndarray
    fcos_level: np.ndarray
    points_per_level: np.ndarray  # points strictly inside each box, per level

    @property
    def no_point(self) -> np.ndarray:
        """(L,) boxes containing no point of each level."""
        return (self.points_per_level == 0).sum(axis=0)

    @property
    def no_point_at_all(self) -> int:
        """Boxes that contain no point of any level: never candidates."""
        return int((self.points_per_level.sum(axis=1) == 0).sum())


@dataclass
class DatasetSummary:
    """Counts and box geometry of one dataset (see :func:`summarize_dataset`)."""

    dataset_name: str
    class_names: List[str]
    num_images: int
    boxes_per_class: np.ndarray  # (C,) non-crowd annotations
    num_crowd: int
    boxes_per_image: np.ndarray  # (num_images,) non-crowd annotations
    box_width: np.ndarray  # (B,) in the image's pixels
    box_height: np.ndarray
    strides: Tuple[int, ...]
    level_names: Tuple[str, ...]
    point_offset: float
    scales: List[ScaleSummary] = field(default_factory=list)

    @property
    def num_boxes(self) -> int:
        return int(self.boxes_per_class.sum())

    def to_json(self) -> dict:
        """The numbers of the summary, as plain JSON values."""
        size = np.sqrt(self.box_width * self.box_height)
        return {
            "dataset": self.dataset_name,
            "images": self.num_images,
            "images_without_boxes": int((self.boxes_per_image == 0).sum()),
            "boxes": self.num_boxes,
            "crowd_boxes": self.num_crowd,
            "boxes_per_class": dict(zip(self.class_names, self.boxes_per_class.tolist())),
            "boxes_per_image": _distribution(self.boxes_per_image),
            "box_sqrt_area": _distribution(size),
            "strides": list(self.strides),
            "point_offset": self.point_offset,
            "scales": [{
                "name": s.scale.name,
                "box_sqrt_area": _distribution(np.sqrt(s.box_width * s.box_height)),
                "fcos_level_counts": dict(zip(self.level_names, np.bincount(
                    s.fcos_level, minlength=len(self.strides)).tolist())),
                "boxes_without_points": dict(zip(self.level_names, s.no_point.tolist())),
                "boxes_without_any_point": s.no_point_at_all,
            } for s in self.scales],
        }


def _distribution(values: np.ndarray) -> Dict[str, float]:
    if len(values) == 0:
        return {}
    result = {"min": float(np.min(values)), "mean": float(np.mean(values))}
    result.update({f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES})
    result["max"] = float(np.max(values))
    return result


def summarize_dataset(
    dataset_dicts: Sequence[dict],
    dataset_name: str,
    class_names: Sequence[str],
    *,
    scales: Sequence[InputScale],
    strides: Sequence[int],
    point_offset: float,
    level_names: Optional[Sequence[str]] = None,
) -> DatasetSummary:
    """Measure a dataset (checked dicts: finite boxes inside their images, valid classes).

    Args:
        scales: the input sizes to measure at (:func:`input_scales`).
        strides: the strides of the detector's levels, finest first.
        point_offset: where a level's point sits in its cell (see the module docstring).
        level_names: names of the levels (default ``p3``... for strides 8...).
    """
    strides = tuple(int(s) for s in strides)
    if level_names is None:
        level_names = tuple(f"p{int(np.log2(s))}" for s in strides)
    per_image, rows = [], []
    num_crowd = 0
    for record in dataset_dicts:
        count = 0
        for ann in record.get("annotations", ()):
            if ann.get("iscrowd", 0):
                num_crowd += 1
                continue
            mode = BoxMode(int(ann.get("bbox_mode", BoxMode.XYXY_ABS)))
            box = BoxMode.convert(list(ann["bbox"]), mode, BoxMode.XYXY_ABS)
            rows.append((*box, ann["category_id"], record["height"], record["width"]))
            count += 1
        per_image.append(count)
    table = np.array(rows, dtype=np.float64).reshape(-1, 7)
    boxes, classes, image_hw = table[:, :4], table[:, 4].astype(np.int64), table[:, 5:7]

    summary = DatasetSummary(
        dataset_name=dataset_name, class_names=list(class_names), num_images=len(dataset_dicts),
        boxes_per_class=np.bincount(classes, minlength=len(class_names)), num_crowd=num_crowd,
        boxes_per_image=np.array(per_image, dtype=np.int64),
        box_width=boxes[:, 2] - boxes[:, 0], box_height=boxes[:, 3] - boxes[:, 1],
        strides=strides, level_names=tuple(level_names), point_offset=float(point_offset),
    )
    for scale in scales:
        summary.scales.append(_at_scale(boxes, image_hw, scale, strides, point_offset))
    return summary


def _at_scale(boxes, image_hw, scale: InputScale, strides, offset) -> ScaleSummary:
    # Scale factors per distinct image size (Detectron2 rounds the new size, then scales x and
    # y by new/old separately).
    factors = np.ones((len(boxes), 2))
    sizes, inverse = np.unique(image_hw, axis=0, return_inverse=True)
    for k, (height, width) in enumerate(sizes):
        new_h, new_w = scale.resized_shape(int(height), int(width))
        factors[inverse.reshape(-1) == k] = (new_w / width, new_h / height)
    scaled = boxes * np.tile(factors, 2)
    width, height = scaled[:, 2] - scaled[:, 0], scaled[:, 3] - scaled[:, 1]
    points = np.stack([
        points_inside(scaled[:, 0], scaled[:, 2], s, offset)
        * points_inside(scaled[:, 1], scaled[:, 3], s, offset) for s in strides
    ], axis=1).reshape(len(boxes), len(strides))
    return ScaleSummary(scale, width, height, fcos_levels(np.maximum(width, height), strides),
                        points)


def format_summary(summary: DatasetSummary) -> str:
    """The summary as text, with the warnings a user should read before training."""
    s = summary
    lines = [f"Dataset '{s.dataset_name}': {s.num_images} images, {s.num_boxes} boxes "
             f"(+ {s.num_crowd} crowd boxes, ignored in training), "
             f"{int((s.boxes_per_image == 0).sum())} images without boxes."]
    width = max([len(c) for c in s.class_names] + [5])
    lines.append("  boxes per class:")
    lines += [f"    {name:<{width}} {int(n):>8}" for name, n in zip(s.class_names,
                                                                      s.boxes_per_class)]
    if len(s.boxes_per_image):
        d = _distribution(s.boxes_per_image)
        lines.append("  boxes per image: " + _format_distribution(d, "{:.3g}"))
    if s.num_boxes == 0:
        return "\n".join(lines)
    lines.append("  box size sqrt(w*h), image pixels: "
                 + _format_distribution(_distribution(np.sqrt(s.box_width * s.box_height)),
                                        "{:.1f}"))
    for scale in s.scales:
        lines.append(f"  at the input size {scale.scale.name}:")
        lines.append("    box size sqrt(w*h), input pixels: " + _format_distribution(
            _distribution(np.sqrt(scale.box_width * scale.box_height)), "{:.1f}"))
        levels = np.bincount(scale.fcos_level, minlength=len(s.strides))
        lines.append("    FCOS level (8s < longer side <= 16s): " + ", ".join(
            f"{name} {n} ({100 * n / s.num_boxes:.1f}%)" for name, n in zip(s.level_names,
                                                                             levels.tolist())))
        lines.append("    boxes containing no point of the level: " + ", ".join(
            f"{name} {n}" for name, n in zip(s.level_names, scale.no_point.tolist())))
    lines += [f"  WARNING: {w}" for w in summary_warnings(s)]
    return "\n".join(lines)


def _format_distribution(d: Dict[str, float], number: str) -> str:
    return ", ".join(f"{k} {number.format(v)}" for k, v in d.items())


def summary_warnings(summary: DatasetSummary) -> List[str]:
    """What in the summary may hurt training: unused classes, boxes without candidates."""
    s = summary
    warnings = []
    empty_classes = [c for c, n in zip(s.class_names, s.boxes_per_class) if n == 0]
    if empty_classes and s.num_boxes:
        warnings.append(f"{len(empty_classes)} classes have no box: {', '.join(empty_classes)}.")
    finest, name = s.strides[0], s.level_names[0]
    for scale in s.scales:
        thin = int(((scale.box_width <= finest) | (scale.box_height <= finest)).sum())
        if not thin:
            continue
        warnings.append(
            f"at {scale.scale.name}: {thin} boxes ({100 * thin / s.num_boxes:.1f}%) are at most "
            f"{finest} px (the stride of {name}) wide or high, and {int(scale.no_point[0])} of "
            f"them contain no {name} point (points at ((x + {s.point_offset:g}) * {finest}, "
            f"(y + {s.point_offset:g}) * {finest}); a box holds one only if one lies strictly "
            f"inside it). {scale.no_point_at_all} boxes contain no point of any level: they are "
            f"never candidates, so DW/AutoAssign cannot learn them. Consider a larger input "
            f"size (INPUT.MIN_SIZE_*)."
        )
    return warnings
