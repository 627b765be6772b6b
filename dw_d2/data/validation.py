"""Checks on training annotations, run once before training starts.

What :func:`validate_dataset_dicts` does with each kind of problem:

* a box with a NaN or infinite coordinate: error naming the annotation file (when known), the
  image file, the image id, the annotation's index in the image and the field;
* a category id that is not an integer in ``[0, len(thing_classes))``: error, named the same way
  (for COCO JSON files, :func:`load_dataset_dicts` reports unknown ids with the offending
  image and annotation before Detectron2's id mapping turns them into a bare ``KeyError``);
* a box with zero or negative width or height: dropped, and the number dropped is logged;
* a box wholly outside its image: dropped, count logged;
* a box partly outside its image: clipped to the image, ``[0, width] x [0, height]``, count
  logged (Detectron2 clips the transformed boxes the same way later; clipping first means
  the degenerate and outside checks see the box that will actually be trained on);
* an image with no annotations: kept; ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` decides, as in
  Detectron2 (dense detectors learn negatives from such images);
* crowd annotations (``iscrowd=1``): not checked and left as they are: Detectron2's
  ``DatasetMapper`` drops them before they reach the model;
* an image file that does not exist or cannot be read: error listing the files, raised before
  training starts (existence and permission only: decoding every image up front would cost as
  much as an epoch).

Only the training dicts are validated: COCO evaluation reads the annotation file itself.
"""
import json
import logging
import os
from typing import List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

logger = logging.getLogger(__name__)

_MAX_LISTED = 5  # how many offending items an error message lists


class AnnotationError(ValueError):
    """An annotation that training cannot use; the message says where it is."""


def _where(annotation_file: Optional[str], record: dict, index: int) -> str:
    source = f"annotation file {annotation_file}, " if annotation_file else ""
    return (f"{source}image {record.get('file_name')!r} (image_id={record.get('image_id')}), "
            f"annotation #{index} of that image")


def load_dataset_dicts(dataset_name: str) -> List[dict]:
    """``DatasetCatalog.get(dataset_name)`` with errors that name the annotation file.

    Detectron2's COCO loader reports an annotation file that is not valid JSON with the
    ``json`` module's bare message, and an annotation whose category id is not among the
    file's ``categories`` with a ``KeyError`` that names neither the file nor the image.
    """
    annotation_file = MetadataCatalog.get(dataset_name).get("json_file")
    try:
        return DatasetCatalog.get(dataset_name)
    except json.JSONDecodeError as e:
        raise AnnotationError(
            f"Annotation file {annotation_file} of dataset '{dataset_name}' is not valid JSON: "
            f"{e.msg} at line {e.lineno}, column {e.colno}."
        ) from e
    except KeyError as e:
        unknown = _unknown_category_ids(annotation_file) if annotation_file else None
        if not unknown:
            raise
        raise AnnotationError(
            f"Annotation file {annotation_file} of dataset '{dataset_name}' has annotations "
            f"whose category_id is not among its 'categories' ({unknown['known']}): "
            + "; ".join(unknown["examples"])
            + (f" (and {unknown['count'] - len(unknown['examples'])} more)"
               if unknown["count"] > len(unknown["examples"]) else "")
        ) from e


def _unknown_category_ids(annotation_file: str):
    """Annotations of a COCO file whose category id is not declared; None if it has none."""
    try:
        with open(annotation_file) as f:
            coco = json.load(f)
        known = sorted(c["id"] for c in coco["categories"])
        bad = [a for a in coco["annotations"] if a.get("category_id") not in set(known)]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not bad:
        return None
    examples = [f"annotation id {a.get('id')} of image_id {a.get('image_id')} has "
                f"category_id={a.get('category_id')!r}" for a in bad[:_MAX_LISTED]]
    return {"known": known, "examples": examples, "count": len(bad)}


def check_image_files(dataset_dicts: Sequence[dict], dataset_name: str) -> None:
    """Raise ``FileNotFoundError`` listing the images that do not exist or cannot be read."""
    missing = [d["file_name"] for d in dataset_dicts
               if not (os.path.isfile(d["file_name"]) and os.access(d["file_name"], os.R_OK))]
    if missing:
        listed = ", ".join(repr(f) for f in missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise FileNotFoundError(
            f"Dataset '{dataset_name}': {len(missing)} of {len(dataset_dicts)} image files are "
            f"missing or unreadable: {listed}{more}. Check the dataset's image_root "
            f"({MetadataCatalog.get(dataset_name).get('image_root', 'not set')})."
        )


def validate_dataset_dicts(
    dataset_dicts: List[dict],
    dataset_name: str,
    *,
    num_classes: Optional[int] = None,
    check_files: bool = True,
) -> List[dict]:
    """Check and clean the annotations of one training dataset (see the module docstring).

    Args:
        dataset_dicts: Detectron2 dataset dicts (``file_name``, ``image_id``, ``height``,
            ``width``, ``annotations`` with ``bbox``, ``bbox_mode``, ``category_id``).
        dataset_name: the registered name, for messages and for the annotation file's name.
        num_classes: number of categories; None reads ``thing_classes`` from the metadata
            (the category check is skipped when neither is known).
        check_files: check that every image file exists and is readable.

    Returns:
        list[dict]: the same images (none dropped); records whose boxes changed are shallow
        copies with new annotation lists; the input is not modified.
    """
    meta = MetadataCatalog.get(dataset_name)
    annotation_file = meta.get("json_file")
    if num_classes is None and meta.get("thing_classes") is not None:
        num_classes = len(meta.thing_classes)
    if check_files:
        check_image_files(dataset_dicts, dataset_name)

    # Every non-crowd annotation as one row: (record index, annotation index).
    owners = [(r, a) for r, record in enumerate(dataset_dicts)
              for a, ann in enumerate(record.get("annotations", ()))
              if not ann.get("iscrowd", 0)]
    if not owners:
        return list(dataset_dicts)
    anns = [dataset_dicts[r]["annotations"][a] for r, a in owners]
    record_index = np.array([r for r, _ in owners])

    _check_categories(dataset_dicts, owners, anns, num_classes, annotation_file)
    boxes = _boxes_xyxy(dataset_dicts, owners, anns, annotation_file)

    width_height = np.array([[dataset_dicts[r].get("width", np.inf),
                              dataset_dicts[r].get("height", np.inf)] for r in record_index],
                            dtype=np.float64)
    degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    outside = ~degenerate & (
        (boxes[:, 0] >= width_height[:, 0]) | (boxes[:, 1] >= width_height[:, 1])
        | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
    )
    clipped_boxes = np.concatenate(
        [np.clip(boxes[:, :2], 0, width_height), np.clip(boxes[:, 2:], 0, width_height)], axis=1
    )
    clipped = ~degenerate & ~outside & (clipped_boxes != boxes).any(axis=1)
    dropped = degenerate | outside

    if degenerate.any() or outside.any() or clipped.any():
        logger.warning(
            f"Dataset '{dataset_name}': dropped {int(degenerate.sum())} boxes with zero or "
            f"negative width/height and {int(outside.sum())} boxes wholly outside their image; "
            f"clipped {int(clipped.sum())} boxes partly outside their image to the image "
            f"(of {len(owners)} boxes)."
        )
    return _rewrite(dataset_dicts, owners, anns, dropped, clipped, clipped_boxes)


def _check_categories(dataset_dicts, owners, anns, num_classes, annotation_file):
    ids = [ann.get("category_id") for ann in anns]
    valid = np.array([isinstance(c, (int, np.integer)) and not isinstance(c, bool)
                      for c in ids])
    if valid.all():
        values = np.array(ids, dtype=np.int64)
        valid = (values >= 0) & (values < (num_classes if num_classes is not None else np.inf))
    if not valid.all():
        k = int(np.flatnonzero(~valid)[0])
        r, a = owners[k]
        expected = (f"an integer in [0, {num_classes})" if num_classes is not None
                    else "a non-negative integer")
        raise AnnotationError(
            f"{_where(annotation_file, dataset_dicts[r], a)}: field 'category_id' is "
            f"{ids[k]!r}, expected {expected} (a contiguous id; {int((~valid).sum())} "
            f"annotations have such ids)."
        )


def _boxes_xyxy(dataset_dicts, owners, anns, annotation_file) -> np.ndarray:
    """All boxes as an (N, 4) float64 XYXY_ABS array; errors for malformed or non-finite ones."""
    try:
        raw = np.array([ann.get("bbox") for ann in anns], dtype=np.float64)
        well_formed = raw.ndim == 2 and raw.shape[1] == 4
    except (ValueError, TypeError):
        well_formed = False
    if not well_formed:
        k = next(k for k, ann in enumerate(anns) if not _is_four_numbers(ann.get("bbox")))
        r, a = owners[k]
        raise AnnotationError(f"{_where(annotation_file, dataset_dicts[r], a)}: field "
                              f"'bbox' is {anns[k].get('bbox')!r}, expected 4 numbers.")
    nonfinite = ~np.isfinite(raw).all(axis=1)
    if nonfinite.any():
        k = int(np.flatnonzero(nonfinite)[0])
        r, a = owners[k]
        raise AnnotationError(
            f"{_where(annotation_file, dataset_dicts[r], a)}: field 'bbox' has a non-finite "
            f"coordinate: {anns[k]['bbox']!r} ({int(nonfinite.sum())} boxes have NaN/inf)."
        )
    modes = np.array([int(ann.get("bbox_mode", BoxMode.XYXY_ABS)) for ann in anns])
    unsupported = ~np.isin(modes, [int(BoxMode.XYXY_ABS), int(BoxMode.XYWH_ABS)])
    if unsupported.any():
        k = int(np.flatnonzero(unsupported)[0])
        r, a = owners[k]
        raise AnnotationError(
            f"{_where(annotation_file, dataset_dicts[r], a)}: field 'bbox_mode' is "
            f"{BoxMode(int(modes[k]))!r}; training supports XYXY_ABS and XYWH_ABS."
        )
    xywh = modes == int(BoxMode.XYWH_ABS)
    raw[xywh, 2:] += raw[xywh, :2]
    return raw


def _is_four_numbers(value) -> bool:
    try:
        return np.asarray(value, dtype=np.float64).shape == (4,)
    except (ValueError, TypeError):
        return False


def _rewrite(dataset_dicts, owners, anns, dropped, clipped, clipped_boxes):
    changed = np.flatnonzero(dropped | clipped)
    if changed.size == 0:
        return list(dataset_dicts)
    new_annotations = {}
    for k in changed.tolist():
        r, a = owners[k]
        record_anns = new_annotations.setdefault(r, list(dataset_dicts[r]["annotations"]))
        if dropped[k]:
            record_anns[a] = None
        else:
            ann = dict(anns[k])
            mode = BoxMode(int(ann.get("bbox_mode", BoxMode.XYXY_ABS)))
            ann["bbox"] = BoxMode.convert(clipped_boxes[k].tolist(), BoxMode.XYXY_ABS, mode)
            record_anns[a] = ann
    result = list(dataset_dicts)
    for r, record_anns in new_annotations.items():
        result[r] = dict(dataset_dicts[r], annotations=[x for x in record_anns if x is not None])
    return result
