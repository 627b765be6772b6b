"""Training and evaluation entry points of dw-d2 (used by ``train_net.py`` and the tools)."""
from .checkpoint import EvaluationCheckpointer
from .checks import check_num_classes, num_classes_key
from .defaults import default_setup
from .launch import launch
from .trainer import NONFINITE_CHECKPOINT, Trainer

__all__ = ["NONFINITE_CHECKPOINT", "EvaluationCheckpointer", "Trainer", "check_num_classes", "default_setup",
           "launch", "num_classes_key"]
