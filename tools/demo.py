#!/usr/bin/env python
"""Run a trained dw-d2 detector on images; save each picture with its detections and a JSON.

Example::

    python tools/demo.py --config-file configs/Builtin/dw_R_18_FPN_shapes.yaml \\
        --input 'datasets/dw_shapes/val/*.png' --output output/demo \\
        --opts MODEL.WEIGHTS output/shapes_dw/model_final.pth

For every input ``NAME.ext`` it writes ``OUTPUT/NAME.png`` (the detections drawn by
Detectron2's Visualizer, class names from the metadata of ``cfg.DATASETS.TEST[0]``) and
``OUTPUT/NAME.json`` (boxes XYXY in pixels of the input image, scores, classes).
"""
import argparse
import glob
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from dw_d2.viz.detections import save_prediction  # noqa: E402
from dw_d2.viz.tool_config import dataset_class_names, load_config  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--input", nargs="+", required=True,
        help="image files or glob patterns (quote them so the shell does not expand them)",
    )
    parser.add_argument("--output", required=True, help="folder for the pictures and JSON files")
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5,
        help="minimum score for a detection to be drawn and saved",
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER,
        help="modify config options using the command-line 'KEY VALUE' pairs",
    )
    return parser


def expand_inputs(patterns):
    """Image files named by ``patterns`` (files or globs), in order, without duplicates."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        files.extend(m for m in matches if m not in files)
    return files


def main(argv=None):
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="dw_d2.demo")
    cfg = load_config(args.config_file, args.opts, freeze=False)
    if hasattr(cfg.MODEL, "DW"):
        # As in Detectron2's demo: filtering before NMS keeps exactly the detections that would
        # score above the threshold after it (a suppressing box always scores higher).
        cfg.MODEL.DW.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.freeze()
    if not cfg.DATASETS.TEST:
        raise ValueError(f"{args.config_file}: DATASETS.TEST is empty; it names the metadata "
                         "(class names) the demo uses")
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: running a randomly initialised model")

    files = expand_inputs(args.input)
    dataset_class_names(cfg.DATASETS.TEST[0])  # fills thing_classes of lazily loaded datasets
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    predictor = DefaultPredictor(cfg)
    for image_file in files:
        png_path, json_path, count = save_prediction(
            predictor, image_file, args.output, args.confidence_threshold, metadata
        )
        logger.info(f"{image_file}: {count} detections -> {png_path}, {json_path}")
    return 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
