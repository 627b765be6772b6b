"""The built-in ``dw_shapes`` dataset: registered, valid COCO, varied, and reproducible."""
import json
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools.coco import COCO

from dw_d2.data import SHAPE_CLASSES, generate_shapes_dataset, prepare_dataset
from dw_d2.data.shapes import generate
from dw_d2.data.shapes.__main__ import main as shapes_cli

NAMES = {"dw_shapes_train": 240, "dw_shapes_val": 60}


@pytest.fixture(scope="module")
def dataset_dir():
    """The registered copy (generated on first use, reused while its stamp is current)."""
    for name in NAMES:
        prepare_dataset(name)
    return Path(MetadataCatalog.get("dw_shapes_train").dataset_dir)


@pytest.fixture(scope="module")
def cocos(dataset_dir):
    return {name: COCO(MetadataCatalog.get(name).json_file) for name in NAMES}


@pytest.fixture
def small_splits(monkeypatch):
    """Shrink the splits, so that tests of the generation mechanics take a fraction of a second."""
    monkeypatch.setattr(generate, "SPLITS", {
        "train": generate.SplitSpec(num_images=3, seed=1),
        "val": generate.SplitSpec(num_images=2, seed=2),
    })


def test_registered_names_and_metadata():
    for name in NAMES:
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["circle", "square", "triangle", "cross"] == SHAPE_CLASSES
        assert meta.evaluator_type == "coco"
        assert meta.json_file.endswith(f"instances_{name.split('_')[-1]}.json")
        assert Path(meta.image_root).name == name.split("_")[-1]


def test_coco_json_loads_with_pycocotools(cocos):
    for name, coco in cocos.items():
        assert len(coco.getImgIds()) == NAMES[name]
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == SHAPE_CLASSES
        assert coco.getCatIds() == [1, 2, 3, 4]
        anns = coco.loadAnns(coco.getAnnIds())
        assert len({a["id"] for a in anns}) == len(anns)
        assert {a["category_id"] for a in anns} == {1, 2, 3, 4}  # every class in every split


def test_boxes_are_inside_their_images_and_not_empty(cocos):
    for coco in cocos.values():
        for ann in coco.loadAnns(coco.getAnnIds()):
            image = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0
            assert x + w <= image["width"] and y + h <= image["height"]
            assert ann["area"] == w * h and ann["iscrowd"] == 0


def test_dataset_dicts_load_through_the_catalog(dataset_dir):
    dicts = DatasetCatalog.get("dw_shapes_val")
    assert len(dicts) == 60
    assert all(Path(d["file_name"]).is_file() for d in dicts)
    first = dicts[0]
    with Image.open(first["file_name"]) as image:
        assert image.size == (first["width"], first["height"])
        assert image.mode == "RGB"
    categories = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert categories == {0, 1, 2, 3}  # contiguous ids after Detectron2's mapping
    assert all(a["bbox_mode"] == BoxMode.XYWH_ABS for d in dicts for a in d["annotations"])


def test_content_is_varied(cocos):
    coco = cocos["dw_shapes_train"]
    images = list(coco.imgs.values())
    sizes = {(i["width"], i["height"]) for i in images}
    assert len(sizes) > 50
    assert all(160 <= i["width"] <= 256 and 160 <= i["height"] <= 256 for i in images)
    assert any(w == h for w, h in sizes) and any(w != h for w, h in sizes)

    empty = [i for i in images if not coco.getAnnIds(imgIds=i["id"])]
    assert 0.05 <= len(empty) / len(images) <= 0.15

    anns = coco.loadAnns(coco.getAnnIds())
    longest_side = np.array([max(a["bbox"][2:]) for a in anns])
    shorter_image_side = np.array([min(coco.imgs[a["image_id"]]["width"],
                                       coco.imgs[a["image_id"]]["height"]) for a in anns])
    assert (longest_side <= 12).mean() > 0.15  # small objects
    assert (longest_side / shorter_image_side >= 0.4).sum() >= 10  # large objects
    assert (longest_side / shorter_image_side <= 0.61).all()
    assert _overlapping_pairs(coco) >= 10


def _overlapping_pairs(coco):
    count = 0
    for image_id in coco.imgs:
        boxes = np.array([a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))])
        if len(boxes) < 2:
            continue
        x1, y1 = boxes[:, 0], boxes[:, 1]
        x2, y2 = x1 + boxes[:, 2], y1 + boxes[:, 3]
        iw = np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None])
        ih = np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None])
        overlap = (iw > 0) & (ih > 0)
        count += int(np.triu(overlap, k=1).sum())
    return count


def test_generating_again_gives_identical_annotations_and_pixels(dataset_dir, tmp_path,
                                                                  monkeypatch):
    # Each image depends only on (split seed, index): regenerating the validation split
    # exercises the same code as the full dataset, in a fifth of the time.
    monkeypatch.setattr(generate, "SPLITS", {"val": generate.SPLITS["val"]})
    again = generate_shapes_dataset(tmp_path / "dw_shapes")
    relative = Path("annotations") / "instances_val.json"
    assert (again / relative).read_bytes() == (dataset_dir / relative).read_bytes()
    for index in (0, 17, 59):
        file_name = f"val/{index:06d}.png"
        with Image.open(again / file_name) as a, Image.open(dataset_dir / file_name) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_interrupted_generation_leaves_no_dataset(small_splits, tmp_path, monkeypatch):
    def fail_on_val(split, spec, dataset_dir):
        if split == "val":
            raise KeyboardInterrupt
        return original(split, spec, dataset_dir)

    original = generate._generate_split
    monkeypatch.setattr(generate, "_generate_split", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_dataset(tmp_path / "dw_shapes")
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its staging folder


def test_stale_or_missing_stamp_regenerates(small_splits, tmp_path):
    target = tmp_path / "dw_shapes"
    assert not generate.is_up_to_date(target)
    generate.ensure_shapes_dataset(target)
    assert generate.is_up_to_date(target)
    marker = target / "train" / "marker"
    marker.write_text("kept while the stamp is current")
    generate.ensure_shapes_dataset(target)
    assert marker.exists()

    stamp = json.loads((target / "VERSION.json").read_text())
    stamp["generator_version"] -= 1
    (target / "VERSION.json").write_text(json.dumps(stamp))
    generate.ensure_shapes_dataset(target)
    assert generate.is_up_to_date(target)
    assert not marker.exists()  # replaced by a fresh copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dw_shapes"]


def test_command_line_regenerates_into_the_given_folder(small_splits, tmp_path, capsys):
    shapes_cli(["--out", str(tmp_path / "out")])
    assert generate.is_up_to_date(tmp_path / "out")
    assert len(list((tmp_path / "out" / "train").glob("*.png"))) == 3
    printed = capsys.readouterr().out
    assert "train: 3 images" in printed and "4 classes" in printed
