"""``deepforest_trees``: a small real detection dataset (tree crowns in aerial photographs)
taken from a package on PyPI.

The PyPI wheel of DeepForest (``deepforest==2.1.0``, MIT licence) ships sample images from
NEON's airborne observation platform (10 cm per pixel RGB) with tree-crown boxes in Pascal VOC
XML. This module downloads that wheel once with pip (``pip download --no-deps``: nothing is
installed), checks its SHA-256, and converts the samples to a one-class COCO dataset:

* ``deepforest_trees_train``: ``2019_YELL_2_528000_4978000_image_crop2`` (2299 x 2472 px,
  574 crowns, Yellowstone) cut into 6 x 7 tiles of 400 x 400 px, evenly spread from edge to
  edge (neighbours overlap by 20 to 55 px); a crown goes to each tile that holds at least half
  of its box, clipped to the tile;
* ``deepforest_trees_val``: two whole images at their native size, another Yellowstone crop
  (``2019_YELL_2_541000_4977000_image_crop``, 1249 x 1035 px, 279 crowns) and a Florida plot
  (``OSBS_029``, 400 x 400 px, 61 crowns), so that validation also sees another site.

Both are registered when dw_d2 is imported and prepared on first load under
``$DW_D2_DATASETS/deepforest_trees`` (default ``./datasets/deepforest_trees``)::

    VERSION.json                        the stamp: converter version, wheel hash, split sizes
    annotations/instances_{train,val}.json
    {train,val}/*.png

and the downloaded wheel in ``$DW_D2_DATASETS/deepforest_trees_download`` (kept when the
dataset is converted again; copy it there on a machine without access to PyPI).

``python -m dw_d2.data.trees`` prepares it by hand and prints its size.
"""
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = [
    "TREE_CLASSES",
    "TREES_DATASET_NAMES",
    "ensure_trees_dataset",
    "prepare_trees_dataset",
    "register_trees_dataset",
    "trees_dataset_dir",
]

logger = logging.getLogger(__name__)

DATASET_FOLDER = "deepforest_trees"
TREE_CLASSES = ("tree",)
TREES_DATASET_NAMES = {"deepforest_trees_train": "train", "deepforest_trees_val": "val"}
WHEEL_REQUIREMENT = "deepforest==2.1.0"
WHEEL_NAME = "deepforest-2.1.0-py3-none-any.whl"
WHEEL_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
CONVERTER_VERSION = 2
TILE_SIZE = 400
# A crown is kept in a tile when at least this fraction of its box lies inside the tile.
MIN_VISIBLE_FRACTION = 0.5
TRAIN_IMAGES = ("2019_YELL_2_528000_4978000_image_crop2",)
VAL_IMAGES = ("2019_YELL_2_541000_4977000_image_crop", "OSBS_029")
STAMP_FILE = "VERSION.json"


def trees_dataset_dir() -> Path:
    """``$DW_D2_DATASETS/deepforest_trees`` (``DW_D2_DATASETS`` defaults to ``datasets``)."""
    return Path(os.path.expanduser(os.getenv("DW_D2_DATASETS", "datasets"))) / DATASET_FOLDER


def _annotation_file(dataset_dir: Path, split: str) -> Path:
    return Path(dataset_dir) / "annotations" / f"instances_{split}.json"


def _expected_stamp() -> dict:
    return {"converter_version": CONVERTER_VERSION, "wheel_sha256": WHEEL_SHA256,
            "tile_size": TILE_SIZE, "train": list(TRAIN_IMAGES), "val": list(VAL_IMAGES)}


def _is_up_to_date(dataset_dir: Path) -> bool:
    try:
        return json.loads((dataset_dir / STAMP_FILE).read_text()) == _expected_stamp()
    except (OSError, ValueError):
        return False


def download_wheel(download_dir: Path) -> Path:
    """The DeepForest wheel in ``download_dir``, downloaded by pip if absent; SHA-256 checked."""
    wheel = Path(download_dir) / WHEEL_NAME
    if not wheel.is_file():
        download_dir.mkdir(parents=True, exist_ok=True)
        logger.info(f"Downloading {WHEEL_REQUIREMENT} (20 MB, only its sample data is used) "
                    f"into {download_dir} ...")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--dest", str(download_dir), WHEEL_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            raise RuntimeError(
                f"Could not download {WHEEL_REQUIREMENT} with `{' '.join(command)}` "
                f"(exit status {result.returncode}):\n{result.stderr.strip()[-2000:]}\n"
                f"On a machine without access to PyPI, copy {WHEEL_NAME} into {download_dir}.")
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()  # 20 MB
    if actual != WHEEL_SHA256:
        raise ValueError(f"{wheel} has SHA-256 {actual}, expected {WHEEL_SHA256}: delete it "
                         f"and prepare the dataset again")
    return wheel


def _read_voc_boxes(xml_text: bytes, source: str) -> np.ndarray:
    """(M, 4) XYXY boxes of a Pascal VOC annotation (every object is a tree crown)."""
    boxes = []
    for obj in ET.fromstring(xml_text).iter("object"):
        box = obj.find("bndbox")
        try:
            boxes.append([float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
        except (AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: an <object> without a numeric <bndbox>") from e
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _tile_starts(length: int, size: int) -> List[int]:
    """Where the tiles of one side start: as few ``size``-long tiles as cover ``length``,
    evenly spread from one edge to the other (neighbours overlap by less than ``size``)."""
    if length <= size:
        return [0]
    count = -(-length // size)
    return [round(i * (length - size) / (count - 1)) for i in range(count)]


def _tiles(width: int, height: int, size: int) -> List[Tuple[int, int, int, int]]:
    """Tiles of ``size`` x ``size`` (the image's side where it is smaller) covering the image.

    Every tile has the full size: cutting at multiples of ``size`` instead leaves slivers at
    the last row and column (72 px high for the training image), which training upscales to
    its input size and batches together (Detectron2 groups images by aspect ratio), so that
    a sixth of the iterations would see a few cut crowns at twice their size.
    """
    return [(x, y, x + min(size, width), y + min(size, height))
            for y in _tile_starts(height, size) for x in _tile_starts(width, size)]


def _boxes_in_tile(boxes: np.ndarray, tile) -> np.ndarray:
    """The boxes with at least MIN_VISIBLE_FRACTION of their area in ``tile``, clipped to it,
    in the tile's coordinates."""
    x0, y0, x1, y1 = tile
    clipped = np.stack([boxes[:, 0].clip(x0, x1), boxes[:, 1].clip(y0, y1),
                        boxes[:, 2].clip(x0, x1), boxes[:, 3].clip(y0, y1)], axis=1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (area > 0) & (visible >= MIN_VISIBLE_FRACTION * area)
    return clipped[keep] - np.array([x0, y0, x0, y0], dtype=np.float64)


def _convert_split(wheel: zipfile.ZipFile, names, split: str, out: Path, tile: bool) -> dict:
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 2300 * 2500)
    (out / split).mkdir(parents=True)
    images, annotations = [], []
    for name in names:
        with wheel.open(f"deepforest/data/{name}.png") as f:
            picture = Image.open(f).convert("RGB")
        boxes = _read_voc_boxes(wheel.read(f"deepforest/data/{name}.xml"), f"{name}.xml")
        width, height = picture.size
        regions = _tiles(width, height, TILE_SIZE) if tile else [(0, 0, width, height)]
        for x0, y0, x1, y1 in regions:
            file_name = f"{name}_{x0}_{y0}.png" if tile else f"{name}.png"
            picture.crop((x0, y0, x1, y1)).save(out / split / file_name)
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": file_name,
                           "width": x1 - x0, "height": y1 - y0})
            for bx0, by0, bx1, by1 in _boxes_in_tile(boxes, (x0, y0, x1, y1)).tolist():
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                    "bbox": [bx0, by0, bx1 - bx0, by1 - by0],
                    "area": (bx1 - bx0) * (by1 - by0), "iscrowd": 0,
                })
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": TREE_CLASSES[0]}]}


def prepare_trees_dataset(dataset_dir=None) -> Path:
    """Download the wheel if needed and (re)write the dataset into ``dataset_dir``.

    The files are written into a temporary sibling folder renamed into place when complete.
    """
    dataset_dir = Path(dataset_dir) if dataset_dir is not None else trees_dataset_dir()
    download_dir = dataset_dir.parent / f"{DATASET_FOLDER}_download"
    wheel_path = download_wheel(download_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.tmp-", dir=dataset_dir.parent))
    try:
        (staging / "annotations").mkdir()
        with zipfile.ZipFile(wheel_path) as wheel:
            for split, names, tile in (("train", TRAIN_IMAGES, True), ("val", VAL_IMAGES, False)):
                coco = _convert_split(wheel, names, split, staging, tile)
                _annotation_file(staging, split).write_text(json.dumps(coco))
        (staging / STAMP_FILE).write_text(json.dumps(_expected_stamp(), indent=2) + "\n")
        if dataset_dir.exists():
            if _is_up_to_date(dataset_dir):  # a concurrent process finished first
                return dataset_dir
            shutil.rmtree(dataset_dir)
        os.rename(staging, dataset_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"Wrote the deepforest_trees dataset in {dataset_dir}")
    return dataset_dir


def ensure_trees_dataset(dataset_dir=None) -> Path:
    """Prepare the dataset in ``dataset_dir`` unless an up-to-date copy is there."""
    dataset_dir = Path(dataset_dir) if dataset_dir is not None else trees_dataset_dir()
    if not _is_up_to_date(dataset_dir):
        logger.info(f"Preparing the deepforest_trees dataset in {dataset_dir} (first use) ...")
        prepare_trees_dataset(dataset_dir)
    return dataset_dir


def _load_split(dataset_dir: Path, split: str, dataset_name: str) -> List[dict]:
    ensure_trees_dataset(dataset_dir)
    return load_coco_json(str(_annotation_file(dataset_dir, split)),
                          str(Path(dataset_dir) / split), dataset_name)


def register_trees_dataset(dataset_dir=None) -> None:
    """Register ``deepforest_trees_train`` and ``deepforest_trees_val`` as
    ``register_coco_instances`` would, prepared when first loaded."""
    dataset_dir = Path(dataset_dir) if dataset_dir is not None else trees_dataset_dir()
    for name, split in TREES_DATASET_NAMES.items():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda d=dataset_dir, s=split, n=name: _load_split(d, s, n))
        MetadataCatalog.get(name).set(
            thing_classes=list(TREE_CLASSES),
            json_file=str(_annotation_file(dataset_dir, split)),
            image_root=str(Path(dataset_dir) / split),
            evaluator_type="coco",
            dataset_dir=str(dataset_dir),
        )


def prepare_if_trees(dataset_name: str) -> None:
    """Prepare the files of ``dataset_name`` if it is a split of this dataset."""
    if dataset_name in TREES_DATASET_NAMES:
        ensure_trees_dataset(MetadataCatalog.get(dataset_name).dataset_dir)


def _main(argv=None) -> Dict[str, int]:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dw_d2.data.trees",
                                     description="Download and convert the deepforest_trees "
                                                 "dataset (once).")
    parser.add_argument("--out", default=None, help=f"dataset folder (default: "
                                                    f"{trees_dataset_dir()})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = ensure_trees_dataset(args.out)
    sizes = {}
    for split in ("train", "val"):
        coco = json.loads(_annotation_file(out, split).read_text())
        sizes[split] = len(coco["annotations"])
        print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} boxes "
              f"-> {_annotation_file(out, split)}")
    return sizes


if __name__ == "__main__":
    _main()
