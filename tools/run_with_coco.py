#!/usr/bin/env python
"""Register COCO-format datasets, then run a dw-d2 script (training, evaluation, demo) with them.

Detectron2 finds datasets by name in a registry that lives in the running process, so a
dataset of your own must be registered in the process that trains, evaluates or draws. This
wrapper does that with ``register_coco_instances`` and then runs the script named after
``--`` as if it had been started itself::

    python tools/run_with_coco.py \\
        --dataset my_train data/train.json data/train_images \\
        --dataset my_val data/val.json data/val_images \\
        -- train_net.py --config-file configs/SmallData/dw_lite0_FPN_small_cpu.yaml \\
           DATASETS.TRAIN '("my_train",)' DATASETS.TEST '("my_val",)' MODEL.DW.NUM_CLASSES 3

The same works for ``train_net.py --eval-only`` and ``tools/demo.py``. In your own code, call
``register_coco_instances`` instead.
"""
import argparse
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]),
        usage="%(prog)s --dataset NAME JSON IMAGES [--dataset ...] -- SCRIPT [ARGS ...]")
    parser.add_argument("--dataset", nargs=3, action="append", required=True,
                        metavar=("NAME", "JSON", "IMAGES"),
                        help="a dataset name, its COCO annotation file and its image folder")
    return parser


def split_command(argv):
    if "--" not in argv:
        raise SystemExit("run_with_coco.py: put the script to run after '--', e.g. "
                         "-- train_net.py --config-file CONFIG")
    cut = argv.index("--")
    script = argv[cut + 1:]
    if not script:
        raise SystemExit("run_with_coco.py: no script after '--'")
    return argv[:cut], script


def register(datasets):
    """Register each (name, json, image folder) with ``register_coco_instances``."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    import dw_d2  # noqa: F401  (registers dw-d2's models and its own datasets first)

    for name, json_file, image_root in datasets:
        if not Path(json_file).is_file():
            raise FileNotFoundError(f"--dataset {name}: annotation file {json_file} not found")
        if not Path(image_root).is_dir():
            raise FileNotFoundError(f"--dataset {name}: image folder {image_root} not found")
        if name in DatasetCatalog.list():
            raise ValueError(f"--dataset {name}: the name is already registered; choose another")
        register_coco_instances(name, {}, json_file, image_root)


def main(argv=None):
    own, script = split_command(list(sys.argv[1:] if argv is None else argv))
    args = get_parser().parse_args(own)
    register(args.dataset)
    script_path = Path(script[0])
    if not script_path.is_file() and (REPO / script_path).is_file():
        script_path = REPO / script_path
    sys.argv = [str(script_path), *script[1:]]
    runpy.run_path(str(script_path), run_name="__main__")


if __name__ == "__main__":
    main()
