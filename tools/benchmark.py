#!/usr/bin/env python
"""Speed and memory benchmark of dw-d2 (``make bench``), on the CPU or CUDA.

Three sections, measured in one run so that their ratios compare like with like:

weighting
    Weighting + loss of every assignment scheme of ``dw_d2.ASSIGNER_REGISTRY`` that has a
    per-GT-loop reference (DW and AutoAssign), forward and forward + backward, at COCO-like
    sizes (an 800x1333 input padded to 800x1344: 22,400 points over strides 8-128;
    80 classes; 2 images; 1, 10, 50 and 100 GT boxes per image): ``dw_d2``'s assigner,
    called as the detector calls it, against the per-GT-loop reference of
    :mod:`dw_d2.assign.reference` (the official code's approach). Both run on the same inputs in the same process; the table reports
    their largest relative difference (losses and input gradients), in the benchmark's dtype
    and, at one GT count, in float64.
detectors
    Whole training step (forward, backward, SGD step) and inference latency of the DW
    detector (box refinement on) and of the other schemes (AutoAssign), against Detectron2's
    FCOS and RetinaNet,
    all on the same backbone and input; peak training memory (CPU: the resident-set peak of
    a fresh process per model; CUDA: ``max_memory_allocated``).
scaling
    How the weighting cost grows with the number of GT boxes and with the input size; a PNG.

Timing: warm-up runs, then the median of ``--repeats`` runs, the implementations or models
interleaved run by run so that drifts of the machine's speed hit all of them alike;
``torch.set_num_threads`` is left at its default. The load average is recorded: on a busy
machine the ratios stay roughly comparable, the absolute times do not.

Output: one table on stdout, and ``benchmark.json`` (the table rows plus every raw number),
``benchmark.txt`` (the table) and ``weighting_scaling.png`` in ``--output``.

Examples::

    python tools/benchmark.py                  # the default run, about 10 min on 2 CPU cores
    python tools/benchmark.py --quick          # smoke run of every section
    python tools/benchmark.py --device cuda --backbone R-50 --det-size 800 1333  # COCO scale
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STRIDES = (8, 16, 32, 64, 128)
SECTIONS = ("weighting", "detectors", "scaling")
BASELINES = ("FCOS", "RetinaNet")
BASELINE_DETECTOR = "FCOS"
# The box refinement branch is DW's own; the other schemes run the head without it, as their
# reference implementations do.
BOX_REFINEMENT = {"DW": True}
# Targets of the project: (measure, GT count or model) -> (comparison, bound) on the row's ratio.
TARGETS = {
    ("weighting fwd+bwd", 50): (">=", 10.0),
    ("weighting fwd+bwd", 100): (">=", 20.0),
    ("train step", "DW"): ("<=", 1.10),
    ("inference", "DW"): ("<=", 1.05),
    ("peak train memory", "DW"): ("<=", 1.10),
}


# --------------------------------------------------------------------------------------------
# The assignment schemes
# --------------------------------------------------------------------------------------------
def scheme_names():
    """The schemes of ``dw_d2.ASSIGNER_REGISTRY`` that have a per-GT-loop reference."""
    from dw_d2 import ASSIGNER_REGISTRY
    from dw_d2.assign.reference import REFERENCE_LOSSES

    return [name for name, _ in ASSIGNER_REGISTRY if name in REFERENCE_LOSSES]


def detector_names():
    """The detectors section b can build: every scheme, then Detectron2's baselines."""
    return [*scheme_names(), *BASELINES]


def build_scheme(scheme, num_classes, device="cpu"):
    """The registered assigner ``scheme`` with its default (official) hyper-parameters."""
    from detectron2.config import get_cfg

    from dw_d2 import add_dw_config
    from dw_d2.modeling import build_assigner

    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.MODEL.ASSIGNER.NAME = scheme
    cfg.MODEL.DW.NUM_CLASSES = num_classes
    return build_assigner(cfg).to(device)


# --------------------------------------------------------------------------------------------
# Synthetic inputs
# --------------------------------------------------------------------------------------------
def padded_size(height, width, divisibility=32):
    """The input size after Detectron2's padding to the backbone's size divisibility."""
    return (math.ceil(height / divisibility) * divisibility,
            math.ceil(width / divisibility) * divisibility)


def feature_sizes(height, width, strides=STRIDES):
    """(h, w) of every FPN level of a padded (height, width) input."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def make_points(sizes, offset, dtype, device, strides=STRIDES):
    """The :class:`~dw_d2.points.PointLayout` the head builds for these feature sizes."""
    from dw_d2.points import PointGrid

    return PointGrid(strides, offset)(sizes, dtype, device)


def sample_gt_boxes(num_boxes, height, width, generator, dtype=torch.float32):
    """(num_boxes, 4) random XYXY boxes inside a (height, width) image, sized like COCO's.

    sqrt(area) / sqrt(image area) is log-normal with median 0.077 and log-sd 1.21: on a
    640x480 image that gives COCO's mix of ~41% small (< 32^2), ~34% medium and ~25% large
    boxes. Aspect ratios (w / h) are log-normal with log-sd 0.6. Boxes are at least 2 px.
    """
    def normal():
        return torch.randn(num_boxes, generator=generator, dtype=torch.float64)

    side = torch.exp(normal() * 1.21 - 2.57).clamp(0.004, 0.9) * math.sqrt(height * width)
    aspect_sqrt = torch.exp(normal() * 0.6).sqrt()
    box_w = (side * aspect_sqrt).clamp(2, width)
    box_h = (side / aspect_sqrt).clamp(2, height)
    x1 = torch.rand(num_boxes, generator=generator, dtype=torch.float64) * (width - box_w)
    y1 = torch.rand(num_boxes, generator=generator, dtype=torch.float64) * (height - box_h)
    return torch.stack((x1, y1, x1 + box_w, y1 + box_h), 1).to(dtype)


def _predicted_distances(points, strides, boxes, generator):
    """(R, 4) plausible predictions: near the smallest GT box containing the point (log-normal
    factor, sd 0.25, so candidate IoUs spread over [0, 1]), about two strides elsewhere."""
    num_points = len(points)
    background = strides[:, None] * torch.exp(
        math.log(2) + torch.randn(num_points, 4, generator=generator, dtype=torch.float64) * 0.5
    )
    if len(boxes) == 0:
        return background
    x, y = points[:, None, 0], points[:, None, 1]
    to_edges = torch.stack((x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y), -1)
    inside = to_edges.min(-1).values > 0
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    smallest = torch.where(inside, area, torch.full_like(area, math.inf)).argmin(1)
    matched = to_edges[torch.arange(num_points), smallest]
    noise = torch.exp(torch.randn(num_points, 4, generator=generator, dtype=torch.float64) * 0.25)
    return torch.where(inside.any(1, keepdim=True), matched * noise, background)


def make_weighting_inputs(scheme, height, width, num_images, gts_per_image, num_classes,
                          dtype, device, seed=0):
    """Inputs of one call of a weighting function.

    Returns:
        leaves: the differentiable inputs: ``cls_logits`` (N, R, C) (sigmoid around 0.03),
            ``box_dists`` (N, R, 4), ``score_logits`` (N, R, 1) (centerness / objectness,
            sigmoid around 0.5) and the assigner's parameters at their initial values, by
            name (AutoAssign: ``prior_mean`` / ``prior_sigma`` (C, 2)).
        fixed: ``scheme``, its ``assigner`` module, ``points`` (a PointLayout of R points),
            ``gt_boxes`` / ``gt_classes`` (N lists).
    """
    generator = torch.Generator().manual_seed(seed)
    assigner = build_scheme(scheme, num_classes, device)
    sizes = feature_sizes(*padded_size(height, width))
    layout = make_points(sizes, getattr(assigner, "reference_point_offset", 0.5), torch.float64,
                         "cpu")
    points, strides = layout.points, layout.strides
    gt_boxes, gt_classes, dists = [], [], []
    for _ in range(num_images):
        boxes = sample_gt_boxes(gts_per_image, height, width, generator, torch.float64)
        gt_boxes.append(boxes)
        gt_classes.append(torch.randint(num_classes, (gts_per_image,), generator=generator))
        dists.append(_predicted_distances(points, strides, boxes, generator))
    num_points = len(points)
    leaves = {
        "cls_logits": torch.randn(num_images, num_points, num_classes, generator=generator) * 1.5
        - 4.0,
        "box_dists": torch.stack(dists),
        "score_logits": torch.randn(num_images, num_points, 1, generator=generator),
    }
    leaves.update({name: p.detach().cpu() for name, p in assigner.named_parameters()})
    leaves = {k: v.to(dtype=dtype, device=device) for k, v in leaves.items()}
    fixed = {
        "scheme": scheme,
        "assigner": assigner,
        "points": layout.to(dtype=dtype, device=device),
        "gt_boxes": [b.to(dtype=dtype, device=device) for b in gt_boxes],
        "gt_classes": [c.to(device) for c in gt_classes],
    }
    return leaves, fixed


def as_dtype(leaves, fixed, dtype):
    """The same inputs in another floating dtype."""
    return ({k: v.to(dtype) for k, v in leaves.items()},
            dict(fixed, points=fixed["points"].to(dtype),
                 gt_boxes=[b.to(dtype) for b in fixed["gt_boxes"]]))


def dw_d2_losses(leaves, fixed):
    """The scheme's losses as the detector computes them: its assigner module, called on the
    head's point layout, with ``leaves`` standing in for its parameters."""
    assigner = fixed["assigner"]
    parameters = {name: leaves[name] for name, _ in assigner.named_parameters()}
    return torch.func.functional_call(
        assigner, parameters, (fixed["points"], leaves["cls_logits"], leaves["box_dists"],
                               leaves["score_logits"], fixed["gt_boxes"], fixed["gt_classes"]))


def reference_losses(leaves, fixed):
    """The same losses from the per-GT-loop oracle (:mod:`dw_d2.assign.reference`)."""
    from dw_d2.assign.reference import REFERENCE_LOSSES

    points = fixed["points"]
    parameters = {name: leaves[name] for name, _ in fixed["assigner"].named_parameters()}
    return REFERENCE_LOSSES[fixed["scheme"]](
        points.points, points.strides, leaves["cls_logits"], leaves["box_dists"],
        leaves["score_logits"], fixed["gt_boxes"], fixed["gt_classes"], **parameters)


def weighting_step(losses_of, leaves, fixed, backward):
    """A closure running one forward (and backward) pass of ``dw_d2_losses`` or
    ``reference_losses``."""
    def run():
        for leaf in leaves.values():
            leaf.requires_grad_(backward)
            leaf.grad = None
        if not backward:
            with torch.no_grad():
                losses_of(leaves, fixed)
            return
        losses = losses_of(leaves, fixed)
        sum(losses.values()).backward()
    return run


# --------------------------------------------------------------------------------------------
# Timing and comparison
# --------------------------------------------------------------------------------------------
def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device):
    """(wall seconds, process CPU seconds) of one call of ``function``, device work included.

    The CPU time (all threads of this process) is what the call costs on a machine shared
    with other jobs, where the wall time also counts the waits for a core.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_medians(functions, warmup, repeats, device):
    """Median wall seconds of each of ``functions`` (a dict), timed in turn within each repeat.

    Returns:
        (medians, samples): dicts keyed like ``functions``; ``samples[name]`` holds the lists
        ``wall_s`` and ``cpu_s`` and their medians ``wall_median_s`` and ``cpu_median_s``.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    samples = {name: {"wall_s": [], "cpu_s": []} for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            wall, cpu = timed(function, device)
            samples[name]["wall_s"].append(wall)
            samples[name]["cpu_s"].append(cpu)
    for entry in samples.values():
        entry["wall_median_s"] = statistics.median(entry["wall_s"])
        entry["cpu_median_s"] = statistics.median(entry["cpu_s"])
    return {name: entry["wall_median_s"] for name, entry in samples.items()}, samples


def cpu_time_ratio(device, samples, name, baseline, speedup):
    """A row's ratio on median process CPU times (None on CUDA, where it means little)."""
    value, base = samples[name]["cpu_median_s"], samples[baseline]["cpu_median_s"]
    if torch.device(device).type == "cuda" or min(value, base) <= 0:
        return None
    return base / value if speedup else value / base


def relative_difference(actual, expected):
    """max |a - b| / max |b|, a scale-aware relative difference (max |a - b| when b is 0)."""
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.detach().double(), expected.detach().double()
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    return diff / scale if scale > 0 else diff


def compare_implementations(leaves, fixed):
    """dw_d2 vs the reference on the same inputs: (largest relative difference, per term).

    The terms are every loss and the gradient of the summed losses w.r.t. every input.
    """
    results = []
    for losses_of in (dw_d2_losses, reference_losses):
        inputs = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
        losses = losses_of(inputs, fixed)
        sum(losses.values()).backward()
        grads = {k: v.grad if v.grad is not None else torch.zeros_like(v)
                 for k, v in inputs.items()}
        results.append((losses, grads))
    (fast_losses, fast_grads), (ref_losses, ref_grads) = results
    per_term = {k: relative_difference(fast_losses[k], ref_losses[k]) for k in ref_losses}
    per_term.update({f"d/d{k}": relative_difference(fast_grads[k], ref_grads[k])
                     for k in ref_grads})
    return max(per_term.values()), per_term


def profile_step(step, args, path, row_limit=25):
    """torch.profiler table (by self time) of one warmed-up call of ``step``, saved to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(args.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    with profile(activities=activities) as profiler:
        step()
        synchronize(args.device)
    sort_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profiler.key_averages().table(sort_by=sort_key, row_limit=row_limit) + "\n")
    return {"file": str(path), "sort_by": sort_key}


# --------------------------------------------------------------------------------------------
# Section a: weighting + loss
# --------------------------------------------------------------------------------------------
def bench_weighting(args, log):
    dtype = getattr(torch, args.dtype)
    height, width = args.image_size
    fp64_gts = args.gt_counts[min(1, len(args.gt_counts) - 1)] if args.fp64_check else None
    rows, cases = [], []
    for scheme in scheme_names():
        for gts in args.gt_counts:
            leaves, fixed = make_weighting_inputs(scheme, height, width, args.batch, gts,
                                                  args.num_classes, dtype, args.device, seed=gts)
            max_diff, per_term = compare_implementations(leaves, fixed)
            fp64_diff = None
            if gts == fp64_gts:
                fp64_diff = compare_implementations(*as_dtype(leaves, fixed, torch.float64))[0]
            case = {"scheme": scheme, "gts_per_image": gts,
                    "num_points": fixed["points"].num_points,
                    "max_rel_diff": max_diff, "rel_diff_per_term": per_term,
                    "fp64_max_rel_diff": fp64_diff}
            for backward in (False, True):
                measure = "weighting fwd+bwd" if backward else "weighting fwd"
                medians, samples = interleaved_medians(
                    {"dw_d2": weighting_step(dw_d2_losses, leaves, fixed, backward),
                     "reference": weighting_step(reference_losses, leaves, fixed, backward)},
                    args.warmup, args.repeats, args.device,
                )
                case["fwd_bwd" if backward else "fwd"] = {
                    "dw_d2_s": medians["dw_d2"], "reference_s": medians["reference"],
                    "samples": samples,
                }
                rows.append(make_row(
                    "weighting", measure, f"{scheme}, {gts} GT/img", medians["dw_d2"], "s",
                    "per-GT-loop reference", medians["reference"],
                    medians["reference"] / medians["dw_d2"], "speed-up",
                    TARGETS.get((measure, gts)), check=max_diff, check64=fp64_diff,
                    cpu=cpu_time_ratio(args.device, samples, "dw_d2", "reference", True),
                ))
                log(format_row(rows[-1]))
            if args.profile and gts == max(args.gt_counts):
                case["profile"] = profile_step(
                    weighting_step(dw_d2_losses, leaves, fixed, True), args,
                    Path(args.output) / f"profile_{scheme}_{gts}gt.txt",
                )
                log(f"profile of dw_d2 {scheme} fwd+bwd: {case['profile']['file']}")
            cases.append(case)
    raw = {"input": list(args.image_size), "batch": args.batch, "num_classes": args.num_classes,
           "dtype": args.dtype, "cases": cases}
    return rows, raw


# --------------------------------------------------------------------------------------------
# Section b: detectors
# --------------------------------------------------------------------------------------------
def detector_config(args, model_name):
    """The Detectron2 config of one model; all models share the backbone and input size."""
    from detectron2.config import get_cfg

    from dw_d2 import add_dw_config

    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-DW.yaml"))
    depth = int(args.backbone.split("-")[1])
    # DW's layout (P6 from P5's output) for every model, AutoAssign and RetinaNet included,
    # so that the heads and losses are the only difference.
    cfg.MODEL.BACKBONE.NAME = "build_dw_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.WEIGHTS = ""
    # Random weights and frozen BN normalise nothing: scale the inputs to unit variance.
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.DW.NUM_CLASSES = args.num_classes
    cfg.MODEL.DW.SCORE_THRESH_TEST = args.infer_score_thresh
    if model_name in scheme_names():
        cfg.MODEL.ASSIGNER.NAME = model_name
        cfg.MODEL.DW.BOX_REFINEMENT = BOX_REFINEMENT.get(model_name, False)
    elif model_name == "RetinaNet":
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
        cfg.MODEL.RETINANET.IN_FEATURES = list(cfg.MODEL.DW.IN_FEATURES)
        cfg.MODEL.RETINANET.NUM_CLASSES = args.num_classes
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.infer_score_thresh
        # Detectron2's RetinaNet recipe: 3 scales x 3 aspect ratios per level.
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [
            [x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)] for x in (32, 64, 128, 256, 512)
        ]
        cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    cfg.freeze()
    return cfg


def group_norm(channels):
    """GroupNorm(32), Detectron2's "GN", as a callable: the 2021 snapshot's RetinaNetHead
    probes its norm with ``get_norm(norm, 1)``, which fails for the string "GN"."""
    return torch.nn.GroupNorm(math.gcd(32, channels), channels)


def build_detector(args, model_name):
    """One of :func:`detector_names`, on ``args.device``, with random weights."""
    from detectron2.modeling import build_backbone, build_model

    cfg = detector_config(args, model_name)
    if model_name != "FCOS":
        return build_model(cfg)
    # Detectron2 builds FCOS from a LazyConfig (configs/common/models/fcos.py) and does not
    # register it, so assemble it the same way here: GN head, P3-P7, focal + GIoU losses.
    from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead

    backbone = build_backbone(cfg)
    in_features = list(cfg.MODEL.DW.IN_FEATURES)
    shapes = backbone.output_shape()
    head = FCOSHead(
        input_shape=[shapes[f] for f in in_features],
        num_classes=args.num_classes,
        conv_dims=[shapes[in_features[0]].channels] * cfg.MODEL.DW.NUM_CONVS,
        norm=group_norm,
        prior_prob=0.01,
    )
    model = FCOS(
        backbone=backbone, head=head, head_in_features=in_features,
        num_classes=args.num_classes, test_score_thresh=args.infer_score_thresh,
        test_topk_candidates=1000, test_nms_thresh=0.6, max_detections_per_image=100,
        pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD,
    )
    return model.to(torch.device(args.device))


def detector_inputs(args, seed=0):
    """``--det-batch`` random uint8 images of ``--det-size`` with COCO-like GT boxes."""
    from detectron2.structures import Boxes, Instances

    generator = torch.Generator().manual_seed(seed)
    height, width = args.det_size
    batch = []
    for _ in range(args.det_batch):
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(sample_gt_boxes(args.det_gts, height, width, generator))
        instances.gt_classes = torch.randint(args.num_classes, (args.det_gts,),
                                             generator=generator)
        batch.append({"image": image, "instances": instances, "height": height, "width": width})
    return batch


def make_optimizer(model):
    """Detectron2's SGD (momentum 0.9, weight decay 1e-4). The learning rate does not change
    the work of a step; at 0 the random weights stay put, so that no model drifts to
    non-finite losses over the repeats."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)


def train_step(model, optimizer, batch):
    """A closure running one training step: forward, backward, optimizer step."""
    from detectron2.utils.events import EventStorage

    def run():
        with EventStorage():
            losses = model(batch)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"{type(model).__name__}: non-finite losses {losses}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    return run


def inference_step(model, batch, num_images):
    """A closure running inference (pre-processing, network, post-processing, NMS)."""
    images = [{k: v for k, v in x.items() if k != "instances"} for x in batch[:num_images]]

    def run():
        with torch.no_grad():
            model(images)
    return run


def _proc_status_bytes(field):
    """A memory field of /proc/self/status (Linux) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss():
    """Restart the kernel's resident-set high-water mark (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    """Resident-set peak since the last :func:`reset_peak_rss` (else since the start)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is None:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak


def measure_training_memory(args, model_name):
    """Peak memory of ``--memory-steps`` training steps of one model, in this process.

    CPU: the resident-set peak during the steps (the kernel's high-water mark, reset just
    before the first step), and that peak minus the resident set at the reset: activations,
    gradients and optimizer state, without the libraries, the model and the inputs (None
    where the mark cannot be reset). CUDA: ``max_memory_allocated`` during the steps, and the
    same minus the memory allocated before them.
    """
    torch.manual_seed(0)
    model = build_detector(args, model_name)
    model.train()
    step = train_step(model, make_optimizer(model), detector_inputs(args))
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        # Without the reset, the peak could be the import-time or model-building one.
        start = _proc_status_bytes("VmRSS") if reset_peak_rss() else None
    for _ in range(args.memory_steps):
        step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    return {"peak_bytes": peak, "peak_above_start_bytes": None if start is None else peak - start,
            "kind": "cuda max_memory_allocated" if cuda else "resident-set peak"}


def memory_in_fresh_process(args, model_name):
    """CPU peak memory of one model, measured in a new process that sees no other model."""
    command = [sys.executable, str(Path(__file__).resolve()), *args.forwarded_argv,
               "--memory-probe", model_name]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {model_name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_detectors(args, log):
    torch.manual_seed(0)
    models = {name: build_detector(args, name) for name in args.models}
    batch = detector_inputs(args)
    raw = {"backbone": args.backbone, "input": list(args.det_size), "batch": args.det_batch,
           "gts_per_image": args.det_gts, "inference_batch": args.infer_batch,
           "num_parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}}
    train_steps = {}
    for name, model in models.items():
        model.train()
        train_steps[name] = train_step(model, make_optimizer(model), batch)
    train, train_samples = interleaved_medians(train_steps, args.det_warmup,
                                                      args.det_repeats, args.device)
    log("train step medians: " + ", ".join(f"{k} {v:.3f} s" for k, v in train.items()))
    infer_steps = {}
    for name, model in models.items():
        model.eval()
        infer_steps[name] = inference_step(model, batch, args.infer_batch)
    infer, infer_samples = interleaved_medians(infer_steps, args.det_warmup,
                                                          args.det_repeats, args.device)
    log("inference medians: " + ", ".join(f"{k} {v:.3f} s" for k, v in infer.items()))
    del models, train_steps, infer_steps

    memory = {}
    for name in args.models:
        if torch.device(args.device).type == "cuda":
            memory[name] = measure_training_memory(args, name)
        else:
            memory[name] = memory_in_fresh_process(args, name)
        log(f"peak training memory {name}: {memory[name]}")
    raw.update(train_step_s=train, inference_s=infer, memory=memory,
               train_samples=train_samples, inference_samples=infer_samples)

    rows = []
    if BASELINE_DETECTOR not in args.models:
        return rows, raw
    base = BASELINE_DETECTOR
    case = f"{args.backbone} FPN, {args.det_size[0]}x{args.det_size[1]}"
    for name in (n for n in args.models if n != base):
        rows.append(make_row(
            "detectors", "train step", f"{name}, {case}, batch {args.det_batch}", train[name], "s",
            base, train[base], train[name] / train[base], "ratio",
            TARGETS.get(("train step", name)),
            cpu=cpu_time_ratio(args.device, train_samples, name, base, False),
        ))
        rows.append(make_row(
            "detectors", "inference", f"{name}, {case}, batch {args.infer_batch}", infer[name],
            "s", base, infer[base], infer[name] / infer[base], "ratio",
            TARGETS.get(("inference", name)),
            cpu=cpu_time_ratio(args.device, infer_samples, name, base, False),
        ))
        above_start = memory[name]["peak_above_start_bytes"] is not None
        key = "peak_above_start_bytes" if above_start else "peak_bytes"
        rows.append(make_row(
            "detectors", "peak train memory",
            f"{name} ({'above start' if above_start else 'process total'})",
            memory[name][key], "bytes", base, memory[base][key],
            memory[name][key] / memory[base][key], "ratio",
            TARGETS.get(("peak train memory", name)),
            note=f"{memory[name]['kind']}: total "
                 f"{format_value(memory[name]['peak_bytes'], 'bytes')} vs "
                 f"{format_value(memory[base]['peak_bytes'], 'bytes')}",
        ))
    return rows, raw


# --------------------------------------------------------------------------------------------
# Section c: scaling
# --------------------------------------------------------------------------------------------
def bench_scaling(args, log):
    dtype = getattr(torch, args.dtype)
    raw = {"by_gt_count": [], "by_input_size": []}
    plans = [("by_gt_count", tuple(args.image_size), gts) for gts in args.scaling_gt_counts]
    plans += [("by_input_size", tuple(size), args.scaling_size_gts) for size in args.scaling_sizes]
    for axis, (height, width), gts in plans:
        for scheme in scheme_names():
            leaves, fixed = make_weighting_inputs(scheme, height, width, args.batch, gts,
                                                  args.num_classes, dtype, args.device, seed=gts)
            functions = {"dw_d2": weighting_step(dw_d2_losses, leaves, fixed, True)}
            if args.scaling_reference:
                functions["reference"] = weighting_step(reference_losses, leaves, fixed, True)
            medians, _ = interleaved_medians(functions, args.warmup, args.scaling_repeats,
                                             args.device)
            raw[axis].append({"scheme": scheme, "input": [height, width],
                              "num_points": fixed["points"].num_points, "gts_per_image": gts,
                              **{f"{k}_s": v for k, v in medians.items()}})
            log(f"scaling {axis}: {scheme} {height}x{width} {gts} GT/img: "
                + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in medians.items()))
    plot = Path(args.output) / "weighting_scaling.png"
    if plot_scaling(raw, plot, args):
        raw["plot"] = str(plot)
    return [], raw


def plot_scaling(raw, path, args):
    """Two log-log panels: fwd+bwd time against GT boxes per image and against points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    schemes = list(dict.fromkeys(e["scheme"] for axis in raw.values() if isinstance(axis, list)
                                 for e in axis))
    styles = {(scheme, impl): f"C{i}{'-o' if impl == 'dw_d2' else '--x'}"
              for i, scheme in enumerate(schemes) for impl in ("dw_d2", "reference")}
    panels = ((axes[0], "by_gt_count", "gts_per_image", "GT boxes per image"),
              (axes[1], "by_input_size", "num_points", "points per image (R)"))
    for ax, axis, x_key, x_label in panels:
        for (scheme, impl), style in styles.items():
            entries = [e for e in raw[axis] if e["scheme"] == scheme and f"{impl}_s" in e]
            if entries:
                label = f"{scheme} {'dw_d2' if impl == 'dw_d2' else 'per-GT loop'}"
                ax.plot([e[x_key] for e in entries], [e[f"{impl}_s"] * 1e3 for e in entries],
                        style, label=label, markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({e[x_key] for e in raw[axis]})
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks], fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(x_label)
        ax.set_ylabel("fwd+bwd time (ms)")
        ax.grid(True, which="both", alpha=0.3)
    height, width = args.image_size
    axes[0].set_title(f"{height}x{width} input, {args.batch} images", fontsize=9)
    axes[1].set_title(f"{args.scaling_size_gts} GT/img, {args.batch} images", fontsize=9)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"Weighting + loss cost ({args.device}, {torch.get_num_threads()} threads, "
                    f"{args.dtype}, {args.num_classes} classes)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return True


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------
TABLE_COLUMNS = ("section", "measure", "subject", "value", "baseline", "baseline value",
                 "ratio", "target", "met", "CPU-time ratio", "check")


def make_row(section, measure, subject, value, unit, baseline, baseline_value, ratio,
             ratio_kind, target, check=None, check64=None, note=None, cpu=None):
    """One table row.

    ``ratio_kind`` is "speed-up" (baseline / value) or "ratio" (value / baseline), on median
    wall times; ``target`` is (comparison, bound) on that ratio, or None; ``cpu`` is the same
    ratio on median process CPU times; ``check`` and ``check64`` are the largest relative
    differences from the reference in the run's dtype and in float64.
    """
    met = None
    if target is not None:
        comparison, bound = target
        met = ratio >= bound if comparison == ">=" else ratio <= bound
    return {
        "section": section, "measure": measure, "subject": subject, "value": value,
        "unit": unit, "baseline": baseline, "baseline_value": baseline_value, "ratio": ratio,
        "ratio_kind": ratio_kind,
        "target": None if target is None else f"{target[0]} {target[1]:g}x",
        "met": met, "cpu_time_ratio": cpu, "max_rel_diff": check, "fp64_max_rel_diff": check64,
        "note": note,
    }


def format_value(value, unit):
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1e3:.1f} ms" if value < 10 else f"{value:.2f} s"
    if unit == "bytes":
        return f"{value / 2 ** 20:.0f} MiB"
    return f"{value:g} {unit}"


def format_row(row):
    """The cells of a row, in ``TABLE_COLUMNS`` order."""
    check = row["note"] or "-"
    if row["max_rel_diff"] is not None:
        check = f"rel diff {row['max_rel_diff']:.1e}"
        if row["fp64_max_rel_diff"] is not None:
            check += f" (fp64 {row['fp64_max_rel_diff']:.1e})"
    return (row["section"], row["measure"], row["subject"],
            format_value(row["value"], row["unit"]), row["baseline"],
            format_value(row["baseline_value"], row["unit"]), f"{row['ratio']:.2f}x",
            row["target"] or "", {None: "", True: "yes", False: "NO"}[row["met"]],
            "" if row["cpu_time_ratio"] is None else f"{row['cpu_time_ratio']:.2f}x", check)


def render_table(rows):
    cells = [TABLE_COLUMNS] + [format_row(r) for r in rows]
    widths = [max(len(str(line[i])) for line in cells) for i in range(len(TABLE_COLUMNS))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    parser.add_argument("--output", default="output/benchmark",
                        help="folder of benchmark.json, benchmark.txt and the plot")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true",
                        help="smallest sizes, one repeat: a smoke run, not a measurement")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="dtype of the weighting inputs (sections a and c)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice). On a machine "
                             "shared with other jobs, 1 thread gives far steadier ratios: "
                             "multi-threaded kernels wait for every thread at each op")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up runs (sections a, c)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (section a)")
    group = parser.add_argument_group("weighting (section a)")
    group.add_argument("--image-size", type=int, nargs=2, default=(800, 1333),
                       metavar=("H", "W"), help="input size before padding to a multiple of 32")
    group.add_argument("--batch", type=int, default=2, help="images per call")
    group.add_argument("--num-classes", type=int, default=80)
    group.add_argument("--gt-counts", type=int, nargs="+", default=(1, 10, 50, 100),
                       help="GT boxes per image")
    group.add_argument("--no-fp64-check", dest="fp64_check", action="store_false",
                       help="skip the float64 comparison (at the second GT count)")
    group.add_argument("--profile", action="store_true",
                       help="write a torch.profiler table of dw_d2's fwd+bwd at the largest "
                            "GT count")
    group = parser.add_argument_group("detectors (section b)")
    group.add_argument("--models", nargs="+", choices=detector_names(), default=detector_names())
    group.add_argument("--backbone", default="R-18", choices=("R-18", "R-34", "R-50", "R-101"))
    group.add_argument("--det-size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    group.add_argument("--det-batch", type=int, default=2, help="images per training step")
    group.add_argument("--det-gts", type=int, default=8, help="GT boxes per image (COCO: 7.3)")
    group.add_argument("--infer-batch", type=int, default=1, help="images per inference call")
    group.add_argument("--det-warmup", type=int, default=2)
    group.add_argument("--det-repeats", type=int, default=5)
    group.add_argument("--memory-steps", type=int, default=3,
                       help="training steps of each memory measurement")
    group.add_argument("--infer-score-thresh", type=float, default=0.0,
                       help="score threshold of every model at inference. Random weights give "
                            "every point about the same score; 0 makes each model keep its top "
                            "1000 candidates per level, the same (full) post-processing load")
    group = parser.add_argument_group("scaling (section c)")
    group.add_argument("--scaling-gt-counts", type=int, nargs="+",
                       default=(1, 5, 20, 50, 100, 200))
    group.add_argument("--scaling-sizes", type=int, nargs=2, action="append", metavar=("H", "W"),
                       help="an input size (repeatable); default 320x544 to 1024x1696")
    group.add_argument("--scaling-size-gts", type=int, default=20,
                       help="GT boxes per image in the input-size sweep")
    group.add_argument("--scaling-repeats", type=int, default=3)
    group.add_argument("--no-scaling-reference", dest="scaling_reference", action="store_false",
                       help="time only dw_d2 in the sweeps")
    parser.add_argument("--memory-probe", choices=detector_names(), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    at_least = {"--threads": (args.threads, 1), "--warmup": (args.warmup, 0),
                "--repeats": (args.repeats, 1), "--batch": (args.batch, 1),
                "--num-classes": (args.num_classes, 1), "--det-batch": (args.det_batch, 1),
                "--det-gts": (args.det_gts, 0), "--infer-batch": (args.infer_batch, 1),
                "--det-warmup": (args.det_warmup, 0), "--det-repeats": (args.det_repeats, 1),
                "--memory-steps": (args.memory_steps, 1),
                "--scaling-size-gts": (args.scaling_size_gts, 0),
                "--scaling-repeats": (args.scaling_repeats, 1),
                "--gt-counts": (min(args.gt_counts), 0),
                "--scaling-gt-counts": (min(args.scaling_gt_counts), 0)}
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if args.infer_batch > args.det_batch:
        parser.error(f"--infer-batch ({args.infer_batch}) cannot exceed --det-batch "
                     f"({args.det_batch}): inference reuses the training batch's images")
    for flag, sizes in (("--image-size", [args.image_size]), ("--det-size", [args.det_size]),
                        ("--scaling-sizes", args.scaling_sizes or [])):
        for height, width in sizes:
            if height < 32 or width < 32:
                parser.error(f"{flag} {height} {width}: both sides must be >= 32 pixels")
    args.forwarded_argv = list(sys.argv[1:] if argv is None else argv)
    if args.scaling_sizes is None:
        args.scaling_sizes = [(320, 544), (480, 800), (640, 1088), (800, 1333), (1024, 1696)]
    if args.quick:
        apply_quick(args)
    return args


def apply_quick(args):
    args.image_size, args.gt_counts, args.batch = (128, 192), [1, 4], 2
    args.warmup, args.repeats = 0, 1
    args.backbone, args.det_size, args.det_batch, args.det_gts = "R-18", (128, 128), 1, 3
    args.det_warmup, args.det_repeats, args.memory_steps = 1, 1, 1
    args.scaling_gt_counts, args.scaling_sizes = [1, 4], [(96, 128), (128, 192)]
    args.scaling_size_gts, args.scaling_repeats = 2, 1


def environment():
    import torchvision

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine()}
    try:
        import detectron2

        info["detectron2"] = detectron2.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main(argv=None):
    # Detectron2 and fvcore call torch.jit.script at import time; its deprecation warning is
    # noise here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import dw_d2  # noqa: F401  (registers the meta-architecture and backbone)

    if args.memory_probe:
        # Child process of memory_in_fresh_process: print one JSON line and stop.
        print(json.dumps(measure_training_memory(args, args.memory_probe)))
        return None
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    def log(message):
        if isinstance(message, tuple):
            message = " | ".join(str(c) for c in message)
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    result = {"environment": environment(), "device": args.device, "quick": args.quick,
              "arguments": {k: v for k, v in vars(args).items()
                            if k not in ("forwarded_argv", "memory_probe")},
              "load_average_start": load_average(), "rows": [], "sections": {}}
    cores = os.cpu_count() or 1
    if result["load_average_start"] and result["load_average_start"][0] > 0.5 * cores:
        log(f"the machine is busy (1-min load {result['load_average_start'][0]:.1f} on {cores} "
            "cores): absolute times will be inflated and noisy")
    run_section = {"weighting": bench_weighting, "detectors": bench_detectors,
                   "scaling": bench_scaling}
    for section in args.sections:
        log(f"section {section}")
        section_started = time.perf_counter()
        rows, raw = run_section[section](args, log)
        raw["elapsed_s"] = time.perf_counter() - section_started
        result["rows"].extend(rows)
        result["sections"][section] = raw
    result["elapsed_s"] = time.perf_counter() - started
    result["load_average_end"] = load_average()
    table = render_table(result["rows"])
    print(table)
    (output / "benchmark.txt").write_text(table + "\n")
    (output / "benchmark.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    log(f"done in {result['elapsed_s']:.0f} s; wrote {output / 'benchmark.json'}")
    return result


if __name__ == "__main__":
    main()
