"""Config and dataset look-ups shared by the command-line tools.

The tools read a config without ``default_setup`` (which would claim the config's
``OUTPUT_DIR`` for logs and write a copy of the config there).
"""
import logging
from pathlib import Path

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["load_config", "dataset_class_names", "dataset_record"]

logger = logging.getLogger(__name__)


def load_config(config_file, opts=(), freeze=True):
    """A Detectron2 config with the dw-d2 keys, merged from a YAML file and ``KEY VALUE`` opts.

    Args:
        config_file (str or Path): a config YAML (e.g. ``configs/Builtin/dw_R_18_FPN_shapes.yaml``).
        opts (list[str]): trailing ``KEY VALUE`` overrides, as on ``train_net.py``'s command line.
        freeze (bool): freeze the result.
    """
    from dw_d2 import add_dw_config  # the package import also registers datasets and models

    config_file = Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    opts = list(opts or [])
    if len(opts) % 2:
        raise ValueError(f"--opts takes KEY VALUE pairs; got an odd number of items: {opts}")
    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(opts)
    if freeze:
        cfg.freeze()
    return cfg


def dataset_class_names(dataset_name):
    """The ``thing_classes`` of a registered dataset (loading it if its metadata lacks them).

    ``register_coco_instances`` only fills ``thing_classes`` when the JSON is first loaded, so
    the dataset is loaded once if needed.
    """
    metadata = MetadataCatalog.get(dataset_name)
    if not hasattr(metadata, "thing_classes"):
        DatasetCatalog.get(dataset_name)
    if not hasattr(metadata, "thing_classes"):
        raise ValueError(f"dataset {dataset_name!r} has no 'thing_classes' in its metadata")
    return list(metadata.thing_classes)


def dataset_record(dataset_name, index=None, image_id=None):
    """One record (a Detectron2 dataset dict) of a registered dataset.

    Args:
        dataset_name (str): a name registered in ``DatasetCatalog``.
        index (int or None): position in the dataset.
        image_id (int, str or None): the record's ``image_id``; exactly one of ``index`` and
            ``image_id`` must be given.
    """
    if (index is None) == (image_id is None):
        raise ValueError("give exactly one of index and image_id")
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"dataset {dataset_name!r} is not registered; "
            f"registered: {sorted(DatasetCatalog.list())}"
        )
    records = DatasetCatalog.get(dataset_name)
    if index is not None:
        if not -len(records) <= index < len(records):
            raise IndexError(
                f"index {index} is out of range for dataset {dataset_name!r} "
                f"({len(records)} images)"
            )
        return records[index]
    matches = [r for r in records if str(r.get("image_id")) == str(image_id)]
    if not matches:
        raise KeyError(f"dataset {dataset_name!r} has no image with image_id {image_id!r}")
    return matches[0]
