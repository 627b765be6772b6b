"""Checks on a dataset's annotations and image files, run once before training starts.

What :func:`validate_dataset_dicts` does with each kind of problem:

* a box with a NaN or infinite coordinate: error naming the annotation file (when known), the
  image file, the image id, the annotation's index in the image and the field;
* a category id that is not an integer in ``[0, len(thing_classes))``: error, named the same way
  (for COCO JSON files, :func:`load_dataset_dicts` reports unknown ids with the offending
  image and annotation before Detectron2's id mapping turns them into a bare ``KeyError``);
* a box with zero or negative width or height: dropped;
* a box wholly outside its image: dropped;
* a box partly outside its image: clipped to the image, ``[0, width] x [0, height]``
  (Detectron2 clips the transformed boxes the same way later; clipping first means the
  degenerate and outside checks see the box that will actually be trained on);
* crowd annotations (``iscrowd=1``): left as they are, and counted: Detectron2's
  ``DatasetMapper`` drops them before they reach the model;
* every dropped, clipped or ignored annotation is an :class:`AnnotationChange`: the log counts
  them by cause, names the first few (file, image id, annotation id, box) and says where the
  full list is written (``annotation_changes_<dataset>.json`` in the report folder, the
  training run's ``OUTPUT_DIR``);
* an image with no annotations: kept; ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` decides, as in
  Detectron2 (dense detectors learn negatives from such images);
* image files (:func:`check_image_files`): a file that does not exist or cannot be opened,
  that Pillow cannot identify as an image, or whose size (after the EXIF orientation that
  Detectron2 applies) differs from the record's ``width``/``height``, stops the run with an
  error listing the first 10 such files (file, image id, field, both values) and their number.
  Only headers are read, in parallel, and the results are cached between runs
  (:mod:`dw_d2.data.image_headers`).
"""
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils import comm

from .image_headers import ImageFileInfo, ImageInfoCache, cache_key, read_image_infos

logger = logging.getLogger(__name__)

_MAX_LISTED = 5  # how many offending items an error message lists
_MAX_LISTED_FILES = 10  # how many image files an image-file error lists
_MAX_LOGGED_PER_CAUSE = 3  # how many changed annotations of each cause the log names


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


class ImageFileError(ValueError):
    """Image files that Detectron2's data loader would fail on; the message lists them."""


@dataclass(frozen=True)
class ImageFileProblem:
    """One image file that training cannot use, and why (``message`` names the field)."""

    index: int  # position of the record in the dataset
    file_name: str
    image_id: object
    kind: str  # "missing", "unreadable", "not_image" or "size"
    message: str


def find_image_file_problems(
    dataset_dicts: Sequence[dict],
    dataset_name: str,
    *,
    use_cache: bool = True,
    workers: Optional[int] = None,
    progress: bool = True,
) -> List[ImageFileProblem]:
    """The records whose image file Detectron2's ``DatasetMapper`` could not use.

    Reads each file's header (:func:`~dw_d2.data.image_headers.read_image_infos`) and compares
    the size Detectron2 would see with the record's ``width``/``height`` exactly as its
    ``check_image_size`` does (only when the record has either key; a tuple comparison).
    Under ``torch.distributed`` each worker reads every ``world_size``-th file and the
    problems are gathered, so every worker returns the same list.

    Args:
        use_cache: reuse and update the per-file cache (see
            :class:`~dw_d2.data.image_headers.ImageInfoCache`).
        workers: processes reading headers (None: chosen from the CPUs and the file count).
        progress: show progress on large datasets (main process only).
    """
    world_size, rank = comm.get_world_size(), comm.get_rank()
    indices = range(rank, len(dataset_dicts), world_size)
    cache = None
    if use_cache:
        cache = ImageInfoCache.for_dataset(
            cache_key(dataset_name, MetadataCatalog.get(dataset_name).get("json_file")))
    if workers is None and world_size > 1:
        workers = max(1, (os.cpu_count() or 1) // _processes_per_machine())
    infos = read_image_infos(
        [dataset_dicts[i]["file_name"] for i in indices], cache=cache, workers=workers,
        progress=progress and comm.is_main_process(),
        description=f"image headers of '{dataset_name}'",
        dataset_paths=[d["file_name"] for d in dataset_dicts] if world_size > 1 else None,
    )
    problems = [p for i, info in zip(indices, infos)
                for p in _image_problems(i, dataset_dicts[i], info)]
    if world_size > 1:
        problems = sorted((p for part in comm.all_gather(problems) for p in part),
                          key=lambda p: p.index)
    return problems


def _processes_per_machine() -> int:
    try:
        return comm.get_local_size()
    except AssertionError:  # upstream Detectron2 outside its launch(): no local group
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def _image_problems(index: int, record: dict, info: ImageFileInfo) -> List[ImageFileProblem]:
    file_name, image_id = record["file_name"], record.get("image_id")

    def problem(kind, message):
        return [ImageFileProblem(index, file_name, image_id, kind, message)]

    if info.problem == "missing":
        return problem("missing", f"does not exist ({info.detail})")
    if info.problem == "unreadable":
        return problem("unreadable", f"cannot be opened ({info.detail})")
    if info.problem == "not_image":
        return problem("not_image", f"is not an image file Pillow can read ({info.detail})")
    if "width" not in record and "height" not in record:
        return []  # Detectron2 then takes the size from the image
    missing_fields = [k for k in ("width", "height") if k not in record]
    if missing_fields:
        return problem("size", f"field '{missing_fields[0]}' is missing (Detectron2 needs both "
                               f"'width' and 'height' when either is given); the image is "
                               f"{info.width}x{info.height}")
    # The comparison of Detectron2's check_image_size, tuple against tuple.
    if (info.width, info.height) == (record["width"], record["height"]):
        return []
    wrong = [f"field '{field}' is {record[field]!r} but the image is {actual} pixels {unit}"
             for field, actual, unit in (("width", info.width, "wide"),
                                         ("height", info.height, "high"))
             if not actual == record[field]]
    rotated = (f" (its EXIF orientation {info.orientation}, which Detectron2 applies when "
               f"reading it, swaps width and height)" if info.orientation in (5, 6, 7, 8) else "")
    return problem("size", "; ".join(wrong) + rotated)


def image_file_error(problems: Sequence[ImageFileProblem], num_images: int,
                     dataset_name: str) -> Exception:
    """The exception listing ``problems``: ``FileNotFoundError`` when a file is missing or
    unreadable, ``ImageFileError`` otherwise."""
    listed = "\n".join(f"  - {p.file_name!r} (image_id={p.image_id!r}): {p.message}"
                       for p in problems[:_MAX_LISTED_FILES])
    more = (f"\n  ... and {len(problems) - _MAX_LISTED_FILES} more"
            if len(problems) > _MAX_LISTED_FILES else "")
    kinds = {p.kind for p in problems}
    missing = kinds & {"missing", "unreadable"}
    what = ("are missing or unreadable" if kinds <= {"missing", "unreadable"} else
            "cannot be used by Detectron2's data loader (missing, unreadable, not an image, or "
            "not of the size the annotations give)")
    hint = (f" Check the dataset's image_root "
            f"({MetadataCatalog.get(dataset_name).get('image_root', 'not set')})." if missing
            else " Fix the files or the records' width/height, or remove those records.")
    annotation_file = MetadataCatalog.get(dataset_name).get("json_file")
    source = f" (annotation file {annotation_file})" if annotation_file else ""
    message = (f"Dataset '{dataset_name}'{source}: {len(problems)} of {num_images} image files "
               f"{what}:"
               f"\n{listed}{more}\n{hint.strip()}")
    return FileNotFoundError(message) if missing else ImageFileError(message)


def check_image_files(dataset_dicts: Sequence[dict], dataset_name: str, **kwargs) -> None:
    """Raise if an image file is missing, unreadable, not an image, or of another size than
    its record says (:func:`find_image_file_problems`; ``kwargs`` go there)."""
    problems = find_image_file_problems(dataset_dicts, dataset_name, **kwargs)
    if problems:
        raise image_file_error(problems, len(dataset_dicts), dataset_name)


# Why an annotation did not reach training as it is in the annotation file.
CHANGE_CAUSES = {
    "degenerate": "dropped: zero or negative width/height",
    "outside": "dropped: wholly outside its image",
    "clipped": "clipped to the image: partly outside it",
    "crowd": "ignored: crowd region (iscrowd=1), which Detectron2's DatasetMapper removes",
}


@dataclass
class AnnotationChange:
    """An annotation that training drops, clips or ignores (``cause``: a key of
    :data:`CHANGE_CAUSES`). ``bbox`` is the box as annotated, in ``bbox_mode``;
    ``clipped_bbox`` the box trained on (same mode) when clipped. ``annotation_id`` is the
    annotation file's ``id`` when known (see :func:`report_annotation_changes`)."""

    cause: str
    file_name: str
    image_id: object
    annotation_index: int  # position among the image's annotations
    annotation_id: Optional[object]
    bbox: list
    bbox_mode: str
    clipped_bbox: Optional[list] = None

    def describe(self) -> str:
        ann = (f"annotation id {self.annotation_id}" if self.annotation_id is not None
               else f"annotation #{self.annotation_index}")
        box = f"bbox {_rounded(self.bbox)}"
        if self.clipped_bbox is not None:
            box += f" -> {_rounded(self.clipped_bbox)}"
        return f"{self.file_name!r} (image_id={self.image_id!r}), {ann}: {box} ({self.bbox_mode})"


def _rounded(box) -> list:
    return [round(float(v), 2) for v in box]


def validate_dataset_dicts(
    dataset_dicts: List[dict],
    dataset_name: str,
    *,
    num_classes: Optional[int] = None,
    check_files: bool = True,
    report_dir: Optional[str] = None,
) -> List[dict]:
    """Check and clean one training dataset (see the module docstring).

    Args:
        dataset_dicts: Detectron2 dataset dicts (``file_name``, ``image_id``, ``height``,
            ``width``, ``annotations`` with ``bbox``, ``bbox_mode``, ``category_id``).
        dataset_name: the registered name, for messages and for the annotation file's name.
        num_classes: number of categories; None reads ``thing_classes`` from the metadata
            (the category check is skipped when neither is known).
        check_files: check every image file (:func:`check_image_files`).
        report_dir: where the full list of dropped, clipped and ignored annotations is
            written (the training run's ``OUTPUT_DIR``); None writes no list.

    Returns:
        list[dict]: the same images (none dropped); records whose boxes changed are shallow
        copies with new annotation lists; the input is not modified.
    """
    cleaned, changes = check_annotations(dataset_dicts, dataset_name, num_classes=num_classes)
    report_annotation_changes(changes, dataset_dicts, dataset_name, report_dir=report_dir)
    if check_files:
        check_image_files(dataset_dicts, dataset_name)
    return cleaned


def check_annotations(
    dataset_dicts: List[dict], dataset_name: str, *, num_classes: Optional[int] = None
) -> Tuple[List[dict], List[AnnotationChange]]:
    """Raise for unusable annotations; return the cleaned dicts and what changed.

    Returns:
        (cleaned dicts as :func:`validate_dataset_dicts` returns them, the list of
        :class:`AnnotationChange`, in dataset order)
    """
    meta = MetadataCatalog.get(dataset_name)
    annotation_file = meta.get("json_file")
    if num_classes is None and meta.get("thing_classes") is not None:
        num_classes = len(meta.thing_classes)

    # Every non-crowd annotation as one row: (record index, annotation index).
    owners, crowd = [], []
    for r, record in enumerate(dataset_dicts):
        for a, ann in enumerate(record.get("annotations", ())):
            (crowd if ann.get("iscrowd", 0) else owners).append((r, a))
    changed = [(r, a, "crowd", None) for r, a in crowd]  # (record, annotation, cause, box)
    if not owners:
        return list(dataset_dicts), _changes(dataset_dicts, changed)
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

    for cause, mask in (("degenerate", degenerate), ("outside", outside), ("clipped", clipped)):
        changed += [(*owners[k], cause, clipped_boxes[k] if cause == "clipped" else None)
                    for k in np.flatnonzero(mask).tolist()]
    return (_rewrite(dataset_dicts, owners, anns, dropped, clipped, clipped_boxes),
            _changes(dataset_dicts, changed))


def _changes(dataset_dicts, changed) -> List[AnnotationChange]:
    """AnnotationChange of each (record, annotation, cause, clipped XYXY box), dataset order."""
    changes = []
    for r, a, cause, clipped_xyxy in sorted(changed, key=lambda row: row[:2]):
        record = dataset_dicts[r]
        ann = record["annotations"][a]
        mode = BoxMode(int(ann.get("bbox_mode", BoxMode.XYXY_ABS)))
        changes.append(AnnotationChange(
            cause=cause, file_name=record.get("file_name"), image_id=record.get("image_id"),
            annotation_index=a, annotation_id=ann.get("id"), bbox=list(ann.get("bbox", [])),
            bbox_mode=mode.name,
            clipped_bbox=(None if clipped_xyxy is None else list(
                BoxMode.convert(clipped_xyxy.tolist(), BoxMode.XYXY_ABS, mode))),
        ))
    return changes


def report_annotation_changes(
    changes: Sequence[AnnotationChange],
    dataset_dicts: Sequence[dict],
    dataset_name: str,
    *,
    report_dir: Optional[str] = None,
) -> Optional[str]:
    """Log the changes by cause, naming the first few, and write them all to
    ``report_dir/annotation_changes_<dataset>.json`` (main process only).

    Records loaded by Detectron2's ``load_coco_json`` keep no annotation ``id``; the ids are
    then looked up in the dataset's COCO file (read once more, only when there is a change to
    report), matching each image's annotations in file order by box and crowd flag.

    Returns:
        the path of the JSON file, or None when nothing was written.
    """
    if not changes or not comm.is_main_process():
        return None
    annotation_file = MetadataCatalog.get(dataset_name).get("json_file")
    _fill_annotation_ids(changes, dataset_dicts, annotation_file)
    counts = {cause: sum(c.cause == cause for c in changes) for cause in CHANGE_CAUSES}
    num_annotations = sum(len(d.get("annotations", ())) for d in dataset_dicts)
    path = None
    if report_dir is not None:
        path = os.path.join(report_dir, f"annotation_changes_{_safe_name(dataset_name)}.json")
        os.makedirs(report_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"dataset": dataset_name, "annotation_file": annotation_file,
                       "num_annotations": num_annotations, "counts": counts,
                       "causes": CHANGE_CAUSES, "changes": [asdict(c) for c in changes]},
                      f, indent=1, default=str)

    summary = (
        f"Dataset '{dataset_name}': dropped {counts['degenerate']} boxes with zero or negative "
        f"width/height and {counts['outside']} boxes wholly outside their image; clipped "
        f"{counts['clipped']} boxes partly outside their image to the image; ignored "
        f"{counts['crowd']} crowd boxes (iscrowd=1) (of {num_annotations} annotations)."
    )
    lines = [f"  {CHANGE_CAUSES[cause].split(':')[0]} ({CHANGE_CAUSES[cause].split(': ')[1]}): "
             f"{c.describe()}"
             for cause in CHANGE_CAUSES
             for c in [c for c in changes if c.cause == cause][:_MAX_LOGGED_PER_CAUSE]]
    where = (f"All {len(changes)} are listed in {path}." if path else
             "Pass report_dir to write the full list.")
    level = logging.WARNING if len(changes) > counts["crowd"] else logging.INFO
    logger.log(level, summary + " The first ones:\n" + "\n".join(lines) + "\n" + where)
    return path


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _fill_annotation_ids(changes, dataset_dicts, annotation_file) -> None:
    unknown = [c for c in changes if c.annotation_id is None]
    if not unknown or not annotation_file:
        return
    try:
        with open(annotation_file, encoding="utf-8") as f:
            coco = json.load(f)
        image_ids = {c.image_id for c in unknown}
        in_file: Dict[object, list] = {i: [] for i in image_ids}
        for ann in coco["annotations"]:
            if ann.get("image_id") in in_file:
                in_file[ann["image_id"]].append(ann)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # the report then names annotations by their index in the image
    records = {d.get("image_id"): d for d in dataset_dicts if d.get("image_id") in in_file}
    ids = {image_id: _aligned_ids(records[image_id].get("annotations", ()), in_file[image_id])
           for image_id in in_file if image_id in records}
    for c in unknown:
        found = ids.get(c.image_id)
        if found and c.annotation_index < len(found):
            c.annotation_id = found[c.annotation_index]


def _aligned_ids(record_anns, file_anns) -> list:
    """The file id of each record annotation: the record keeps the file's order and may skip
    some (Detectron2 drops invalid segmentations), so match in order by box and crowd flag."""
    ids, j = [], 0
    for ann in record_anns:
        key = (list(ann.get("bbox", [])), int(ann.get("iscrowd", 0)))
        while j < len(file_anns) and (list(file_anns[j].get("bbox", [])),
                                      int(file_anns[j].get("iscrowd", 0))) != key:
            j += 1
        ids.append(file_anns[j].get("id") if j < len(file_anns) else None)
        j += 1
    return ids


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
