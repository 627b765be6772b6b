"""``python -m dw_d2.check_dataset``: the checks of training without training, a summary, a
picture, and an exit status a script can test."""
import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from dw_d2.check_dataset import detector_points, main
from dw_d2.viz.tool_config import load_config
from tests.helpers import BUILTIN_DW_CONFIG, REPO
from tests.shapes_subsets import unregister

CONFIG = str(BUILTIN_DW_CONFIG)


def test_builtin_datasets_pass_with_a_summary_and_pictures(tmp_path, capsys):
    assert main(["--config-file", CONFIG, "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "=== dw_shapes_train (training dataset) ===" in out
    assert "=== dw_shapes_val (evaluation dataset) ===" in out
    assert "Dataset 'dw_shapes_train': 240 images, 778 boxes" in out
    assert "boxes per class:" in out and "boxes per image:" in out
    assert "FCOS level (8s < longer side <= 16s): p3" in out
    assert "contain no point of any level" in out
    assert "All 2 datasets pass" in out
    for name in ("dw_shapes_train", "dw_shapes_val"):
        with Image.open(tmp_path / f"dataset_summary_{name}.png") as picture:
            assert picture.size == (1380, 680)
        numbers = json.loads((tmp_path / f"dataset_summary_{name}.json").read_text())
        assert numbers["strides"] == [8, 16, 32, 64, 128] and numbers["point_offset"] == 0.5


@pytest.mark.parametrize("fault, words", [
    ("garbage", "is not an image file Pillow can read"),
    ("size", "field 'width' is"),
])
def test_a_faulty_dataset_fails_naming_the_file_and_the_others_are_still_checked(
        shapes_subset, tmp_path, capsys, fault, words):
    bad = shapes_subset("train", 5, fault)
    good = shapes_subset("val", 5)
    status = main(["--config-file", CONFIG, "--output", str(tmp_path / "out"),
                   "--dataset", bad.name, "--dataset", good.name])
    out = capsys.readouterr().out
    assert status == 1
    assert f"ERROR: ImageFileError: Dataset '{bad.name}'" in out
    assert repr(bad.file_name) in out and f"image_id={bad.image_id}" in out and words in out
    assert f"Dataset '{good.name}': 5 images" in out
    assert f"1 of 2 datasets FAIL the checks that train_net.py runs before training: " \
           f"{bad.name}" in out


def test_coco_datasets_are_registered_from_the_command_line(shapes_subset, tmp_path, capsys):
    subset = shapes_subset("val", 4, "garbage")
    meta_json = str(tmp_path / subset.name / "instances.json")
    status = main(["--config-file", CONFIG, "--output", str(tmp_path / "out"),
                   "--coco", "user_data", meta_json, str(tmp_path / subset.name),
                   "DATASETS.TRAIN", "('user_data',)"])
    out = capsys.readouterr().out
    unregister("user_data")
    assert status == 1
    assert "=== user_data (training dataset) ===" in out
    assert "  ERROR: ImageFileError: Dataset 'user_data'" in out
    assert f"\n      - {subset.file_name!r} (image_id={subset.image_id})" in out
    assert main(["--config-file", CONFIG, "--coco", "dw_shapes_val", meta_json, "x"]) == 2


def test_dropped_annotations_are_listed_and_do_not_fail_the_check(shapes_subset, tmp_path,
                                                                  capsys):
    subset = shapes_subset("train", 5, "zero_width")
    assert main(["--config-file", CONFIG, "--output", str(tmp_path), "--dataset",
                 subset.name]) == 0
    report = json.loads((tmp_path / f"annotation_changes_{subset.name}.json").read_text())
    assert report["counts"]["degenerate"] == 1


def test_config_options_follow_the_config_file(tmp_path, capsys, shapes_subset):
    subset = shapes_subset("val", 3)
    assert main(["--config-file", CONFIG, "--output", str(tmp_path), "--dataset", subset.name,
                 "INPUT.MIN_SIZE_TEST", "512", "INPUT.MAX_SIZE_TEST", "600"]) == 0
    assert "at the input size test (512, max 600)" in capsys.readouterr().out


def test_wrong_number_of_classes_and_unknown_dataset_fail(tmp_path, capsys):
    status = main(["--config-file", CONFIG, "--output", str(tmp_path), "--dataset",
                   "dw_shapes_val", "--dataset", "no_such_dataset", "MODEL.DW.NUM_CLASSES", "3"])
    out = capsys.readouterr().out
    assert status == 1
    assert "MODEL.DW.NUM_CLASSES is 3, but dataset 'dw_shapes_val' has 4 classes" in out
    assert "no_such_dataset" in out and "not registered" in out


def test_bad_command_lines(tmp_path, capsys):
    assert main(["--config-file", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--config-file", CONFIG, "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]) == 2


def test_detector_points_of_the_schemes():
    assert detector_points(load_config(CONFIG)) == ([8, 16, 32, 64, 128], 0.5,
                                                    ["p3", "p4", "p5", "p6", "p7"])
    autoassign = load_config(CONFIG, ["MODEL.ASSIGNER.NAME", "AutoAssign",
                                      "MODEL.DW.BOX_REFINEMENT", "False"])
    assert detector_points(autoassign)[1] == 0.0


def test_make_target_passes_datasets_and_options():
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    printed = subprocess.run(
        ["make", "--no-print-directory", "-n", "check-data", "CONFIG=c.yaml", "DATASETS=a b",
         "OPTS=K V"], cwd=REPO, capture_output=True, text=True, check=True, env=environment)
    command = next(line for line in printed.stdout.splitlines() if "check_dataset" in line)
    assert command.endswith("-m dw_d2.check_dataset --config-file c.yaml --dataset=a "
                            "--dataset=b K V")
