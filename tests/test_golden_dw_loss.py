"""``dual_weighting_loss`` reproduces the official DWHead's golden cases (float64, 1e-9 rel.)."""
import pytest
import torch

from dw_d2 import dual_weighting_loss

LOSSES = ("loss_cls_pos", "loss_loc", "loss_cls_neg")
# Our name of an intermediate -> the golden per-image key.
INTERMEDIATES = {
    "candidates": "inside_gt_bbox_mask",
    "center_prior": "center_prior_weights",
    "ious": "ious",
    "pos_weight": "p_pos_weight",
    "neg_weight": "p_neg_weight",
}
INPUTS = ("cls_logits", "bbox_preds", "centerness_logits")


def run(case, inputs=None, **hyper):
    inputs = inputs or {name: case[name] for name in INPUTS}
    return dual_weighting_loss(case["points"], case["point_strides"], inputs["cls_logits"],
                               inputs["bbox_preds"], inputs["centerness_logits"],
                               case["gt_bboxes"], case["gt_labels"], **hyper)


def test_losses_match_official_as_written(golden_dw_loss_case, assert_golden_close):
    case = golden_dw_loss_case
    losses = run(case)
    assert set(losses) == set(LOSSES)
    for name in LOSSES:
        assert_golden_close(losses[name], case["outputs"][name], name)


def test_float64_normaliser_matches_neutralised_cast(golden_dw_loss_case, assert_golden_close):
    case = golden_dw_loss_case
    losses = run(case, round_neg_normaliser_to_float32=False)
    assert_golden_close(losses["loss_cls_neg"], case["outputs"]["loss_cls_neg_fp64_normaliser"],
                        "loss_cls_neg")
    assert_golden_close(losses["loss_cls_pos"], case["outputs"]["loss_cls_pos"], "loss_cls_pos")


def test_per_image_weights_match(golden_dw_loss_case, assert_golden_close):
    case = golden_dw_loss_case
    _, weights = run(case, return_weights=True)
    assert len(weights) == len(case["per_image"])
    for i, (mine, golden) in enumerate(zip(weights, case["per_image"])):
        assert set(mine) == set(INTERMEDIATES)
        for ours, theirs in INTERMEDIATES.items():
            assert not mine[ours].requires_grad
            assert_golden_close(mine[ours], golden[theirs], f"image {i} {ours}")


def test_gradients_match(golden_dw_loss_case, assert_golden_close):
    case = golden_dw_loss_case
    if "grads" not in case:
        pytest.skip(f"{case['name']} stores no gradients")
    inputs = {name: case[name].clone().requires_grad_() for name in INPUTS}
    # The golden gradients come from the run with the float64 negative normaliser (README D9).
    losses = run(case, inputs, round_neg_normaliser_to_float32=False)
    for loss_name in LOSSES:
        grads = torch.autograd.grad(losses[loss_name], list(inputs.values()), retain_graph=True,
                                    allow_unused=True)
        for input_name, grad in zip(inputs, grads):
            expected = case["grads"][loss_name][input_name]
            grad = torch.zeros_like(expected) if grad is None else grad
            assert_golden_close(grad, expected, f"d {loss_name} / d {input_name}")
