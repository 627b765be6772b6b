"""train_net.py end to end on the built-in dataset: train, evaluate, resume; start-up checks;
what a non-finite loss leaves behind."""
import json
from pathlib import Path

import pytest
import torch
import train_net
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import get_event_storage

from dw_d2 import add_dw_config
from dw_d2.data import prepare_dataset
from dw_d2.engine import NONFINITE_CHECKPOINT, Trainer, num_classes_key
from dw_d2.env import has_compiled_ops
from tests.helpers import RETINANET_CONFIG, REPO, TINY, make_cfg, run_train_net

BUILTIN = REPO / "configs" / "Builtin"


def _configs():
    """The stand-in RetinaNet config and, once written, the built-in DW and AutoAssign ones."""
    params = [pytest.param(RETINANET_CONFIG, id="retinanet")]
    for name in ("dw_R_18_FPN_shapes", "autoassign_R_18_FPN_shapes"):
        path = BUILTIN / f"{name}.yaml"
        params.append(pytest.param(path, id=name, marks=pytest.mark.skipif(
            not path.exists(), reason=f"{path} not written yet")))
    return params


@pytest.fixture(scope="module")
def val_subset(tmp_path_factory):
    """The first 12 validation images as a COCO dataset of their own: evaluation in seconds."""
    prepare_dataset("dw_shapes_val")
    meta = MetadataCatalog.get("dw_shapes_val")
    coco = json.loads(Path(meta.json_file).read_text())
    coco["images"] = coco["images"][:12]
    kept = {image["id"] for image in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
    json_file = tmp_path_factory.mktemp("val_subset") / "instances_val12.json"
    json_file.write_text(json.dumps(coco))
    name = "dw_d2_test_shapes_val12"
    register_coco_instances(name, {}, str(json_file), str(Path(meta.image_root).resolve()))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _iterations_in_metrics(output_dir):
    lines = (Path(output_dir) / "metrics.json").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines if '"iteration"' in line]


@pytest.mark.slow
@pytest.mark.parametrize("config_file", _configs())
def test_train_then_eval_only_then_resume(tmp_path, config_file, val_subset):
    out = tmp_path / "run"
    common = ["--config-file", config_file]
    run_train_net(*common, *TINY, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 3,
                  "SOLVER.CHECKPOINT_PERIOD", 100, "DATASETS.TEST", "()")
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 2

    # A 3-iteration DW model scores about 0.02 x 0.5, below the usual 0.05 threshold: lower
    # it, so that COCO evaluation has detections to score (it reports NaN for none at all).
    results = run_train_net(*common, "--eval-only", *TINY, "OUTPUT_DIR", out,
                            "MODEL.WEIGHTS", out / "model_final.pth",
                            "MODEL.DW.SCORE_THRESH_TEST", 0.005,
                            "DATASETS.TEST", f"('{val_subset}',)")
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert 0.0 <= results["bbox"]["AP"] <= 100.0  # a number, not NaN
    assert (out / "inference" / "coco_instances_results.json").exists()
    assert "Evaluation results for bbox" in (out / "log.txt").read_text()

    run_train_net(*common, "--resume", *TINY, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 5,
                  "SOLVER.CHECKPOINT_PERIOD", 100, "DATASETS.TEST", "()")
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 4
    assert "Starting training from iteration 3" in (out / "log.txt").read_text()
    assert max(_iterations_in_metrics(out)) == 4


def test_evaluator_is_coco_on_the_official_path_writing_to_inference(tmp_path):
    cfg = make_cfg(RETINANET_CONFIG, tmp_path, *TINY)
    evaluator = Trainer.build_evaluator(cfg, "dw_shapes_val")
    assert isinstance(evaluator, COCOEvaluator)
    assert evaluator._output_dir == str(tmp_path / "inference")
    # The fast (unofficial, compiled) COCO evaluation only where Detectron2 has compiled ops.
    assert evaluator._use_fast_impl is has_compiled_ops()


def test_setup_falls_back_to_cpu_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = default_argument_parser().parse_args(
        ["--config-file", str(RETINANET_CONFIG), "MODEL.DEVICE", "cuda", "OUTPUT_DIR",
         str(tmp_path)])
    cfg = train_net.setup(args)
    assert cfg.MODEL.DEVICE == "cpu"
    assert cfg.MODEL.DW.NUM_CLASSES == 80  # dw-d2's keys are there
    assert (tmp_path / "config.yaml").exists()  # default_setup ran


def test_num_classes_key_follows_the_meta_architecture():
    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    assert num_classes_key(cfg) == "MODEL.RETINANET.NUM_CLASSES"
    cfg.MODEL.META_ARCHITECTURE = "DWDetector"
    assert num_classes_key(cfg) == "MODEL.DW.NUM_CLASSES"
    cfg.MODEL.META_ARCHITECTURE = "NoSuchArchitecture"
    assert num_classes_key(cfg) is None


@pytest.mark.parametrize("config_file,key", [
    pytest.param(RETINANET_CONFIG, "MODEL.RETINANET.NUM_CLASSES", id="retinanet"),
    pytest.param(BUILTIN / "dw_R_18_FPN_shapes.yaml", "MODEL.DW.NUM_CLASSES", id="dw",
                 marks=pytest.mark.skipif(not (BUILTIN / "dw_R_18_FPN_shapes.yaml").exists(),
                                          reason="built-in DW config not written yet")),
])
def test_num_classes_mismatch_names_both_values_and_the_dataset(tmp_path, config_file, key):
    cfg = make_cfg(config_file, tmp_path, *TINY, key, 5)
    with pytest.raises(ValueError) as error:
        Trainer(cfg)
    message = str(error.value)
    assert f"{key} is 5" in message
    assert "'dw_shapes_train' has 4 classes" in message


@pytest.mark.slow
def test_nonfinite_loss_keeps_the_last_checkpoint_and_saves_the_failing_state(tmp_path):
    cfg = make_cfg(RETINANET_CONFIG, tmp_path, *TINY, "SOLVER.MAX_ITER", 5,
                   "SOLVER.CHECKPOINT_PERIOD", 2, "DATASETS.TEST", "()")
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    forward = trainer.model.forward

    def forward_with_nan_at_iteration_3(batched_inputs):
        losses = forward(batched_inputs)
        if get_event_storage().iter == 3:
            losses = {name: value * float("nan") for name, value in losses.items()}
        return losses

    trainer.model.forward = forward_with_nan_at_iteration_3
    with pytest.raises(FloatingPointError, match="iteration=3"):
        trainer.train()

    # The periodic checkpoint (after iteration 1) is intact and still the one to resume from.
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    assert torch.load(tmp_path / "model_0000001.pth", weights_only=False)["iteration"] == 1
    # The failing iteration's state: its weights (the step was not taken), its batch.
    snapshot = torch.load(tmp_path / NONFINITE_CHECKPOINT, weights_only=False)
    assert snapshot["iteration"] == 3
    assert snapshot["batch_file_names"] == trainer.train_loader.file_names(3)
    assert snapshot["nonfinite_parameters"] == []
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(snapshot["model"][name], value), name
    assert "optimizer" in snapshot["trainer"]["_trainer"]

    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
