"""Registration of ``dw_shapes_train`` and ``dw_shapes_val`` in Detectron2's catalogs.

Generation happens when a split is first loaded (or :func:`prepare_dataset` is called), not at
registration, so importing dw_d2 stays cheap.
"""
from pathlib import Path
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .generate import (
    DATASET_NAMES,
    SHAPE_CLASSES,
    annotation_file,
    default_dataset_dir,
    ensure_shapes_dataset,
    image_dir,
)


def _load_split(dataset_dir: Path, split: str, dataset_name: str) -> List[dict]:
    ensure_shapes_dataset(dataset_dir)
    return load_coco_json(
        str(annotation_file(dataset_dir, split)), str(image_dir(dataset_dir, split)), dataset_name
    )


def register_shapes_dataset(dataset_dir=None) -> None:
    """Register ``dw_shapes_train`` and ``dw_shapes_val`` in Detectron2's catalogs.

    The same as Detectron2's ``register_coco_instances`` (same loader, same metadata:
    ``thing_classes``, ``json_file``, ``image_root``, ``evaluator_type="coco"``), except that
    loading a split first generates the dataset if needed. Registering again (for example with
    another ``dataset_dir``) replaces the previous registration.
    """
    dataset_dir = Path(dataset_dir) if dataset_dir is not None else default_dataset_dir()
    for name, split in DATASET_NAMES.items():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name, lambda d=dataset_dir, s=split, n=name: _load_split(d, s, n)
        )
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPE_CLASSES),
            json_file=str(annotation_file(dataset_dir, split)),
            image_root=str(image_dir(dataset_dir, split)),
            evaluator_type="coco",
            dataset_dir=str(dataset_dir),
        )


def prepare_dataset(dataset_name: str) -> None:
    """Make sure a dataset's files exist before something reads them without loading it.

    Generates ``dw_shapes`` when ``dataset_name`` is one of its splits (for example before a
    ``COCOEvaluator`` reads its ``json_file``); does nothing for other datasets.
    """
    if dataset_name in DATASET_NAMES:
        ensure_shapes_dataset(MetadataCatalog.get(dataset_name).dataset_dir)
