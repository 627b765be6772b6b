"""The dataset summary: counts, sizes at the input scale, FCOS levels, and which boxes contain
points of each level, the last checked against the detector's own candidate search."""
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import build_augmentation
from detectron2.structures import BoxMode, ImageList
from PIL import Image

from dw_d2.assign.candidates import concat_ground_truth, find_candidate_pairs
from dw_d2.data.summary import (
    InputScale,
    fcos_levels,
    format_summary,
    input_scales,
    points_inside,
    summarize_dataset,
)
from dw_d2.points import PointGrid
from dw_d2.viz.dataset_summary import plot_dataset_summary
from dw_d2.viz.tool_config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "Builtin" / "dw_R_18_FPN_shapes.yaml"


@pytest.mark.parametrize("offset", [0.0, 0.5, 0.25])
@pytest.mark.parametrize("stride", [8, 16, 128])
def test_points_inside_counts_the_grid_points_strictly_between(stride, offset):
    rng = np.random.default_rng(stride)
    low = rng.uniform(0, 300, 2000)
    high = low + rng.choice([rng.uniform(0, 3 * stride), stride], 2000)
    low[:5], high[:5] = (np.array([0, stride * offset, 7.9, 8, 0]),
                         np.array([stride * (1 + offset), stride * (2 + offset), 8.1, 8, 0.1]))
    grid = (np.arange(0, 1000) + offset) * stride
    expected = ((grid[None] > low[:, None]) & (grid[None] < high[:, None])).sum(axis=1)
    np.testing.assert_array_equal(points_inside(low, high, stride, offset), expected)


def test_wider_than_the_stride_always_holds_a_point_at_most_the_stride_may_not():
    low = np.linspace(0, 16, 1001)
    assert (points_inside(low, low + 8.001, 8, 0.5) >= 1).all()
    just_one_stride = points_inside(low, low + 8, 8, 0.5)
    assert (just_one_stride == 0).any() and (just_one_stride == 1).any()


def test_fcos_levels_follow_the_8s_16s_ranges():
    strides = [8, 16, 32, 64, 128]
    sides = np.array([1, 128, 128.01, 256, 257, 1024, 1025, 10 ** 6])
    assert fcos_levels(sides, strides).tolist() == [0, 0, 1, 1, 2, 3, 4, 4]


def test_input_scales_of_a_config():
    cfg = load_config(CONFIG, ["INPUT.MIN_SIZE_TRAIN", "(640, 672, 800)",
                               "INPUT.MAX_SIZE_TRAIN", "1333", "INPUT.MIN_SIZE_TEST", "800",
                               "INPUT.MAX_SIZE_TEST", "1333"])
    assert [(s.name, s.short_edge, s.max_size) for s in input_scales(cfg)] == [
        ("test and train (800, max 1333)", 800, 1333), ("train (640, max 1333)", 640, 1333)]
    assert InputScale("x", 800, 1333).resized_shape(480, 640) == (800, 1067)
    assert InputScale("x", 800, 1000).resized_shape(100, 400) == (250, 1000)
    assert InputScale("x", 0, 0).resized_shape(33, 44) == (33, 44)


def _record(image_id, height, width, boxes, crowd=()):
    annotations = [{"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "category_id": c}
                   for b, c in boxes]
    annotations += [{"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                     "iscrowd": 1} for b in crowd]
    return {"file_name": f"{image_id}.png", "image_id": image_id, "height": height,
            "width": width, "annotations": annotations}


def test_summary_counts_and_scaled_sizes():
    dicts = [
        _record(1, 50, 100, [([0, 0, 4, 4], 0), ([10, 10, 60, 30], 1)], crowd=[[0, 0, 9, 9]]),
        _record(2, 100, 100, [([20, 20, 3, 40], 1)]),
        _record(3, 100, 100, []),
    ]
    scale = InputScale("test", 100, 1000)  # image 1 doubles, images 2 and 3 stay
    summary = summarize_dataset(dicts, "toy", ["a", "b", "c"], scales=[scale],
                                strides=[8, 16], point_offset=0.5)
    assert summary.boxes_per_class.tolist() == [1, 2, 0]
    assert summary.num_crowd == 1 and summary.boxes_per_image.tolist() == [2, 1, 0]
    at_scale = summary.scales[0]
    assert at_scale.box_width.tolist() == [8, 120, 3]
    assert at_scale.box_height.tolist() == [8, 60, 40]
    assert at_scale.fcos_level.tolist() == [0, 0, 0]
    # [0, 8]^2 holds the P3 point (4, 4) but no P4 point; the 3 px wide box [20, 23] holds
    # no column of either (P3 at 20 and 28 are not strictly inside; P4 at 8, 24).
    assert at_scale.points_per_level[0].tolist() == [1, 0]
    assert at_scale.points_per_level[2].tolist() == [0, 0]
    assert at_scale.no_point.tolist() == [1, 2] and at_scale.no_point_at_all == 1
    text = format_summary(summary)
    assert "3 images, 3 boxes (+ 1 crowd boxes" in text
    assert "1 classes have no box: c" in text
    assert "2 boxes (66.7%) are at most 8 px" in text and "1 boxes contain no point" in text
    numbers = summary.to_json()
    assert numbers["boxes_per_class"] == {"a": 1, "b": 2, "c": 0}
    assert numbers["scales"][0]["boxes_without_any_point"] == 1


def test_no_point_agrees_with_the_detectors_candidates_on_the_builtin_dataset():
    """Boxes as Detectron2's mapper scales them at the test size, points as the detector
    places them on the padded input's feature maps, candidates as the weighting finds them."""
    cfg = load_config(CONFIG)
    dicts = DatasetCatalog.get("dw_shapes_val")
    strides = [8, 16, 32, 64, 128]
    summary = summarize_dataset(dicts, "dw_shapes_val", ["0", "1", "2", "3"],
                                scales=input_scales(cfg), strides=strides, point_offset=0.5)
    # A training-mode mapper (it keeps the boxes) with the test-time resize and no flip.
    mapper = DatasetMapper(is_train=True, augmentations=build_augmentation(cfg, False),
                           image_format=cfg.INPUT.FORMAT)
    no_candidate, no_p3 = [], []
    for record in dicts:
        if not record["annotations"]:
            continue
        mapped = mapper(dict(record, annotations=[dict(a) for a in record["annotations"]]))
        boxes = mapped["instances"].gt_boxes.tensor.double()
        padded = ImageList.from_tensors([mapped["image"]], size_divisibility=32).tensor.shape
        points = PointGrid(strides, 0.5)(
            [(-(-padded[-2] // s), -(-padded[-1] // s)) for s in strides], dtype=torch.float64)
        gt = concat_ground_truth([boxes], [torch.zeros(len(boxes), dtype=torch.long)],
                                 torch.float64, torch.device("cpu"))
        pairs = find_candidate_pairs(points, gt)
        no_candidate += (pairs.per_gt == 0).tolist()
        in_p3 = torch.zeros(len(boxes), dtype=torch.long)
        in_p3.index_add_(0, pairs.gt, (pairs.point < points.level_starts[1]).long())
        no_p3 += (in_p3 == 0).tolist()
    at_scale = summary.scales[0]
    assert sum(no_candidate) == at_scale.no_point_at_all > 0
    assert np.array_equal(np.array(no_candidate), at_scale.points_per_level.sum(axis=1) == 0)
    assert np.array_equal(np.array(no_p3), at_scale.points_per_level[:, 0] == 0)


def test_summary_picture(tmp_path):
    dicts = [_record(1, 50, 100, [([0, 0, 4, 4], 0), ([10, 10, 60, 30], 1)]),
             _record(2, 100, 100, [([20, 20, 3, 40], 1)])]
    summary = summarize_dataset(dicts, "toy", ["a", "b"], strides=[8, 16, 32],
                                point_offset=0.5, scales=[InputScale("test", 100, 1000),
                                                          InputScale("train", 200, 1000)])
    path = plot_dataset_summary(summary, tmp_path / "summary.png")
    with Image.open(path) as image:
        assert image.size == (1380, 680)
