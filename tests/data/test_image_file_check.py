"""Image files that Detectron2's data loader would fail on stop training before it starts, with
an error naming the file, the image id, the field and both values."""
import pytest
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError

from dw_d2.data import (
    ImageFileError,
    check_evaluation_dataset,
    check_image_files,
    find_image_file_problems,
    load_dataset_dicts,
    load_training_dataset_dicts,
)

BOX = [{"bbox": [2, 2, 10, 10]}]


def _error(name):
    with pytest.raises((ImageFileError, FileNotFoundError)) as error:
        check_image_files(load_dataset_dicts(name), name)
    return error.value


def test_sound_images_pass(coco_images, encode):
    name = coco_images([("a.png", 40, 30, None), ("b.jpg", 30, 40, encode.jpeg(30, 40)),
                        ("c.jpg", 40, 30, encode.png(40, 30))],  # a PNG named .jpg
                       BOX)
    check_image_files(load_dataset_dicts(name), name)


@pytest.mark.parametrize("json_size, file_size", [((40, 30), (41, 30)), ((40, 30), (40, 29)),
                                                  ((40, 30), (30, 40))])
def test_size_mismatch_in_either_direction_names_file_id_field_and_values(
        coco_images, encode, json_size, file_size):
    name = coco_images([("ok.png", 40, 30, None),
                        ("bad.png", *json_size, encode.png(*file_size))], BOX)
    error = _error(name)
    message = str(error)
    assert isinstance(error, ImageFileError)
    assert "1 of 2 image files" in message and name in message
    assert "bad.png" in message and "image_id=2" in message
    for field, index, unit in (("width", 0, "wide"), ("height", 1, "high")):
        if json_size[index] != file_size[index]:
            assert (f"field '{field}' is {json_size[index]} but the image is "
                    f"{file_size[index]} pixels {unit}") in message
        else:
            assert f"field '{field}'" not in message


def test_the_check_agrees_with_detectron2s_check_image_size(coco_images, encode):
    """Every record the check passes maps; every record it rejects fails in the mapper."""
    name = coco_images([("same.png", 40, 30, None),
                        ("wider.png", 40, 30, encode.png(41, 30)),
                        ("rotated_ok.jpg", 30, 40, encode.jpeg(40, 30, orientation=6)),
                        ("rotated_bad.jpg", 40, 30, encode.jpeg(40, 30, orientation=6)),
                        ("flipped.jpg", 40, 30, encode.jpeg(40, 30, orientation=2))], BOX)
    dicts = load_dataset_dicts(name)
    rejected = {p.file_name for p in find_image_file_problems(dicts, name)}
    mapper = DatasetMapper(is_train=False, augmentations=[T.NoOpTransform()],
                           image_format="BGR")
    for record in dicts:
        if record["file_name"] in rejected:
            with pytest.raises(SizeMismatchError):
                mapper(dict(record))
        else:
            mapper(dict(record))
    assert sorted(f.rsplit("/", 1)[1] for f in rejected) == ["rotated_bad.jpg", "wider.png"]


def test_exif_rotation_is_named_when_it_explains_the_mismatch(coco_images, encode):
    name = coco_images([("rotated.jpg", 40, 30, encode.jpeg(40, 30, orientation=6))], BOX)
    message = str(_error(name))
    assert "field 'width' is 40 but the image is 30 pixels wide" in message
    assert "EXIF orientation 6" in message


@pytest.mark.parametrize("content, words", [
    (b"\x00garbage bytes" * 20, "UnidentifiedImageError"),
    (b"", "UnidentifiedImageError"),
    ("truncated", "truncated"),
])
def test_files_that_are_not_images_are_named(coco_images, encode, content, words):
    if content == "truncated":
        data = encode.png(40, 30)
        content = data[: len(data) // 2]
    name = coco_images([("ok.png", 40, 30, None), ("broken.jpg", 40, 30, content)], BOX)
    message = str(_error(name))
    assert "broken.jpg" in message and "image_id=2" in message
    assert "is not an image file Pillow can read" in message and words in message


def test_the_error_lists_ten_files_and_the_total(coco_images, encode):
    images = [(f"{i:02d}.png", 40, 30, encode.png(41, 30)) for i in range(13)]
    message = str(_error(coco_images(images, BOX)))
    assert "13 of 13 image files" in message
    assert "09.png" in message and "10.png" not in message
    assert "... and 3 more" in message


def test_a_missing_file_is_a_file_not_found_error_that_also_lists_other_faults(coco_images):
    name = coco_images([("gone.png", 40, 30, "absent"), ("bad.png", 40, 30, b"junk")], BOX)
    error = _error(name)
    assert isinstance(error, FileNotFoundError)
    assert "gone.png" in str(error) and "does not exist" in str(error)
    assert "bad.png" in str(error)
    assert "image_root" in str(error)


def test_a_record_with_only_one_of_width_and_height(tmp_path, encode):
    image = tmp_path / "x.png"
    image.write_bytes(encode.png(8, 6))
    record = {"file_name": str(image), "image_id": "x", "width": 8, "annotations": []}
    name = "dw_d2_data_test_width_only"
    DatasetCatalog.register(name, lambda: [record])
    try:
        with pytest.raises(ImageFileError, match="field 'height' is missing"):
            check_image_files([record], name)
        without_size = dict(record)
        del without_size["width"]
        check_image_files([without_size], name)  # Detectron2 takes the size from the image
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_training_data_are_checked_while_loading(coco_images, encode):
    name = coco_images([("ok.png", 40, 30, None), ("bad.png", 40, 30, encode.png(30, 40))],
                       BOX)
    with pytest.raises(ImageFileError, match="bad.png"):
        load_training_dataset_dicts([name], filter_empty=False)


def test_evaluation_data_are_checked(coco_images, encode, caplog):
    name = coco_images([("ok.png", 40, 30, None), ("bad.png", 40, 30, b"junk")],
                       [{"bbox": [1, 1, 0, 5], "image_id": 1}])
    with pytest.raises(ImageFileError, match="bad.png"):
        check_evaluation_dataset(name)
    assert "1 ground-truth boxes" in caplog.text and "can match no detection" in caplog.text
