"""The per-GT-loop oracle (dw_d2.assign.reference) reproduces the official code's golden cases."""
import pytest
import torch

from dw_d2.assign import reference


def _leaves(case, score_key):
    return {key: case[key].clone().requires_grad_()
            for key in ("cls_logits", "bbox_preds", score_key)}


def _run_dw(case, inputs, **kwargs):
    return reference.reference_dual_weighting_loss(
        case["points"], case["point_strides"], inputs["cls_logits"], inputs["bbox_preds"],
        inputs["centerness_logits"], case["gt_bboxes"], case["gt_labels"],
        center_prior_sigma=float(case["center_prior_sigma"][0, 0]), **kwargs,
    )


def test_dw_reference_matches_golden_losses_and_intermediates(golden_dw_loss_case,
                                                              assert_golden_close):
    case = golden_dw_loss_case
    name = case["name"]
    inputs = _leaves(case, "centerness_logits")
    out = _run_dw(case, inputs, return_intermediates=True)
    for key in ("loss_cls_pos", "loss_loc", "loss_cls_neg"):
        assert_golden_close(out[key], case["outputs"][key], f"{name} {key}")
    for i, (mine, gold) in enumerate(zip(out["per_image"], case["per_image"])):
        for key, value in gold.items():
            assert_golden_close(mine[key], value, f"{name} image {i} {key}")

    fp64 = _run_dw(case, inputs, round_neg_normaliser_to_float32=False)
    assert_golden_close(fp64["loss_cls_neg"], case["outputs"]["loss_cls_neg_fp64_normaliser"],
                  f"{name} float64 negative normaliser")


def test_dw_reference_matches_golden_gradients(golden_dw_loss_case, assert_golden_gradients):
    case = golden_dw_loss_case
    if "grads" not in case:
        pytest.skip(f"{case['name']} stores no gradients")
    inputs = _leaves(case, "centerness_logits")
    # The golden gradients come from the run with the float64 negative normaliser.
    losses = _run_dw(case, inputs, round_neg_normaliser_to_float32=False)
    assert_golden_gradients(losses, inputs, case["grads"], f"{case['name']} ")


def _autoassign_leaves(case):
    inputs = _leaves(case, "objectness_logits")
    inputs["prior_mean"] = case["center_prior_mean"].clone().requires_grad_()
    inputs["prior_sigma"] = case["center_prior_sigma"].clone().requires_grad_()
    return inputs


def _run_autoassign(case, inputs, **kwargs):
    return reference.reference_autoassign_loss(
        case["points"], case["point_strides"], inputs["cls_logits"], inputs["bbox_preds"],
        inputs["objectness_logits"], case["gt_bboxes"], case["gt_labels"],
        inputs["prior_mean"], inputs["prior_sigma"],
        giou_weight=case["loss_bbox_weight"], force_topk=case["force_topk"], topk=case["topk"],
        pos_loss_weight=case["pos_loss_weight"], neg_loss_weight=case["neg_loss_weight"],
        center_loss_weight=case["center_loss_weight"], **kwargs,
    )


def test_autoassign_reference_matches_golden(golden_autoassign_loss_case, assert_golden_close,
                                             assert_golden_gradients):
    case = golden_autoassign_loss_case
    name = case["name"]
    out = _run_autoassign(case, _autoassign_leaves(case), return_intermediates=True)
    for key in ("loss_pos", "loss_neg", "loss_center"):
        assert_golden_close(out[key], case["outputs"][key], f"{name} {key}")
    for i, (mine, gold) in enumerate(zip(out["per_image"], case["per_image"])):
        for key, value in gold.items():
            assert_golden_close(mine[key], value, f"{name} image {i} {key}")
    inputs = _autoassign_leaves(case)
    assert_golden_gradients(_run_autoassign(case, inputs), inputs, case.get("grads", {}),
                            f"{name} ")


def _overlapping_same_class_boxes():
    """One 64x64 image, P3 only: two class-0 boxes that share points, and a class-1 box.

    Every point predicts roughly the first box: high IoU with it, below 0.5 with the second,
    so the two class-0 boxes give different negative weights at the points they share.
    """
    torch.manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    points = torch.stack(((xs.flatten() + 0.5) * 8, (ys.flatten() + 0.5) * 8), 1).double()
    strides = torch.full((64,), 8.0, dtype=torch.float64)
    boxes = torch.tensor([[2.0, 2.0, 40.0, 44.0], [20.0, 6.0, 62.0, 50.0],
                          [0.0, 30.0, 30.0, 63.0]], dtype=torch.float64)
    classes = torch.tensor([0, 0, 1])
    first = boxes[0]
    to_first = torch.stack((points[:, 0] - first[0], points[:, 1] - first[1],
                            first[2] - points[:, 0], first[3] - points[:, 1]), 1)
    box_dists = (to_first.clamp(min=1.0) + torch.rand(64, 4, dtype=torch.float64) * 3)[None]
    cls_logits = torch.randn(1, 64, 3, dtype=torch.float64)
    score_logits = torch.randn(1, 64, 1, dtype=torch.float64)
    return points, strides, cls_logits, box_dists, score_logits, boxes, classes


def _negative_weights(scheme, order, rule):
    points, strides, cls_logits, box_dists, score_logits, boxes, classes = \
        _overlapping_same_class_boxes()
    common = (points, strides, cls_logits, box_dists, score_logits, [boxes[order]],
              [classes[order]])
    if scheme == "dw":
        out = reference.reference_dual_weighting_loss(
            *common, duplicate_rule=rule, return_intermediates=True)
    else:
        prior = (torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64))
        out = reference.reference_autoassign_loss(
            *common, *prior, duplicate_rule=rule, return_intermediates=True)
    image = out["per_image"][0]
    inside = image["inside_gt_bbox_mask"][:, order.argsort()]  # back to the original GT order
    return image["p_neg_weight"][:, 0], inside[:, 0] & inside[:, 1]


@pytest.mark.parametrize("scheme", ["dw", "autoassign"])
def test_duplicate_rules(scheme):
    forward, backward = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 2])
    last_forward, shared = _negative_weights(scheme, forward, "last_gt")
    last_backward, _ = _negative_weights(scheme, backward, "last_gt")
    assert shared.sum() >= 4, "the fixture must put points inside both class-0 boxes"
    # "last_gt" keeps the later box's value, so the order of the GT boxes matters ...
    assert not torch.equal(last_forward[shared], last_backward[shared])
    assert torch.equal(last_forward[~shared], last_backward[~shared])
    # ... while "min" keeps the smaller of the two, whatever the order.
    smallest = torch.minimum(last_forward, last_backward)
    for order in (forward, backward):
        assert torch.equal(_negative_weights(scheme, order, "min")[0], smallest)


def test_bad_inputs_are_named():
    points, strides, cls_logits, box_dists, ctr_logits, boxes, classes = \
        _overlapping_same_class_boxes()
    with pytest.raises(ValueError, match="duplicate_rule='first'"):
        reference.reference_dual_weighting_loss(points, strides, cls_logits, box_dists,
                                                ctr_logits, [boxes], [classes],
                                                duplicate_rule="first")
    with pytest.raises(ValueError, match="box_dists"):
        reference.reference_dual_weighting_loss(points, strides, cls_logits, box_dists[:, :10],
                                                ctr_logits, [boxes], [classes])
    with pytest.raises(ValueError, match="gt_boxes"):
        reference.reference_dual_weighting_loss(points, strides, cls_logits, box_dists,
                                                ctr_logits, [], [])
