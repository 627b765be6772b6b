"""The per-class Gaussian centre prior of DW and AutoAssign (its parameters, not the weights)."""
from typing import Tuple

import torch
from torch import Tensor, nn

__all__ = ["CenterPrior"]


class CenterPrior(nn.Module):
    """Per-class mean and sigma, in stride units, of the Gaussian over point-to-centre offsets.

    AutoAssign learns them (initialised at 0 and 1); they are then parameters, updated by the
    optimizer and saved in checkpoints. DW keeps them fixed (0 and 1.11); they are then
    non-persistent buffers, so that the config's value is the one used even when an older
    checkpoint is loaded.
    """

    def __init__(self, num_classes: int, learnable: bool, init_mean: float, init_sigma: float):
        """
        Args:
            num_classes: C.
            learnable: whether the optimizer updates mean and sigma.
            init_mean, init_sigma: the initial (or fixed) value of every entry.
        """
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"CenterPrior needs num_classes >= 1, got {num_classes}")
        if not init_sigma > 0:
            raise ValueError(f"CenterPrior needs init_sigma > 0, got {init_sigma}")
        mean = torch.full((num_classes, 2), float(init_mean))
        sigma = torch.full((num_classes, 2), float(init_sigma))
        self.learnable = learnable
        if learnable:
            self.mean = nn.Parameter(mean)
            self.sigma = nn.Parameter(sigma)
        else:
            self.register_buffer("mean", mean, persistent=False)
            self.register_buffer("sigma", sigma, persistent=False)

    def forward(self) -> Tuple[Tensor, Tensor]:
        """Returns (mean, sigma), each (C, 2): (x, y) per class."""
        return self.mean, self.sigma

    def extra_repr(self) -> str:
        return f"num_classes={self.mean.shape[0]}, learnable={self.learnable}"
