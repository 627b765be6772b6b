"""ResNet-FPN with P3-P7 where P6 comes from P5's output (as DW's MMDetection config)."""
import math

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from .resnet import build_dw_resnet

__all__ = ["build_dw_resnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_dw_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + FPN on ``MODEL.FPN.IN_FEATURES`` (C3-C5), then P6 = conv(P5) and
    P7 = conv(relu(P6)).

    Detectron2's RetinaNet backbone feeds C5 to P6 instead; DW's official config uses FPN's
    ``add_extra_convs='on_output'`` with ``relu_before_extra_convs``, which is this layout.
    The ResNet is :func:`~dw_d2.modeling.resnet.build_dw_resnet`: Detectron2's, with dw-d2's
    norm names (``MODEL.RESNETS.NORM FrozenStatsBN``) and deformable stages that need no
    compiled operator (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``). ResNet-18/34 work too (set
    ``MODEL.RESNETS.RES2_OUT_CHANNELS`` to 64).

    Returns:
        FPN: a Backbone with outputs p3-p7 (strides 8-128), ``MODEL.FPN.OUT_CHANNELS`` each.
    """
    bottom_up = build_dw_resnet(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    in_features = cfg.MODEL.FPN.IN_FEATURES
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {list(in_features)} names {missing}, which the ResNet does "
            f"not output; add them to MODEL.RESNETS.OUT_FEATURES "
            f"(now {list(cfg.MODEL.RESNETS.OUT_FEATURES)})"
        )
    # FPN names its outputs p<log2(stride)>; the coarsest one feeds P6.
    top_stride = bottom_up.output_shape()[in_features[-1]].stride
    top_fpn_output = f"p{int(math.log2(top_stride))}"
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature=top_fpn_output),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
