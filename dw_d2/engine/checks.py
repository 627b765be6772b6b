"""Start-up checks that a training or evaluation config agrees with its datasets."""
import logging
from typing import Optional, Sequence

from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY

from ..data import load_dataset_dicts

logger = logging.getLogger(__name__)

# Detectron2's own meta-architectures and the key of their number of classes.
_DETECTRON2_NUM_CLASSES_KEYS = {
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
}


def num_classes_key(cfg) -> Optional[str]:
    """The config key holding the model's number of classes, e.g. ``"MODEL.DW.NUM_CLASSES"``.

    ``MODEL.DW.NUM_CLASSES`` for a meta-architecture registered by dw_d2 (every config built
    with ``add_dw_config`` has ``MODEL.DW``, so the architecture decides, not the key);
    None for an architecture this check does not know.
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch in _DETECTRON2_NUM_CLASSES_KEYS:
        return _DETECTRON2_NUM_CLASSES_KEYS[arch]
    try:
        arch_class = META_ARCH_REGISTRY.get(arch)
    except KeyError:
        return None  # build_model reports the unknown architecture
    if arch_class.__module__.split(".")[0] == "dw_d2" and "DW" in cfg.MODEL:
        return "MODEL.DW.NUM_CLASSES"
    return None


def _config_value(cfg, dotted_key: str):
    node = cfg
    for part in dotted_key.split("."):
        node = node[part]
    return node


def _preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_num_classes(cfg, dataset_names: Sequence[str]) -> None:
    """Raise ``ValueError`` if the model's number of classes differs from a dataset's.

    A dataset's classes are its metadata's ``thing_classes`` (a COCO JSON dataset gets them
    when loaded; one not loaded yet is loaded here). Datasets without ``thing_classes`` and
    architectures that :func:`num_classes_key` does not know are skipped.
    """
    key = num_classes_key(cfg)
    if key is None:
        logger.info(f"Not checking the number of classes of {cfg.MODEL.META_ARCHITECTURE}.")
        return
    num_classes = _config_value(cfg, key)
    for name in dataset_names:
        thing_classes = MetadataCatalog.get(name).get("thing_classes")
        if thing_classes is None:
            load_dataset_dicts(name)
            thing_classes = MetadataCatalog.get(name).get("thing_classes")
        if thing_classes is not None and len(thing_classes) != num_classes:
            raise ValueError(
                f"{key} is {num_classes}, but dataset '{name}' has {len(thing_classes)} "
                f"classes ({_preview(thing_classes)}). Set {key} {len(thing_classes)} "
                f"(for example as a trailing KEY VALUE option of train_net.py)."
            )
