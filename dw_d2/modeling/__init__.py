"""dw-d2's Detectron2 modules; importing registers the meta-architecture, the backbone and the
assignment schemes."""
from ..points import PointGrid, PointLayout, level_points
from .assigners import ASSIGNER_REGISTRY, AutoAssign, DW, build_assigner
from .backbone import build_dw_resnet_fpn_backbone
from .head import DWHead, HeadOutputs
from .meta_arch import DWDetector
from .timm_backbone import build_dw_timm_fpn_backbone

__all__ = [
    "DWDetector",
    "DWHead",
    "HeadOutputs",
    "ASSIGNER_REGISTRY",
    "build_assigner",
    "DW",
    "AutoAssign",
    "PointGrid",
    "PointLayout",
    "level_points",
    "build_dw_resnet_fpn_backbone",
    "build_dw_timm_fpn_backbone",
]
