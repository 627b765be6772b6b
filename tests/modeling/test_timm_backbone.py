"""The timm backbone: ImageNet weights from the installed package (checked on a real photo),
weights files by name and by position, clear errors, norm handling and frozen stages."""
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402

from dw_d2 import add_dw_config  # noqa: E402
from dw_d2.modeling.timm_backbone import (  # noqa: E402
    TimmBackbone,
    imagenet_state_dict,
    map_state_dict,
)

from tests.helpers import BUILTIN_CONFIGS  # noqa: E402

LITE0_CONFIG = BUILTIN_CONFIGS / "dw_lite0_FPN_shapes.yaml"
# ImageNet class 652, "military uniform": what matplotlib's photo of Grace Hopper shows.
MILITARY_UNIFORM = 652


def grace_hopper_batch():
    """matplotlib's sample photo, 224 x 224 (PIL's default bicubic), (x / 255 - 0.5) / 0.5."""
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    image = np.asarray(Image.open(photo).convert("RGB").resize((224, 224)), dtype=np.float32)
    return torch.from_numpy((image / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]


def test_packaged_efficientnet_lite0_weights_classify_a_real_photo():
    classifier = timm.create_model("efficientnet_lite0")
    classifier.load_state_dict(imagenet_state_dict("efficientnet_lite0"))
    with torch.no_grad():
        probabilities = classifier.eval()(grace_hopper_batch()).softmax(-1)[0]
    assert probabilities.argmax().item() == MILITARY_UNIFORM
    # 0.33 with these weights; a network whose tensors were mapped wrongly gives ~1/1000.
    assert probabilities[MILITARY_UNIFORM] > 0.25


def test_backbone_features_carry_the_packaged_weights():
    backbone = TimmBackbone("efficientnet_lite0", [2, 3, 4])
    weights = imagenet_state_dict("efficientnet_lite0")
    for name, value in backbone.features.state_dict().items():
        assert torch.equal(value, weights[name]), name
    shapes = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "c3": (40, 8), "c4": (112, 16), "c5": (320, 32)}


def test_map_state_dict_by_name_by_position_and_mismatches():
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    renamed = {"_x.w": torch.ones(2, 3), "_x.b": torch.ones(2)}
    mapped = map_state_dict(renamed, target, "f.pth")
    assert list(mapped) == ["a.weight", "a.bias"] and torch.equal(mapped["a.bias"], torch.ones(2))
    same_names = {"a.bias": torch.ones(2), "a.weight": torch.ones(2, 3)}
    assert list(map_state_dict(same_names, target, "f.pth")) == ["a.weight", "a.bias"]
    with pytest.raises(ValueError, match=r"f.pth: tensor #0 '_x.w' has shape \(3, 2\)"):
        map_state_dict({"_x.w": torch.ones(3, 2), "_x.b": torch.ones(2)}, target, "f.pth")
    with pytest.raises(ValueError, match="f.pth has 1 tensors, the model 2"):
        map_state_dict({"_x.w": torch.ones(2, 3)}, target, "f.pth")


@pytest.mark.parametrize("model_name", ["mobilenetv3_small_050", "resnet10t"])
def test_weights_file_in_timm_names_or_in_order_loads(tmp_path, model_name):
    torch.manual_seed(0)
    source = timm.create_model(model_name).state_dict()
    by_name, by_order = tmp_path / "timm_names.pth", tmp_path / "renamed.pth"
    torch.save(source, by_name)
    torch.save({f"t{i}": v for i, v in enumerate(source.values())}, by_order)
    reference = timm.create_model(model_name, features_only=True, out_indices=(2, 3, 4))
    reference.load_state_dict({k: v for k, v in source.items()
                               if k in reference.state_dict()}, strict=False)
    image = torch.rand(1, 3, 64, 64)
    for weights_file in (by_name, by_order):
        backbone = TimmBackbone(model_name, [2, 3, 4], weights_file=str(weights_file)).eval()
        for ours, expected in zip(backbone(image).values(), reference.eval()(image)):
            torch.testing.assert_close(ours, expected)


def test_wrong_weights_file_is_an_error_naming_it(tmp_path):
    wrong = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), wrong)
    with pytest.raises(ValueError, match="resnet.pth"):
        TimmBackbone("efficientnet_lite0", [2, 3, 4], weights_file=str(wrong))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        TimmBackbone("efficientnet_lite0", [2, 3, 4], weights_file=str(tmp_path / "missing.pth"))


def test_download_failure_names_the_model_and_the_weights_file_key(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("cannot reach the download host")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    with pytest.raises(RuntimeError, match=r"'resnet10t'.*MODEL.TIMM.WEIGHTS_FILE"):
        TimmBackbone("resnet10t", [2, 3, 4], pretrained=True)


def test_unknown_model_and_bad_norm_are_errors():
    with pytest.raises(ValueError, match="MODEL.TIMM.NAME 'no_such_net'"):
        TimmBackbone("no_such_net", [2, 3, 4], pretrained=False)
    with pytest.raises(ValueError, match="MODEL.TIMM.NORM"):
        TimmBackbone("resnet10t", [2, 3, 4], pretrained=False, norm="GN")


def test_frozen_bn_keeps_the_fused_activation_and_the_statistics():
    trained_bn = TimmBackbone("efficientnet_lite0", [2, 3, 4], norm="BN").eval()
    frozen_bn = TimmBackbone("efficientnet_lite0", [2, 3, 4], norm="FrozenBN").train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen_bn.modules())
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(trained_bn(image).values(), frozen_bn(image).values()):
            # The same arithmetic in another order (x * scale + shift): float32 rounding.
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name,first_trained", [
    ("efficientnet_lite0", "features.blocks.2.0.conv_pw.weight"),
    ("resnet10t", "features.layer2.0.conv1.weight"),
])
def test_freeze_at_stops_training_the_first_stages(model_name, first_trained):
    backbone = TimmBackbone(model_name, [2, 3, 4], pretrained=False, freeze_at=2)
    names = [name for name, _ in backbone.named_parameters()]
    trained = [name for name, p in backbone.named_parameters() if p.requires_grad]
    assert trained == names[names.index(first_trained):]
    # The frozen stages' BatchNorm layers keep their statistics in training mode too.
    frozen_bn = [m for m in backbone.features.modules() if "Frozen" in type(m).__name__]
    assert frozen_bn
    with pytest.raises(ValueError, match="MODEL.TIMM.FREEZE_AT must be in"):
        TimmBackbone(model_name, [2, 3, 4], pretrained=False, freeze_at=9)


def test_config_builds_p3_to_p7_from_the_packaged_weights():
    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(str(LITE0_CONFIG))
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    assert {k: s.stride for k, s in shapes.items()} == {
        "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    assert {s.channels for s in shapes.values()} == {cfg.MODEL.FPN.OUT_CHANNELS}
    features = backbone(torch.rand(1, 3, 128, 128))
    assert features["p7"].shape[-2:] == (1, 1)


def test_main_job_detector_trains_a_step_on_the_pretrained_backbone():
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances

    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(str(LITE0_CONFIG))
    cfg.merge_from_list(["MODEL.TIMM.FREEZE_AT", 2, "MODEL.TIMM.NORM", "FrozenBN"])
    model = build_model(cfg).train()
    instances = Instances((96, 128))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0]]))
    instances.gt_classes = torch.tensor([2])
    batch = [{"image": torch.randint(0, 256, (3, 96, 128)).float(), "instances": instances}]
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    stem = model.backbone.bottom_up.features.conv_stem.weight
    assert stem.grad is None and not stem.requires_grad
    assert model.backbone.bottom_up.features.blocks[6][0].conv_pw.weight.grad is not None
