"""The points of the detector (dw_d2.points): the official generators' layout, the cache, and
the layout the public weighting functions recognise from flat points."""
import pytest
import torch

from dw_d2.points import PointGrid, PointLayout, recognise_point_layout
from tests.helpers import GOLDEN_DIR


@pytest.mark.skipif(not GOLDEN_DIR.is_dir(), reason=f"golden folder {GOLDEN_DIR} is absent")
@pytest.mark.parametrize("case", ["dw_loss_02.pt", "autoassign_loss_01.pt"])
def test_points_match_the_official_generator(case):
    golden = torch.load(GOLDEN_DIR / case, weights_only=True)
    grid = PointGrid(golden["strides"], golden["point_offset"])
    layout = grid([tuple(s) for s in golden["featmap_sizes"]], dtype=torch.float64)
    assert torch.equal(layout.points, golden["points"])
    assert torch.equal(layout.strides, golden["point_strides"])
    assert layout.level_shapes == tuple(tuple(s) for s in golden["featmap_sizes"])


def test_point_grid_caches_per_size():
    grid = PointGrid([8, 16], 0.5)
    first = grid([(2, 3), (1, 2)])
    assert grid([(2, 3), (1, 2)]).points is first.points
    assert grid([(4, 3), (2, 2)]).points.shape == (16, 2)


def test_layout_splits_its_levels():
    layout = PointGrid([8, 16, 32], 0.0)([(3, 4), (2, 2), (1, 1)])
    assert layout.level_starts == (0, 12, 16)
    parts = layout.split_levels(layout.points)
    assert [len(p) for p in parts] == [12, 4, 1]
    assert parts[1][0].tolist() == [0.0, 0.0] and parts[1][-1].tolist() == [16.0, 16.0]


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_flat_grid_points_are_recognised_as_the_grid_built_them(offset):
    layout = PointGrid([8, 16, 32, 64, 128], offset)([(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)])
    recognised = recognise_point_layout(layout.points, layout.strides)
    assert recognised.level_shapes == layout.level_shapes
    shuffled = recognise_point_layout(layout.points.flip(0), layout.strides.flip(0))
    assert shuffled.level_shapes is None
    assert recognise_point_layout(layout.points[1:], layout.strides[1:]).level_shapes is None
    assert PointLayout(layout.points, layout.strides).level_shapes is None
