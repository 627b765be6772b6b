"""Element-wise functions with torch's values and gradients, minus the slow paths that torch's
stock CPU kernels take on the weighting's inputs.

* ``torch.exp`` on the CPU computes arguments whose result is subnormal or zero (a Gaussian
  prior far from its centre: about half of the candidate pairs) on a slow path, about ten
  times slower than the rest of the tensor.
* ``F.binary_cross_entropy`` on the CPU is a scalar (not vectorised) kernel, and its
  ``log1p(-x)`` is not vectorised either.

The functions here give the same numbers as the stock ones (to the last bit where the
vectorised kernels round alike, to a few ulp for ``BCE(x, 0)``) and torch's gradients.
"""
import math

import torch
from torch import Tensor

# torch's BCE clamps the log at -100 and the derivative's denominator at 1e-12, a constant
# that its kernels hold in float32 (1e-12 rounded to float32, then widened).
LOG_CLAMP = -100.0
BCE_GRAD_EPS = torch.tensor(1e-12, dtype=torch.float32).item()


def exp(x: Tensor) -> Tensor:
    """``torch.exp(x)``, differentiable, without the CPU slow path of underflowing arguments.

    Arguments whose result is not a normal number are set aside: those far below (result
    exactly 0) get 0; the thin band whose result is subnormal is computed on its own, in
    float64 for the narrower dtypes (where it is a normal number, then rounded once). Other
    devices call ``torch.exp``.
    """
    if x.device.type != "cpu":
        return torch.exp(x)
    return _Exp.apply(x)


class _Exp(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        info = torch.finfo(x.dtype)
        # One e-fold above the smallest normal: the kernel's fast path covers every argument
        # from there on (right at the bound it does not).
        normal_min = math.log(info.tiny) + 1.0
        # Two e-folds under the smallest subnormal: the result rounds to 0 however exp rounds.
        zero_below = math.log(info.tiny * info.eps) - 2.0
        result = torch.exp(x.clamp(min=normal_min))
        below_normal = x < normal_min
        result.masked_fill_(below_normal, 0.0)
        subnormal = (below_normal & (x >= zero_below)).view(-1).nonzero(as_tuple=True)[0]
        if subnormal.numel():
            # In float64 these results are normal numbers (fast), rounded once to x's dtype.
            band = x.view(-1).index_select(0, subnormal)
            wide = band.double() if band.dtype in (torch.float32, torch.float16,
                                                   torch.bfloat16) else band
            result.view(-1).index_copy_(0, subnormal, torch.exp(wide).to(x.dtype))
        ctx.save_for_backward(result)
        return result

    @staticmethod
    def backward(ctx, grad):
        result, = ctx.saved_tensors
        return grad * result


def bce_with_one_target(probability: Tensor) -> Tensor:
    """``F.binary_cross_entropy(p, ones, reduction="none")`` = ``-max(log(p), -100)``,
    differentiable, with torch's gradient ``(p - 1) / max((1 - p) p, 1e-12)``.

    Args:
        probability: (...) in [0, 1].
    Returns:
        (...) the element-wise loss.
    """
    return _BCEWithOneTarget.apply(probability)


class _BCEWithOneTarget(torch.autograd.Function):

    @staticmethod
    def forward(ctx, probability):
        ctx.save_for_backward(probability)
        return torch.log(probability).clamp_(min=LOG_CLAMP).neg_()

    @staticmethod
    def backward(ctx, grad):
        probability, = ctx.saved_tensors
        denominator = (1 - probability).mul_(probability).clamp_(min=BCE_GRAD_EPS)
        return grad * (probability - 1) / denominator


def focal_negative_term(x: Tensor, gamma: float = 2.0) -> Tensor:
    """``h(x) = x**gamma * BCE(x, 0)`` element-wise, the negative term of both schemes,
    differentiable with torch's gradient (see :func:`focal_negative_grad_`).

    Args:
        x: (...) probabilities in [0, 1].
    Returns:
        (...) the term.
    """
    return _FocalNegativeTerm.apply(x, float(gamma))


class _FocalNegativeTerm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, gamma):
        one_minus_x = 1 - x
        bce = bce_with_zero_target_(x, one_minus_x, torch.empty_like(x), torch.empty_like(x))
        power = x * x if gamma == 2.0 else x.pow(gamma)
        ctx.save_for_backward(x, one_minus_x, bce, power)
        ctx.gamma = gamma
        return power * bce

    @staticmethod
    def backward(ctx, grad):
        x, one_minus_x, bce, power = ctx.saved_tensors
        derivative = focal_negative_grad_(x, one_minus_x.clone(), bce.clone(), power.clone(),
                                          ctx.gamma)
        return grad * derivative, None


def bce_with_zero_target_(x: Tensor, one_minus_x: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
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
    return torch.clamp(bce, min=x, max=x.new_tensor(-LOG_CLAMP), out=bce)


def focal_negative_grad_(x: Tensor, one_minus_x: Tensor, bce: Tensor, power: Tensor,
                         gamma: float) -> Tensor:
    """``h'(x)`` with torch's pow and BCE backward formulas, ``x**gamma * x / max((1 - x) x,
    1e-12) + BCE * gamma x**(gamma - 1)``, overwriting its arguments: ``one_minus_x``, ``bce``
    and ``power`` (``x**gamma``, which becomes the result)."""
    denominator = one_minus_x.mul_(x).clamp_(min=BCE_GRAD_EPS)
    grad = power.mul_(x).div_(denominator)
    if gamma == 2.0:
        # BCE * (2 x) == 2 (BCE x) exactly: scaling by 2 does not round.
        return grad.add_(bce.mul_(x), alpha=2.0)
    return grad.add_(bce.mul_(torch.pow(x, gamma - 1, out=denominator)).mul_(gamma))
