"""Gathers onto the candidate pairs whose backward passes avoid the slow stock paths.

Both give the values of a plain ``index_select`` and its gradient, summed in the same places;
only how the gradient is accumulated differs.
"""
import torch
from torch import Tensor


def gather_coordinates(table: Tensor, index: Tensor) -> Tensor:
    """``table[index].t()`` as a contiguous, coordinate-major (D, P) tensor, differentiable;
    the gradient of ``table`` (K, D) comes back contiguous (a transposed view would reach
    the caller's tensors, and torch.distributed reduces raw storage)."""
    return _GatherCoordinates.apply(table, index)


class _GatherCoordinates(torch.autograd.Function):

    @staticmethod
    def forward(ctx, table, index):
        ctx.save_for_backward(index)
        ctx.table_shape = table.shape
        return table.t().contiguous().index_select(1, index)

    @staticmethod
    def backward(ctx, grad):
        index, = ctx.saved_tensors
        rows, columns = ctx.table_shape
        table_grad = grad.new_zeros(columns, rows).index_add_(1, index, grad)
        return table_grad.t().contiguous(), None


def expand_per_gt(per_gt: Tensor, gt_of_pair: Tensor, pairs_per_gt: Tensor) -> Tensor:
    """Per-GT values (D, G) at the pairs, (D, P) = ``per_gt[:, gt_of_pair]``, differentiable.

    The pairs of a GT box are consecutive (``pairs_per_gt`` of them), so the backward pass sums
    segments instead of scattering P gradients into G bins, which contend on the CPU.
    """
    return _ExpandPerGt.apply(per_gt, gt_of_pair, pairs_per_gt)


class _ExpandPerGt(torch.autograd.Function):

    @staticmethod
    def forward(ctx, per_gt, gt_index, pairs_per_gt):
        ctx.save_for_backward(pairs_per_gt)
        return per_gt.index_select(1, gt_index)

    @staticmethod
    def backward(ctx, grad):
        pairs_per_gt, = ctx.saved_tensors
        if pairs_per_gt.numel() == 0:
            return grad.new_zeros(grad.shape[0], 0), None, None
        return torch.stack([torch.segment_reduce(row, "sum", lengths=pairs_per_gt)
                            for row in grad]), None, None
