"""The deepforest_trees converter on a small stand-in for the PyPI wheel (no download)."""
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from dw_d2.data import trees


def voc_xml(boxes):
    objects = "".join(
        f"<object><name>Tree</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for x0, y0, x1, y1 in boxes)
    return f"<annotation>{objects}</annotation>".encode()


def test_read_voc_boxes_and_a_clear_error():
    boxes = trees._read_voc_boxes(voc_xml([(1, 2, 30, 40)]), "a.xml")
    assert boxes.tolist() == [[1, 2, 30, 40]]
    with pytest.raises(ValueError, match="b.xml"):
        trees._read_voc_boxes(b"<annotation><object><bndbox><xmin>x</xmin></bndbox>"
                              b"</object></annotation>", "b.xml")


def test_a_box_goes_to_the_tile_holding_half_of_it_clipped():
    boxes = np.array([[390.0, 10, 430, 50],    # 25% in tile 0, 75% in tile 1
                      [100.0, 100, 150, 150],  # inside tile 0
                      [380.0, 200, 420, 240]])  # half in each
    in_first = trees._boxes_in_tile(boxes, (0, 0, 400, 400))
    in_second = trees._boxes_in_tile(boxes, (400, 0, 800, 400))
    assert in_first.tolist() == [[100, 100, 150, 150], [380, 200, 400, 240]]
    assert in_second.tolist() == [[0, 10, 30, 50], [0, 200, 20, 240]]


@pytest.mark.parametrize("length, starts", [
    (2299, [0, 380, 760, 1139, 1519, 1899]),  # the training image's width
    (800, [0, 400]),
    (400, [0]),
    (300, [0]),  # shorter than a tile: one tile, as long as the image
])
def test_tiles_have_the_full_size_and_cover_the_image(length, starts):
    assert trees._tile_starts(length, 400) == starts
    tiles = trees._tiles(length, 1000, 400)
    assert {(x1 - x0, y1 - y0) for x0, y0, x1, y1 in tiles} == {(min(length, 400), 400)}
    assert max(x1 for _, _, x1, _ in tiles) == length
    assert max(y1 for _, _, _, y1 in tiles) == 1000


def fake_wheel(path, names_and_sizes):
    with zipfile.ZipFile(path, "w") as wheel:
        for name, (width, height), boxes in names_and_sizes:
            png = io.BytesIO()
            Image.new("RGB", (width, height), (40, 120, 40)).save(png, format="PNG")
            wheel.writestr(f"deepforest/data/{name}.png", png.getvalue())
            wheel.writestr(f"deepforest/data/{name}.xml", voc_xml(boxes))


def test_conversion_writes_tiles_and_whole_validation_images(tmp_path, monkeypatch):
    wheel_path = tmp_path / "download" / trees.WHEEL_NAME
    wheel_path.parent.mkdir()
    fake_wheel(wheel_path, [("big", (500, 420), [(10, 10, 60, 60), (420, 300, 480, 400)]),
                            ("small", (300, 200), [(5, 5, 25, 30)])])
    monkeypatch.setattr(trees, "TRAIN_IMAGES", ("big",))
    monkeypatch.setattr(trees, "VAL_IMAGES", ("small",))
    monkeypatch.setattr(trees, "download_wheel", lambda download_dir: wheel_path)
    out = trees.prepare_trees_dataset(tmp_path / "trees")
    train = json.loads((out / "annotations" / "instances_train.json").read_text())
    val = json.loads((out / "annotations" / "instances_val.json").read_text())
    # Full-size tiles, the last row and column against the far edges (no 100 x 20 slivers).
    assert [i["file_name"] for i in train["images"]] == [
        "big_0_0.png", "big_100_0.png", "big_0_20.png", "big_100_20.png"]
    assert {(i["width"], i["height"]) for i in train["images"]} == {(400, 400)}
    assert [a["bbox"] for a in train["annotations"]] == [
        [10, 10, 50, 50], [320, 300, 60, 100], [10, 0, 50, 40], [320, 280, 60, 100]]
    assert [a["image_id"] for a in train["annotations"]] == [1, 2, 3, 4]
    assert Image.open(out / "train" / "big_100_20.png").size == (400, 400)
    assert [(i["file_name"], i["width"]) for i in val["images"]] == [("small.png", 300)]
    assert val["categories"] == [{"id": 1, "name": "tree"}]
    assert trees._is_up_to_date(out)


def test_a_corrupted_download_is_refused(tmp_path):
    (tmp_path / trees.WHEEL_NAME).write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match="SHA-256"):
        trees.download_wheel(tmp_path)
