"""The dense part of DW's and AutoAssign's losses: the joint score and its negative term.

Both schemes score every (image, point, class) entry with ``S = sigmoid(cls) * sigmoid(ctr)``,
gather S at the candidate pairs' classes for the positive terms, and add over all entries a
focal-like negative term ``a * h(b * S)`` with ``h(x) = x**gamma * BCE(x, 0)``. The weights are
1 everywhere except at the few entries written for candidate pairs: DW weights the term
(``a = w-``, ``b = 1``), AutoAssign scales the score (``a = 1``, ``b = w-``).

Built from torch ops, this costs a dozen fresh (N, R, C) tensors per step (a dense weight map,
a target of zeros, BCE's kernel and its backward, the pow, product and gather graphs), and on
the CPU each fresh buffer of that size costs more in page faults than the pass that fills it.
One autograd function here keeps the weights sparse and, because the term is only ever summed,
computes its gradient in the same pass as its value: one sweep over the score map, block by
block, in a few reusable block-sized buffers (sized to stay in a core's cache on the CPU; on
CUDA the whole map is one block), writes the sum and the logits' gradient, which the backward
pass then only scales. Its values follow torch's CPU formulas (``BCE(x, 0) =
-max(log1p(-x), -100)``, BCE's derivative ``x / max((1 - x) x, 1e-12)``, ``pow``'s
``gamma x**(gamma - 1)``, ``sigmoid' = (1 - s) s``), in torch's order of operations.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .elementwise import BCE_GRAD_EPS as _GRAD_EPS, LOG_CLAMP as _LOG_CLAMP

# Entries per block on the CPU: the block's buffers together stay within a core's L2 cache.
CPU_BLOCK_ENTRIES = 1 << 17


def joint_score_terms(cls_logits: Tensor, score_logits: Tensor, entries: Tensor,
                      entry_of_pair: Tensor, neg_weights: Tensor, gamma: float,
                      weight_scales_score: bool) -> Tuple[Tensor, Tensor]:
    """The joint score at the candidate pairs, and the dense negative term.

    Args:
        cls_logits: (N, R, C) classification logits.
        score_logits: (N, R, 1) centerness / objectness logits.
        entries: (E,) int64 distinct flat (image, point, class) entries of the pairs, in
            ascending order: the entries whose negative weight is not 1.
        entry_of_pair: (P,) int64 index into ``entries`` of each pair's entry.
        neg_weights: (E,) the negative weight at each entry (no gradient).
        gamma: exponent of the score factor of the negative term.
        weight_scales_score: False: the weight multiplies the term (DW); True: it scales the
            score inside it (AutoAssign).
    Returns:
        ``(p_cls, neg_sum)``: (P,) ``S`` at the pairs and the 0-dim sum
        ``sum_k a_k h(b_k S_k)``, both differentiable w.r.t. both logits.
    """
    with_grad = torch.is_grad_enabled() and (cls_logits.requires_grad
                                             or score_logits.requires_grad)
    return _JointScoreTerms.apply(cls_logits, score_logits, entries, entry_of_pair,
                                  neg_weights.detach(), float(gamma), bool(weight_scales_score),
                                  with_grad)


def _bce_with_zero_target(x: Tensor, one_minus_x: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """``BCE(x, 0) = -max(log1p(-x), -100)`` for x in [0, 1], accurate to a few ulp, into ``out``.

    torch's CPU ``log1p`` is not vectorised (about 20x slower than ``log`` here), and
    ``log(1 - x)`` loses all relative precision for small x, where the scores mostly are.
    Goldberg's identity ``log1p(z) = z log(u) / (u - 1)`` with ``u = 1 + z`` cancels the
    rounding of u. Where u rounds to 1 it gives 0 / 0, and there ``-log1p(-x) = x`` to within
    an ulp; as ``-log1p(-x) >= x`` everywhere, clamping the result (NaN set to 0) from below
    at x takes care of it without a mask.

    Args:
        x: the probabilities; one_minus_x: ``1 - x``, kept.
        out, scratch: buffers of x's size; scratch is overwritten.
    """
    u_minus_one = torch.sub(one_minus_x, 1, out=scratch)
    bce = torch.log(one_minus_x, out=out).mul_(x).div_(u_minus_one)
    bce.nan_to_num_(nan=0.0, posinf=float("inf"))
    return torch.clamp(bce, min=x, max=x.new_tensor(-_LOG_CLAMP), out=bce)


def _small_term_and_grad(x: Tensor, gamma: float, with_grad: bool):
    """``h(x) = x**gamma * BCE(x, 0)`` and, with ``with_grad``, ``h'(x)`` of a small vector, as
    the block pass computes them."""
    one_minus_x = 1 - x
    bce = _bce_with_zero_target(x, one_minus_x, torch.empty_like(x), torch.empty_like(x))
    power = x * x if gamma == 2.0 else x.pow(gamma)
    term = power * bce
    if not with_grad:
        return term, None
    return term, _focal_grad(x, one_minus_x, bce, power, gamma)


def _focal_grad(x: Tensor, one_minus_x: Tensor, bce: Tensor, power: Tensor, gamma: float):
    """``h'(x)`` with torch's pow and BCE backward formulas, ``x**gamma * x / max((1 - x) x,
    1e-12) + BCE * gamma x**(gamma - 1)``, overwriting its arguments: ``one_minus_x``, ``bce``
    and ``power`` (``x**gamma``, which becomes the result)."""
    denominator = one_minus_x.mul_(x).clamp_(min=_GRAD_EPS)
    grad = power.mul_(x).div_(denominator)
    if gamma == 2.0:
        # BCE * (2 x) == 2 (BCE x) exactly: scaling by 2 does not round.
        return grad.add_(bce.mul_(x), alpha=2.0)
    return grad.add_(bce.mul_(torch.pow(x, gamma - 1, out=denominator)).mul_(gamma))


class _EntryValues(NamedTuple):
    """The scores and the weighted negative term at the (E,) sorted entries."""

    rows: Tensor  # (E,) int64 row of the (N * R, C) map
    cls_prob: Tensor  # (E,) s = sigmoid(cls)
    score_prob: Tensor  # (E,) q = sigmoid(score)
    joint: Tensor  # (E,) S = s q
    term: Tensor  # (E,) the weighted term: w h(S) (DW) or h(w S) (AutoAssign)
    grad: Optional[Tensor]  # (E,) its derivative w.r.t. S


def _entry_values(cls_rows: Tensor, score_rows: Tensor, entries: Tensor, weights: Tensor,
                  gamma: float, weight_scales_score: bool, with_grad: bool) -> _EntryValues:
    """The weighted term at the entries, all at once (the block sweep then writes them in)."""
    rows = torch.div(entries, cls_rows.shape[1], rounding_mode="floor")
    cls_prob = cls_rows.view(-1).index_select(0, entries).sigmoid()
    score_prob = score_rows.view(-1).index_select(0, rows).sigmoid()
    joint = cls_prob * score_prob
    if weight_scales_score:
        # h(w S), and d/dS h(w S) = h'(w S) w in the order torch's MulBackward applies it.
        term, grad = _small_term_and_grad(joint * weights, gamma, with_grad)
        grad = grad * weights if with_grad else None
    else:
        term, grad = _small_term_and_grad(joint, gamma, with_grad)
        term = weights * term
        grad = weights * grad if with_grad else None
    return _EntryValues(rows, cls_prob, score_prob, joint, term, grad)


class _DenseResult(NamedTuple):
    neg_sum: Tensor  # 0-dim
    entry: _EntryValues
    grad_cls: Optional[Tensor]  # (N * R, C) d neg_sum / d cls_logits
    grad_score: Optional[Tensor]  # (N * R, 1) d neg_sum / d score_logits


def _dense_negative_term(cls_rows: Tensor, score_rows: Tensor, neg_entries: Tensor,
                         neg_weights: Tensor, gamma: float, weight_scales_score: bool,
                         with_grad: bool) -> _DenseResult:
    """The negative sum over the (N * R, C) score map, the values at the (sorted) entries and,
    with ``with_grad``, the sum's gradient w.r.t. both logits, one block of rows at a time.

    The weighted entries are computed first, together; each block computes the unweighted
    term and derivative everywhere, then writes them in.
    """
    num_rows, num_classes = cls_rows.shape
    entry = _entry_values(cls_rows, score_rows, neg_entries, neg_weights, gamma,
                          weight_scales_score, with_grad)
    if cls_rows.device.type == "cpu":
        rows_per_block = max(1, CPU_BLOCK_ENTRIES // max(num_classes, 1))
    else:
        rows_per_block = max(num_rows, 1)
    starts = range(0, num_rows, rows_per_block)
    # neg_entries is sorted: each block's entries are one slice.
    cuts = [0, neg_entries.shape[0]]
    if len(starts) > 1:
        bounds = torch.tensor(starts[1:], dtype=neg_entries.dtype) * num_classes
        cuts[1:1] = torch.searchsorted(neg_entries, bounds.to(neg_entries.device)).tolist()

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
        _bce_with_zero_target(joint, one_minus, bce, power)
        # x * x is what torch's pow computes for gamma 2.
        torch.mul(joint, joint, out=power) if gamma == 2.0 else torch.pow(joint, gamma, out=power)
        torch.mul(power, bce, out=term)
        in_block = slice(cuts[block], cuts[block + 1])
        local = neg_entries[in_block] - start * num_classes
        term.view(-1).index_copy_(0, local, entry.term[in_block])
        # torch's cascaded sum: a float32 dot product of 10^5 terms drifts by ~1e-5.
        partial_sums.append(term.sum())
        if not with_grad:
            continue
        grad = _focal_grad(joint, one_minus, bce, power, gamma)
        grad.view(-1).index_copy_(0, local, entry.grad[in_block])
        # S = s q: d/d score = sum_c grad * s through sigmoid' (torch's own kernel, fused);
        # d/d cls = grad * q through sigmoid'.
        score_grad = torch.sum(torch.mul(grad, s, out=bce), dim=1, keepdim=True)
        torch.ops.aten.sigmoid_backward.grad_input(score_grad, q, grad_input=grad_score[rows])
        torch.ops.aten.sigmoid_backward.grad_input(torch.mul(grad, q, out=one_minus), s,
                                                   grad_input=grad_cls[rows])
    return _DenseResult(torch.stack(partial_sums).sum(), entry, grad_cls, grad_score)


class _JointScoreTerms(torch.autograd.Function):

    @staticmethod
    def forward(ctx, cls_logits, score_logits, entries, entry_of_pair, neg_weights, gamma,
                weight_scales_score, with_grad):
        num_classes = cls_logits.shape[-1]
        # Flat indices address a row-major (N, R, C) map, whatever the head's layout.
        cls_rows = cls_logits.reshape(-1, num_classes).contiguous()
        score_rows = score_logits.reshape(-1, 1).contiguous()
        dense = _dense_negative_term(cls_rows, score_rows, entries, neg_weights, gamma,
                                     weight_scales_score, with_grad)
        p_cls = dense.entry.joint.index_select(0, entry_of_pair)
        ctx.save_for_backward(cls_rows, score_rows, entries, entry_of_pair, neg_weights)
        ctx.dense = dense
        ctx.gamma, ctx.weight_scales_score = gamma, weight_scales_score
        ctx.cls_shape, ctx.score_shape = cls_logits.shape, score_logits.shape
        return p_cls, dense.neg_sum

    @staticmethod
    def backward(ctx, grad_p_cls, grad_neg_sum):
        cls_rows, score_rows, entries, entry_of_pair, neg_weights = ctx.saved_tensors
        dense = ctx.dense
        if dense is None:
            # A second backward through a retained graph: the first one scaled the saved
            # gradient in place, so it is computed again.
            dense = _dense_negative_term(cls_rows, score_rows, entries, neg_weights, ctx.gamma,
                                         ctx.weight_scales_score, True)
        ctx.dense = None
        grad_cls = dense.grad_cls.mul_(grad_neg_sum)
        grad_score = dense.grad_score.mul_(grad_neg_sum)
        # The pairs' own gradient, summed per entry, through S = s q.
        grad_joint = grad_p_cls.new_zeros(entries.shape).index_add_(0, entry_of_pair, grad_p_cls)
        s, q = dense.entry.cls_prob, dense.entry.score_prob
        sigmoid_backward = torch.ops.aten.sigmoid_backward
        grad_cls.view(-1).index_add_(0, entries, sigmoid_backward(grad_joint * q, s))
        grad_score.view(-1).index_add_(0, dense.entry.rows, sigmoid_backward(grad_joint * s, q))
        grad_cls = grad_cls.view(ctx.cls_shape) if ctx.needs_input_grad[0] else None
        grad_score = grad_score.view(ctx.score_shape) if ctx.needs_input_grad[1] else None
        return grad_cls, grad_score, None, None, None, None, None, None
