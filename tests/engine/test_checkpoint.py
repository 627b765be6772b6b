"""EvaluationCheckpointer: a checkpoint that leaves the head untrained is refused for evaluation;
checkpoints written before the assignment schemes became modules still load."""
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer

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


def test_autoassign_from_a_checkpoint_of_another_scheme(tmp_path):
    path = save_checkpoint(tiny_model(), tmp_path / "dw.pth")
    with pytest.raises(ValueError, match=r"dw\.pth.*assigner\.prior_mean.*MODEL.ASSIGNER.NAME"):
        EvaluationCheckpointer(tiny_model("MODEL.ASSIGNER.NAME", "AutoAssign")).load(path)


def checkpoint_with_old_keys(model, path):
    """The state dict as dw-d2 saved it before the centre prior moved into the assigner."""
    state = {k.replace("assigner.prior_", "center_prior."): v
             for k, v in model.state_dict().items()}
    torch.save({"model": state}, path)
    return str(path)


@pytest.mark.parametrize("checkpointer", [DetectionCheckpointer, EvaluationCheckpointer])
def test_autoassign_checkpoint_with_old_keys_loads(tmp_path, checkpointer):
    trained = tiny_model("MODEL.ASSIGNER.NAME", "AutoAssign", seed=1)
    with torch.no_grad():
        trained.assigner.prior_mean.uniform_(-1, 1)
        trained.assigner.prior_sigma.uniform_(0.5, 2)
    path = checkpoint_with_old_keys(trained, tmp_path / "old.pth")
    assert "center_prior.mean" in torch.load(path)["model"]
    model = tiny_model("MODEL.ASSIGNER.NAME", "AutoAssign", seed=2)
    checkpointer(model).load(path)
    for name, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_old_keys_of_another_shape_are_not_loaded(tmp_path):
    three_classes = tiny_model("MODEL.ASSIGNER.NAME", "AutoAssign", "MODEL.DW.NUM_CLASSES", 3)
    path = checkpoint_with_old_keys(three_classes, tmp_path / "c3.pth")
    old_prior = {k: v for k, v in torch.load(path)["model"].items() if "center_prior" in k}
    model = tiny_model("MODEL.ASSIGNER.NAME", "AutoAssign")
    incompatible = model.load_state_dict(old_prior, strict=False)
    assert "assigner.prior_mean" in incompatible.missing_keys
    assert "center_prior.mean" in incompatible.unexpected_keys
