"""tools/run_with_coco.py registers COCO datasets, then runs a script with its arguments."""
import json

import pytest
from PIL import Image

from tools import run_with_coco as tool_module


@pytest.fixture
def tiny_coco(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 24)).save(images / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8],
                             "area": 80, "iscrowd": 0}],
            "categories": [{"id": 7, "name": "thing"}]}
    (tmp_path / "train.json").write_text(json.dumps(coco))
    return tmp_path / "train.json", images


def test_the_script_sees_the_registered_dataset(tmp_path, tiny_coco, capsys):
    json_file, images = tiny_coco
    script = tmp_path / "show.py"
    script.write_text(
        "import sys\n"
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        "records = DatasetCatalog.get('tiny_run_with_coco')\n"
        "print(len(records), records[0]['annotations'][0]['bbox'],\n"
        "      MetadataCatalog.get('tiny_run_with_coco').thing_classes, sys.argv[1:])\n")
    tool_module.main(["--dataset", "tiny_run_with_coco", str(json_file),
                                     str(images), "--", str(script), "--flag", "x"])
    assert capsys.readouterr().out.strip() == "1 [2, 3, 10, 8] ['thing'] ['--flag', 'x']"


def test_missing_files_and_missing_script_are_errors(tmp_path, tiny_coco):
    json_file, images = tiny_coco
    tool = tool_module
    with pytest.raises(FileNotFoundError, match="missing.json"):
        tool.main(["--dataset", "x1", str(tmp_path / "missing.json"), str(images), "--", "a.py"])
    with pytest.raises(SystemExit, match="after '--'"):
        tool.main(["--dataset", "x2", str(json_file), str(images)])
