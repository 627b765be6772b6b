"""DWHead options for the official models: DCN in the last conv of each tower."""
import torch

from dw_d2.layers import ModulatedDeformConvWithOffsets
from tests.helpers import tiny_model


def test_dcn_on_last_conv_replaces_the_last_conv_of_each_tower():
    head = tiny_model("MODEL.DW.NUM_CONVS", 2, "MODEL.DW.DCN_ON_LAST_CONV", True).head
    for tower in (head.cls_tower, head.reg_tower):
        assert type(tower[0]) is torch.nn.Conv2d
        assert isinstance(tower[3], ModulatedDeformConvWithOffsets)
        assert isinstance(tower[4], torch.nn.GroupNorm)
    keys = head.state_dict()
    assert {"cls_tower.3.weight", "cls_tower.3.bias", "cls_tower.3.conv_offset.weight",
            "reg_tower.3.conv_offset.bias"} <= set(keys)
    # The offset conv is initialised like the head's other convs (as in the official head).
    offset_conv = head.cls_tower[3].conv_offset
    assert 0.005 < offset_conv.weight.std() < 0.015 and not offset_conv.bias.any()
    features = [torch.randn(1, 64, s, s) for s in (8, 4, 2, 1, 1)]
    outputs = head(features)
    assert outputs.cls_logits[0].shape[-2:] == (8, 8)
    assert not tiny_model().head.cls_tower[0].__class__ is ModulatedDeformConvWithOffsets
