"""``autoassign_loss`` reproduces MMDetection 2.25's AutoAssignHead golden cases (float64, 1e-9 relative)."""
import pytest
import torch

from dw_d2 import autoassign_loss

RTOL = 1e-9
LOSSES = ("loss_pos", "loss_neg", "loss_center")
# Our name of an intermediate -> the golden per-image key.
INTERMEDIATES = {
    "candidates": "inside_gt_bbox_mask",
    "center_prior": "center_prior_weights",
    "ious": "ious",
    "pos_weight": "p_pos_weight",
    "neg_weight": "p_neg_weight",
}
# Golden gradient key -> golden input key.
INPUTS = {
    "cls_logits": "cls_logits",
    "bbox_preds": "bbox_preds",
    "objectness_logits": "objectness_logits",
    "prior_mean": "center_prior_mean",
    "prior_sigma": "center_prior_sigma",
}


def assert_matches(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.dtype == torch.bool:
        assert torch.equal(actual, expected), f"{what}: masks differ"
        return
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual.detach(), expected, rtol=RTOL, atol=0, msg=lambda m: f"{what}: {m}")


def run(case, inputs=None, **hyper):
    inputs = inputs or {name: case[key] for name, key in INPUTS.items()}
    hyper = {"force_topk": case["force_topk"], "topk": case["topk"], "giou_weight": case["loss_bbox_weight"],
             "pos_loss_weight": case["pos_loss_weight"], "neg_loss_weight": case["neg_loss_weight"],
             "center_loss_weight": case["center_loss_weight"], **hyper}
    return autoassign_loss(case["points"], case["point_strides"], inputs["cls_logits"], inputs["bbox_preds"],
                           inputs["objectness_logits"], case["gt_bboxes"], case["gt_labels"],
                           inputs["prior_mean"], inputs["prior_sigma"], **hyper)


def test_golden_hyper_parameters_are_the_defaults(golden_autoassign_loss_case):
    case = golden_autoassign_loss_case
    losses = autoassign_loss(case["points"], case["point_strides"], case["cls_logits"], case["bbox_preds"],
                             case["objectness_logits"], case["gt_bboxes"], case["gt_labels"],
                             case["center_prior_mean"], case["center_prior_sigma"])
    for name in LOSSES:
        assert_matches(losses[name], case["outputs"][name], name)


def test_losses_match_official(golden_autoassign_loss_case):
    case = golden_autoassign_loss_case
    losses = run(case)
    assert set(losses) == set(LOSSES)
    for name in LOSSES:
        assert_matches(losses[name], case["outputs"][name], name)


def test_per_image_weights_match(golden_autoassign_loss_case):
    case = golden_autoassign_loss_case
    _, weights = run(case, return_weights=True)
    assert len(weights) == len(case["per_image"])
    for i, (mine, golden) in enumerate(zip(weights, case["per_image"])):
        assert set(mine) == set(INTERMEDIATES)
        for ours, theirs in INTERMEDIATES.items():
            assert not mine[ours].requires_grad
            assert_matches(mine[ours], golden[theirs], f"image {i} {ours}")


def test_gradients_match(golden_autoassign_loss_case):
    case = golden_autoassign_loss_case
    if "grads" not in case:
        pytest.skip(f"{case['name']} stores no gradients")
    inputs = {name: case[key].clone().requires_grad_() for name, key in INPUTS.items()}
    losses = run(case, inputs)
    for loss_name in LOSSES:
        grads = torch.autograd.grad(losses[loss_name], list(inputs.values()), retain_graph=True,
                                    allow_unused=True)
        for input_name, grad in zip(inputs, grads):
            expected = case["grads"][loss_name][input_name]
            grad = torch.zeros_like(expected) if grad is None else grad
            assert_matches(grad, expected, f"d {loss_name} / d {input_name}")
