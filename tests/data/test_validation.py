"""Training annotations are checked before training: bad boxes dropped or clipped (and
counted), unusable ones and missing files reported with where they are."""
import logging

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from dw_d2.data import (
    AnnotationError,
    load_dataset_dicts,
    load_training_dataset_dicts,
    validate_dataset_dicts,
)

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]


@pytest.fixture
def coco_dataset(tmp_path, register_coco):
    """``make(annotations, images=...)`` writes a tiny COCO dataset and registers it."""

    def make(annotations, images=None, categories=CATEGORIES, write_images=True):
        images = images if images is not None else [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
        ]
        if write_images:
            for image in images:
                Image.new("RGB", (image["width"], image["height"])).save(
                    tmp_path / image["file_name"])
        return register_coco(images, annotations, categories, tmp_path)

    return make


def _boxes(dicts):
    return [[round(v, 6) for v in a["bbox"]] for d in dicts for a in d["annotations"]]


def test_clean_annotations_pass_unchanged(coco_dataset):
    name = coco_dataset([{"bbox": [1, 2, 10, 5]}, {"bbox": [0, 0, 40, 30], "category_id": 2}])
    dicts = load_dataset_dicts(name)
    assert validate_dataset_dicts(dicts, name) == dicts


def test_degenerate_boxes_are_dropped_and_counted(coco_dataset, caplog):
    name = coco_dataset([{"bbox": [1, 2, 0, 5]}, {"bbox": [1, 2, 4, -3]},
                         {"bbox": [1, 2, 3, 4]}])
    with caplog.at_level(logging.WARNING):
        dicts = validate_dataset_dicts(load_dataset_dicts(name), name)
    assert _boxes(dicts) == [[1, 2, 3, 4]]
    assert "dropped 2 boxes with zero or negative width/height" in caplog.text


def test_boxes_partly_outside_are_clipped_to_the_image(coco_dataset, caplog):
    name = coco_dataset([{"bbox": [-5, 20, 15, 20]}, {"bbox": [30, -2, 20, 10]}])
    original = load_dataset_dicts(name)
    with caplog.at_level(logging.WARNING):
        dicts = validate_dataset_dicts(original, name)
    # XYWH kept as XYWH: x in [-5, 10] -> [0, 10], y in [20, 40] -> [20, 30], and so on.
    assert _boxes(dicts) == [[0, 20, 10, 10], [30, 0, 10, 8]]
    assert all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in dicts[0]["annotations"])
    assert "clipped 2 boxes partly outside their image" in caplog.text
    assert _boxes(original) == [[-5, 20, 15, 20], [30, -2, 20, 10]]  # input untouched


def test_boxes_wholly_outside_are_dropped_and_counted(coco_dataset, caplog):
    name = coco_dataset([{"bbox": [40, 0, 5, 5]}, {"bbox": [-9, -9, 9, 9]},
                         {"bbox": [5, 5, 5, 5]}])
    with caplog.at_level(logging.WARNING):
        dicts = validate_dataset_dicts(load_dataset_dicts(name), name)
    assert _boxes(dicts) == [[5, 5, 5, 5]]
    assert "0 boxes with zero or negative width/height and 2 boxes wholly outside" in caplog.text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_coordinates_name_file_image_annotation_and_field(coco_dataset, bad):
    name = coco_dataset([{"bbox": [1, 1, 2, 2], "image_id": 2},
                         {"bbox": [1, 1, bad, 2], "image_id": 2}])
    with pytest.raises(AnnotationError) as error:
        validate_dataset_dicts(load_dataset_dicts(name), name)
    message = str(error.value)
    json_file = MetadataCatalog.get(name).json_file
    assert json_file in message
    assert "b.png" in message and "image_id=2" in message
    assert "annotation #1" in message and "'bbox'" in message and "non-finite" in message


def test_unknown_category_id_in_json_names_file_image_and_id(coco_dataset):
    name = coco_dataset([{"bbox": [1, 1, 2, 2]}, {"bbox": [1, 1, 2, 2], "category_id": 7,
                                                   "image_id": 2, "id": 42}])
    with pytest.raises(AnnotationError) as error:
        load_dataset_dicts(name)
    message = str(error.value)
    assert MetadataCatalog.get(name).json_file in message
    assert "annotation id 42 of image_id 2 has category_id=7" in message
    assert "[1, 2]" in message  # the declared ids


def test_category_id_outside_the_classes_of_a_custom_dataset(tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    name = "dw_d2_validation_test_custom"
    record = {"file_name": str(image), "image_id": "x", "height": 8, "width": 8,
              "annotations": [{"bbox": [0, 0, 4, 4], "bbox_mode": BoxMode.XYXY_ABS,
                               "category_id": 3}]}
    DatasetCatalog.register(name, lambda: [record])
    MetadataCatalog.get(name).thing_classes = ["a", "b", "c"]
    try:
        with pytest.raises(AnnotationError, match=r"field 'category_id' is 3, expected an "
                                                  r"integer in \[0, 3\)"):
            validate_dataset_dicts(DatasetCatalog.get(name), name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_images_without_annotations_are_kept_unless_filtered(coco_dataset):
    name = coco_dataset([{"bbox": [1, 1, 2, 2]}, {"bbox": [50, 50, 2, 2], "image_id": 2}])
    kept = load_training_dataset_dicts([name], filter_empty=False)
    assert [len(d["annotations"]) for d in kept] == [1, 0]  # image 2 lost its only box
    filtered = load_training_dataset_dicts([name], filter_empty=True)
    assert [d["image_id"] for d in filtered] == [1]


def test_crowd_boxes_are_left_alone_and_never_reach_the_model(coco_dataset):
    name = coco_dataset([{"bbox": [1, 1, 5, 5]},
                         {"bbox": [-10, -10, 100, 100], "iscrowd": 1}])
    dicts = validate_dataset_dicts(load_dataset_dicts(name), name)
    assert _boxes(dicts) == [[1, 1, 5, 5], [-10, -10, 100, 100]]
    mapper = DatasetMapper(is_train=True, augmentations=[T.NoOpTransform()],
                           image_format="BGR")
    instances = mapper(dicts[0])["instances"]
    assert len(instances) == 1
    assert instances.gt_boxes.tensor.tolist() == [[1.0, 1.0, 6.0, 6.0]]


def test_missing_image_files_are_named_before_training(coco_dataset, tmp_path):
    name = coco_dataset([{"bbox": [1, 1, 2, 2]}])
    (tmp_path / "b.png").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_training_dataset_dicts([name], filter_empty=False)
    message = str(error.value)
    assert str(tmp_path / "b.png") in message and "1 of 2 image files" in message
    assert name in message


def test_annotation_file_that_is_not_json_is_named(coco_dataset):
    name = coco_dataset([{"bbox": [1, 1, 2, 2]}])
    json_file = MetadataCatalog.get(name).json_file
    with open(json_file, "w") as f:
        f.write('{"images": [')
    with pytest.raises(AnnotationError, match="is not valid JSON") as error:
        load_training_dataset_dicts([name], filter_empty=False)
    assert json_file in str(error.value)
    assert name in str(error.value)


def test_malformed_bbox_is_named(coco_dataset):
    name = coco_dataset([{"bbox": [1, 1, 2, 2]}, {"bbox": [1, 1, 2]}])
    with pytest.raises(AnnotationError, match=r"annotation #1 .*field 'bbox' is \[1, 1, 2\], "
                                              r"expected 4 numbers"):
        validate_dataset_dicts(load_dataset_dicts(name), name)


def test_many_random_boxes_all_end_up_inside_their_images(coco_dataset):
    rng = np.random.default_rng(0)
    xy = rng.uniform(-10, 45, size=(3000, 2))
    wh = rng.uniform(-2, 20, size=(3000, 2))
    annotations = [{"bbox": [float(v) for v in np.concatenate([p, s])], "image_id": 1 + i % 2}
                   for i, (p, s) in enumerate(zip(xy, wh))]
    name = coco_dataset(annotations)
    dicts = validate_dataset_dicts(load_dataset_dicts(name), name)
    boxes = np.array(_boxes(dicts))
    assert len(boxes) > 0
    assert (boxes[:, 2] > 0).all() and (boxes[:, 3] > 0).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 40 + 1e-6).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 30 + 1e-6).all()
