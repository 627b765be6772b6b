"""Drawing and writing ``dw_shapes`` (see the package docstring for its content and layout).

The dataset is written to a temporary folder beside its destination and renamed into place only
once complete, so an interrupted generation never leaves a half dataset; a folder whose stamp
does not match :data:`GENERATOR_VERSION`, the classes and the split sizes is regenerated.
"""
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

# Bump whenever the generated images or annotations change: existing copies then regenerate.
GENERATOR_VERSION = 1

SHAPE_CLASSES = ["circle", "square", "triangle", "cross"]
DATASET_FOLDER = "dw_shapes"
STAMP_FILE = "VERSION.json"


@dataclass(frozen=True)
class SplitSpec:
    num_images: int
    seed: int


SPLITS: Dict[str, SplitSpec] = {
    "train": SplitSpec(num_images=240, seed=20220301),
    "val": SplitSpec(num_images=60, seed=20220302),
}

# Registered dataset name -> split.
DATASET_NAMES = {f"dw_shapes_{split}": split for split in SPLITS}

_MIN_SIDE, _MAX_SIDE = 160, 256
_SQUARE_IMAGE_FRACTION = 0.3
_EMPTY_IMAGE_FRACTION = 0.1
_MAX_OBJECTS = 6
_SMALL_OBJECT_FRACTION = 0.3
_SMALL_SIZE_RANGE = (6.0, 12.0)
_MAX_SIZE_FRACTION = 0.6  # of the shorter image side
_MAX_PAIR_IOU = 0.4  # overlapping objects are allowed, but none hides another
_PLACEMENT_TRIES = 30
_SUPERSAMPLING = 4  # shapes are rasterised at 4x and averaged: anti-aliased edges
_MIN_COLOUR_DISTANCE = 90.0


def default_dataset_dir() -> Path:
    """``$DW_D2_DATASETS/dw_shapes`` (``DW_D2_DATASETS`` defaults to ``datasets``)."""
    return Path(os.path.expanduser(os.getenv("DW_D2_DATASETS", "datasets"))) / DATASET_FOLDER


def annotation_file(dataset_dir, split: str) -> Path:
    return Path(dataset_dir) / "annotations" / f"instances_{split}.json"


def image_dir(dataset_dir, split: str) -> Path:
    return Path(dataset_dir) / split


def expected_stamp() -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "classes": SHAPE_CLASSES,
        "splits": {name: [spec.num_images, spec.seed] for name, spec in SPLITS.items()},
    }


def is_up_to_date(dataset_dir) -> bool:
    """True when ``dataset_dir`` holds a complete dataset made by this generator version."""
    stamp = Path(dataset_dir) / STAMP_FILE
    try:
        return json.loads(stamp.read_text()) == expected_stamp()
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Drawing


def _shape_outline(category: str, cx: float, cy: float, radius: float, angle: float):
    """Polygon vertices (x, y) of a shape whose farthest point lies ``radius`` from its centre.

    Returns None for a circle (drawn as an ellipse).
    """
    if category == "circle":
        return None
    if category == "square":
        corners = angle + np.pi / 4 + np.arange(4) * np.pi / 2
        local = radius * np.stack([np.cos(corners), np.sin(corners)], axis=1)
    elif category == "triangle":
        corners = angle + np.arange(3) * 2 * np.pi / 3
        local = radius * np.stack([np.cos(corners), np.sin(corners)], axis=1)
    elif category == "cross":
        half_width = 0.35
        arm = radius / math.hypot(1.0, half_width)  # so the arm corners sit at ``radius``
        a = half_width * arm
        local = np.array(
            [(-a, -arm), (a, -arm), (a, -a), (arm, -a), (arm, a), (a, a),
             (a, arm), (-a, arm), (-a, a), (-arm, a), (-arm, -a), (-a, -a)]
        )
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        local = local @ rotation.T
    else:
        raise ValueError(f"Unknown shape category {category!r}; expected one of {SHAPE_CLASSES}")
    return local + np.array([cx, cy])


def _shape_coverage(category, cx, cy, radius, angle, width, height):
    """Anti-aliased coverage of the shape: ``(alpha, x0, y0)``.

    ``alpha`` (h x w float in [0, 1]) covers the image window whose top-left pixel is
    ``(x0, y0)``; the window is the shape's extent plus a margin, clipped to the image.
    """
    x0 = max(int(math.floor(cx - radius)) - 1, 0)
    y0 = max(int(math.floor(cy - radius)) - 1, 0)
    x1 = min(int(math.ceil(cx + radius)) + 2, width)
    y1 = min(int(math.ceil(cy + radius)) + 2, height)
    k = _SUPERSAMPLING
    canvas = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
    draw = ImageDraw.Draw(canvas)
    # Pixel (i, j) of the image covers [i, i + 1) x [j, j + 1); in the canvas it is k x k cells.
    outline = _shape_outline(category, (cx - x0) * k, (cy - y0) * k, radius * k, angle)
    if outline is None:
        r = radius * k
        draw.ellipse([(cx - x0) * k - r, (cy - y0) * k - r,
                      (cx - x0) * k + r, (cy - y0) * k + r], fill=255)
    else:
        draw.polygon([tuple(p) for p in outline], fill=255)
    cells = np.asarray(canvas, dtype=np.float64) / 255.0
    alpha = cells.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3))
    return alpha, x0, y0


def _tight_box(alpha, x0, y0) -> Optional[Tuple[int, int, int, int]]:
    """XYXY box (exclusive end) of the pixels at least half covered, or None if there are none."""
    rows = np.flatnonzero((alpha >= 0.5).any(axis=1))
    cols = np.flatnonzero((alpha >= 0.5).any(axis=0))
    if rows.size == 0:
        return None
    return (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)


def _iou(box, boxes: np.ndarray) -> np.ndarray:
    """IoU of one XYXY box against an (N, 4) array of XYXY boxes."""
    if len(boxes) == 0:
        return np.zeros(0)
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Textured background (H, W, 3) float: colour gradient + smooth blotches + pixel noise."""
    start, end = rng.uniform(40, 215, size=(2, 3))
    direction = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    t = (xs * np.cos(direction) + ys * np.sin(direction)) / max(width, height)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    image = start + (end - start) * t[..., None]
    # Smooth blotches: a coarse random grid, upsampled bilinearly by PIL.
    grid = rng.uniform(-1, 1, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9))))
    blotch_image = Image.fromarray(((grid + 1) * 127.5).astype(np.uint8))
    blotches = np.asarray(blotch_image.resize((width, height), Image.BILINEAR), np.float64)
    image += (blotches / 127.5 - 1.0)[..., None] * rng.uniform(10, 35)
    image += rng.normal(0.0, rng.uniform(4, 14), size=image.shape)
    return image


def _object_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - background_mean) >= _MIN_COLOUR_DISTANCE:
            return colour
    # Fall back to the colour opposite the background: always far from it.
    return 255.0 - background_mean


def _draw_image(rng: np.random.Generator, with_objects: bool):
    """One image and its objects: ``(uint8 H x W x 3, [(category_index, XYWH box)])``."""
    if rng.uniform() < _SQUARE_IMAGE_FRACTION:
        width = height = int(rng.integers(_MIN_SIDE, _MAX_SIDE + 1))
    else:
        width, height = (int(v) for v in rng.integers(_MIN_SIDE, _MAX_SIDE + 1, size=2))
    image = _background(rng, width, height)
    if not with_objects:
        return np.clip(np.rint(image), 0, 255).astype(np.uint8), []

    num_objects = int(rng.integers(1, _MAX_OBJECTS + 1))
    max_size = _MAX_SIZE_FRACTION * min(width, height)
    placed = []  # (category, coverage, box)
    boxes = np.zeros((0, 4))
    for _ in range(num_objects):
        category = int(rng.integers(len(SHAPE_CLASSES)))
        if rng.uniform() < _SMALL_OBJECT_FRACTION:
            size = rng.uniform(*_SMALL_SIZE_RANGE)
        else:
            size = math.exp(rng.uniform(math.log(_SMALL_SIZE_RANGE[1]), math.log(max_size)))
        radius = size / 2
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(_PLACEMENT_TRIES):
            cx = rng.uniform(radius + 1, width - radius - 1)
            cy = rng.uniform(radius + 1, height - radius - 1)
            coverage = _shape_coverage(
                SHAPE_CLASSES[category], cx, cy, radius, angle, width, height
            )
            box = _tight_box(*coverage)
            if box is not None and (_iou(np.array(box), boxes) < _MAX_PAIR_IOU).all():
                placed.append((category, coverage, box))
                boxes = np.vstack([boxes, box])
                break

    # Larger objects first, so that smaller ones on top stay visible.
    placed.sort(key=lambda obj: -(obj[2][2] - obj[2][0]) * (obj[2][3] - obj[2][1]))
    objects = []
    for category, (alpha, x0, y0), box in placed:
        window = image[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]]
        colour = _object_colour(rng, window.reshape(-1, 3).mean(axis=0))
        shading = 1.0 + rng.normal(0.0, 0.05, size=alpha.shape)[..., None]
        window *= 1.0 - alpha[..., None]
        window += alpha[..., None] * colour * shading
        x_min, y_min, x_max, y_max = box
        objects.append((category, [x_min, y_min, x_max - x_min, y_max - y_min]))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


# --------------------------------------------------------------------------------------------
# Dataset files


def _generate_split(split: str, spec: SplitSpec, dataset_dir: Path) -> dict:
    """Write a split's images and return its COCO annotation dict."""
    images_out = image_dir(dataset_dir, split)
    images_out.mkdir(parents=True)
    split_rng = np.random.default_rng(spec.seed)
    num_empty = int(round(_EMPTY_IMAGE_FRACTION * spec.num_images))
    empty = set(split_rng.permutation(spec.num_images)[:num_empty].tolist())

    images, annotations = [], []
    for index in range(spec.num_images):
        # One generator per image: each image depends only on (seed, index).
        rng = np.random.default_rng([spec.seed, index])
        pixels, objects = _draw_image(rng, with_objects=index not in empty)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(images_out / file_name)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name,
                       "width": int(pixels.shape[1]), "height": int(pixels.shape[0])})
        for category, (x, y, w, h) in objects:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category + 1,
                "bbox": [float(x), float(y), float(w), float(h)],
                # Box area: these annotations have no masks (COCO's small/medium/large split
                # then follows the box, as in Detectron2's convert_to_coco_dict).
                "area": float(w * h),
                "iscrowd": 0,
            })
    return {
        "info": {"description": f"dw-d2 synthetic shapes, {split} split",
                 "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                       for i, name in enumerate(SHAPE_CLASSES)],
    }


def generate_shapes_dataset(dataset_dir) -> Path:
    """(Re)generate the complete dataset into ``dataset_dir``, replacing what is there.

    The files are written into a temporary sibling folder, which is renamed to ``dataset_dir``
    when complete. If another process completes the same dataset first, its copy is kept.

    Returns:
        Path: ``dataset_dir``.
    """
    dataset_dir = Path(dataset_dir)
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.tmp-", dir=dataset_dir.parent))
    try:
        (staging / "annotations").mkdir()
        for split, spec in SPLITS.items():
            coco = _generate_split(split, spec, staging)
            with open(annotation_file(staging, split), "w") as f:
                json.dump(coco, f, indent=None, separators=(",", ":"))
        # The stamp goes last: a folder with a valid stamp is complete.
        (staging / STAMP_FILE).write_text(json.dumps(expected_stamp(), indent=2) + "\n")
        _move_into_place(staging, dataset_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"Generated the dw_shapes dataset in {dataset_dir}")
    return dataset_dir


def _move_into_place(staging: Path, dataset_dir: Path) -> None:
    if dataset_dir.exists():
        if is_up_to_date(dataset_dir):  # a concurrent process finished first: keep its copy
            return
        # Move the stale copy aside first, so that the rename below is a single atomic step.
        stale = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.stale-", dir=dataset_dir.parent))
        os.rename(dataset_dir, stale / dataset_dir.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(staging, dataset_dir)
    except OSError:
        if not is_up_to_date(dataset_dir):  # not a concurrent writer: a real failure
            raise


def ensure_shapes_dataset(dataset_dir=None) -> Path:
    """Generate the dataset into ``dataset_dir`` unless an up-to-date copy is there."""
    dataset_dir = Path(dataset_dir) if dataset_dir is not None else default_dataset_dir()
    if not is_up_to_date(dataset_dir):
        logger.info(f"Generating the dw_shapes dataset in {dataset_dir} (first use) ...")
        generate_shapes_dataset(dataset_dir)
    return dataset_dir
