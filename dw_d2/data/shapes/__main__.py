"""``python -m dw_d2.data.shapes [--out DIR]``: (re)generate the dw_shapes dataset."""
import argparse
import json
import logging

from .generate import (
    DATASET_FOLDER,
    SHAPE_CLASSES,
    SPLITS,
    annotation_file,
    default_dataset_dir,
    generate_shapes_dataset,
)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m dw_d2.data.shapes", description="(Re)generate the dw_shapes dataset."
    )
    parser.add_argument(
        "--out", default=None,
        help=f"dataset folder to write (default: $DW_D2_DATASETS/{DATASET_FOLDER}, "
             f"currently {default_dataset_dir()})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = generate_shapes_dataset(args.out if args.out is not None else default_dataset_dir())
    for split in SPLITS:
        with open(annotation_file(out, split)) as f:
            coco = json.load(f)
        print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
              f"{len(SHAPE_CLASSES)} classes {SHAPE_CLASSES} -> {annotation_file(out, split)}")


if __name__ == "__main__":
    main()
