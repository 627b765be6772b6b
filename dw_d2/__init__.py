"""dw-d2: DW (Dual Weighting) and AutoAssign dense detectors for Detectron2.

The weighting functions are pure PyTorch and import without Detectron2::

    from dw_d2 import dual_weighting_loss, autoassign_loss, refine_box_distances

Importing the package also registers the meta-architecture, the backbone and the assignment
schemes (``dw_d2.ASSIGNER_REGISTRY``) with Detectron2's registries when Detectron2 is
installed.
"""
from .assign import autoassign_loss, dual_weighting_loss
from .box_refinement import refine_box_distances

try:
    import detectron2  # noqa: F401
except ImportError:  # the pure functions stay usable without Detectron2
    pass
else:
    from .config import add_dw_config
    from . import data  # noqa: F401  (registers the built-in dataset)
    from . import modeling  # noqa: F401  (registers the meta-architecture and backbone)
    from .modeling import ASSIGNER_REGISTRY  # noqa: F401
    from . import baselines  # noqa: F401  (registers FCOSBaseline, for comparisons)

__version__ = "0.1.0"
