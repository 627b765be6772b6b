"""The dense part of DW's and AutoAssign's losses: the joint score and its negative term.

Both schemes score every (image, point, class) entry with ``S = sigmoid(cls) * sigmoid(ctr)``,
gather S at the candidate pairs' classes for the positive terms, and add over all entries a
focal-like negative term ``a * h(b * S)`` with ``h(x) = x**gamma * BCE(x, 0)``. The weights are
1 everywhere except at the few entries written for candidate pairs: DW weights the term
(``a = w-``, ``b = 1``), AutoAssign scales the score (``a = 1``, ``b = w-``).

Built from torch ops, this costs a dozen fresh (N, R, C) tensors per step (a dense weight map,
a target of zeros, BCE's kernel and its backward, the pow, product and gather graphs), and on
the CPU each fresh buffer of that size costs more in page faults than the pass that fills it.
One autograd function here keeps the weights sparse and runs the forward and backward as a
few in-place passes. Its values follow torch's CPU formulas (``BCE(x, 0) = -max(log1p(-x),
-100)``, derivative ``x / max((1 - x) x, 1e-12)``, ``sigmoid' = (1 - s) s``) to rounding.
"""
from typing import Tuple

import torch
from torch import Tensor

# torch's BCE clamps the log at -100 and the derivative's denominator at 1e-12.
_LOG_CLAMP = -100.0
_GRAD_EPS = 1e-12


def joint_score_terms(cls_logits: Tensor, score_logits: Tensor, pair_entries: Tensor,
                      neg_entries: Tensor, neg_weights: Tensor, gamma: float,
                      weight_scales_score: bool) -> Tuple[Tensor, Tensor]:
    """The joint score at the candidate pairs, and the dense negative term.

    Args:
        cls_logits: (N, R, C) classification logits.
        score_logits: (N, R, 1) centerness / objectness logits.
        pair_entries: (P,) int64 flat (image, point, class) index of each pair.
        neg_entries: (E,) int64 distinct flat indices whose negative weight is not 1.
        neg_weights: (E,) their weights (no gradient).
        gamma: exponent of the score factor of the negative term.
        weight_scales_score: False: the weight multiplies the term (DW); True: it scales the
            score inside it (AutoAssign).
    Returns:
        ``(p_cls, neg_sum)``: (P,) ``S`` at the pairs and the 0-dim sum
        ``sum_k a_k h(b_k S_k)``, both differentiable w.r.t. both logits.
    """
    return _JointScoreTerms.apply(cls_logits, score_logits, pair_entries, neg_entries,
                                  neg_weights.detach(), float(gamma), bool(weight_scales_score))


def _bce_with_zero_target(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``BCE(x, 0) = -max(log1p(-x), -100)`` for x in [0, 1], accurate to a few ulp.

    torch's CPU ``log1p`` is not vectorised (about 20x slower than ``log`` here), and
    ``log(1 - x)`` loses all relative precision for small x, where the scores mostly are.
    Goldberg's identity ``log1p(z) = z log(u) / (u - 1)`` with ``u = 1 + z`` cancels the
    rounding of u; where u rounds to 1 (0 / 0 here), ``log1p(z) = z`` to within an ulp.
    Every step is in place: a fresh (N, R, C) buffer costs more in page faults than its pass.

    Returns:
        ``BCE(x, 0)``, and a spare buffer of the same size for the caller's next step.
    """
    bce = 1 - x
    u_minus_one = bce - 1
    bce.log_().mul_(x).div_(u_minus_one).nan_to_num_(nan=0.0, posinf=float("inf"))
    bce.addcmul_(u_minus_one.eq_(0), x).clamp_(max=-_LOG_CLAMP)
    return bce, u_minus_one


def _focal_term(x: Tensor, bce: Tensor, gamma: float, out: Tensor) -> Tensor:
    """``x**gamma * bce`` into ``out``; ``x * x`` is what torch's ``pow`` computes for gamma 2."""
    factor = torch.mul(x, x, out=out) if gamma == 2.0 else torch.pow(x, gamma, out=out)
    return factor.mul_(bce)


def _focal_term_grad(x: Tensor, bce: Tensor, gamma: float) -> Tuple[Tensor, Tensor]:
    """d/dx of ``x**gamma * BCE(x, 0)``, with the pow and BCE backward formulas of torch:
    ``x**gamma * x / max((1 - x) x, 1e-12) + gamma x**(gamma - 1) BCE``.

    Returns:
        the gradient, and a spare buffer of the same size for the caller's next step.
    """
    scratch = torch.rsub(x, 1).mul_(x).clamp_(min=_GRAD_EPS)
    grad = x * x if gamma == 2.0 else x.pow(gamma)
    grad.mul_(x).div_(scratch)
    pow_grad = (torch.mul(x, 2.0, out=scratch) if gamma == 2.0
                else torch.pow(x, gamma - 1, out=scratch).mul_(gamma))
    return grad.add_(pow_grad.mul_(bce)), scratch


class _JointScoreTerms(torch.autograd.Function):

    @staticmethod
    def forward(ctx, cls_logits, score_logits, pair_entries, neg_entries, neg_weights, gamma,
                weight_scales_score):
        # Flat indices address a row-major (N, R, C) map, whatever the head's layout.
        cls_prob = cls_logits.sigmoid().contiguous()
        score_prob = score_logits.sigmoid()
        joint = cls_prob * score_prob
        flat = joint.view(-1)
        p_cls = flat[pair_entries]
        bce, scratch = _bce_with_zero_target(flat)
        term = _focal_term(flat, bce, gamma, out=scratch)
        if weight_scales_score:
            scaled = flat[neg_entries] * neg_weights
            neg_bce, neg_scratch = _bce_with_zero_target(scaled)
            term[neg_entries] = _focal_term(scaled, neg_bce, gamma, out=neg_scratch)
        else:
            neg_bce = bce[:0]
            term[neg_entries] = neg_weights * term[neg_entries]
        ctx.save_for_backward(cls_prob, score_prob, joint, bce, pair_entries, neg_entries,
                              neg_weights, neg_bce)
        ctx.gamma, ctx.weight_scales_score = gamma, weight_scales_score
        return p_cls, term.sum()

    @staticmethod
    def backward(ctx, grad_p_cls, grad_neg_sum):
        (cls_prob, score_prob, joint, bce, pair_entries, neg_entries, neg_weights,
         neg_bce) = ctx.saved_tensors
        gamma = ctx.gamma
        flat = joint.view(-1)
        grad, scratch = _focal_term_grad(flat, bce, gamma)
        if ctx.weight_scales_score:
            # d/dS h(w S) = h'(w S) w, in the order torch's MulBackward applies it.
            scaled = flat[neg_entries] * neg_weights
            grad[neg_entries] = _focal_term_grad(scaled, neg_bce, gamma)[0] * neg_weights
        else:
            grad[neg_entries] = neg_weights * grad[neg_entries]
        grad.mul_(grad_neg_sum)
        grad.index_add_(0, pair_entries, grad_p_cls)
        grad = grad.view_as(joint)
        grad_cls = grad_score = None
        if ctx.needs_input_grad[1]:
            # sum_c grad * sigmoid(cls) as a batched dot product: no (N, R, C) temporary.
            num_classes = joint.shape[-1]
            grad_score_prob = torch.bmm(grad.reshape(-1, 1, num_classes),
                                        cls_prob.reshape(-1, num_classes, 1))
            grad_score = torch.ops.aten.sigmoid_backward(
                grad_score_prob.view_as(score_prob), score_prob)
        if ctx.needs_input_grad[0]:
            # sigmoid_backward's grad * (1 - s) * s, in place.
            one_minus_cls_prob = torch.sub(1, cls_prob, out=scratch.view_as(cls_prob))
            grad_cls = grad.mul_(score_prob).mul_(one_minus_cls_prob).mul_(cls_prob)
        return grad_cls, grad_score, None, None, None, None, None
