"""dw-d2's Detectron2 modules; importing registers the meta-architecture and backbone."""
from .backbone import build_dw_resnet_fpn_backbone
from .center_prior import CenterPrior
from .head import DWHead
from .meta_arch import DWDetector
from .points import PointGrid, level_points
from .timm_backbone import build_dw_timm_fpn_backbone

__all__ = [
    "DWDetector",
    "DWHead",
    "CenterPrior",
    "PointGrid",
    "level_points",
    "build_dw_resnet_fpn_backbone",
    "build_dw_timm_fpn_backbone",
]
