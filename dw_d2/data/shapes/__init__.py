"""``dw_shapes``: a small synthetic detection dataset that dw-d2 generates itself.

Images of filled circles, squares, triangles and crosses (4 classes) on textured, noisy
backgrounds, with COCO-format annotations, so that ``train_net.py`` can train and COCO-evaluate
end to end on a CPU without downloading anything: 240 training and 60 validation images of
160-256 px (some square, most not), objects from about 6 px to 60% of the shorter image side,
some overlapping, about 10% of the images empty. Every image is a pure function of a fixed seed
and its index: generating the dataset twice gives identical annotations and pixels.

Registered as ``dw_shapes_train`` and ``dw_shapes_val`` when dw_d2 is imported; generated on
first load under ``$DW_D2_DATASETS/dw_shapes`` (default ``./datasets/dw_shapes``; a relative
path is relative to the working directory, like Detectron2's ``DETECTRON2_DATASETS``)::

    VERSION.json                            the stamp: generator version, classes, split sizes
    annotations/instances_{train,val}.json
    {train,val}/000000.png ...

Regenerate by hand with ``python -m dw_d2.data.shapes --out DIR``.
"""
from .generate import (
    DATASET_NAMES,
    GENERATOR_VERSION,
    SHAPE_CLASSES,
    SPLITS,
    default_dataset_dir,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    is_up_to_date,
)
from .register import prepare_dataset, register_shapes_dataset

__all__ = [
    "DATASET_NAMES",
    "GENERATOR_VERSION",
    "SHAPE_CLASSES",
    "SPLITS",
    "default_dataset_dir",
    "ensure_shapes_dataset",
    "generate_shapes_dataset",
    "is_up_to_date",
    "prepare_dataset",
    "register_shapes_dataset",
]
