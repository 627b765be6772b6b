"""A 2-worker data-parallel step of the DW / AutoAssign losses against one process.

DDP averages the workers' parameter gradients (all_reduce SUM / world size), and the losses
average their normalisers over the workers as the official heads do (mmdet's ``reduce_mean``):
the number of GT boxes for the positive terms, DW's ``sum(1 - w-)`` and AutoAssign's summed
centre prior for the negative term. So a data-parallel step equals one process seeing the
whole batch, except where the official clamp at 1, applied *after* the mean over workers,
acts. With W workers and a batch normaliser n, the averaged gradient of a term is
``sum / max(n, W)`` against ``sum / max(n, 1)`` in one process: the two agree exactly when
n >= W (or when the term's sum is 0), and below that the data-parallel one is
``max(n, 1) / max(n, W)`` times the other.

AutoAssign's centre loss is a mean over the images of each worker; averaged over workers it
is the mean over the batch because Detectron2 gives every worker the same number of images.

"One process" here is the same loss function on the whole batch without
``torch.distributed``; the workers are forked processes in a gloo group.
"""
import pytest
import torch
import torch.distributed as dist

from tests.helpers import (AA_INPUTS, BUILTIN_ASSIGNERS, DW_INPUTS, image_input, make_batch,
                           run_aa, run_dw, run_on_gloo_workers, tiny_model, with_leaves)

WORLD_SIZE = 2
# Seconds to wait for a worker's result, and the gloo collective timeout: a failing worker
# fails the test instead of leaving the other one blocked in a collective.
WORKER_TIMEOUT_S = 60
# Float64 gradients of the same sums in a different order and division.
GRAD_RTOL = 1e-10

# Scheme -> (loss function, inputs that get gradients, loss hyper-parameters, point offset).
# DW's negative normaliser is rounded to float32 by default, per worker before the mean; the
# exact comparisons keep it in float64 (the rounding has its own test below).
SCHEMES = {
    "dw": (run_dw, DW_INPUTS, {"round_neg_normaliser_to_float32": False}, 0.5),
    "autoassign": (run_aa, AA_INPUTS, {}, 0.0),
    "dw_float32_normaliser": (run_dw, DW_INPUTS, {}, 0.5),
}
# Which batch normaliser divides each loss (None: the per-image mean of the centre loss).
LOSS_NORMALISER = {
    "loss_cls_pos": "num_gt", "loss_loc": "num_gt", "loss_cls_neg": "negative",
    "loss_pos": "num_gt", "loss_neg": "negative", "loss_center": None,
}
# GT boxes per image of the batch; worker k gets the k-th equal share of the images.
EQUAL_CASES = {
    "both_workers_with_gt": (3, 2),
    "worker1_without_gt": (3, 0),
    "images_of_different_gt_counts": (1, 4, 0, 2),
}
CLAMPED_CASES = {
    "one_gt_in_the_batch": (1, 0),  # mean GT count 0.5: clamped to 1 on each worker
    "no_gt_in_the_batch": (0, 0),  # negative normalisers 0: clamped to 1 on each worker
}


# --------------------------------------------------------------------------------------------
# Running a step on forked gloo workers
# --------------------------------------------------------------------------------------------
def run_on_workers(step, cases, init_file):
    """``step(case, rank)`` for every case on WORLD_SIZE forked gloo workers -> rank -> outputs."""
    return run_on_gloo_workers(
        lambda rank: {name: step(case, rank) for name, case in cases.items()},
        init_file, world_size=WORLD_SIZE, timeout_s=WORKER_TIMEOUT_S)


def averaged_over_workers(tensor):
    """What DDP applies to a gradient: all_reduce SUM / world size."""
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / dist.get_world_size()


def loss_gradients(loss, leaves):
    """d loss / d leaf for a dict of leaves, zeros where the loss does not reach a leaf."""
    names = list(leaves)
    if not loss.requires_grad:  # DW's loss_loc without GT boxes: a constant, as officially
        return {name: torch.zeros_like(leaves[name]) for name in names}
    grads = torch.autograd.grad(loss, [leaves[name] for name in names], retain_graph=True,
                                allow_unused=True)
    return {name: torch.zeros_like(leaves[name]) if grad is None else grad
            for name, grad in zip(names, grads)}


def step_outputs(losses, leaves):
    """Per loss: its value and its gradients with respect to the leaves."""
    return {name: {"value": loss.detach(), "grads": loss_gradients(loss, leaves)}
            for name, loss in losses.items()}


def averaged_step_outputs(losses, leaves):
    """``step_outputs`` averaged over the workers (values as Detectron2 logs them)."""
    return {name: {"value": averaged_over_workers(out["value"]),
                   "grads": {k: averaged_over_workers(g) for k, g in out["grads"].items()}}
            for name, out in step_outputs(losses, leaves).items()}


def worker_images(rank, num_images):
    share = num_images // WORLD_SIZE
    return slice(rank * share, (rank + 1) * share)


def assert_step_relation(two_workers, one_process, scales, what):
    """Every averaged loss and gradient is ``scales[loss]`` times the one-process one."""
    assert set(two_workers) == set(one_process), what
    for loss_name, scale in scales.items():
        actual, expected = two_workers[loss_name], one_process[loss_name]
        torch.testing.assert_close(actual["value"], expected["value"] * scale, rtol=GRAD_RTOL,
                                   atol=0, msg=lambda m: f"{what} {loss_name} value: {m}")
        for leaf, grad in expected["grads"].items():
            # Entries that cancel to ~0 carry the rounding of the largest ones.
            atol = GRAD_RTOL * grad.abs().max().item() * scale
            torch.testing.assert_close(actual["grads"][leaf], grad * scale, rtol=GRAD_RTOL,
                                       atol=atol,
                                       msg=lambda m: f"{what} d{loss_name}/d{leaf}: {m}")


def official_scale(normaliser):
    """Data-parallel / one-process ratio of a term divided by the batch normaliser n."""
    if normaliser is None:
        return 1.0
    return max(normaliser, 1.0) / max(normaliser, float(WORLD_SIZE))


# --------------------------------------------------------------------------------------------
# The weighting functions
# --------------------------------------------------------------------------------------------
def accurate_box_predictions(batch, seed):
    """The batch with predictions within +-15 % of the GT box at the box's candidates.

    Random predictions rarely reach IoU 0.5, which leaves DW's negative normaliser near 0;
    here it is well above the number of workers, so the equality cases test equality.
    """
    generator = torch.Generator().manual_seed(seed)
    x, y = batch["points"][:, 0], batch["points"][:, 1]
    box_dists = batch["box_dists"].clone()
    for image, boxes in enumerate(batch["gt_boxes"]):
        exact = torch.stack((x - boxes[:, 0:1], y - boxes[:, 1:2], boxes[:, 2:3] - x,
                             boxes[:, 3:4] - y), dim=-1)  # (M, R, 4)
        inside = exact.min(dim=-1).values > 0
        if not inside.any():
            continue
        # Each point takes the last box it lies in.
        owner = (inside * torch.arange(1, len(boxes) + 1)[:, None]).argmax(dim=0)
        jitter = 1 + 0.3 * (torch.rand(exact.shape[1:], generator=generator,
                                       dtype=torch.float64) - 0.5)
        chosen = exact[owner, torch.arange(exact.shape[1])] * jitter
        covered = inside.any(dim=0)
        box_dists[image][covered] = chosen[covered]
    return dict(batch, box_dists=box_dists)


def weighting_case(scheme, gt_per_image, seed=0):
    offset = SCHEMES[scheme][3]
    batch = make_batch(seed=seed, gt_per_image=gt_per_image, offset=offset)
    return {"scheme": scheme, "batch": accurate_box_predictions(batch, seed)}


def weighting_step(case, rank):
    """One worker's share of a data-parallel step: averaged losses and gradients."""
    loss_fn, inputs, hyper, _ = SCHEMES[case["scheme"]]
    leaves = with_leaves(case["batch"], inputs)
    images = worker_images(rank, len(leaves["gt_boxes"]))
    shard = dict(leaves, gt_boxes=leaves["gt_boxes"][images],
                 gt_classes=leaves["gt_classes"][images],
                 **{name: leaves[name][images] for name in ("cls_logits", "box_dists",
                                                            "score_logits")})
    losses = loss_fn(shard, **hyper)
    return averaged_step_outputs(losses, {name: leaves[name] for name in inputs})


def one_process_step(case):
    """The whole batch in this process: losses, gradients, the batch normalisers and the
    per-image weights."""
    loss_fn, inputs, hyper, _ = SCHEMES[case["scheme"]]
    leaves = with_leaves(case["batch"], inputs)
    losses, weights = loss_fn(leaves, return_weights=True, **hyper)
    if loss_fn is run_dw:
        negative = sum((1 - image["neg_weight"]).sum() for image in weights)
    else:
        negative = sum(image["center_prior"].sum() for image in weights)
    normalisers = {"num_gt": float(sum(len(b) for b in leaves["gt_boxes"])),
                   "negative": float(negative), None: None}
    return step_outputs(losses, {name: leaves[name] for name in inputs}), normalisers, weights


WEIGHTING_CASES = {
    **{(scheme, name): weighting_case(scheme, counts) for scheme in ("dw", "autoassign")
       for name, counts in {**EQUAL_CASES, **CLAMPED_CASES}.items()},
    ("dw_float32_normaliser", "both_workers_with_gt"):
        weighting_case("dw_float32_normaliser", EQUAL_CASES["both_workers_with_gt"]),
}


@pytest.fixture(scope="module")
def weighting_two_workers(tmp_path_factory):
    init_file = str(tmp_path_factory.mktemp("gloo_weighting") / "init")
    outputs = run_on_workers(weighting_step, WEIGHTING_CASES, init_file)
    # After the all_reduce both workers hold the same averaged step.
    for key in WEIGHTING_CASES:
        assert_step_relation(outputs[1][key], outputs[0][key],
                             {name: 1.0 for name in outputs[0][key]}, f"rank 1 vs 0 {key}")
    return outputs[0]


@pytest.mark.parametrize("scheme", ["dw", "autoassign"])
@pytest.mark.parametrize("case", list(EQUAL_CASES))
def test_two_worker_step_equals_one_process(scheme, case, weighting_two_workers):
    one_process, normalisers, _ = one_process_step(WEIGHTING_CASES[scheme, case])
    for loss_name in one_process:
        normaliser = normalisers[LOSS_NORMALISER[loss_name]]
        # The case is built so that no clamp acts (or the term is empty).
        assert normaliser is None or normaliser == 0 or normaliser >= WORLD_SIZE, \
            (loss_name, normaliser)
    scales = {name: 1.0 for name in one_process}
    assert_step_relation(weighting_two_workers[scheme, case], one_process, scales,
                         f"{scheme} {case}")


@pytest.mark.parametrize("scheme,case", [
    (scheme, case) for scheme in ("dw", "autoassign") for case in CLAMPED_CASES])
def test_clamped_normalisers_follow_the_official_relation(scheme, case, weighting_two_workers):
    one_process, normalisers, _ = one_process_step(WEIGHTING_CASES[scheme, case])
    scales = {name: official_scale(normalisers[LOSS_NORMALISER[name]]) for name in one_process}
    assert min(scales.values()) < 1, f"the case must make a clamp act: {normalisers}"
    assert_step_relation(weighting_two_workers[scheme, case], one_process, scales,
                         f"{scheme} {case}")


def test_dw_float32_negative_normaliser_is_rounded_per_worker(weighting_two_workers):
    # As the official .float() then reduce_mean: each worker rounds its own sum(1 - w-) to
    # float32, and the mean is taken in float32. Against one process with the float64 batch
    # sum F, loss_cls_neg is then scaled by F / (W * that mean), about 1e-8 away from 1.
    case = "both_workers_with_gt"
    one_process, normalisers, weights = one_process_step(WEIGHTING_CASES["dw", case])
    worker_sums = torch.stack([
        (1 - torch.stack([w["neg_weight"] for w in weights[worker_images(rank, len(weights))]])
         ).sum(dim=(1, 2)).sum().float()
        for rank in range(WORLD_SIZE)])
    float32_mean = (worker_sums / WORLD_SIZE).sum()
    assert float32_mean >= 1
    scales = {name: 1.0 for name in one_process}
    scales["loss_cls_neg"] = normalisers["negative"] / (WORLD_SIZE * float32_mean.item())
    assert_step_relation(weighting_two_workers["dw_float32_normaliser", case], one_process,
                         scales, f"dw {case} with the float32 normaliser")


# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------


def detector_case(assigner):
    """A tiny float64 DWDetector and 2 images: 2 GT boxes on worker 0, none on worker 1.

    The backbone is frozen, BN in eval mode: in train mode each worker would normalise with
    its own batch statistics, which differ from the whole batch's. The head uses GN (per
    image), so its gradients are those to compare.
    """
    model = tiny_model("MODEL.ASSIGNER.NAME", assigner).double().train()
    model.backbone.eval()
    model.backbone.requires_grad_(False)
    if hasattr(model.assigner, "round_neg_normaliser_to_float32"):  # DW
        model.assigner.round_neg_normaliser_to_float32 = False
    # Boxes about as large as the initial predictions (8 strides wide), so that DW's negative
    # normaliser is not 0.
    images = [image_input(64, 64, boxes=[[2.0, 3.0, 62.0, 60.0], [6.0, 8.0, 58.0, 54.0]],
                          classes=[1, 1]),
              image_input(64, 64, seed=1)]
    return {"model": model, "images": images}


def trainable_parameters(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def detector_step(case, rank):
    from detectron2.utils.events import EventStorage

    model = case["model"]
    images = case["images"][worker_images(rank, len(case["images"]))]
    with EventStorage():
        losses = model(images)
    return averaged_step_outputs(losses, trainable_parameters(model))


def detector_one_process_step(case):
    """The whole batch in this process: losses, gradients and the negative normaliser."""
    from detectron2.utils.events import EventStorage

    captured = {}
    model = case["model"]
    assign = model.assigner.forward

    def with_weights(*args, **kwargs):
        losses, captured["weights"] = assign(*args, return_weights=True, **kwargs)
        return losses

    with pytest.MonkeyPatch.context() as patch, EventStorage():
        patch.setattr(model.assigner, "forward", with_weights)
        losses = model(case["images"])
    weights = captured["weights"]
    negative = (sum((1 - w["neg_weight"]).sum() for w in weights)
                if type(model.assigner).__name__ == "DW"
                else sum(w["center_prior"].sum() for w in weights))
    return step_outputs(losses, trainable_parameters(model)), float(negative)


@pytest.fixture(scope="module")
def detector_steps(tmp_path_factory):
    """Per assigner: (one-process step, its negative normaliser, rank 0's 2-worker step)."""
    cases = {assigner: detector_case(assigner) for assigner in BUILTIN_ASSIGNERS}
    # One process first: the workers fork after the first (slow) run has warmed torch up.
    one_process = {assigner: detector_one_process_step(case) for assigner, case in cases.items()}
    init_file = str(tmp_path_factory.mktemp("gloo_detector") / "init")
    two_workers = run_on_workers(detector_step, cases, init_file)[0]
    return {assigner: (*one_process[assigner], two_workers[assigner])
            for assigner in BUILTIN_ASSIGNERS}


@pytest.mark.parametrize("assigner", BUILTIN_ASSIGNERS)
def test_detector_two_worker_step_equals_one_process(assigner, detector_steps):
    one_process, negative, two_workers = detector_steps[assigner]
    assert negative >= WORLD_SIZE, f"the negative normaliser {negative} would be clamped"
    scales = {name: 1.0 for name in one_process}
    assert_step_relation(two_workers, one_process, scales, assigner)
    grads = one_process[next(iter(one_process))]["grads"]
    assert grads and all(name.startswith(("head.", "assigner.")) for name in grads)
    if assigner == "AutoAssign":
        assert "assigner.prior_sigma" in grads
