"""What a DW / AutoAssign detector assigns to one image: per GT box and FPN level, the
positive and negative weights over the points, as heat maps on the image.

The weights come from the detector's own assigner, called with ``return_weights=True`` on the
detector's head outputs and points, so the pictures show exactly what training uses.
"""
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
from matplotlib import colors
from matplotlib.patches import Rectangle

from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_image_to_rgb

from .figures import new_figure, save_figure

__all__ = [
    "AssignmentMaps",
    "deterministic_mapper",
    "assignment_weights",
    "compute_assignment_maps",
    "plot_assignment_grid",
]


@dataclass
class AssignmentMaps:
    """Per-level weight maps of one image, for each of its GT boxes.

    Attributes:
        assigner: the assignment scheme's name ("DW", "AutoAssign", ...).
        image: (H, W, 3) uint8 RGB, the detector's (resized) input image.
        padded_size: (H_pad, W_pad), its size once padded for the backbone; the feature maps
            cover it.
        gt_boxes: (M, 4) XYXY in input pixels; gt_classes: (M,) int.
        strides: the stride of each level; level_shapes: (h_l, w_l) of each level.
        point_offset: point of cell (y, x) at ((x + o) * s, (y + o) * s).
        pos_weights, neg_weights: per level, (M, h_l, w_l): the positive weight of GT m, and
            the negative weight of the class of GT m, at every point of the level.
        candidates: per level, (M, h_l, w_l) bool: the points inside GT m.
        weights: the per-image weight dict returned by the weighting function.
    """

    assigner: str
    image: np.ndarray
    padded_size: Tuple[int, int]
    gt_boxes: np.ndarray
    gt_classes: np.ndarray
    strides: List[int]
    level_shapes: List[Tuple[int, int]]
    point_offset: float
    pos_weights: List[np.ndarray]
    neg_weights: List[np.ndarray]
    candidates: List[np.ndarray]
    weights: dict


def deterministic_mapper(cfg):
    """A :class:`DatasetMapper` that keeps the annotations but resizes as at test time.

    Training augmentation (random sizes, flips) would make the picture differ on every call.
    """
    return DatasetMapper(
        is_train=True,
        augmentations=[T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)],
        image_format=cfg.INPUT.FORMAT,
    )


def assignment_weights(model, batched_inputs):
    """Run the detector's head and its weighting function on a batch, returning the weights.

    The head runs in the model's current mode, without gradient; the weights are those of the
    assigner that ``DWDetector.forward_training`` calls in training.

    Args:
        model (DWDetector): the detector.
        batched_inputs (list[dict]): mapped dataset dicts with "image" and "instances".

    Returns:
        tuple: (ImageList of the inputs, list of N weight dicts: "candidates" bool (R, M_i),
        "center_prior" (R, M_i), "pos_weight" (R, M_i), "neg_weight" (R, C), "ious" (R, M_i);
        features: the head's input feature maps, per level (N, K, h_l, w_l)).
    """
    missing = [i for i, x in enumerate(batched_inputs) if "instances" not in x]
    if missing:
        raise ValueError(f"inputs {missing} carry no 'instances' (GT boxes) to assign")
    with torch.no_grad():
        images = model.preprocess_image(batched_inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        predictions = model.head(features)
        gt_instances = [x["instances"].to(model.device) for x in batched_inputs]
        _, weights = model.forward_training(images, features, predictions, gt_instances,
                                            return_weights=True)
    return images, weights, features


def _per_level(values, level_shapes):
    """(R, K) point-major values -> per level (K, h_l, w_l)."""
    sizes = [h * w for h, w in level_shapes]
    return [
        part.T.reshape(-1, h, w).cpu().numpy()
        for part, (h, w) in zip(values.split(sizes), level_shapes)
    ]


def compute_assignment_maps(model, mapped_input):
    """The weight maps of one image, for drawing with :func:`plot_assignment_grid`.

    Args:
        model (DWDetector): the detector (its current mode is used; eval mode gives the
            deterministic, inference-time features).
        mapped_input (dict): one image mapped by :func:`deterministic_mapper`.

    Returns:
        AssignmentMaps
    """
    instances = mapped_input["instances"]
    if len(instances) == 0:
        raise ValueError(
            f"image {mapped_input.get('file_name', '?')} (image_id "
            f"{mapped_input.get('image_id', '?')}) has no GT boxes: nothing is assigned"
        )
    images, weights, features = assignment_weights(model, [mapped_input])
    weights = weights[0]
    level_shapes = [tuple(f.shape[-2:]) for f in features]
    gt_classes = instances.gt_classes.to(weights["neg_weight"].device)
    image = convert_image_to_rgb(mapped_input["image"].permute(1, 2, 0), model.input_format)
    return AssignmentMaps(
        assigner=type(model.assigner).__name__,
        image=np.clip(image, 0, 255).astype(np.uint8),
        padded_size=tuple(images.tensor.shape[-2:]),
        gt_boxes=instances.gt_boxes.tensor.cpu().numpy(),
        gt_classes=instances.gt_classes.cpu().numpy(),
        strides=list(model.strides),
        level_shapes=level_shapes,
        point_offset=model.point_offset,
        pos_weights=_per_level(weights["pos_weight"], level_shapes),
        neg_weights=_per_level(weights["neg_weight"][:, gt_classes], level_shapes),
        candidates=_per_level(weights["candidates"], level_shapes),
        weights=weights,
    )


def _level_extent(shape, stride, offset):
    """imshow extent (left, right, bottom, top) of a level whose cell centres are the points."""
    h, w = shape
    return ((offset - 0.5) * stride, (w + offset - 0.5) * stride,
            (h + offset - 0.5) * stride, (offset - 0.5) * stride)


def plot_assignment_grid(maps, output_path, class_names=None, max_gt_boxes=8, title=None,
                         panel_inches=1.7):
    """Draw the weight maps as one PNG grid.

    Rows are GT boxes; the first ``L`` columns show each level's positive weights, the last
    ``L`` its negative weights (of the GT's class, inside the GT: outside it the negative
    weight is 1). Each panel shows the input image, the heat map on the level's points and the
    GT box; one colour bar serves all positive panels, one all negative panels.

    Args:
        maps (AssignmentMaps): from :func:`compute_assignment_maps`.
        output_path (str or Path): the PNG to write.
        class_names (list[str] or None): names of the classes, for the row labels.
        max_gt_boxes (int): draw at most this many GT boxes (the first ones).
        title (str or None): the figure title.
        panel_inches (float): size of one panel.

    Returns:
        Path: ``output_path``.
    """
    num_gt = min(len(maps.gt_boxes), max_gt_boxes)
    num_levels = len(maps.level_shapes)
    fig, axes = new_figure(num_gt, 2 * num_levels, panel_size=(panel_inches, panel_inches))
    pos_max = max(float(p[:num_gt].max()) for p in maps.pos_weights)
    # Square-root scale: one GT's weights can be orders of magnitude below another's.
    pos_norm = colors.PowerNorm(0.5, 0.0, pos_max if pos_max > 0 else 1.0)
    neg_norm = colors.Normalize(0.0, 1.0)
    height, width = maps.image.shape[:2]
    padded_height, padded_width = maps.padded_size
    # A grey image leaves colour to the weights.
    grey = maps.image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    pos_image = neg_image = None
    for m in range(num_gt):
        x1, y1, x2, y2 = maps.gt_boxes[m]
        for level, (shape, stride) in enumerate(zip(maps.level_shapes, maps.strides)):
            extent = _level_extent(shape, stride, maps.point_offset)
            inside = maps.candidates[level][m]
            for column, values, norm, cmap in (
                (level, maps.pos_weights[level][m], pos_norm, "viridis"),
                (num_levels + level, maps.neg_weights[level][m], neg_norm, "magma"),
            ):
                ax = axes[m, column]
                ax.set_facecolor("black")  # the padding the backbone sees
                ax.imshow(grey, extent=(0, width, height, 0), cmap="gray", vmin=0, vmax=255)
                heat = ax.imshow(np.ma.masked_where(~inside, values), extent=extent, norm=norm,
                                 cmap=cmap, interpolation="nearest", alpha=0.85)
                if column < num_levels:
                    pos_image = heat
                else:
                    neg_image = heat
                ax.add_patch(_box_patch(x1, y1, x2, y2))
                ax.set_xlim(0, padded_width)
                ax.set_ylim(padded_height, 0)
                ax.set_xticks([])
                ax.set_yticks([])
                if m == 0:
                    kind = "w+ (pos)" if column < num_levels else "w- (neg)"
                    ax.set_title(f"P{_pyramid_level(stride)} s={stride}\n{kind}", fontsize=8)
        class_id = int(maps.gt_classes[m])
        name = class_names[class_id] if class_names and class_id < len(class_names) else class_id
        axes[m, 0].set_ylabel(f"GT {m}: {name}", fontsize=8)
    fig.colorbar(pos_image, ax=axes[:, :num_levels], location="bottom", shrink=0.6,
                 label="positive weight w+, square-root scale (0 outside the GT box)")
    fig.colorbar(neg_image, ax=axes[:, num_levels:], location="bottom", shrink=0.6,
                 label="negative weight w- of the GT's class (1 outside the GT box)")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, output_path)


def _pyramid_level(stride):
    return int(round(np.log2(stride)))


def _box_patch(x1, y1, x2, y2):
    return Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", linewidth=1.0)
