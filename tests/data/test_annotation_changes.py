"""Every annotation that training drops, clips or ignores is counted by cause, the first few are
named in the log (file, image id, annotation id, box), and all are listed in a JSON file."""
import json
import logging

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from dw_d2.data import check_annotations, load_dataset_dicts, load_training_dataset_dicts
from dw_d2.data.validation import report_annotation_changes

IMAGES = [("a.png", 40, 30, None), ("b.png", 40, 30, None)]
ANNOTATIONS = [
    {"id": 11, "bbox": [1, 1, 5, 5]},                        # kept
    {"id": 12, "bbox": [1, 2, 0, 5]},                        # zero width
    {"id": 13, "bbox": [-9, -9, 5, 5], "image_id": 2},       # wholly outside
    {"id": 14, "bbox": [30, 20, 20, 20], "image_id": 2},     # partly outside: clipped
    {"id": 15, "bbox": [0, 0, 40, 30], "iscrowd": 1},        # crowd
    {"id": 16, "bbox": [2, 2, 4, -1], "image_id": 2},        # negative height
]


def _load_with_report(name, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dw_d2.data.validation"):
        dicts = load_training_dataset_dicts([name], filter_empty=False,
                                            report_dir=str(tmp_path / "out"))
    return dicts, tmp_path / "out" / f"annotation_changes_{name}.json"


def test_changes_are_counted_by_cause_and_listed_in_a_json_file(coco_images, tmp_path, caplog):
    name = coco_images(IMAGES, ANNOTATIONS)
    dicts, report = _load_with_report(name, tmp_path, caplog)
    assert [[a["bbox"] for a in d["annotations"]] for d in dicts] == [
        [[1, 1, 5, 5], [0, 0, 40, 30]], [[30, 20, 10, 10]]]  # the crowd box stays, unused

    content = json.loads(report.read_text())
    assert content["counts"] == {"degenerate": 2, "outside": 1, "clipped": 1, "crowd": 1}
    assert content["num_annotations"] == 6
    assert content["annotation_file"] == MetadataCatalog.get(name).json_file
    by_id = {c["annotation_id"]: c for c in content["changes"]}
    assert set(by_id) == {12, 13, 14, 15, 16}
    assert by_id[14] == {
        "cause": "clipped", "file_name": dicts[1]["file_name"], "image_id": 2,
        "annotation_index": 1, "annotation_id": 14, "bbox": [30, 20, 20, 20],
        "bbox_mode": "XYWH_ABS", "clipped_bbox": [30.0, 20.0, 10.0, 10.0]}
    assert by_id[15]["cause"] == "crowd" and by_id[16]["cause"] == "degenerate"


def test_the_log_names_the_first_ones_and_the_report(coco_images, tmp_path, caplog):
    name = coco_images(IMAGES, ANNOTATIONS)
    _, report = _load_with_report(name, tmp_path, caplog)
    log = caplog.text
    assert ("dropped 2 boxes with zero or negative width/height and 1 boxes wholly outside "
            "their image; clipped 1 boxes partly outside their image to the image; ignored 1 "
            "crowd boxes (iscrowd=1) (of 6 annotations)") in log
    assert "a.png' (image_id=1), annotation id 12: bbox [1.0, 2.0, 0.0, 5.0] (XYWH_ABS)" in log
    assert "annotation id 14: bbox [30.0, 20.0, 20.0, 20.0] -> [30.0, 20.0, 10.0, 10.0]" in log
    assert "ignored (crowd region" in log and "annotation id 15" in log
    assert f"All 5 are listed in {report}" in log


def test_only_the_first_three_of_a_cause_are_logged(coco_images, tmp_path, caplog):
    name = coco_images(IMAGES, [{"id": 50 + i, "bbox": [1, 1, 0, 1]} for i in range(5)])
    _, report = _load_with_report(name, tmp_path, caplog)
    assert "annotation id 52" in caplog.text and "annotation id 53" not in caplog.text
    assert len(json.loads(report.read_text())["changes"]) == 5


def test_crowd_boxes_alone_are_reported_at_info_level(coco_images, tmp_path, caplog):
    name = coco_images(IMAGES, [{"bbox": [1, 1, 5, 5]}, {"bbox": [1, 1, 5, 5], "iscrowd": 1}])
    _, report = _load_with_report(name, tmp_path, caplog)
    records = [r for r in caplog.records if "crowd boxes" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.INFO]
    assert json.loads(report.read_text())["counts"]["crowd"] == 1


def test_no_change_no_report(coco_images, tmp_path, caplog):
    name = coco_images(IMAGES, [{"bbox": [1, 1, 5, 5]}])
    _, report = _load_with_report(name, tmp_path, caplog)
    assert not report.exists()
    assert "boxes with zero" not in caplog.text


def test_ids_are_matched_in_file_order_when_detectron2_skipped_an_annotation(coco_images):
    """load_coco_json drops annotations with invalid polygons, which shifts the indices; ids
    are matched by box within the image, in file order, even for identical boxes."""
    name = coco_images(IMAGES, [
        {"id": 1, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 2, 2]]},  # invalid: skipped
        {"id": 2, "bbox": [1, 1, 0, 5]},
        {"id": 3, "bbox": [1, 1, 0, 5]},
        {"id": 4, "bbox": [3, 3, 0, 2], "image_id": 2},
    ])
    dicts = load_dataset_dicts(name)
    _, changes = check_annotations(dicts, name)
    report_annotation_changes(changes, dicts, name)
    assert [(c.image_id, c.annotation_index, c.annotation_id) for c in changes] == [
        (1, 0, 2), (1, 1, 3), (2, 0, 4)]


def test_records_that_carry_ids_and_other_box_modes(tmp_path):
    record = {"file_name": "x.png", "image_id": "x", "width": 10, "height": 10,
              "annotations": [
                  {"id": "first", "bbox": [5, 5, 20, 20], "bbox_mode": BoxMode.XYXY_ABS,
                   "category_id": 0},
                  {"id": "second", "bbox": [5, 5, 5, 2], "bbox_mode": BoxMode.XYXY_ABS,
                   "category_id": 0}]}
    name = "dw_d2_data_test_custom_ids"
    DatasetCatalog.register(name, lambda: [record])
    MetadataCatalog.get(name).thing_classes = ["a"]
    try:
        cleaned, changes = check_annotations([record], name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert [(c.annotation_id, c.cause, c.bbox_mode) for c in changes] == [
        ("first", "clipped", "XYXY_ABS"), ("second", "degenerate", "XYXY_ABS")]
    assert changes[0].clipped_bbox == [5.0, 5.0, 10.0, 10.0]
    assert cleaned[0]["annotations"][0]["bbox"] == [5.0, 5.0, 10.0, 10.0]
