"""Label-assignment weighting functions: pure PyTorch, no parameters, no Detectron2."""
from .autoassign import autoassign_loss
from .dual_weighting import dual_weighting_loss

__all__ = ["dual_weighting_loss", "autoassign_loss"]
