"""Deformable convolutions (DCNv1 and the modulated DCNv2) in pure PyTorch.

Detectron2's ``DeformConv`` and ``ModulatedDeformConv`` need Detectron2's compiled operator,
which a Python-only install lacks. These layers compute the same thing with
``torchvision.ops.deform_conv2d``, so they run wherever torchvision does (CPU and CUDA, float16
to float64, with autograd).

Offsets follow the layout shared by torchvision, Detectron2 and mmcv: for kernel position
``k = i * kernel_w + j`` of offset group ``g``, channel ``2 * (g * K + k)`` holds the vertical
displacement (dy) and the next channel the horizontal one (dx), in input pixels; the mask, when
given, has one channel per (group, kernel position). A sample reads its input bilinearly, with
zero outside the map.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

__all__ = ["DeformConv", "ModulatedDeformConvWithOffsets", "split_offsets_and_mask"]


def split_offsets_and_mask(raw: Tensor) -> Tuple[Tensor, Tensor]:
    """The offsets and the mask of a modulated deformable conv from its offset conv's output.

    DCNv2's offset conv predicts ``3 * G * K`` channels: the first two thirds are the offsets
    (in the interleaved (dy, dx) layout above), the last third the mask logits. This is how
    Detectron2's ``DeformBottleneckBlock`` and mmcv's ``ModulatedDeformConv2dPack`` read them.

    Args:
        raw: (N, 3 * G * K, H, W).

    Returns:
        offsets (N, 2 * G * K, H, W) and mask (N, G * K, H, W) in (0, 1).
    """
    first, second, mask_logits = torch.chunk(raw, 3, dim=1)
    return torch.cat((first, second), dim=1), mask_logits.sigmoid()


class DeformConv(nn.Module):
    """A deformable convolution that takes its offsets (and, for DCNv2, its mask) as inputs,
    with Detectron2 ``Conv2d``'s optional ``norm`` and ``activation`` applied after it.

    Parameters: ``weight`` (out, in / groups, kh, kw) and, with ``bias=True``, ``bias`` (out,):
    the names and shapes of Detectron2's and mmcv's deformable convs, so their checkpoints load.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, deformable_groups: int = 1, bias: bool = False,
                 norm: Optional[nn.Module] = None, activation=None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"DeformConv: groups ({groups}) must divide in_channels "
                             f"({in_channels}) and out_channels ({out_channels})")
        if in_channels % deformable_groups:
            raise ValueError(f"DeformConv: deformable_groups ({deformable_groups}) must divide "
                             f"in_channels ({in_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.norm = norm
        self.activation = activation
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in +-1/sqrt(fan_in) and a zero bias, as mmcv's deformable convs start."""
        bound = 1.0 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def offset_channels(self) -> int:
        """Channels of the offsets: 2 per kernel position and deformable group."""
        return 2 * self.deformable_groups * self.kernel_size[0] * self.kernel_size[1]

    def forward(self, x: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x: (N, in_channels, H, W).
            offset: (N, offset_channels, H_out, W_out), (dy, dx) pairs in input pixels.
            mask: None (DCNv1) or (N, offset_channels / 2, H_out, W_out) modulation (DCNv2).

        Returns:
            (N, out_channels, H_out, W_out).
        """
        if offset.shape[1] != self.offset_channels:
            raise ValueError(f"DeformConv expects {self.offset_channels} offset channels "
                             f"(2 x {self.deformable_groups} groups x {self.kernel_size} kernel), "
                             f"got {offset.shape[1]}")
        x = deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride,
                          padding=self.padding, dilation=self.dilation, mask=mask)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, deformable_groups={self.deformable_groups}, "
                f"bias={self.bias is not None}")


class ModulatedDeformConvWithOffsets(DeformConv):
    """A modulated deformable convolution (DCNv2) that predicts its own offsets and mask from
    its input, so that it replaces a plain convolution one for one (a 3x3 conv in a head
    tower, for example).

    ``conv_offset``, a convolution of the same kernel, stride, padding and dilation with
    ``3 * deformable_groups * kh * kw`` outputs and a bias, predicts them as
    :func:`split_offsets_and_mask` reads them; it starts at zero (a plain convolution sampled
    on the regular grid, each sample weighted by 0.5). Its parameters are named as in mmcv's
    ``ModulatedDeformConv2dPack`` (``weight``, ``bias``, ``conv_offset.weight``,
    ``conv_offset.bias``), which the official DW DCN model uses in its heads.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, deformable_groups: int = 1, bias: bool = True,
                 norm: Optional[nn.Module] = None, activation=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, deformable_groups, bias, norm, activation)
        self.conv_offset = nn.Conv2d(
            in_channels, self.offset_channels * 3 // 2, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        offset, mask = split_offsets_and_mask(self.conv_offset(x))
        return super().forward(x, offset, mask)
