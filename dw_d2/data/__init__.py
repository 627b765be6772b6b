"""dw-d2's data: the built-in ``dw_shapes`` dataset, annotation checks and the resumable loader.

Importing this package registers ``dw_shapes_train`` and ``dw_shapes_val`` (generated on first
load under ``$DW_D2_DATASETS/dw_shapes``; see :mod:`dw_d2.data.shapes`), and the real
``deepforest_trees_train`` / ``deepforest_trees_val`` (tree crowns, downloaded from PyPI and
converted on first load; see :mod:`dw_d2.data.trees`).
"""
from .build import (
    ResumableTrainLoader,
    build_resumable_train_loader,
    check_evaluation_dataset,
    load_training_dataset_dicts,
)
from .samplers import ResumableBatchSampler, aspect_ratio_group_ids
from .shapes import (
    SHAPE_CLASSES,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    register_shapes_dataset,
)
from .shapes import prepare_dataset as _prepare_shapes
from .trees import prepare_if_trees, register_trees_dataset
from .validation import (
    AnnotationChange,
    AnnotationError,
    ImageFileError,
    check_annotations,
    check_image_files,
    find_image_file_problems,
    load_dataset_dicts,
    validate_dataset_dicts,
)

register_shapes_dataset()
register_trees_dataset()


def prepare_dataset(dataset_name: str) -> None:
    """Make sure the files of one of dw-d2's generated or downloaded datasets exist before
    something reads them without loading the dataset (``COCOEvaluator`` reads ``json_file``);
    does nothing for other datasets."""
    _prepare_shapes(dataset_name)
    prepare_if_trees(dataset_name)


__all__ = [
    "AnnotationChange",
    "AnnotationError",
    "ImageFileError",
    "ResumableBatchSampler",
    "ResumableTrainLoader",
    "SHAPE_CLASSES",
    "aspect_ratio_group_ids",
    "build_resumable_train_loader",
    "check_annotations",
    "check_evaluation_dataset",
    "check_image_files",
    "ensure_shapes_dataset",
    "find_image_file_problems",
    "generate_shapes_dataset",
    "load_dataset_dicts",
    "load_training_dataset_dicts",
    "prepare_dataset",
    "register_shapes_dataset",
    "register_trees_dataset",
    "validate_dataset_dicts",
]
