"""EvaluationCheckpointer: a checkpoint that leaves the head untrained is refused for evaluation."""
import pytest
import torch

from dw_d2.engine import EvaluationCheckpointer
from tests.helpers import tiny_model


def save_checkpoint(model, path):
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def test_refinement_asked_for_on_a_checkpoint_without_it(tmp_path):
    path = save_checkpoint(tiny_model("MODEL.DW.BOX_REFINEMENT", False), tmp_path / "norefine.pth")
    model = tiny_model("MODEL.DW.BOX_REFINEMENT", True)
    with pytest.raises(ValueError, match=r"norefine\.pth.*head\.refine.*BOX_REFINEMENT False"):
        EvaluationCheckpointer(model).load(path)


def test_number_of_classes_that_differs_from_the_checkpoint(tmp_path):
    path = save_checkpoint(tiny_model("MODEL.DW.NUM_CLASSES", 3), tmp_path / "three.pth")
    with pytest.raises(ValueError, match=r"three\.pth.*head\.cls"):
        EvaluationCheckpointer(tiny_model("MODEL.DW.NUM_CLASSES", 5)).load(path)


def test_matching_checkpoint_loads_every_weight(tmp_path):
    trained = tiny_model(seed=1)
    path = save_checkpoint(trained, tmp_path / "model.pth")
    model = tiny_model(seed=2)
    EvaluationCheckpointer(model).load(path)
    for name, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_backbone_only_checkpoint_is_not_a_detector_checkpoint(tmp_path):
    backbone_only = {k: v for k, v in tiny_model().state_dict().items() if k.startswith("backbone.")}
    path = tmp_path / "backbone.pth"
    torch.save({"model": backbone_only}, path)
    EvaluationCheckpointer(tiny_model()).load(str(path))  # head stays initialised, no error
