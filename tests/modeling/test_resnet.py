"""dw-d2's ResNet builder: Detectron2's ResNet, plus dw-d2's norm names and deformable stages."""
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import BottleneckBlock, build_resnet_backbone
from detectron2.modeling.backbone.resnet import DeformBottleneckBlock as D2DeformBottleneckBlock
from detectron2.solver import build_optimizer

from dw_d2 import add_dw_config
from dw_d2.layers import DeformConv, FrozenStatisticsBatchNorm2d
from dw_d2.modeling.resnet import DeformBottleneckBlock, build_dw_resnet
from tests.helpers import REPO

INPUT = ShapeSpec(channels=3)


def resnet_cfg(*opts):
    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_list(["MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"], *opts])
    return cfg


@pytest.mark.parametrize("opts", [
    ("MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", 2),
    ("MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.NORM", "BN",
     "MODEL.BACKBONE.FREEZE_AT", 1, "MODEL.RESNETS.STRIDE_IN_1X1", False),
], ids=["R50-caffe-FrozenBN", "R18-BN"])
def test_detectron2_norms_build_detectron2s_resnet(opts):
    cfg = resnet_cfg(*opts)
    torch.manual_seed(0)
    ours = build_dw_resnet(cfg, INPUT)
    torch.manual_seed(0)
    theirs = build_resnet_backbone(cfg, INPUT)
    # The same modules, names and initial weights (so seeded runs keep their results).
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                 theirs.state_dict().values()))
    assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]
    assert [p.requires_grad for p in ours.parameters()] == \
        [p.requires_grad for p in theirs.parameters()]
    x = torch.randn(1, 3, 32, 64)
    for name, feature in ours.eval()(x).items():
        torch.testing.assert_close(feature, theirs.eval()(x)[name])


def test_frozen_statistics_bn_keeps_its_layout_in_frozen_stages_and_trains_elsewhere():
    cfg = resnet_cfg("MODEL.RESNETS.NORM", "FrozenStatsBN", "MODEL.BACKBONE.FREEZE_AT", 2,
                     "MODEL.RESNETS.STRIDE_IN_1X1", False)
    resnet = build_dw_resnet(cfg, INPUT)
    norms = {name: m for name, m in resnet.named_modules() if name.endswith("norm")}
    assert all(type(m) is FrozenStatisticsBatchNorm2d for m in norms.values())
    for name, norm in norms.items():
        frozen = name.startswith(("stem.", "res2."))
        assert norm.weight.requires_grad != frozen, name
    assert not any(p.requires_grad for p in resnet.stem.parameters())
    assert all(p.requires_grad for p in resnet.res3.parameters())
    assert "res2.0.conv1.norm.num_batches_tracked" in resnet.state_dict()
    # The first bottleneck of res3 strides in its 3x3 conv (pytorch style).
    assert resnet.res3[0].conv1.stride == (1, 1) and resnet.res3[0].conv2.stride == (2, 2)


def test_official_config_has_no_weight_decay_on_the_trained_bn_parameters():
    cfg = get_cfg()
    add_dw_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "COCO-Detection" / "Base-DW-official.yaml"))
    cfg.merge_from_list(["MODEL.DW.NUM_CONVS", 1])
    from detectron2.modeling import build_model

    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups
             for p in group["params"]}
    bn = model.backbone.bottom_up.res4[0].conv1.norm
    assert decay[id(bn.weight)] == decay[id(bn.bias)] == 0.0
    assert decay[id(model.backbone.bottom_up.res4[0].conv1.weight)] == 1e-4
    assert id(model.backbone.bottom_up.res2[0].conv1.norm.weight) not in decay  # frozen


@pytest.mark.parametrize("modulated", [True, False])
def test_deformable_bottleneck_has_detectron2s_names_and_starts_as_a_plain_bottleneck(modulated):
    kwargs = dict(bottleneck_channels=16, stride=2, norm="FrozenBN", deform_modulated=modulated)
    ours = DeformBottleneckBlock(32, 64, **kwargs)
    theirs = D2DeformBottleneckBlock(32, 64, **kwargs)
    assert [(k, v.shape) for k, v in sorted(ours.state_dict().items())] == \
        [(k, v.shape) for k, v in sorted(theirs.state_dict().items())]
    assert isinstance(ours.conv2, DeformConv)
    # Zero offsets: a plain bottleneck; DCNv2's mask is sigmoid(0) = 0.5 at the start.
    plain = BottleneckBlock(32, 64, bottleneck_channels=16, stride=2, norm="FrozenBN")
    state = ours.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("conv2_offset")}
    if modulated:
        state["conv2.weight"] = state["conv2.weight"] * 0.5
    plain.load_state_dict(state)
    x = torch.randn(2, 32, 16, 12)
    torch.testing.assert_close(ours(x), plain(x))


def test_deformable_stages_from_the_config():
    cfg = resnet_cfg("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True],
                     "MODEL.RESNETS.DEFORM_MODULATED", True, "MODEL.RESNETS.NORM",
                     "FrozenStatsBN")
    resnet = build_dw_resnet(cfg, INPUT)
    assert not any(isinstance(b, DeformBottleneckBlock) for b in resnet.res2)
    assert all(isinstance(b, DeformBottleneckBlock) for b in [*resnet.res3, *resnet.res5])
    assert resnet.res3[0].conv2_offset.out_channels == 27


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="MODEL.RESNETS.NORM 'FrozenStatBN' is not a norm layer"):
        build_dw_resnet(resnet_cfg("MODEL.RESNETS.NORM", "FrozenStatBN"), INPUT)
    with pytest.raises(ValueError, match="MODEL.RESNETS.DEPTH 42"):
        build_dw_resnet(resnet_cfg("MODEL.RESNETS.DEPTH", 42), INPUT)
    with pytest.raises(ValueError, match=r"ResNet-18 \(BasicBlock\) needs "
                                         r"MODEL.RESNETS.RES2_OUT_CHANNELS 64 \(got 256\)"):
        build_dw_resnet(resnet_cfg("MODEL.RESNETS.DEPTH", 18), INPUT)
