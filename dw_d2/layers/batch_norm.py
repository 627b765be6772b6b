"""BatchNorm with frozen statistics, and the norm names dw-d2 adds to Detectron2's.

Detectron2's ``get_norm`` maps a config string (``MODEL.RESNETS.NORM``: "BN", "FrozenBN", "GN",
...) to a layer through a fixed dict, so a project cannot add a name to it. dw-d2's builders
resolve the name with :func:`resolve_norm` first: a name in :data:`NORM_LAYERS` becomes its
class, any other name goes to Detectron2 unchanged, and a name neither knows is an error that
lists the known ones. To add a norm, add it to :data:`NORM_LAYERS` before building the model.
"""
from typing import Callable, Dict, Optional, Union

from detectron2.layers import get_norm as detectron2_get_norm
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FrozenStatisticsBatchNorm2d", "NORM_LAYERS", "resolve_norm", "get_norm",
           "has_frozen_statistics"]


class FrozenStatisticsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics and never updates them,
    while its scale and shift (``weight``, ``bias``) stay trainable.

    This is MMDetection's ``BN`` with ``requires_grad=True`` under ``norm_eval=True``, the
    backbone norm of the official DW models: ImageNet statistics, affine parameters fine-tuned.
    Detectron2's ``FrozenBN`` freezes both; its ``BN`` learns both. As a ``BatchNorm2d`` it keeps
    BN's parameter and buffer names (a checkpoint maps 1:1) and Detectron2's optimizer builder
    treats it as a norm layer (``SOLVER.WEIGHT_DECAY_NORM`` applies to its parameters).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


# Norm names dw-d2 adds to Detectron2's (config string -> layer class, called with channels).
NORM_LAYERS: Dict[str, Callable[[int], nn.Module]] = {
    "FrozenStatsBN": FrozenStatisticsBatchNorm2d,
}


def resolve_norm(norm: Union[str, Callable, None], config_key: str = "norm"
                 ) -> Union[str, Callable, None]:
    """The norm as Detectron2's builders accept it: a dw-d2 name becomes its class (Detectron2's
    ``get_norm`` calls it with the channel count), anything else is returned unchanged.

    Raises:
        ValueError: ``norm`` is a string that neither dw-d2 nor Detectron2 knows; the message
            names ``config_key`` (e.g. ``"MODEL.RESNETS.NORM"``) and the known names.
    """
    if not isinstance(norm, str) or norm == "":
        return norm
    if norm in NORM_LAYERS:
        return NORM_LAYERS[norm]
    try:
        detectron2_get_norm(norm, 32)
    except KeyError:
        raise ValueError(
            f"{config_key} {norm!r} is not a norm layer: dw-d2 adds {sorted(NORM_LAYERS)} to "
            f"Detectron2's names (BN, SyncBN, FrozenBN, GN, ...)") from None
    return norm


def get_norm(norm: Union[str, Callable, None], out_channels: int,
             config_key: str = "norm") -> Optional[nn.Module]:
    """Detectron2's ``get_norm``, knowing dw-d2's names too (see :func:`resolve_norm`)."""
    return detectron2_get_norm(resolve_norm(norm, config_key), out_channels)


def has_frozen_statistics(module: nn.Module) -> bool:
    """Whether ``module`` contains a :class:`FrozenStatisticsBatchNorm2d`."""
    return any(isinstance(m, FrozenStatisticsBatchNorm2d) for m in module.modules())
