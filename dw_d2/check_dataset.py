"""Check datasets as training would, without training, and show what the detector will see.

::

    python -m dw_d2.check_dataset --config-file configs/Builtin/dw_R_18_FPN_shapes.yaml
    python -m dw_d2.check_dataset --config-file CONFIG \\
        --coco my_train path/train.json path/train_images \\
        --coco my_val path/val.json path/val_images \\
        DATASETS.TRAIN '("my_train",)' DATASETS.TEST '("my_val",)' MODEL.DW.NUM_CLASSES 3
    make check-data CONFIG=CONFIG DATASETS="my_train my_val" OPTS="MODEL.DW.NUM_CLASSES 3"

``--coco NAME JSON IMAGE_ROOT`` registers a COCO-format dataset as ``register_coco_instances``
does in a training script; datasets registered elsewhere are checked by name (``--dataset``).
For each dataset (``--dataset`` names, else the ``--coco`` ones, else the config's
``DATASETS.TRAIN`` and ``DATASETS.TEST``; a dataset of ``DATASETS.TRAIN`` is checked as
training data, the others as evaluation data) it runs the
checks that ``train_net.py`` runs before iteration 0: the annotation file (valid JSON, known
categories), every annotation (finite boxes, valid class ids; dropped, clipped and crowd boxes
counted and listed), every image file (exists, is an image Pillow can read, has the size the
annotations give; headers only, cached), and the model's number of classes. It then prints a
summary (images, boxes per class, boxes per image, box sizes in image pixels and at the
network's input sizes, FCOS levels, boxes containing no point of a level; see
:mod:`dw_d2.data.summary`) and writes, into ``--output`` (default ``OUTPUT_DIR/dataset_check``):

* ``dataset_summary_<dataset>.png``: the summary's histograms;
* ``dataset_summary_<dataset>.json``: its numbers;
* ``annotation_changes_<dataset>.json``: every dropped, clipped or ignored annotation.

Exit status: 0 when every dataset passes (warnings allowed), 1 when any check fails, 2 for a
bad command line.
"""
import argparse
import json
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

__all__ = ["main", "detector_points"]

logger = logging.getLogger("dw_d2.check_dataset")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dw_d2.check_dataset",
        description="Run the dataset checks of training without training, print a summary of "
                    "what the detector will see, and write it as a PNG.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a config YAML")
    parser.add_argument("--dataset", action="append", default=None, metavar="NAME",
                        help="a registered dataset to check (repeat for several; default: "
                             "DATASETS.TRAIN and DATASETS.TEST of the config)")
    parser.add_argument("--coco", nargs=3, action="append", default=[],
                        metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register a COCO-format dataset first (repeat for several)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="where to write the summaries (default: OUTPUT_DIR/dataset_check)")
    parser.add_argument("--no-cache", action="store_true",
                        help="read every image header again (and do not update the cache)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes reading image headers (default: automatic)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, as on train_net.py's command line")
    return parser.parse_args(argv)


def detector_points(cfg) -> Tuple[List[int], float, List[str]]:
    """(strides, point offset, level names) of the detector a config builds, finest first.

    The model is built on the CPU without weights, so its points are the ones training uses:
    the DW detector's ``strides`` and ``point_offset`` (``MODEL.ASSIGNER.POINT_OFFSET``, or the
    scheme's reference value); for another dense detector its anchor generator's offset.
    """
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    shapes = model.backbone.output_shape()
    names = list(getattr(model, "head_in_features", None) or sorted(
        shapes, key=lambda f: shapes[f].stride))
    strides = list(getattr(model, "strides", None) or [shapes[f].stride for f in names])
    offset = getattr(model, "point_offset", None)
    if offset is None:
        offset = getattr(getattr(model, "anchor_generator", None), "offset", 0.5)
    return [int(s) for s in strides], float(offset), names


def check_one_dataset(cfg, dataset_name: str, *, is_training: bool, output_dir: str,
                      use_cache: bool, workers: Optional[int], points, scales):
    """Run the checks on one dataset; return (summary or None, list of error messages)."""
    from detectron2.data import MetadataCatalog

    from .data import (
        AnnotationError,
        check_annotations,
        find_image_file_problems,
        load_dataset_dicts,
    )
    from .data.summary import summarize_dataset
    from .data.validation import image_file_error, report_annotation_changes
    from .engine.checks import check_num_classes

    errors = []
    try:
        dicts = load_dataset_dicts(dataset_name)
    except (AnnotationError, OSError, KeyError, ValueError, AssertionError) as e:
        return None, [f"{type(e).__name__}: {e}"]
    if not dicts:
        return None, [f"Dataset '{dataset_name}' is empty."]
    try:
        cleaned, changes = check_annotations(dicts, dataset_name)
    except AnnotationError as e:
        errors.append(f"AnnotationError: {e}")
        cleaned, changes = None, []
    report_annotation_changes(changes, dicts, dataset_name, report_dir=output_dir)
    problems = find_image_file_problems(dicts, dataset_name, use_cache=use_cache,
                                        workers=workers)
    if problems:
        error = image_file_error(problems, len(dicts), dataset_name)
        errors.append(f"{type(error).__name__}: {error}")
    try:
        check_num_classes(cfg, [dataset_name])
    except ValueError as e:
        errors.append(f"ValueError: {e}")
    if is_training and cleaned is not None and not any(
            not a.get("iscrowd", 0) for d in cleaned for a in d.get("annotations", ())):
        errors.append(f"Dataset '{dataset_name}': no image has a (non-crowd) annotation left "
                      f"to train on.")
    if cleaned is None:
        return None, errors
    strides, offset, names = points
    class_names = MetadataCatalog.get(dataset_name).get("thing_classes") or [
        str(c) for c in range(1 + max([a["category_id"] for d in cleaned
                                       for a in d.get("annotations", ())], default=-1))]
    summary = summarize_dataset(cleaned, dataset_name, class_names, scales=scales,
                                strides=strides, point_offset=offset, level_names=names)
    return summary, errors


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="dw_d2", abbrev_name="dw_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    logging.getLogger("detectron2").setLevel(logging.WARNING)

    from .data.summary import format_summary, input_scales
    from .viz.dataset_summary import plot_dataset_summary
    from .viz.tool_config import load_config

    try:
        cfg = load_config(args.config_file, args.opts)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    for name, json_file, image_root in args.coco:
        if name in DatasetCatalog.list():
            print(f"error: --coco {name}: a dataset of that name is already registered",
                  file=sys.stderr)
            return 2
        register_coco_instances(name, {}, json_file, image_root)
    training = list(cfg.DATASETS.TRAIN)
    names = args.dataset or [name for name, _, _ in args.coco] or list(
        dict.fromkeys(training + list(cfg.DATASETS.TEST)))
    if not names:
        print("error: no dataset to check (the config has no DATASETS.TRAIN or DATASETS.TEST, "
              "and no --dataset was given)", file=sys.stderr)
        return 2
    output_dir = args.output or os.path.join(cfg.OUTPUT_DIR, "dataset_check")
    os.makedirs(output_dir, exist_ok=True)
    points = detector_points(cfg)
    scales = input_scales(cfg)

    failed = {}
    for name in names:
        role = "training" if name in training else "evaluation"
        print(f"\n=== {name} ({role} dataset) ===", flush=True)
        summary, errors = check_one_dataset(
            cfg, name, is_training=name in training, output_dir=output_dir,
            use_cache=not args.no_cache, workers=args.workers, points=points, scales=scales)
        for error in errors:
            print("  ERROR: " + error.replace("\n", "\n    "))
        if summary is not None:
            print(format_summary(summary))
            picture = plot_dataset_summary(
                summary, os.path.join(output_dir, f"dataset_summary_{_file_part(name)}.png"))
            numbers = os.path.join(output_dir, f"dataset_summary_{_file_part(name)}.json")
            with open(numbers, "w", encoding="utf-8") as f:
                json.dump(summary.to_json(), f, indent=1)
            print(f"  summary picture: {picture}\n  summary numbers: {numbers}")
        if errors:
            failed[name] = errors
        sys.stdout.flush()

    if failed:
        print(f"\n{len(failed)} of {len(names)} datasets FAIL the checks that train_net.py runs "
              f"before training: {', '.join(failed)}. See the errors above.")
        return 1
    print(f"\nAll {len(names)} datasets pass the checks that train_net.py runs before training.")
    return 0


def _file_part(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)


if __name__ == "__main__":
    sys.exit(main())
