#!/usr/bin/env python
"""Inference speed of detectors on the CPU (or a GPU): images per second at batch 1.

Each config's detector runs on the same validation images, resized as its config's test
pipeline resizes them (or to ``--size``), one image per call, after ``--warmup`` calls; the
figure is the number of images divided by the median of ``--repeats`` timed passes over them.
The whole call is timed, pre- and post-processing (NMS) included. Without ``--weights`` the
detectors keep their initial weights (ImageNet backbone where the config says so): their
score threshold then lets almost nothing through, so NMS costs less than after training.

Example (the main job's lite backbone against the ResNet-18 one, same input size)::

    python tools/inference_speed.py \\
        configs/Builtin/dw_lite0_FPN_shapes.yaml configs/Builtin/dw_R_18_FPN_shapes.yaml \\
        --size 256 --images 20
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from dw_d2.viz.tool_config import load_config  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]))
    parser.add_argument("configs", nargs="+", help="detector configs to time")
    parser.add_argument("--weights", nargs="*", default=[],
                        help="a checkpoint per config, in the same order ('' for none)")
    parser.add_argument("--size", type=int, default=None,
                        help="resize the shorter side to this (and the longer to at most this); "
                             "default: each config's INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST")
    parser.add_argument("--images", type=int, default=20, help="validation images per pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median taken)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="KEY VALUE overrides applied to every config")
    return parser


def model_inputs(cfg, num_images, size):
    """Batch-1 inputs from the first ``num_images`` images of ``cfg.DATASETS.TEST[0]``."""
    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:num_images]
    min_size = size if size is not None else cfg.INPUT.MIN_SIZE_TEST
    max_size = size if size is not None else cfg.INPUT.MAX_SIZE_TEST
    resize = T.ResizeShortestEdge([min_size, min_size], max_size)
    inputs = []
    for record in records:
        image = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
        height, width = image.shape[:2]
        image = resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        inputs.append({"image": tensor, "height": height, "width": width})
    return inputs


def images_per_second(model, inputs, repeats, warmup):
    with torch.no_grad():
        for i in range(warmup):
            model([inputs[i % len(inputs)]])
        passes = []
        for _ in range(repeats):
            start = time.perf_counter()
            for item in inputs:
                model([item])
            passes.append(time.perf_counter() - start)
    return len(inputs) / statistics.median(passes)


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.weights and len(args.weights) != len(args.configs):
        raise ValueError(f"--weights takes one checkpoint per config ({len(args.configs)}), "
                         f"got {len(args.weights)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for i, config_file in enumerate(args.configs):
        cfg = load_config(config_file, args.opts)
        model = build_model(cfg).eval()
        weights = args.weights[i] if args.weights else ""
        if weights:
            DetectionCheckpointer(model).load(weights)
        inputs = model_inputs(cfg, args.images, args.size)
        speed = images_per_second(model, inputs, args.repeats, args.warmup)
        sizes = sorted({tuple(x["image"].shape[1:]) for x in inputs})
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append((Path(config_file).name, cfg.MODEL.BACKBONE.NAME, f"{params:.2f} M",
                     f"{sizes[0][0]}-{sizes[-1][0]} x {sizes[0][1]}-{sizes[-1][1]}",
                     f"{speed:.1f}"))
    header = ("config", "backbone", "parameters", "input (h x w)", "images/s")
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    print(f"\nbatch 1, {torch.get_num_threads()} threads, device {cfg.MODEL.DEVICE}, "
          f"{args.images} images x {args.repeats} passes")
    for row in [header, *rows]:
        print(" | ".join(value.ljust(w) for value, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
