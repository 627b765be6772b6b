"""DW box refinement against the official head's outputs (the golden dw_refine_* cases)."""
import pytest
import torch
from torchvision.ops import deform_conv2d

from dw_d2 import refine_box_distances
from dw_d2.box_refinement import (
    decode_box_map,
    edge_sampling_offsets,
    sample_bilinear_per_channel,
)
from tests.helpers import GOLDEN_DIR

REFINE_CASES = sorted(GOLDEN_DIR.glob("dw_refine_*.pt"))
RTOL = 1e-9


def load_case(path):
    return torch.load(path, weights_only=True)


def assert_close_relative(actual, expected, rtol=RTOL):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=0.0)


golden = pytest.mark.skipif(
    not GOLDEN_DIR.is_dir(), reason=f"golden folder {GOLDEN_DIR} is absent"
)


@golden
def test_golden_cases_exist():
    assert REFINE_CASES, f"no dw_refine_*.pt in {GOLDEN_DIR}"


@golden
@pytest.mark.parametrize("path", REFINE_CASES, ids=lambda p: p.stem)
def test_refined_distances_float64(path):
    case = load_case(path)
    refined = refine_box_distances(
        case["bbox_pred"], case["reg_offset"], case["stride"], case["point_offset"]
    )
    assert_close_relative(refined, case["outputs"]["refined_bbox_pred"])


@golden
@pytest.mark.parametrize("path", REFINE_CASES, ids=lambda p: p.stem)
def test_refined_distances_float32(path):
    case = load_case(path)
    refined = refine_box_distances(
        case["bbox_pred"].float(), case["reg_offset"].float(), case["stride"],
        case["point_offset"],
    )
    expected = case["outputs"]["refined_bbox_pred_fp32"]
    assert refined.dtype == torch.float32
    torch.testing.assert_close(refined, expected, rtol=0.0, atol=1e-4)


@golden
@pytest.mark.parametrize("path", REFINE_CASES, ids=lambda p: p.stem)
def test_intermediates_float64(path):
    case = load_case(path)
    stride, offset = case["stride"], case["point_offset"]
    assert_close_relative(
        decode_box_map(case["bbox_pred"], stride, offset), case["decoded_bbox_preds"]
    )
    assert_close_relative(
        edge_sampling_offsets(case["bbox_pred"], case["reg_offset"], stride),
        case["deform_offsets"],
    )
    assert_close_relative(
        sample_bilinear_per_channel(case["decoded_bbox_preds"], case["deform_offsets"]),
        case["sampled_bboxes"],
    )


def deformable_reference(values, sampling_offsets):
    """torchvision's 1x1 deformable conv with one group per channel: the official sampler."""
    k = values.shape[1]
    weight = values.new_ones(k, 1, 1, 1)
    return deform_conv2d(values, sampling_offsets, weight)


@pytest.mark.parametrize("height,width", [(1, 1), (1, 6), (5, 1), (4, 7)])
def test_sampling_matches_deformable_conv_on_thin_maps(height, width):
    generator = torch.Generator().manual_seed(height * 10 + width)
    values = torch.randn(2, 4, height, width, generator=generator, dtype=torch.float64)
    sampling_offsets = 2.0 * torch.randn(
        2, 8, height, width, generator=generator, dtype=torch.float64
    )
    # Positions exactly on the border, where the sample fades to zero.
    sampling_offsets[0, 0, 0, 0] = -1.0
    sampling_offsets[0, 1, 0, 0] = -0.5
    sampling_offsets[0, 2, 0, 0] = float(height)
    sampling_offsets[1, 3, 0, 0] = float(width) - 1.0
    expected = deformable_reference(values, sampling_offsets)
    actual = sample_bilinear_per_channel(values, sampling_offsets)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_sample_outside_the_map_reads_zero():
    values = torch.full((1, 4, 3, 3), 7.0, dtype=torch.float64)
    far_away = torch.full((1, 8, 3, 3), 10.0, dtype=torch.float64)
    assert sample_bilinear_per_channel(values, far_away).abs().max() == 0
    # Half a cell beyond the last row: half of the value remains.
    half_out = torch.zeros(1, 8, 3, 3, dtype=torch.float64)
    half_out[:, 0::2] = 0.5
    sampled = sample_bilinear_per_channel(values, half_out)
    assert torch.equal(sampled[0, :, 2], torch.full((4, 3), 3.5, dtype=torch.float64))
    assert torch.equal(sampled[0, :, :2], torch.full((4, 2, 3), 7.0, dtype=torch.float64))


def test_zero_offsets_read_each_coordinate_at_its_edge():
    # Every cell predicts distances d = 2 cells. With zero learned offsets, the left coordinate
    # of the centre cell is read from the cell 2 to the left, whose own box starts d further
    # left: every refined distance of the centre cell is 2d.
    stride = 8
    box_dists = torch.full((1, 4, 5, 5), 2.0 * stride, dtype=torch.float64)
    refined = refine_box_distances(box_dists, torch.zeros(1, 8, 5, 5, dtype=torch.float64), stride)
    assert torch.equal(refined[0, :, 2, 2], torch.full((4,), 4.0 * stride, dtype=torch.float64))
    assert refined.min() >= 0


def test_gradients_reach_distances_and_offsets():
    generator = torch.Generator().manual_seed(0)
    stride = 16
    box_dists = (torch.rand(1, 4, 3, 4, generator=generator, dtype=torch.float64) * 3 + 0.3)
    box_dists = (box_dists * stride).requires_grad_()
    # Offsets away from integers so that the bilinear weights are differentiable everywhere.
    offsets = (torch.rand(1, 8, 3, 4, generator=generator, dtype=torch.float64) - 0.5) * 0.6
    offsets = (offsets + 0.137).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda d, o: refine_box_distances(d, o, stride), (box_dists, offsets), eps=1e-6, atol=1e-6
    )
    refine_box_distances(box_dists, offsets, stride).sum().backward()
    assert box_dists.grad.abs().sum() > 0
    assert offsets.grad.abs().sum() > 0


def test_half_precision_input_is_refined_in_float32():
    box_dists = torch.full((1, 4, 2, 3), 8.0, dtype=torch.bfloat16)
    offsets = torch.zeros(1, 8, 2, 3, dtype=torch.bfloat16)
    assert refine_box_distances(box_dists, offsets, 8).dtype == torch.float32
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        refined = refine_box_distances(box_dists.float(), offsets.float(), 8)
    assert refined.dtype == torch.float32


@pytest.mark.parametrize(
    "dists_shape,offsets_shape,match",
    [((1, 3, 2, 2), (1, 8, 2, 2), r"box_dists must have shape \(N, 4, H, W\)"),
     ((1, 4, 2, 2), (1, 8, 2, 3), r"offsets must have shape \(N, 8, H, W\)")],
)
def test_bad_shapes_raise_clear_errors(dists_shape, offsets_shape, match):
    with pytest.raises(ValueError, match=match):
        refine_box_distances(torch.zeros(dists_shape), torch.zeros(offsets_shape), 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@golden
@pytest.mark.parametrize("path", REFINE_CASES, ids=lambda p: p.stem)
def test_refined_distances_float64_cuda(path):
    case = load_case(path)
    refined = refine_box_distances(
        case["bbox_pred"].cuda(), case["reg_offset"].cuda(), case["stride"], case["point_offset"]
    )
    assert_close_relative(refined.cpu(), case["outputs"]["refined_bbox_pred"])
