"""Small COCO datasets cut from the built-in dw_shapes, with one planted fault: what a new user's
dataset looks like to the end-to-end tests of train_net.py and the check_dataset command."""
import json
from pathlib import Path
from typing import NamedTuple, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from dw_d2.data import prepare_dataset

# What make_shapes_subset can plant in the first image (or its first annotation).
FAULTS = ("garbage", "size", "zero_width")


class ShapesSubset(NamedTuple):
    name: str  # the registered dataset
    file_name: str  # the first image (where the fault is)
    image_id: int  # its id


def make_shapes_subset(folder: Path, name: str, split: str, count: int,
                       fault: Optional[str] = None) -> ShapesSubset:
    """Copy the first ``count`` images of ``dw_shapes_<split>`` into ``folder``, write their
    COCO JSON with ``fault`` planted, and register it as ``name``
    (:func:`unregister` removes it)."""
    source = f"dw_shapes_{split}"
    prepare_dataset(source)
    meta = MetadataCatalog.get(source)
    coco = json.loads(Path(meta.json_file).read_text())
    coco["images"] = coco["images"][:count]
    kept = {image["id"] for image in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
    folder.mkdir(parents=True)
    for image in coco["images"]:
        (folder / image["file_name"]).write_bytes(
            (Path(meta.image_root) / image["file_name"]).read_bytes())
    first = coco["images"][0]
    if fault == "garbage":
        (folder / first["file_name"]).write_bytes(b"\x89garbage" * 100)
    elif fault == "size":
        first["width"] += 1
    elif fault == "zero_width":
        coco["annotations"][0]["bbox"][2] = 0
    elif fault is not None:
        raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
    json_file = folder / "instances.json"
    json_file.write_text(json.dumps(coco))
    register_coco_instances(name, {}, str(json_file), str(folder))
    return ShapesSubset(name, str(folder / first["file_name"]), first["id"])


def unregister(name: str) -> None:
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
