"""``dual_weighting_loss`` reproduces the official DWHead's golden cases (float64, 1e-9 rel.)."""
import pytest

from dw_d2 import dual_weighting_loss

LOSSES = ("loss_cls_pos", "loss_loc", "loss_cls_neg")
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


def test_per_image_weights_match(golden_dw_loss_case, assert_golden_weights):
    case = golden_dw_loss_case
    _, weights = run(case, return_weights=True)
    assert_golden_weights(weights, case["per_image"])


def test_gradients_match(golden_dw_loss_case, assert_golden_gradients):
    case = golden_dw_loss_case
    if "grads" not in case:
        pytest.skip(f"{case['name']} stores no gradients")
    inputs = {name: case[name].clone().requires_grad_() for name in INPUTS}
    # The golden gradients come from the official code run with its float32 rounding of the
    # negative normaliser neutralised (it only scales loss_cls_neg's gradient).
    losses = run(case, inputs, round_neg_normaliser_to_float32=False)
    assert set(case["grads"]) == set(LOSSES)
    assert_golden_gradients(losses, inputs, case["grads"])
