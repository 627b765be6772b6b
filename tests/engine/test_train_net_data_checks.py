"""train_net.py as a new user runs it on a COCO dataset with one planted fault: the run stops
before iteration 0 with an error naming the file; and main() returns the final evaluation."""
import json
import runpy
from pathlib import Path

import pytest
from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser

from dw_d2.data import ImageFileError
from tests.helpers import BUILTIN_DW_CONFIG, REPO

CONFIG = BUILTIN_DW_CONFIG
TINY = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)",
        "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(100,)", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.DEVICE", "cpu", "SEED", "3"]
train_net_main = runpy.run_path(str(REPO / "train_net.py"), run_name="train_net")["main"]

pytestmark = pytest.mark.slow


def run_train_net(*argv):
    args = default_argument_parser().parse_args([str(a) for a in argv])
    return train_net_main(args)


@pytest.mark.parametrize("fault, words", [("garbage", "is not an image file Pillow can read"),
                                          ("size", "field 'width' is")])
@pytest.mark.parametrize("split", ["train", "val"])
def test_a_bad_image_stops_the_run_before_iteration_0(shapes_subset, tmp_path, fault, words,
                                                      split):
    bad, file_name, image_id = shapes_subset(split, 6, fault)
    train, _, _ = shapes_subset("train", 6) if split == "val" else (bad, None, None)
    test = bad if split == "val" else "dw_shapes_val"
    out = tmp_path / "run"
    with pytest.raises(ImageFileError) as error:
        run_train_net("--config-file", CONFIG, *TINY, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 2,
                      "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{test}',)")
    message = str(error.value)
    assert repr(file_name) in message and f"image_id={image_id}" in message and words in message
    assert "Starting training from iteration 0" not in (out / "log.txt").read_text()


def test_main_returns_the_final_evaluation_after_training(shapes_subset, tmp_path):
    val, _, _ = shapes_subset("val", 4)
    # A 2-iteration DW model scores about 0.02 x 0.5: lower the threshold so that COCO
    # evaluation has detections to score.
    results = run_train_net("--config-file", CONFIG, *TINY, "OUTPUT_DIR", tmp_path / "run",
                            "SOLVER.MAX_ITER", 2, "MODEL.DW.SCORE_THRESH_TEST", 0.005,
                            "DATASETS.TEST", f"('{val}',)")
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75"}
    assert 0.0 <= results["bbox"]["AP"] <= 100.0


def test_changed_annotations_are_listed_in_output_dir(shapes_subset, tmp_path):
    train, _, _ = shapes_subset("train", 4, "zero_width")
    annotation_id = json.loads(Path(MetadataCatalog.get(train).json_file).read_text())[
        "annotations"][0]["id"]
    out = tmp_path / "run"
    run_train_net("--config-file", CONFIG, *TINY, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 1,
                  "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", "()")
    report = out / f"annotation_changes_{train}.json"
    content = json.loads(report.read_text())
    assert content["counts"]["degenerate"] == 1
    assert content["changes"][0]["annotation_id"] == annotation_id
    assert f"All 1 are listed in {report}" in (out / "log.txt").read_text()
