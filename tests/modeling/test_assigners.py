"""The assignment schemes as modules: the registry, the config, and the modules against the
public weighting functions and the per-GT-loop oracle."""
import pytest
import torch

from dw_d2 import ASSIGNER_REGISTRY, autoassign_loss, dual_weighting_loss
from dw_d2.assign.reference import REFERENCE_LOSSES
from dw_d2.modeling import build_assigner
from dw_d2.points import PointGrid
from tests.helpers import BUILTIN_ASSIGNERS, tiny_cfg

LOSS_NAMES = {"DW": {"loss_cls_pos", "loss_loc", "loss_cls_neg"},
              "AutoAssign": {"loss_pos", "loss_neg", "loss_center"}}


def test_the_registry_holds_the_built_in_schemes():
    assert BUILTIN_ASSIGNERS == ["DW", "AutoAssign"]
    assert set(BUILTIN_ASSIGNERS) <= set(REFERENCE_LOSSES)
    assert "assigner(points, cls_logits, box_dists, ctr_logits" in ASSIGNER_REGISTRY.__doc__
    assert ASSIGNER_REGISTRY.get("DW").reference_point_offset == 0.5
    assert ASSIGNER_REGISTRY.get("AutoAssign").reference_point_offset == 0.0


def test_build_assigner_reads_its_own_config_node():
    dw = build_assigner(tiny_cfg("MODEL.ASSIGNER.DW.LOC_BETA", 3.0,
                                 "MODEL.ASSIGNER.DUPLICATE_RULE", "min"))
    assert type(dw).__name__ == "DW" and dw.loc_beta == 3.0 and dw.duplicate_rule == "min"
    autoassign = build_assigner(tiny_cfg("MODEL.ASSIGNER.NAME", "autoassign",
                                         "MODEL.ASSIGNER.AUTOASSIGN.TOPK", 5,
                                         "MODEL.DW.NUM_CLASSES", 3))
    assert type(autoassign).__name__ == "AutoAssign" and autoassign.topk == 5
    assert autoassign.prior_mean.shape == (3, 2)


def scheme_inputs(scheme, seed=0, num_classes=3):
    """Float64 head outputs on the point layout the head would build, and GT boxes."""
    generator = torch.Generator().manual_seed(seed)
    offset = ASSIGNER_REGISTRY.get(scheme).reference_point_offset
    points = PointGrid([8, 16, 32, 64, 128], offset)([(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)],
                                                     dtype=torch.float64)
    num_points = points.num_points
    boxes = [torch.tensor([[4.0, 6.0, 60.0, 50.0], [30.0, 10.0, 90.0, 62.0],
                           [33.0, 12.0, 80.0, 60.0]], dtype=torch.float64),
             torch.zeros(0, 4, dtype=torch.float64)]
    classes = [torch.tensor([0, 2, 2]), torch.zeros(0, dtype=torch.long)]
    leaves = {
        "cls_logits": torch.randn(2, num_points, num_classes, generator=generator,
                                  dtype=torch.float64),
        "box_dists": torch.rand(2, num_points, 4, generator=generator, dtype=torch.float64) * 40,
        "ctr_logits": torch.randn(2, num_points, 1, generator=generator, dtype=torch.float64),
    }
    return points, {k: v.requires_grad_() for k, v in leaves.items()}, boxes, classes


def losses_and_grads(losses, leaves):
    grads = torch.autograd.grad(sum(losses.values()), list(leaves), allow_unused=True)
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("scheme", BUILTIN_ASSIGNERS)
def test_each_scheme_module_equals_its_public_function_to_the_bit(scheme):
    assigner = build_assigner(tiny_cfg("MODEL.ASSIGNER.NAME", scheme, "MODEL.DW.NUM_CLASSES", 3))
    assigner.double()
    points, leaves, boxes, classes = scheme_inputs(scheme)
    parameters = dict(assigner.named_parameters())
    module_losses = assigner(points, *leaves.values(), boxes, classes)
    assert set(module_losses) == LOSS_NAMES[scheme]
    ours = losses_and_grads(module_losses, [*leaves.values(), *parameters.values()])
    flat = (points.points, points.strides, *leaves.values(), boxes, classes)
    if scheme == "DW":
        public = dual_weighting_loss(*flat)
    else:
        public = autoassign_loss(*flat, parameters["prior_mean"], parameters["prior_sigma"])
    theirs = losses_and_grads(public, [*leaves.values(), *parameters.values()])
    for name in ours[0]:
        assert torch.equal(ours[0][name], theirs[0][name]), name
    for mine, expected in zip(ours[1], theirs[1]):
        assert (mine is None and expected is None) or torch.equal(mine, expected)


@pytest.mark.parametrize("scheme", BUILTIN_ASSIGNERS)
def test_each_scheme_module_matches_the_per_gt_loop_oracle(scheme):
    assigner = build_assigner(tiny_cfg("MODEL.ASSIGNER.NAME", scheme, "MODEL.DW.NUM_CLASSES", 3))
    assigner.double()
    points, leaves, boxes, classes = scheme_inputs(scheme, seed=1)
    parameters = dict(assigner.named_parameters())
    inputs = [*leaves.values(), *parameters.values()]
    ours = losses_and_grads(assigner(points, *leaves.values(), boxes, classes), inputs)
    oracle = REFERENCE_LOSSES[scheme](points.points, points.strides, *leaves.values(), boxes,
                                      classes, **parameters)
    theirs = losses_and_grads(oracle, inputs)
    for name in ours[0]:
        torch.testing.assert_close(ours[0][name], theirs[0][name], rtol=1e-9, atol=0)
    for mine, expected in zip(ours[1], theirs[1]):
        mine = torch.zeros_like(expected) if mine is None else mine
        torch.testing.assert_close(mine, expected, rtol=1e-9, atol=1e-12)


def test_dw_module_returns_its_weights_when_asked():
    assigner = build_assigner(tiny_cfg("MODEL.DW.NUM_CLASSES", 3)).double()
    points, leaves, boxes, classes = scheme_inputs("DW")
    losses, weights = assigner(points, *leaves.values(), boxes, classes, return_weights=True)
    assert set(losses) == LOSS_NAMES["DW"]
    assert len(weights) == 2 and weights[0]["pos_weight"].shape == (points.num_points, 3)
