"""The dense negative term of the weighting losses, with its gradient, in one sweep.

Both schemes add over every (image, point, class) entry k of the joint score
``S = sigmoid(cls) * sigmoid(score)`` a focal-like negative term, and weight it differently at
the few entries that candidate pairs address::

    negative_sum = sum over k not in entries of h(S_k)  +  sum over e in entries of g(S_e),
    h(x) = x**gamma * BCE(x, 0),   g: the scheme's own term (DW: w- h(S), AutoAssign: h(w- S)).

Two ways to compute it, with the same arguments and results:

* :func:`focal_negative_sum`, the fast path. Built from torch ops, the dense sum costs a dozen
  fresh (N, R, C) tensors per step (a weight map, a target of zeros, BCE's kernel and its
  backward, the pow, product and gather graphs), and on the CPU each fresh buffer of that size
  costs more in page faults than the pass that fills it. Here, because the term is only ever
  summed, its gradient is computed in the same pass as its value: one sweep over the score map,
  block by block, in a few reusable block-sized buffers (sized to stay in a core's cache on the
  CPU; on CUDA the whole map is one block), writes the sum and the logits' gradient, which the
  backward pass then only scales. Its values follow torch's CPU formulas (``BCE(x, 0) =
  -max(log1p(-x), -100)``, BCE's derivative ``x / max((1 - x) x, 1e-12)``, ``pow``'s
  ``gamma x**(gamma - 1)``, ``sigmoid' = (1 - s) s``), in torch's order of operations. The
  scheme's term g is any differentiable function written with torch ops: it runs on the (E,)
  entries only, and autograd gives its derivative.
* :func:`plain_negative_sum`, the plain-PyTorch path: a dense score map and autograd, for any
  dense term h. Correct, several times slower and heavier in memory: the way to try a new
  negative term before (or instead of) writing a kernel for it.
"""
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .elementwise import bce_with_zero_target_, focal_negative_grad_

# Entries per block on the CPU: the block's buffers together stay within a core's L2 cache.
CPU_BLOCK_ENTRIES = 1 << 17

EntryTerm = Callable[[Tensor], Tensor]


def focal_negative_sum(cls_logits: Tensor, score_logits: Tensor, entries: Tensor,
                       entry_term: EntryTerm, gamma: float = 2.0) -> Tuple[Tensor, Tensor]:
    """The negative sum of the module docstring with ``h(x) = x**gamma * BCE(x, 0)``, and the
    joint score at the entries.

    Args:
        cls_logits: (N, R, C) classification logits.
        score_logits: (N, R, 1) centerness / objectness logits.
        entries: (E,) int64 distinct flat (image, point, class) entries of the (N, R, C) map,
            in ascending order.
        entry_term: g, (E,) scores -> (E,) terms, written with differentiable torch ops.
        gamma: the exponent of h.
    Returns:
        ``(negative_sum, entry_scores)``: the 0-dim sum and (E,) S at the entries, both
        differentiable with respect to both logits.
    """
    with_grad = torch.is_grad_enabled() and (cls_logits.requires_grad
                                             or score_logits.requires_grad)
    return _FocalNegativeSum.apply(cls_logits, score_logits, entries, entry_term, float(gamma),
                                   with_grad)


def plain_negative_sum(cls_logits: Tensor, score_logits: Tensor, entries: Tensor,
                       entry_term: EntryTerm, dense_term: Optional[EntryTerm] = None,
                       gamma: float = 2.0) -> Tuple[Tensor, Tensor]:
    """:func:`focal_negative_sum` from stock torch ops, for any dense term.

    Args:
        dense_term: h, (K,) scores -> (K,) terms with torch ops; None for the focal term
            ``x**gamma * F.binary_cross_entropy(x, 0)``.
        The others as in :func:`focal_negative_sum`.
    """
    joint = (cls_logits.sigmoid() * score_logits.sigmoid()).reshape(-1)
    entry_scores = joint.index_select(0, entries)
    if dense_term is None:
        terms = joint ** gamma * F.binary_cross_entropy(joint, torch.zeros_like(joint),
                                                         reduction="none")
    else:
        terms = dense_term(joint)
    terms = terms.index_put((entries,), entry_term(entry_scores))
    return terms.sum(), entry_scores


def _focal_term_and_grad(x: Tensor, gamma: float, with_grad: bool):
    """h(x) and, with ``with_grad``, h'(x), into fresh buffers of x's size."""
    one_minus_x = 1 - x
    bce = bce_with_zero_target_(x, one_minus_x, torch.empty_like(x), torch.empty_like(x))
    power = x * x if gamma == 2.0 else x.pow(gamma)
    term = power * bce
    if not with_grad:
        return term, None
    return term, focal_negative_grad_(x, one_minus_x, bce, power, gamma)


class _EntryValues(NamedTuple):
    """The scores and the scheme's term at the (E,) sorted entries."""

    rows: Tensor  # (E,) int64 row of the (N * R, C) map
    cls_prob: Tensor  # (E,) s = sigmoid(cls)
    score_prob: Tensor  # (E,) q = sigmoid(score)
    joint: Tensor  # (E,) S = s q
    term: Tensor  # (E,) g(S)
    grad: Optional[Tensor]  # (E,) g'(S)


def _entry_values(cls_rows: Tensor, score_rows: Tensor, entries: Tensor, entry_term: EntryTerm,
                  with_grad: bool) -> _EntryValues:
    """The scheme's term at the entries, all at once (the block sweep then writes them in)."""
    rows = torch.div(entries, cls_rows.shape[1], rounding_mode="floor")
    cls_prob = cls_rows.view(-1).index_select(0, entries).sigmoid()
    score_prob = score_rows.view(-1).index_select(0, rows).sigmoid()
    joint = cls_prob * score_prob
    if not with_grad:
        return _EntryValues(rows, cls_prob, score_prob, joint, entry_term(joint), None)
    with torch.enable_grad():
        scores = joint.detach().requires_grad_()
        term = entry_term(scores)
        grad, = torch.autograd.grad(term, scores, torch.ones_like(term), allow_unused=True)
    grad = torch.zeros_like(joint) if grad is None else grad
    return _EntryValues(rows, cls_prob, score_prob, joint, term.detach(), grad)


class _DenseResult(NamedTuple):
    neg_sum: Tensor  # 0-dim
    entry: _EntryValues
    grad_cls: Optional[Tensor]  # (N * R, C) d neg_sum / d cls_logits
    grad_score: Optional[Tensor]  # (N * R, 1) d neg_sum / d score_logits


def _dense_negative_term(cls_rows: Tensor, score_rows: Tensor, entries: Tensor,
                         entry_term: EntryTerm, gamma: float, with_grad: bool) -> _DenseResult:
    """The negative sum over the (N * R, C) score map, the values at the (sorted) entries and,
    with ``with_grad``, the sum's gradient w.r.t. both logits, one block of rows at a time.

    The entries' terms are computed first, together; each block computes h and h' everywhere,
    then writes the entries' values in.
    """
    num_rows, num_classes = cls_rows.shape
    entry = _entry_values(cls_rows, score_rows, entries, entry_term, with_grad)
    if cls_rows.device.type == "cpu":
        rows_per_block = max(1, CPU_BLOCK_ENTRIES // max(num_classes, 1))
    else:
        rows_per_block = max(num_rows, 1)
    starts = range(0, num_rows, rows_per_block)
    # The entries are sorted: each block's entries are one slice.
    cuts = [0, entries.shape[0]]
    if len(starts) > 1:
        bounds = torch.tensor(starts[1:], dtype=entries.dtype) * num_classes
        cuts[1:1] = torch.searchsorted(entries, bounds.to(entries.device)).tolist()

    shape = (min(rows_per_block, num_rows), num_classes)
    s_buf, joint_buf, one_minus_buf, bce_buf, power_buf, term_buf = (
        cls_rows.new_empty(shape) for _ in range(6))
    grad_cls = torch.empty_like(cls_rows) if with_grad else None
    grad_score = torch.empty_like(score_rows) if with_grad else None
    one = cls_rows.new_ones(())
    partial_sums = []
    for block, start in enumerate(starts):
        rows = slice(start, start + rows_per_block)
        size = min(rows_per_block, num_rows - start)
        s, joint, one_minus, bce, power, term = (
            b[:size] for b in (s_buf, joint_buf, one_minus_buf, bce_buf, power_buf, term_buf))
        q = torch.sigmoid(score_rows[rows])
        torch.mul(torch.sigmoid(cls_rows[rows], out=s), q, out=joint)
        torch.sub(one, joint, out=one_minus)
        bce_with_zero_target_(joint, one_minus, bce, power)
        # x * x is what torch's pow computes for gamma 2.
        torch.mul(joint, joint, out=power) if gamma == 2.0 else torch.pow(joint, gamma, out=power)
        torch.mul(power, bce, out=term)
        in_block = slice(cuts[block], cuts[block + 1])
        local = entries[in_block] - start * num_classes
        term.view(-1).index_copy_(0, local, entry.term[in_block])
        # torch's cascaded sum: a float32 dot product of 10^5 terms drifts by ~1e-5.
        partial_sums.append(term.sum())
        if not with_grad:
            continue
        grad = focal_negative_grad_(joint, one_minus, bce, power, gamma)
        grad.view(-1).index_copy_(0, local, entry.grad[in_block])
        # S = s q: d/d score = sum_c grad * s through sigmoid' (torch's own kernel, fused);
        # d/d cls = grad * q through sigmoid'.
        score_grad = torch.sum(torch.mul(grad, s, out=bce), dim=1, keepdim=True)
        torch.ops.aten.sigmoid_backward.grad_input(score_grad, q, grad_input=grad_score[rows])
        torch.ops.aten.sigmoid_backward.grad_input(torch.mul(grad, q, out=one_minus), s,
                                                   grad_input=grad_cls[rows])
    return _DenseResult(torch.stack(partial_sums).sum(), entry, grad_cls, grad_score)


class _FocalNegativeSum(torch.autograd.Function):

    @staticmethod
    def forward(ctx, cls_logits, score_logits, entries, entry_term, gamma, with_grad):
        num_classes = cls_logits.shape[-1]
        # Flat indices address a row-major (N, R, C) map, whatever the head's layout.
        cls_rows = cls_logits.reshape(-1, num_classes).contiguous()
        score_rows = score_logits.reshape(-1, 1).contiguous()
        dense = _dense_negative_term(cls_rows, score_rows, entries, entry_term, gamma,
                                     with_grad)
        ctx.save_for_backward(cls_rows, score_rows, entries)
        ctx.dense, ctx.entry_term, ctx.gamma = dense, entry_term, gamma
        ctx.cls_shape, ctx.score_shape = cls_logits.shape, score_logits.shape
        return dense.neg_sum, dense.entry.joint

    @staticmethod
    def backward(ctx, grad_neg_sum, grad_entry_scores):
        cls_rows, score_rows, entries = ctx.saved_tensors
        dense = ctx.dense
        if dense is None:
            # A second backward through a retained graph: the first one scaled the saved
            # gradient in place, so it is computed again.
            dense = _dense_negative_term(cls_rows, score_rows, entries, ctx.entry_term,
                                         ctx.gamma, True)
        ctx.dense = None
        grad_cls = dense.grad_cls.mul_(grad_neg_sum)
        grad_score = dense.grad_score.mul_(grad_neg_sum)
        # The entry scores' own gradient (the positive terms), through S = s q.
        s, q = dense.entry.cls_prob, dense.entry.score_prob
        sigmoid_backward = torch.ops.aten.sigmoid_backward
        grad_cls.view(-1).index_add_(0, entries, sigmoid_backward(grad_entry_scores * q, s))
        grad_score.view(-1).index_add_(0, dense.entry.rows,
                                       sigmoid_backward(grad_entry_scores * s, q))
        grad_cls = grad_cls.view(ctx.cls_shape) if ctx.needs_input_grad[0] else None
        grad_score = grad_score.view(ctx.score_shape) if ctx.needs_input_grad[1] else None
        return grad_cls, grad_score, None, None, None, None
