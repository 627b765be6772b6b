"""Detectron2's ResNet, built with dw-d2's norm names and deformable convolutions that need no
compiled operator.

:func:`build_dw_resnet` reads the same ``MODEL.RESNETS.*`` and ``MODEL.BACKBONE.FREEZE_AT``
keys as Detectron2's ``build_resnet_backbone`` and builds the same modules with the same
parameter names (so Detectron2's ResNet checkpoints load), with three differences:

* ``MODEL.RESNETS.NORM`` may also name a dw-d2 norm (``FrozenStatsBN``:
  :class:`~dw_d2.layers.FrozenStatisticsBatchNorm2d`, the official DW backbones' BN);
* ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` builds :class:`DeformBottleneckBlock`, whose 3x3
  convolution runs on ``torchvision.ops.deform_conv2d``;
* frozen stages (``FREEZE_AT``) with frozen-statistics BN keep it as it is, with its parameters
  no longer trained; Detectron2 turns BN in frozen stages into ``FrozenBN``, which would drop the
  ``num_batches_tracked`` buffers and make the checkpoint layout depend on ``FREEZE_AT``.
"""
import fvcore.nn.weight_init as weight_init
import torch
from torch.nn import functional as F

from detectron2.layers import Conv2d
from detectron2.modeling.backbone.resnet import (BasicBlock, BasicStem, BottleneckBlock,
                                                 ResNet)

from ..layers import (DeformConv, get_norm, has_frozen_statistics, resolve_norm,
                      split_offsets_and_mask)

__all__ = ["build_dw_resnet", "DeformBottleneckBlock", "freeze_resnet_stages"]

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3],
                     101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class DeformBottleneckBlock(BottleneckBlock):
    """Detectron2's ``DeformBottleneckBlock`` (same modules and names: ``conv2`` deformable,
    its offsets from ``conv2_offset``), computed with :class:`~dw_d2.layers.DeformConv`.

    With ``deform_modulated`` (DCNv2), ``conv2_offset`` predicts 27 channels per deformable
    group: offsets and mask, read by :func:`~dw_d2.layers.split_offsets_and_mask`; else (DCNv1)
    18 offset channels. ``conv2_offset`` starts at zero, so the block starts as a plain
    bottleneck (DCNv2: with every sample weighted by 0.5).
    """

    def __init__(self, in_channels, out_channels, *, bottleneck_channels, stride=1,
                 num_groups=1, norm="BN", stride_in_1x1=False, dilation=1,
                 deform_modulated=False, deform_num_groups=1):
        super().__init__(in_channels, out_channels, bottleneck_channels=bottleneck_channels,
                         stride=stride, num_groups=num_groups, norm=norm,
                         stride_in_1x1=stride_in_1x1, dilation=dilation)
        self.deform_modulated = deform_modulated
        stride_3x3 = 1 if stride_in_1x1 else stride
        # The plain 3x3 conv of the bottleneck becomes deformable.
        self.conv2 = DeformConv(
            bottleneck_channels, bottleneck_channels, kernel_size=3, stride=stride_3x3,
            padding=dilation, dilation=dilation, groups=num_groups,
            deformable_groups=deform_num_groups, bias=False,
            norm=get_norm(norm, bottleneck_channels))
        self.conv2_offset = Conv2d(
            bottleneck_channels, (27 if deform_modulated else 18) * deform_num_groups,
            kernel_size=3, stride=stride_3x3, padding=dilation, dilation=dilation)
        weight_init.c2_msra_fill(self.conv2)
        torch.nn.init.zeros_(self.conv2_offset.weight)
        torch.nn.init.zeros_(self.conv2_offset.bias)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        if self.deform_modulated:
            offset, mask = split_offsets_and_mask(self.conv2_offset(out))
            out = self.conv2(out, offset, mask)
        else:
            out = self.conv2(out, self.conv2_offset(out))
        out = self.conv3(F.relu_(out))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out + shortcut)


def freeze_resnet_stages(resnet: ResNet, freeze_at: int) -> ResNet:
    """Freeze the stem (``freeze_at >= 1``) and the stages res2 .. res<freeze_at>, as
    Detectron2's ``ResNet.freeze``, except that blocks with frozen-statistics BN keep it (its
    parameters stop training; its statistics never train)."""
    blocks = [resnet.stem] if freeze_at >= 1 else []
    for stage_index, stage in enumerate(resnet.stages, start=2):
        if freeze_at >= stage_index:
            blocks.extend(stage.children())
    for block in blocks:
        if has_frozen_statistics(block):
            for parameter in block.parameters():
                parameter.requires_grad_(False)
        else:
            block.freeze()
    return resnet


def build_dw_resnet(cfg, input_shape) -> ResNet:
    """Detectron2's ``build_resnet_backbone`` with dw-d2's norms and deformable convolutions
    (see the module docstring).

    Returns:
        ResNet: outputs ``MODEL.RESNETS.OUT_FEATURES``.
    """
    resnets = cfg.MODEL.RESNETS
    norm = resolve_norm(resnets.NORM, "MODEL.RESNETS.NORM")
    depth = resnets.DEPTH
    if depth not in _BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.RESNETS.DEPTH {depth} is not one of {sorted(_BLOCKS_PER_STAGE)}")
    deform_on_per_stage = list(resnets.DEFORM_ON_PER_STAGE)
    if len(deform_on_per_stage) != 4:
        raise ValueError(f"MODEL.RESNETS.DEFORM_ON_PER_STAGE needs one entry per stage res2-res5, "
                         f"got {deform_on_per_stage}")
    if resnets.RES5_DILATION not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {resnets.RES5_DILATION}")
    basic = depth in (18, 34)
    if basic:
        found = {"RES2_OUT_CHANNELS": resnets.RES2_OUT_CHANNELS,
                 "DEFORM_ON_PER_STAGE": deform_on_per_stage,
                 "RES5_DILATION": resnets.RES5_DILATION, "NUM_GROUPS": resnets.NUM_GROUPS}
        needed = {"RES2_OUT_CHANNELS": 64, "DEFORM_ON_PER_STAGE": [False] * 4,
                  "RES5_DILATION": 1, "NUM_GROUPS": 1}
        wrong = [f"MODEL.RESNETS.{key} {value} (got {found[key]})"
                 for key, value in needed.items() if found[key] != value]
        if wrong:
            raise ValueError(f"ResNet-{depth} (BasicBlock) needs {', '.join(wrong)}")

    stem = BasicStem(in_channels=input_shape.channels, out_channels=resnets.STEM_OUT_CHANNELS,
                     norm=norm)
    in_channels = resnets.STEM_OUT_CHANNELS
    out_channels = resnets.RES2_OUT_CHANNELS
    bottleneck_channels = resnets.NUM_GROUPS * resnets.WIDTH_PER_GROUP
    stages = []
    for index, num_blocks in enumerate(_BLOCKS_PER_STAGE[depth]):
        dilation = resnets.RES5_DILATION if index == 3 else 1  # res5
        first_stride = 1 if index == 0 or dilation == 2 else 2
        kwargs = {"num_blocks": num_blocks, "in_channels": in_channels,
                  "out_channels": out_channels, "norm": norm,
                  "stride_per_block": [first_stride] + [1] * (num_blocks - 1)}
        if basic:
            kwargs["block_class"] = BasicBlock
        else:
            kwargs.update(bottleneck_channels=bottleneck_channels,
                          stride_in_1x1=resnets.STRIDE_IN_1X1, dilation=dilation,
                          num_groups=resnets.NUM_GROUPS, block_class=BottleneckBlock)
            if deform_on_per_stage[index]:
                kwargs.update(block_class=DeformBottleneckBlock,
                              deform_modulated=resnets.DEFORM_MODULATED,
                              deform_num_groups=resnets.DEFORM_NUM_GROUPS)
        stages.append(ResNet.make_stage(**kwargs))
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2
    resnet = ResNet(stem, stages, out_features=resnets.OUT_FEATURES, freeze_at=0)
    return freeze_resnet_stages(resnet, cfg.MODEL.BACKBONE.FREEZE_AT)
