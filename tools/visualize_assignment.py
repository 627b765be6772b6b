#!/usr/bin/env python
"""Draw the positive and negative weights that DW (or AutoAssign) assigns to one image.

For each GT box of the image (rows) and each FPN level (columns, positive weights then negative
weights), the weights over the level's points are drawn as a heat map on the image. The weights
are those of the config's assigner (``MODEL.ASSIGNER.NAME``), computed by the detector's own
assigner on the model's predictions (the model in inference mode, so BatchNorm uses its
running statistics): with a trained checkpoint they show what training assigns at that point;
without one, what it assigns at initialisation.

Examples::

    python tools/visualize_assignment.py --config-file configs/Builtin/dw_R_18_FPN_shapes.yaml \\
        --dataset dw_shapes_val --index 0 --output assignment.png \\
        --opts MODEL.WEIGHTS output/shapes_dw/model_final.pth
    python tools/visualize_assignment.py \\
        --config-file configs/Builtin/autoassign_R_18_FPN_shapes.yaml \\
        --image-id 12 --output aa.png        # initial weights, an image of DATASETS.TRAIN[0]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from dw_d2.viz.assignment import (  # noqa: E402
    compute_assignment_maps,
    deterministic_mapper,
    plot_assignment_grid,
)
from dw_d2.viz.tool_config import dataset_class_names, dataset_record, load_config  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]),
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--dataset", help="registered dataset name (default: DATASETS.TRAIN[0])")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=int, help="position of the image in the dataset")
    which.add_argument("--image-id", help="image_id of the image")
    parser.add_argument("--output", default="assignment.png", help="the PNG to write")
    parser.add_argument("--max-gt", type=int, default=8, help="draw at most this many GT boxes")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER,
        help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS path/to/model_final.pth",
    )
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="dw_d2.visualize_assignment")
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.META_ARCHITECTURE != "DWDetector":
        raise ValueError(
            f"{args.config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}; "
            "the assignment can only be drawn for 'DWDetector' (DW or AutoAssign)"
        )
    dataset_name = args.dataset or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None)
    if dataset_name is None:
        raise ValueError("no --dataset given and DATASETS.TRAIN is empty")

    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        source = Path(cfg.MODEL.WEIGHTS).name
    else:
        logger.warning("MODEL.WEIGHTS is empty: drawing the assignment of the initial weights")
        source = "initial weights"
    model.eval()

    record = dataset_record(dataset_name, index=args.index, image_id=args.image_id)
    maps = compute_assignment_maps(model, deterministic_mapper(cfg)(record))
    title = (f"{maps.assigner} assignment, {dataset_name} image {record.get('image_id')} "
             f"({Path(record['file_name']).name}), {source}")
    path = plot_assignment_grid(maps, args.output, class_names=dataset_class_names(dataset_name),
                                max_gt_boxes=args.max_gt, title=title)
    logger.info(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
