"""Label assignment: the weighting functions of DW and AutoAssign. Pure PyTorch: no parameters,
no Detectron2.

* :mod:`.dual_weighting`, :mod:`.autoassign`: each scheme's formulas, in the paper's order;
* :mod:`.pipeline`: what every scheme shares around its formulas (input checks, candidate
  pairs, gathers, IoU / GIoU, per-GT reductions, normalisers); :mod:`.candidates` finds the
  candidate pairs, :mod:`.center_prior` is the Gaussian prior of both schemes;
* :mod:`.kernels`: the speed kernels the formulas call, each with a plain-PyTorch counterpart;
* :mod:`.reference`: the slow per-GT-loop oracle of both schemes (tests and benchmark only).
"""
from .autoassign import autoassign_loss
from .dual_weighting import dual_weighting_loss

__all__ = ["dual_weighting_loss", "autoassign_loss"]
