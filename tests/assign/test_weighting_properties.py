"""Properties of the DW and AutoAssign weighting losses beyond the golden cases."""
import pytest
import torch

from tests.helpers import AA_INPUTS, DW_INPUTS, make_batch, run_aa, run_dw, with_leaves

DW_LOSSES = ("loss_cls_pos", "loss_loc", "loss_cls_neg")
AA_LOSSES = ("loss_pos", "loss_neg", "loss_center")


def image_batch(batch, index):
    """The batch cut down to its image ``index``."""
    dense = {k: batch[k][index:index + 1] for k in ("cls_logits", "box_dists", "score_logits")}
    return dict(batch, **dense, gt_boxes=batch["gt_boxes"][index:index + 1],
                gt_classes=batch["gt_classes"][index:index + 1])


def grad_norms(loss, batch, names):
    """|d loss / d input| summed, per input (0 where the input is not on the loss's graph)."""
    if not loss.requires_grad:
        return {name: 0.0 for name in names}
    grads = torch.autograd.grad(loss, [batch[n] for n in names], retain_graph=True,
                                allow_unused=True)
    return {name: 0.0 if g is None else g.abs().sum().item() for name, g in zip(names, grads)}


# --------------------------------------------------------------------------------------------
# Gradient paths
# --------------------------------------------------------------------------------------------
BOTH_SCHEMES = [(run_dw, DW_INPUTS), (run_aa, AA_INPUTS)]


def test_dw_gradient_paths():
    batch = with_leaves(make_batch(), DW_INPUTS)
    losses = run_dw(batch)
    norms = {name: grad_norms(losses[name], batch, DW_INPUTS) for name in DW_LOSSES}
    # w+ and w- are detached, the IoU has no gradient: the boxes learn only from loss_loc.
    assert norms["loss_cls_pos"]["box_dists"] == 0
    assert norms["loss_cls_pos"]["cls_logits"] > 0 and norms["loss_cls_pos"]["score_logits"] > 0
    assert norms["loss_loc"]["box_dists"] > 0
    assert norms["loss_loc"]["cls_logits"] == 0 and norms["loss_loc"]["score_logits"] == 0
    assert norms["loss_cls_neg"]["box_dists"] == 0
    assert norms["loss_cls_neg"]["cls_logits"] > 0 and norms["loss_cls_neg"]["score_logits"] > 0


def test_autoassign_gradient_paths():
    batch = with_leaves(make_batch(offset=0.0), AA_INPUTS)
    losses = run_aa(batch)
    norms = {name: grad_norms(losses[name], batch, AA_INPUTS) for name in AA_LOSSES}
    # w+ is not detached: the positive loss reaches every input, the prior included.
    assert all(value > 0 for value in norms["loss_pos"].values()), norms["loss_pos"]
    assert norms["loss_neg"]["cls_logits"] > 0 and norms["loss_neg"]["score_logits"] > 0
    for name in ("box_dists", "prior_mean", "prior_sigma"):
        assert norms["loss_neg"][name] == 0, name
    assert norms["loss_center"]["prior_mean"] > 0 and norms["loss_center"]["prior_sigma"] > 0
    for name in ("cls_logits", "box_dists", "score_logits"):
        assert norms["loss_center"][name] == 0, name


# --------------------------------------------------------------------------------------------
# Duplicate rule
# --------------------------------------------------------------------------------------------
def duplicate_batch():
    """Image 0 holds two overlapping GT boxes of class 1 (many same-class duplicate points)."""
    batch = make_batch(seed=3, gt_per_image=(3, 2))
    batch["gt_boxes"][0] = torch.tensor([[4.0, 4.0, 60.0, 50.0], [20.0, 10.0, 90.0, 60.0],
                                         [30.0, 5.0, 70.0, 40.0]], dtype=torch.float64)
    batch["gt_classes"][0] = torch.tensor([1, 1, 2])
    return batch


@pytest.mark.parametrize("loss_fn", [run_dw, run_aa], ids=["dw", "autoassign"])
def test_min_rule_is_invariant_to_gt_order(loss_fn):
    batch = duplicate_batch()
    losses, weights = loss_fn(batch, duplicate_rule="min", return_weights=True)
    order = torch.tensor([2, 0, 1])
    permuted = dict(batch, gt_boxes=[batch["gt_boxes"][0][order], batch["gt_boxes"][1]],
                    gt_classes=[batch["gt_classes"][0][order], batch["gt_classes"][1]])
    permuted_losses, permuted_weights = loss_fn(permuted, duplicate_rule="min", return_weights=True)
    for name in losses:
        torch.testing.assert_close(permuted_losses[name], losses[name], rtol=1e-12, atol=0)
    assert torch.equal(permuted_weights[0]["neg_weight"], weights[0]["neg_weight"])
    torch.testing.assert_close(permuted_weights[0]["pos_weight"],
                               weights[0]["pos_weight"][:, order])


@pytest.mark.parametrize("loss_fn", [run_dw, run_aa], ids=["dw", "autoassign"])
def test_last_gt_rule_takes_the_highest_gt_index(loss_fn):
    batch = duplicate_batch()
    _, last = loss_fn(batch, return_weights=True)
    _, smallest = loss_fn(batch, duplicate_rule="min", return_weights=True)
    both = last[0]["candidates"][:, 0] & last[0]["candidates"][:, 1]
    assert both.sum() >= 3, "the test batch must contain same-class duplicates"
    # Reversing the two class-1 boxes makes the other box the last one.
    swapped = dict(batch, gt_boxes=[batch["gt_boxes"][0][[1, 0, 2]], batch["gt_boxes"][1]],
                   gt_classes=[batch["gt_classes"][0][[1, 0, 2]], batch["gt_classes"][1]])
    _, last_swapped = loss_fn(swapped, return_weights=True)
    last_w = last[0]["neg_weight"][both, 1]
    swapped_w = last_swapped[0]["neg_weight"][both, 1]
    min_w = smallest[0]["neg_weight"][both, 1]
    assert not torch.equal(last_w, swapped_w), "under last_gt the GT order must matter"
    torch.testing.assert_close(torch.minimum(last_w, swapped_w), min_w, rtol=0, atol=0)
    assert torch.equal(last[0]["neg_weight"][~both], smallest[0]["neg_weight"][~both])


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------
def cast(batch, dtype):
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else
                [b.to(dtype) for b in v] if k == "gt_boxes" else v) for k, v in batch.items()}


@pytest.mark.parametrize("loss_fn", [run_dw, run_aa], ids=["dw", "autoassign"])
def test_float32_is_close_to_float64(loss_fn):
    batch = make_batch(seed=1)
    reference = loss_fn(batch)
    single = loss_fn(cast(batch, torch.float32))
    for name, value in single.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), reference[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss_fn,inputs", BOTH_SCHEMES, ids=["dw", "autoassign"])
def test_bfloat16_autocast_on_cpu(loss_fn, inputs):
    batch = cast(make_batch(seed=2), torch.float32)
    reference = loss_fn(batch)
    leaves = with_leaves(batch, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # What a head under autocast hands over: bfloat16 outputs of its convolutions.
        identity = torch.eye(batch["cls_logits"].shape[-1])
        half = dict(leaves, cls_logits=leaves["cls_logits"] @ identity,
                    box_dists=leaves["box_dists"].bfloat16(),
                    score_logits=leaves["score_logits"].bfloat16())
        assert half["cls_logits"].dtype == torch.bfloat16
        losses = loss_fn(half)
    total = sum(losses.values())
    total.backward()
    for name, value in losses.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
        torch.testing.assert_close(value, reference[name], rtol=5e-2, atol=1e-3, msg=name)
    for name in inputs:
        assert leaves[name].grad is not None and torch.isfinite(leaves[name].grad).all(), name


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------
def test_dw_without_any_gt_box():
    batch = with_leaves(make_batch(gt_per_image=(0, 0)), DW_INPUTS)
    losses = run_dw(batch)
    assert losses["loss_cls_pos"].item() == 0 and losses["loss_loc"].item() == 0
    # As the official code: the localisation loss has no graph (mmdet's IoU of no boxes is a
    # fresh tensor); the positive one keeps it.
    assert not losses["loss_loc"].requires_grad and losses["loss_cls_pos"].requires_grad
    assert losses["loss_cls_neg"].item() > 0
    sum(losses.values()).backward()
    assert batch["box_dists"].grad is None
    assert torch.isfinite(batch["cls_logits"].grad).all()


def test_autoassign_without_any_gt_box():
    batch = with_leaves(make_batch(gt_per_image=(0, 0), offset=0.0), AA_INPUTS)
    losses = run_aa(batch)
    # As the official code: zero losses that keep a graph to the boxes and the prior.
    assert losses["loss_pos"].item() == 0 and losses["loss_center"].item() == 0
    assert losses["loss_pos"].requires_grad and losses["loss_center"].requires_grad
    assert losses["loss_neg"].item() > 0
    sum(losses.values()).backward()
    for name in ("box_dists", "prior_mean", "prior_sigma"):
        assert batch[name].grad is not None and batch[name].grad.abs().sum() == 0, name


def test_image_without_gt_box_only_adds_negatives():
    batch = make_batch(gt_per_image=(3, 0))
    both, single = run_dw(batch), run_dw(image_batch(batch, 0))
    torch.testing.assert_close(both["loss_cls_pos"], single["loss_cls_pos"], rtol=1e-12, atol=0)
    torch.testing.assert_close(both["loss_loc"], single["loss_loc"], rtol=1e-12, atol=0)
    assert both["loss_cls_neg"] > single["loss_cls_neg"]
    _, weights = run_dw(batch, return_weights=True)
    assert weights[1]["candidates"].shape == (batch["points"].shape[0], 0)
    assert torch.equal(weights[1]["neg_weight"], torch.ones_like(weights[1]["neg_weight"]))


def tiny_box_batch():
    """Image 0 gets an extra 2x2 box between points: it contains no point of any level."""
    batch = make_batch(offset=0.0)
    extra = torch.tensor([[9.0, 9.0, 11.0, 11.0]], dtype=torch.float64)
    with_tiny = dict(batch,
                     gt_boxes=[torch.cat((batch["gt_boxes"][0], extra)), batch["gt_boxes"][1]],
                     gt_classes=[torch.cat((batch["gt_classes"][0], torch.tensor([0]))),
                                 batch["gt_classes"][1]])
    return batch, with_tiny


def test_dw_gt_without_points_only_counts_in_the_normaliser():
    batch, with_tiny = tiny_box_batch()
    plain, tiny = run_dw(batch), run_dw(with_tiny)
    for name in ("loss_cls_pos", "loss_loc"):
        torch.testing.assert_close(tiny[name] * 6, plain[name] * 5, rtol=1e-12, atol=0, msg=name)
    torch.testing.assert_close(tiny["loss_cls_neg"], plain["loss_cls_neg"], rtol=1e-12, atol=0)


def test_autoassign_gt_without_points():
    batch, with_tiny = tiny_box_batch()
    plain, (tiny, weights) = run_aa(batch), run_aa(with_tiny, return_weights=True)
    assert not weights[0]["candidates"][:, 3].any()
    # Its positive probability is 0, so BCE hits the official -100 log clamp: 0.25 * 100 added.
    torch.testing.assert_close(tiny["loss_pos"] * 6, plain["loss_pos"] * 5 + 25, rtol=1e-12, atol=0)
    forced, forced_weights = run_aa(with_tiny, force_topk=True, topk=9, return_weights=True)
    assert forced_weights[0]["candidates"][:, 3].sum() == 9
    assert forced_weights[0]["center_prior"][:, 3].gt(0).sum() == 9
    assert forced["loss_pos"] < tiny["loss_pos"]
    assert all(torch.isfinite(v) for v in forced.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_fn,inputs", BOTH_SCHEMES, ids=["dw", "autoassign"])
def test_saturated_logits_and_exact_boxes_stay_finite(loss_fn, inputs, dtype):
    batch = make_batch(seed=4)
    coin = torch.rand(batch["cls_logits"].shape, generator=torch.Generator().manual_seed(0))
    batch["cls_logits"] = torch.where(coin < 0.5, -40.0, 40.0).double()
    batch["score_logits"] = torch.full_like(batch["score_logits"], 800.0)
    # Half of the predictions are exactly the first GT box of their image (IoU 1, p_loc 1).
    box = batch["gt_boxes"][0][0]
    x, y = batch["points"][:, 0], batch["points"][:, 1]
    exact = torch.stack((x - box[0], y - box[1], box[2] - x, box[3] - y), 1).clamp(min=0)
    batch["box_dists"][0, ::2] = exact[::2]
    leaves = with_leaves(cast(batch, dtype), inputs)
    losses = loss_fn(leaves)
    sum(losses.values()).backward()
    for name, value in losses.items():
        assert torch.isfinite(value), name
    for name in inputs:
        assert torch.isfinite(leaves[name].grad).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autoassign_perfect_predictions_keep_bce_input_in_range(dtype):
    # Scores of exactly 1 and boxes equal to the GT: sum_r p_pos w+ rounds to 1 + ulp in this
    # batch, which the official code hands to BCE (and fails its [0, 1] check).
    batch = make_batch(seed=2, offset=0.0)
    batch["cls_logits"] = torch.full_like(batch["cls_logits"], 40.0)
    batch["score_logits"] = torch.full_like(batch["score_logits"], 40.0)
    x, y = batch["points"][:, 0], batch["points"][:, 1]
    for image, boxes in enumerate(batch["gt_boxes"]):
        box = boxes[0]
        exact = torch.stack((x - box[0], y - box[1], box[2] - x, box[3] - y), 1)
        batch["box_dists"][image] = exact.clamp(min=0)
    losses = run_aa(cast(batch, dtype))
    assert all(torch.isfinite(value) for value in losses.values())


def test_autoassign_positive_weights_sum_to_one_per_gt():
    _, weights = run_aa(make_batch(offset=0.0), return_weights=True)
    for image in weights:
        has_candidates = image["candidates"].any(0)
        sums = image["pos_weight"].sum(0)
        torch.testing.assert_close(sums[has_candidates], torch.ones_like(sums[has_candidates]))
        assert (image["pos_weight"][~image["candidates"]] == 0).all()
        assert (image["center_prior"][~image["candidates"]] == 0).all()


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    (lambda b: dict(b, box_dists=b["box_dists"][:, :, :3]), "box_dists"),
    (lambda b: dict(b, points=b["points"][:-1]), "points"),
    (lambda b: dict(b, score_logits=b["score_logits"][..., 0]), "ctr_logits"),
    (lambda b: dict(b, gt_boxes=b["gt_boxes"][:1]), "one tensor per image"),
    (lambda b: dict(b, gt_classes=[b["gt_classes"][0][:1], b["gt_classes"][1]]), "gt_classes[0]"),
    (lambda b: dict(b, gt_classes=[b["gt_classes"][0] + 10, b["gt_classes"][1]]),
     "gt_classes must lie"),
    (lambda b: dict(b, gt_boxes=[b["gt_boxes"][0][:, :3], b["gt_boxes"][1]]), "gt_boxes[0]"),
])
def test_bad_input_is_named(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_dw(change(make_batch()))


def test_bad_duplicate_rule_and_prior_shape_are_named():
    with pytest.raises(ValueError, match="duplicate_rule"):
        run_dw(make_batch(), duplicate_rule="first")
    batch = make_batch()
    with pytest.raises(ValueError, match="prior_sigma"):
        run_aa(dict(batch, prior_sigma=batch["prior_sigma"][:2]))
