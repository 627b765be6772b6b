"""The P3-P7 FPN of DW (P6 from P5's output, as DW's MMDetection config), on a ResNet or on any
bottom-up :class:`~detectron2.modeling.Backbone` (see :mod:`dw_d2.modeling.timm_backbone`)."""
import math
from typing import Sequence

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from .resnet import build_dw_resnet

__all__ = ["build_dw_resnet_fpn_backbone", "dw_fpn"]


def dw_fpn(bottom_up: Backbone, in_features: Sequence[str], out_channels: int, *,
           norm: str = "", fuse_type: str = "sum") -> FPN:
    """FPN on ``in_features`` of ``bottom_up``, then P6 = conv(top FPN output) and
    P7 = conv(relu(P6)).

    Detectron2's RetinaNet backbone feeds C5 to P6 instead; DW's official config uses FPN's
    ``add_extra_convs='on_output'`` with ``relu_before_extra_convs``, which is this layout.

    Args:
        bottom_up: the network whose outputs feed the FPN; their strides must be consecutive
            powers of two (e.g. 8, 16, 32).
        in_features: names of ``bottom_up``'s outputs, finest first.
        out_channels, norm, fuse_type: as Detectron2's ``FPN``.

    Returns:
        FPN: outputs p<log2(stride)> for each input (p3-p5 for strides 8-32), then the next
        two levels (p6, p7), ``out_channels`` each.
    """
    in_features = list(in_features)
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(f"The FPN's input features {list(in_features)} name {missing}, which "
                         f"the bottom-up network does not output "
                         f"(it outputs {sorted(bottom_up.output_shape())})")
    # FPN names its outputs p<log2(stride)>; the coarsest one feeds P6.
    top_stride = bottom_up.output_shape()[in_features[-1]].stride
    top_fpn_output = f"p{int(math.log2(top_stride))}"
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=norm,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature=top_fpn_output),
        fuse_type=fuse_type,
    )


@BACKBONE_REGISTRY.register()
def build_dw_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + FPN on ``MODEL.FPN.IN_FEATURES`` (C3-C5), then P6 = conv(P5) and
    P7 = conv(relu(P6)) (:func:`dw_fpn`).

    The ResNet is :func:`~dw_d2.modeling.resnet.build_dw_resnet`: Detectron2's, with dw-d2's
    norm names (``MODEL.RESNETS.NORM FrozenStatsBN``) and deformable stages that need no
    compiled operator (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``). ResNet-18/34 work too (set
    ``MODEL.RESNETS.RES2_OUT_CHANNELS`` to 64).

    Returns:
        FPN: a Backbone with outputs p3-p7 (strides 8-128), ``MODEL.FPN.OUT_CHANNELS`` each.
    """
    bottom_up = build_dw_resnet(cfg, input_shape)
    in_features = cfg.MODEL.FPN.IN_FEATURES
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {list(in_features)} names {missing}, which the ResNet does "
            f"not output; add them to MODEL.RESNETS.OUT_FEATURES "
            f"(now {list(cfg.MODEL.RESNETS.OUT_FEATURES)})"
        )
    return dw_fpn(bottom_up, in_features, cfg.MODEL.FPN.OUT_CHANNELS,
                  norm=cfg.MODEL.FPN.NORM, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
