"""The grid candidate search finds exactly the pairs of the dense strict-inside test."""
import pytest
import torch

from dw_d2.assign.candidates import (add_topk_pairs_for_empty_boxes, concat_ground_truth,
                                     find_candidate_pairs)
from dw_d2.points import PointLayout, recognise_point_layout

LEVELS = [(8, (12, 17)), (16, (6, 9)), (32, (3, 5)), (64, (2, 3)), (128, (1, 2))]


def grid_points(offset, dtype):
    points, strides = [], []
    for stride, (height, width) in LEVELS:
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        points.append(torch.stack([(xs.reshape(-1) + offset) * stride,
                                   (ys.reshape(-1) + offset) * stride], dim=1))
        strides.append(torch.full((height * width,), float(stride)))
    return torch.cat(points).to(dtype), torch.cat(strides).to(dtype)


def random_boxes(generator, count, dtype, fractional):
    corners = torch.randint(-10, 150, (count, 4), generator=generator).to(dtype)
    if fractional:
        corners = corners + torch.rand(count, 4, generator=generator, dtype=dtype) * 3
    # Integer corners put many box edges exactly on points: the strict test must exclude them.
    return torch.stack([corners[:, 0].minimum(corners[:, 2]), corners[:, 1].minimum(corners[:, 3]),
                        corners[:, 0].maximum(corners[:, 2]), corners[:, 1].maximum(corners[:, 3])],
                       dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_grid_search_equals_dense_test(dtype, offset):
    points, strides = grid_points(offset, dtype)
    layout = recognise_point_layout(points, strides)
    assert layout.level_shapes == tuple(shape for _, shape in LEVELS)
    generator = torch.Generator().manual_seed(0)
    for trial in range(150):
        count = int(torch.randint(0, 8, (1,), generator=generator))
        boxes = random_boxes(generator, count, dtype, fractional=trial % 2 == 1)
        split = count // 2
        gt = concat_ground_truth([boxes[:split], boxes[split:]],
                                 [torch.zeros(split, dtype=torch.long),
                                  torch.zeros(count - split, dtype=torch.long)], dtype, points.device)
        grid = find_candidate_pairs(layout, gt)
        dense = find_candidate_pairs(PointLayout(points, strides), gt)
        assert torch.equal(grid.gt, dense.gt) and torch.equal(grid.point, dense.point), trial
        assert torch.equal(grid.image, dense.image), trial


def test_points_that_are_not_a_grid_use_the_dense_test():
    points, strides = grid_points(0.5, torch.float64)
    order = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))
    assert recognise_point_layout(points[order], strides).level_shapes is None


def test_pair_counts_per_gt_and_per_image_match_the_pairs():
    points, strides = grid_points(0.5, torch.float32)
    boxes = torch.tensor([[10.0, 12.0, 90.0, 70.0], [0.0, 0.0, 5.0, 5.0], [40.0, 30.0, 41.0, 31.0],
                          [20.0, 5.0, 120.0, 100.0]])
    gt = concat_ground_truth([boxes[:2], boxes[2:]], [torch.tensor([0, 1]), torch.tensor([1, 0])],
                             torch.float32, "cpu")
    for layout in (recognise_point_layout(points, strides), PointLayout(points, strides)):
        pairs = find_candidate_pairs(layout, gt)
        assert torch.equal(pairs.per_gt, torch.bincount(pairs.gt, minlength=gt.num_boxes))
        assert torch.equal(pairs.per_image, torch.bincount(pairs.image, minlength=2))
        forced = add_topk_pairs_for_empty_boxes(pairs, layout, gt, torch.zeros(2, 2),
                                                torch.ones(2, 2), topk=3)
        assert torch.equal(forced.per_gt, torch.bincount(forced.gt, minlength=gt.num_boxes))
        assert torch.equal(forced.per_image, torch.bincount(forced.image, minlength=2))
        assert (forced.per_gt > 0).all()
