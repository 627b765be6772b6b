"""Hypothesis fuzzing of the DW and AutoAssign weighting functions on awkward batches.

Each example is a float64 batch of 1-2 images up to 160 px (feature maps of strides 8..128
with ceil sizes), 1-6 classes, 0-6 GT boxes per image drawn to hit the edge cases (boxes
smaller than a stride, on the point grid, crossing the image border, containing no point,
duplicated, same-class overlaps), logits up to saturation (sigmoid exactly 0 or 1) and
distances up to 0 or exactly the GT box. For both schemes and both duplicate rules:

* losses and gradients are finite;
* the candidates are exactly the points strictly inside each box (with AutoAssign's
  ``force_topk``, plus the top-k points of the boxes that have none);
* w+ and the centre prior are 0 off each box's candidates, w+ >= 0, the prior in [0, 1];
* w- lies in [0, 1] and is 1 wherever (point, class) is no candidate pair of a box;
* losses and weights do not depend on the order of the GT boxes: always with
  ``duplicate_rule="min"``; with ``"last_gt"`` for the images where no point is a candidate
  of two boxes of the same class (elsewhere that rule depends on the order by design).

The examples are derandomised, so every run (and CI) tests the same batches.
"""
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.helpers import AA_INPUTS, DW_INPUTS, make_points, run_aa, run_dw, with_leaves

MAX_IMAGE_SIZE = 160
MAX_GT_PER_IMAGE = 6
MAX_CLASSES = 6
LOGIT_MODES = ("normal", "saturated", "extreme", "all_high")
DISTANCE_MODES = ("random", "zero", "half_zero", "exact")
BOX_KINDS = ("free", "on_grid", "tiny", "border", "whole_image")
REPEAT_KINDS = ("duplicate", "same_class_overlap")
# The same sums of non-negative terms in another order.
PERMUTATION_RTOL = 1e-9

FUZZ_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors are tiny: handing them to a second thread costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------
def floats(low, high):
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


@st.composite
def box_and_class(draw, height, width, num_classes, previous):
    """One GT box (x1, y1, x2, y2) with x2 > x1, y2 > y1, and its class."""
    kinds = BOX_KINDS + (REPEAT_KINDS if previous else ())
    kind = draw(st.sampled_from(kinds))
    label = draw(st.integers(0, num_classes - 1))
    if kind == "free":
        x1, y1 = draw(floats(-width / 4, width)), draw(floats(-height / 4, height))
        box = [x1, y1, x1 + draw(floats(0.5, width)), y1 + draw(floats(0.5, height))]
    elif kind == "on_grid":
        # Multiples of 4 px: the edges pass through points of both point layouts.
        x1, y1 = draw(st.integers(-2, width // 4)), draw(st.integers(-2, height // 4))
        box = [4 * x1, 4 * y1, 4 * (x1 + draw(st.integers(1, 12))),
               4 * (y1 + draw(st.integers(1, 12)))]
    elif kind == "tiny":
        x, y = draw(floats(0, width)), draw(floats(0, height))
        w, h = draw(floats(0.01, 8)), draw(floats(0.01, 8))
        box = [x - w / 2, y - h / 2, x + w / 2, y + h / 2]
    elif kind == "border":
        overhang = draw(floats(0, 40))
        x1, y1 = draw(floats(-overhang, width)), draw(floats(-overhang, height))
        box = [x1, y1, max(x1 + 1, width + overhang), max(y1 + 1, height + overhang)]
    elif kind == "whole_image":
        box = [0, 0, width, height]
    else:
        index = draw(st.integers(0, len(previous) - 1))
        box, previous_label = previous[index]
        if kind == "same_class_overlap":
            label = previous_label
            w, h = box[2] - box[0], box[3] - box[1]
            dx, dy = draw(floats(-w / 2, w / 2)), draw(floats(-h / 2, h / 2))
            box = [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]
    return [float(v) for v in box], label


@st.composite
def image_ground_truth(draw, height, width, num_classes):
    """(M, 4) float64 boxes and (M,) int64 classes, M in [0, MAX_GT_PER_IMAGE]."""
    boxes = []
    for _ in range(draw(st.integers(0, MAX_GT_PER_IMAGE))):
        boxes.append(draw(box_and_class(height, width, num_classes, boxes)))
    return (torch.tensor([b for b, _ in boxes], dtype=torch.float64).reshape(-1, 4),
            torch.tensor([c for _, c in boxes], dtype=torch.int64))


def random_logits(shape, mode, generator):
    normal = 3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    half = torch.rand(shape, generator=generator, dtype=torch.float64) < 0.5
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0).double()
    if mode == "saturated":  # |logit| >= 30: sigmoid within 1e-13 of 0 or 1
        magnitude = 30 + 30 * torch.rand(shape, generator=generator, dtype=torch.float64)
        return torch.where(half, sign * magnitude, normal)
    if mode == "extreme":  # sigmoid exactly 0 or 1 in float64
        return torch.where(half, sign * 800, normal)
    if mode == "all_high":
        return torch.full(shape, 40.0, dtype=torch.float64)
    return normal


def random_distances(points, strides, gt_boxes, mode, generator):
    """(N, R, 4) distances >= 0; "exact" gives half of the points exactly the distances to one
    GT box of their image (IoU 1 where the point is inside it)."""
    shape = (len(gt_boxes), points.shape[0], 4)
    distances = torch.rand(shape, generator=generator, dtype=torch.float64) * 4 * strides[:, None]
    if mode == "zero":
        return torch.zeros(shape, dtype=torch.float64)
    if mode == "half_zero":
        return distances * (torch.rand(shape[:2] + (1,), generator=generator) < 0.5)
    if mode == "exact":
        x, y = points[:, 0], points[:, 1]
        for image, boxes in enumerate(gt_boxes):
            if len(boxes) == 0:
                continue
            box = boxes[torch.randint(len(boxes), (1,), generator=generator).item()]
            exact = torch.stack((x - box[0], y - box[1], box[2] - x, box[3] - y), 1).clamp(min=0)
            chosen = torch.rand(points.shape[0], generator=generator) < 0.5
            distances[image, chosen] = exact[chosen]
    return distances


@st.composite
def fuzz_batches(draw):
    """A batch in the layout of ``tests.helpers.make_batch``, plus a GT
    permutation per image."""
    height, width = draw(st.integers(8, MAX_IMAGE_SIZE)), draw(st.integers(8, MAX_IMAGE_SIZE))
    num_classes = draw(st.integers(1, MAX_CLASSES))
    points, strides = make_points(height, width, draw(st.sampled_from((0.0, 0.5))))
    ground_truth = [draw(image_ground_truth(height, width, num_classes))
                    for _ in range(draw(st.integers(1, 2)))]
    gt_boxes = [boxes for boxes, _ in ground_truth]
    permutations = [torch.tensor(draw(st.permutations(range(len(boxes)))), dtype=torch.int64)
                    for boxes in gt_boxes]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))
    num_images, num_points = len(gt_boxes), points.shape[0]
    batch = {
        "points": points,
        "strides": strides,
        "cls_logits": random_logits((num_images, num_points, num_classes),
                                    draw(st.sampled_from(LOGIT_MODES)), generator),
        "score_logits": random_logits((num_images, num_points, 1),
                                      draw(st.sampled_from(LOGIT_MODES)), generator),
        "box_dists": random_distances(points, strides, gt_boxes,
                                      draw(st.sampled_from(DISTANCE_MODES)), generator),
        "gt_boxes": gt_boxes,
        "gt_classes": [classes for _, classes in ground_truth],
        "prior_mean": 0.5 * torch.randn(num_classes, 2, generator=generator, dtype=torch.float64),
        "prior_sigma": 0.2 + 1.8 * torch.rand(num_classes, 2, generator=generator,
                                              dtype=torch.float64),
    }
    return batch, permutations


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def strictly_inside(points, boxes):
    """(R, M): point r strictly inside box m."""
    x, y = points[:, 0:1], points[:, 1:2]
    return (x > boxes[:, 0]) & (y > boxes[:, 1]) & (x < boxes[:, 2]) & (y < boxes[:, 3])


def candidate_class_map(candidates, classes, num_classes):
    """(R, C): (r, c) is a candidate pair of some box of class c."""
    one_hot = torch.nn.functional.one_hot(classes, num_classes).double()
    return candidates.double() @ one_hot > 0


def shares_same_class_candidates(candidates, classes):
    """Whether some point is a candidate of two boxes of the same class."""
    shared = (candidates.double().T @ candidates.double()) > 0  # (M, M)
    same_class = classes[:, None] == classes[None, :]
    return bool((shared & same_class).fill_diagonal_(False).any())


def check_losses_and_gradients(losses, leaves, inputs):
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, value)
    total = sum(losses.values())
    if total.requires_grad:
        grads = torch.autograd.grad(total, [leaves[name] for name in inputs], allow_unused=True)
        for name, grad in zip(inputs, grads):
            assert grad is None or torch.isfinite(grad).all(), f"non-finite d/d{name}"


def check_weights(weights, batch, hyper):
    num_classes = batch["cls_logits"].shape[-1]
    num_points = batch["points"].shape[0]
    for image, (w, boxes, classes) in enumerate(zip(weights, batch["gt_boxes"],
                                                    batch["gt_classes"])):
        candidates = w["candidates"]
        inside = strictly_inside(batch["points"], boxes)
        if hyper.get("force_topk"):
            empty = ~inside.any(dim=0)
            assert torch.equal(candidates[:, ~empty], inside[:, ~empty]), image
            expected = min(hyper.get("topk", 9), num_points)
            assert (candidates[:, empty].sum(dim=0) == expected).all(), image
        else:
            assert torch.equal(candidates, inside), f"image {image}: candidates"
        off = ~candidates
        assert torch.isfinite(w["pos_weight"]).all() and (w["pos_weight"] >= 0).all(), image
        assert (w["pos_weight"][off] == 0).all(), f"image {image}: w+ off the candidates"
        prior = w["center_prior"]
        assert ((prior >= 0) & (prior <= 1)).all() and (prior[off] == 0).all(), image
        neg = w["neg_weight"]
        assert neg.shape == (num_points, num_classes)
        assert ((neg >= 0) & (neg <= 1)).all(), f"image {image}: w- outside [0, 1]"
        weighted = candidate_class_map(candidates, classes, num_classes)
        assert (neg[~weighted] == 1).all(), f"image {image}: w- != 1 off the candidate pairs"


def permute_ground_truth(batch, permutations):
    return dict(batch, gt_boxes=[b[p] for b, p in zip(batch["gt_boxes"], permutations)],
                gt_classes=[c[p] for c, p in zip(batch["gt_classes"], permutations)])


def check_order_independence(loss_fn, batch, losses, weights, permutations, hyper):
    permuted_losses, permuted_weights = loss_fn(permute_ground_truth(batch, permutations),
                                                return_weights=True, **hyper)
    for name, value in losses.items():
        torch.testing.assert_close(permuted_losses[name], value.detach(), rtol=PERMUTATION_RTOL,
                                   atol=0, msg=lambda m: f"{name} changes with the GT order: {m}")
    for image, (w, permuted, order) in enumerate(zip(weights, permuted_weights, permutations)):
        assert torch.equal(permuted["candidates"], w["candidates"][:, order]), image
        assert torch.equal(permuted["neg_weight"], w["neg_weight"]), f"image {image}: w-"
        torch.testing.assert_close(permuted["pos_weight"], w["pos_weight"][:, order],
                                   rtol=PERMUTATION_RTOL, atol=0, msg=f"image {image}: w+")


def record_coverage(batch):
    """Hypothesis events (``--hypothesis-show-statistics``): which edge cases were drawn."""
    inside = [strictly_inside(batch["points"], boxes) for boxes in batch["gt_boxes"]]
    num_boxes = sum(len(boxes) for boxes in batch["gt_boxes"])
    event(f"GT boxes in the batch: {num_boxes if num_boxes < 3 else '3 or more'}")
    if any((~m.any(dim=0)).any() for m in inside):
        event("a GT box without points")
    if any(shares_same_class_candidates(m, c) for m, c in zip(inside, batch["gt_classes"])):
        event("a point inside two GT boxes of one class")
    scores = batch["cls_logits"].sigmoid() * batch["score_logits"].sigmoid()
    if ((scores == 0) | (scores == 1)).any():
        event("joint scores of exactly 0 or 1")
    if (batch["box_dists"] == 0).all(dim=-1).any():
        event("zero distances")


def check_batch(loss_fn, inputs, case, hyper):
    """Every property of the module docstring, under both duplicate rules."""
    batch, permutations = case
    record_coverage(batch)
    for rule in ("last_gt", "min"):
        leaves = with_leaves(batch, inputs)
        losses, weights = loss_fn(leaves, duplicate_rule=rule, return_weights=True, **hyper)
        check_losses_and_gradients(losses, leaves, inputs)
        check_weights(weights, batch, hyper)
        orders = permutations
        if rule == "last_gt":
            # Images where the order matters under "last_gt" keep theirs.
            orders = [
                torch.arange(len(order)) if shares_same_class_candidates(w["candidates"], c)
                else order for order, w, c in zip(permutations, weights, batch["gt_classes"])]
        check_order_independence(loss_fn, batch, losses, weights, orders,
                                 dict(hyper, duplicate_rule=rule))


# --------------------------------------------------------------------------------------------
# The fuzz tests
# --------------------------------------------------------------------------------------------
@FUZZ_SETTINGS
@given(case=fuzz_batches())
def test_dw_weighting_on_fuzzed_batches(case):
    check_batch(run_dw, DW_INPUTS, case, {})


@FUZZ_SETTINGS
@given(case=fuzz_batches(), force_topk=st.booleans(), topk=st.integers(1, 12))
def test_autoassign_weighting_on_fuzzed_batches(case, force_topk, topk):
    check_batch(run_aa, AA_INPUTS, case, {"force_topk": force_topk, "topk": topk})
