"""DWDetector, DWHead and the backbone, on tiny models."""
import math

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from dw_d2 import add_dw_config, refine_box_distances
from dw_d2.modeling import ASSIGNER_REGISTRY, DWDetector, DWHead, HeadOutputs
from tests.helpers import (BUILTIN_ASSIGNERS, NUM_CLASSES, REPO, image_input, tiny_cfg,
                           tiny_model)


def test_builtin_config_builds_the_dw_detector():
    model = tiny_model()
    assert isinstance(model, DWDetector)
    assert type(model.assigner).__name__ == "DW"
    assert model.point_offset == 0.5
    assert model.strides == [8, 16, 32, 64, 128]
    assert model.head.box_refinement


@pytest.mark.parametrize(
    "config", sorted((REPO / "configs").glob("**/*.yaml")), ids=lambda p: p.name
)
def test_every_config_merges(config):
    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(str(config))
    assert cfg.MODEL.META_ARCHITECTURE == "DWDetector"
    assert cfg.MODEL.ASSIGNER.NAME in ASSIGNER_REGISTRY


@pytest.mark.parametrize(
    "config,refinement,p6_in_channels",
    [("dw_R_50_FPN_1x.yaml", True, 256), ("dw_R_50_FPN_1x_norefine.yaml", False, 256),
     ("autoassign_R_50_FPN_1x.yaml", False, 2048)],
)
def test_coco_configs_build(config, refinement, p6_in_channels):
    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "COCO-Detection" / config))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert model.head.box_refinement == refinement
    assert model.head.cls_score.out_channels == 80
    # DW feeds P6 from P5 (256 channels); MMDetection's AutoAssign from C5 (2048).
    assert model.backbone.top_block.p6.in_channels == p6_in_channels


def test_backbone_p6_comes_from_p5_output():
    model = tiny_model()
    top_block = model.backbone.top_block
    assert top_block.in_feature == "p5"
    assert top_block.p6.in_channels == 64  # FPN channels, not C5's 512
    images = torch.zeros(1, 3, 64, 64)
    features = model.backbone(images)
    assert torch.allclose(top_block.p6(features["p5"]), features["p6"])


def test_head_output_shapes_for_an_odd_image_size():
    model = tiny_model().eval()
    images = model.preprocess_image([image_input(97, 131)])
    # Padded to a multiple of 32 (128 x 160); level l has size ceil(padded / stride).
    assert images.tensor.shape[-2:] == (128, 160)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    cls_logits, box_dists, ctr_logits, points = model.head(features)
    expected_sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    assert points.level_shapes == tuple(expected_sizes)
    assert points.points.shape == (sum(h * w for h, w in expected_sizes), 2)
    for level, (h, w) in enumerate(expected_sizes):
        assert cls_logits[level].shape == (1, NUM_CLASSES, h, w)
        assert box_dists[level].shape == (1, 4, h, w)
        assert ctr_logits[level].shape == (1, 1, h, w)
        assert model.head.level_outputs(features[level], level)[3].shape == (1, 8, h, w)
        assert box_dists[level].min() >= 0


def test_head_initialisation_follows_the_official_head():
    head = tiny_model().head
    assert torch.allclose(
        head.cls_score.bias, torch.full((NUM_CLASSES,), -math.log((1 - 0.02) / 0.02))
    )
    assert torch.equal(head.distance_pred.bias, torch.full((4,), 4.0))
    assert torch.equal(head.centerness_pred.bias, torch.zeros(1))
    assert torch.equal(head.refine_offset_pred.bias, torch.zeros(8))
    assert torch.equal(head.scales.data, torch.ones(5))
    tower_convs = [m for m in head.cls_tower if isinstance(m, torch.nn.Conv2d)]
    assert all(torch.equal(conv.bias, torch.zeros_like(conv.bias)) for conv in tower_convs)
    assert isinstance(head.cls_tower[1], torch.nn.GroupNorm)
    weights = torch.cat([head.reg_tower[0].weight.flatten(), head.cls_score.weight.flatten()])
    assert 0.008 < weights.std().item() < 0.012


def test_initial_distances_are_bias_times_stride():
    head = DWHead(
        input_shape=[_shape(32, 8), _shape(32, 16)], num_classes=2, num_convs=1,
        distance_bias_init=4.0,
    )
    with torch.no_grad():
        head.distance_pred.weight.zero_()
    features = [torch.randn(1, 32, 4, 4), torch.randn(1, 32, 2, 2)]
    coarse = [head.level_outputs(feature, level)[1] for level, feature in enumerate(features)]
    assert torch.equal(coarse[0], torch.full((1, 4, 4, 4), 32.0))
    assert torch.equal(coarse[1], torch.full((1, 4, 2, 2), 64.0))


def test_box_refinement_toggles_the_offset_conv():
    with_refinement = tiny_model("MODEL.DW.BOX_REFINEMENT", True)
    without = tiny_model("MODEL.DW.BOX_REFINEMENT", False)
    assert any("refine_offset_pred" in k for k in with_refinement.state_dict())
    assert not any("refine_offset_pred" in k for k in without.state_dict())
    assert without.head.refine_offset_pred is None
    features = [torch.randn(1, 64, 4, 4)] * 5
    assert without.head.level_outputs(features[0], 0)[3] is None
    assert torch.equal(without.head(features).box_dists[0],
                       without.head.level_outputs(features[0], 0)[1])


def test_loss_and_inference_use_the_refined_distances():
    model = tiny_model().eval()
    batch = [image_input(64, 96)]
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    predictions = model.head(features)
    _, flat_dists, _ = model.flatten_predictions(predictions)
    _, coarse, _, offsets = model.head.level_outputs(features[0], 0)
    expected = refine_box_distances(coarse, offsets, 8, 0.5)
    assert torch.equal(flat_dists[0], expected.permute(0, 2, 3, 1).reshape(1, -1, 4))


def test_center_prior_is_fixed_for_dw_and_learnable_for_autoassign():
    dw = tiny_model()
    assert dw.assigner.center_prior_sigma == 1.11
    assert not list(dw.assigner.parameters()) and not dw.assigner.state_dict()

    autoassign = tiny_model("MODEL.ASSIGNER.NAME", "AutoAssign")
    names = {n for n, _ in autoassign.named_parameters()}
    assert {"assigner.prior_mean", "assigner.prior_sigma"} <= names
    assert {"assigner.prior_mean", "assigner.prior_sigma"} <= set(autoassign.state_dict())
    assert torch.equal(autoassign.assigner.prior_mean, torch.zeros(NUM_CLASSES, 2))
    assert torch.equal(autoassign.assigner.prior_sigma, torch.ones(NUM_CLASSES, 2))


def test_point_offset_defaults_per_scheme_and_can_be_set():
    assert tiny_model("MODEL.ASSIGNER.NAME", "AutoAssign").point_offset == 0.0
    assert type(tiny_model("MODEL.ASSIGNER.NAME", "autoassign").assigner).__name__ == "AutoAssign"
    assert tiny_model("MODEL.ASSIGNER.POINT_OFFSET", 0.25).point_offset == 0.25


def test_inference_output_format_and_rescaling():
    # A prior probability of 0.5 gives scores of about 0.25, above the 0.05 threshold.
    model = tiny_model("MODEL.DW.PRIOR_PROB", 0.5, "TEST.DETECTIONS_PER_IMAGE", 7).eval()
    batch = [image_input(97, 131), image_input(64, 80, seed=1)]
    batch[0].update(height=194, width=262)  # the caller asks for twice the input size
    with torch.no_grad():
        outputs = model(batch)
    assert len(outputs) == 2
    for output, (height, width) in zip(outputs, [(194, 262), (64, 80)]):
        instances = output["instances"]
        assert instances.image_size == (height, width)
        assert set(instances.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
        assert 0 < len(instances) <= 7
        boxes = instances.pred_boxes.tensor
        assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= width
        assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= height
        assert instances.scores.min() > 0.05
        assert torch.all(instances.scores[:-1] >= instances.scores[1:])
        assert instances.pred_classes.dtype == torch.int64
        assert instances.pred_classes.max() < NUM_CLASSES
    # The rescaled boxes span the doubled frame (initial boxes are 4 strides wide).
    assert outputs[0]["instances"].pred_boxes.tensor[:, 2].max() > 131


def _shape(channels, stride):
    from detectron2.layers import ShapeSpec

    return ShapeSpec(channels=channels, stride=stride)


def test_inference_decodes_thresholds_and_suppresses():
    model = tiny_model("MODEL.DW.BOX_REFINEMENT", False).eval()
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    features = [torch.zeros(1, 64, h, w) for h, w in sizes]
    cls_logits = [torch.full((1, NUM_CLASSES, h, w), -20.0) for h, w in sizes]
    ctr_logits = [torch.full((1, 1, h, w), 20.0) for h, w in sizes]
    box_dists = [torch.full((1, 4, h, w), 4.0) for h, w in sizes]
    # P3 cell (y=2, x=3): point (28, 20); class 1 with score ~0.9, box (18, 14, 36, 26).
    cls_logits[0][0, 1, 2, 3] = 2.2
    box_dists[0][0, :, 2, 3] = torch.tensor([10.0, 6.0, 8.0, 6.0])
    # Its neighbour (x=4), same class, same box shifted by 2 px: suppressed by NMS.
    cls_logits[0][0, 1, 2, 4] = 1.0
    box_dists[0][0, :, 2, 4] = torch.tensor([16.0, 6.0, 2.0, 6.0])
    # Same place, another class: kept (NMS is class-wise).
    cls_logits[0][0, 3, 2, 4] = 0.0
    # Below the 0.05 threshold: dropped.
    cls_logits[0][0, 2, 0, 0] = -3.5
    # P4 cell (y=0, x=0): point (8, 8), box extends outside the image: clipped.
    cls_logits[1][0, 0, 0, 0] = 1.5
    box_dists[1][0, :, 0, 0] = torch.tensor([20.0, 20.0, 20.0, 20.0])
    images = ImageList(torch.zeros(1, 3, 64, 64), [(60, 50)])
    points = model.head.point_grid(sizes)
    results = model.forward_inference(images, features,
                                      HeadOutputs(cls_logits, box_dists, ctr_logits, points))
    (result,) = results
    order = result.pred_classes.tolist()
    assert order == [1, 0, 3]
    boxes = result.pred_boxes.tensor
    assert torch.allclose(boxes[0], torch.tensor([18.0, 14.0, 36.0, 26.0]))
    assert torch.allclose(boxes[1], torch.tensor([0.0, 0.0, 28.0, 28.0]))
    assert torch.allclose(boxes[2], torch.tensor([20.0, 14.0, 38.0, 26.0]))
    expected_top = torch.sigmoid(torch.tensor(2.2)) * torch.sigmoid(torch.tensor(20.0))
    assert torch.isclose(result.scores[0], expected_top)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("MODEL.ASSIGNER.NAME", "ATSS"),
         r"MODEL.ASSIGNER.NAME 'ATSS' is not one of the registered .* \['DW', 'AutoAssign'"),
        (("MODEL.DW.NUM_CLASSES", 0), r"MODEL.DW.NUM_CLASSES must be >= 1, got 0"),
        (("MODEL.DW.IN_FEATURES", ["p3", "p8"]),
         r"MODEL.DW.IN_FEATURES \['p3', 'p8'\] names \['p8'\]"),
        (("MODEL.ASSIGNER.DUPLICATE_RULE", "first"),
         r"MODEL.ASSIGNER.DUPLICATE_RULE 'first' is not one of"),
        (("MODEL.ASSIGNER.POINT_OFFSET", 1.5), r"MODEL.ASSIGNER.POINT_OFFSET must be None or a"),
        (("MODEL.FPN.OUT_CHANNELS", 48), r"'GN' uses 32 groups, which must divide .* \(48"),
        (("MODEL.DW.NORM", "BN"), r"norm 'BN' is not supported"),
    ],
    ids=["assigner", "num_classes", "in_features", "duplicate_rule", "point_offset", "gn", "bn"],
)
def test_config_errors_are_clear(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny_cfg(*overrides))


def test_missing_dw_section_is_a_clear_error():
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "DWDetector"
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(ValueError, match="add_dw_config"):
        build_model(cfg)


def test_old_config_keys_name_their_new_place():
    for old, new in [("MODEL.DW.ASSIGNER", "MODEL.ASSIGNER.NAME"),
                     ("MODEL.DW.CENTER_PRIOR_SIGMA", "MODEL.ASSIGNER.DW.CENTER_PRIOR_SIGMA"),
                     ("MODEL.AUTOASSIGN.FORCE_TOPK", "MODEL.ASSIGNER.AUTOASSIGN.FORCE_TOPK")]:
        with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
            tiny_cfg(old, "1")


def test_old_config_file_names_the_new_key(tmp_path):
    old_file = tmp_path / "old.yaml"
    old_file.write_text(f'_BASE_: "{REPO / "configs" / "Base-DW.yaml"}"\n'
                        "MODEL:\n  DW:\n    POINT_OFFSET: None\n")
    cfg = get_cfg()
    add_dw_config(cfg)
    with pytest.raises(KeyError, match="MODEL.DW.POINT_OFFSET was renamed to "
                                       "MODEL.ASSIGNER.POINT_OFFSET"):
        cfg.merge_from_file(str(old_file))


# Training: the losses come from dw_d2.assign.

def training_batch():
    return [
        image_input(64, 96, boxes=[[8.0, 10.0, 40.0, 50.0], [50.0, 4.0, 90.0, 30.0]],
                    classes=[1, 3]),
        image_input(64, 96, seed=1),  # no GT box
    ]


@pytest.mark.parametrize("assigner", BUILTIN_ASSIGNERS)
def test_training_returns_finite_losses_with_gradients(assigner):
    model = tiny_model("MODEL.ASSIGNER.NAME", assigner).train()
    from detectron2.utils.events import EventStorage

    with EventStorage():
        losses = model(training_batch())
    assert losses and all(name.startswith("loss_") for name in losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.head.cls_score.weight.grad.abs().sum() > 0
    assert model.head.distance_pred.weight.grad.abs().sum() > 0
    assert model.head.refine_offset_pred.weight.grad.abs().sum() > 0
    for name, parameter in model.assigner.named_parameters():  # AutoAssign's prior
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_training_on_images_without_gt_boxes():
    model = tiny_model().train()
    from detectron2.utils.events import EventStorage

    batch = [image_input(64, 64), image_input(64, 64, seed=1)]
    with EventStorage():
        losses = model(batch)
    assert losses["loss_cls_pos"].item() == 0.0
    assert losses["loss_loc"].item() == 0.0
    assert losses["loss_cls_neg"].item() > 0.0
    sum(losses.values()).backward()
    assert model.head.cls_score.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("assigner", BUILTIN_ASSIGNERS)
def test_one_optimizer_step_lowers_the_loss(assigner):
    model = tiny_model("MODEL.ASSIGNER.NAME", assigner).train()
    from detectron2.utils.events import EventStorage

    batch = training_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)
    with EventStorage():
        # BN in train mode sees the same batch both times, so only the step changes the loss.
        before = sum(model(batch).values())
        optimizer.zero_grad()
        before.backward()
        optimizer.step()
        after = sum(model(batch).values())
    assert after.item() < before.item()
