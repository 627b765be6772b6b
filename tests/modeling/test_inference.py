"""How inference ranks candidates (MODEL.DW.INFERENCE_SCORE), and inference in float64."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import ImageList

from dw_d2.modeling import HeadOutputs
from dw_d2.modeling.meta_arch import INFERENCE_SCORES
from tests.helpers import NUM_CLASSES, image_input, tiny_cfg, tiny_model

SIZES = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]


def _one_candidate_outputs(model, cls_logit, ctr_logit):
    """Head outputs with one candidate (P3 cell (2, 3), class 1) and nothing else."""
    cls_logits = [torch.full((1, NUM_CLASSES, h, w), -20.0) for h, w in SIZES]
    ctr_logits = [torch.full((1, 1, h, w), 0.0) for h, w in SIZES]
    box_dists = [torch.full((1, 4, h, w), 4.0) for h, w in SIZES]
    cls_logits[0][0, 1, 2, 3] = cls_logit
    ctr_logits[0][0, 0, 2, 3] = ctr_logit
    return HeadOutputs(cls_logits, box_dists, ctr_logits, model.head.point_grid(SIZES))


@pytest.mark.parametrize("rule,kept", [("joint", False), ("class_then_joint", True)])
def test_threshold_applies_to_the_ranking_score(rule, kept):
    # sigmoid(cls) = 0.2 passes the 0.05 threshold; the joint score 0.2 * 0.1 = 0.02 does not.
    model = tiny_model("MODEL.DW.BOX_REFINEMENT", False, "MODEL.DW.INFERENCE_SCORE", rule).eval()
    cls_logit, ctr_logit = torch.logit(torch.tensor(0.2)), torch.logit(torch.tensor(0.1))
    outputs = _one_candidate_outputs(model, cls_logit, ctr_logit)
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    (result,) = model.forward_inference(images, [torch.zeros(1)] * 5, outputs)
    assert len(result) == int(kept)
    if kept:  # the detection's score is the joint score, as MMDetection's
        assert torch.isclose(result.scores[0], torch.tensor(0.02))
        assert result.pred_classes.tolist() == [1]


def test_class_then_joint_ranks_the_top_k_by_the_class_score():
    model = tiny_model("MODEL.DW.BOX_REFINEMENT", False, "MODEL.DW.INFERENCE_SCORE",
                       "class_then_joint", "MODEL.DW.TOPK_CANDIDATES_TEST", 1).eval()
    outputs = _one_candidate_outputs(model, 1.0, -3.0)
    # A second candidate with a lower class score but a higher joint score: not in the top 1.
    outputs.cls_logits[0][0, 2, 5, 5] = 0.5
    outputs.ctr_logits[0][0, 0, 5, 5] = 3.0
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    (result,) = model.forward_inference(images, [torch.zeros(1)] * 5, outputs)
    assert result.pred_classes.tolist()[0] == 1


def test_each_scheme_uses_its_reference_rule_unless_the_config_names_one():
    assert INFERENCE_SCORES == ("joint", "class_then_joint")
    assert tiny_model().inference_score == "joint"
    assert tiny_model("MODEL.ASSIGNER.NAME", "AutoAssign").inference_score == "class_then_joint"
    assert tiny_model("MODEL.ASSIGNER.NAME", "AutoAssign", "MODEL.DW.INFERENCE_SCORE",
                      "joint").inference_score == "joint"
    with pytest.raises(ValueError, match="MODEL.DW.INFERENCE_SCORE 'cls' is not one of"):
        build_model(tiny_cfg("MODEL.DW.INFERENCE_SCORE", "cls"))


@pytest.mark.parametrize("assigner", ["DW", "AutoAssign"])
def test_float64_model_runs_inference(assigner):
    """Detectron2's batched_nms casts the boxes to float32 but not the scores; dw-d2 runs NMS in
    the model's precision, so a float64 model (the equivalence tests') predicts."""
    model = tiny_model("MODEL.DW.PRIOR_PROB", 0.3, "MODEL.ASSIGNER.NAME", assigner).eval()
    batch = [{**x, "image": x["image"].double()}
             for x in (image_input(64, 96), image_input(48, 64, seed=1))]
    with torch.no_grad():
        outputs = model.double()(batch)
    for output in outputs:
        instances = output["instances"]
        assert len(instances) > 0
        assert instances.scores.dtype == torch.float64
        assert torch.all(instances.scores[:-1] >= instances.scores[1:])
