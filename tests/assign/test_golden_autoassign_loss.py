"""``autoassign_loss`` reproduces MMDetection 2.25's AutoAssignHead golden cases (float64,
1e-9 relative)."""
import pytest

from dw_d2 import autoassign_loss

LOSSES = ("loss_pos", "loss_neg", "loss_center")
# Golden gradient key -> golden input key.
INPUTS = {
    "cls_logits": "cls_logits",
    "bbox_preds": "bbox_preds",
    "objectness_logits": "objectness_logits",
    "prior_mean": "center_prior_mean",
    "prior_sigma": "center_prior_sigma",
}


def run(case, inputs=None, **hyper):
    inputs = inputs or {name: case[key] for name, key in INPUTS.items()}
    return autoassign_loss(case["points"], case["point_strides"], inputs["cls_logits"],
                           inputs["bbox_preds"], inputs["objectness_logits"], case["gt_bboxes"],
                           case["gt_labels"], inputs["prior_mean"], inputs["prior_sigma"], **hyper)


def case_hyper_parameters(case):
    return {"force_topk": case["force_topk"], "topk": case["topk"],
            "giou_weight": case["loss_bbox_weight"], "pos_loss_weight": case["pos_loss_weight"],
            "neg_loss_weight": case["neg_loss_weight"],
            "center_loss_weight": case["center_loss_weight"]}


def test_losses_match_official(golden_autoassign_loss_case, assert_golden_close):
    case = golden_autoassign_loss_case
    losses = run(case, **case_hyper_parameters(case))
    assert set(losses) == set(LOSSES)
    for name in LOSSES:
        assert_golden_close(losses[name], case["outputs"][name], name)


def test_defaults_are_the_reference_config(golden_autoassign_loss_case, assert_golden_close):
    case = golden_autoassign_loss_case
    if case["force_topk"]:
        pytest.skip("this case turns force_topk on")
    losses = run(case)
    for name in LOSSES:
        assert_golden_close(losses[name], case["outputs"][name], name)


def test_per_image_weights_match(golden_autoassign_loss_case, assert_golden_weights):
    case = golden_autoassign_loss_case
    _, weights = run(case, return_weights=True, **case_hyper_parameters(case))
    assert_golden_weights(weights, case["per_image"])


def test_gradients_match(golden_autoassign_loss_case, assert_golden_gradients):
    case = golden_autoassign_loss_case
    if "grads" not in case:
        pytest.skip(f"{case['name']} stores no gradients")
    inputs = {name: case[key].clone().requires_grad_() for name, key in INPUTS.items()}
    losses = run(case, inputs, **case_hyper_parameters(case))
    assert set(case["grads"]) == set(LOSSES)
    assert_golden_gradients(losses, inputs, case["grads"])
