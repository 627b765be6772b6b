"""The speed kernels of the weighting (dw_d2.assign.kernels) against the stock torch formulas
they replace, and the plain-PyTorch path of the negative term against both.

The golden cases are small (one block of the dense negative term, few far-away points), so
the block boundaries, the retained-graph path and the slow-path-free exp are checked here.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dw_d2.assign.kernels import elementwise, negative_term
from dw_d2.assign.kernels.elementwise import focal_negative_term
from dw_d2.assign.kernels.gather import gather_coordinates
from dw_d2.assign.pipeline import distinct_score_entries

# The entry terms of the two schemes: DW weights the term, AutoAssign scales the score.
ENTRY_TERMS = {
    "weight_scales_term": lambda weights: lambda s: weights * focal_negative_term(s, 2.0),
    "weight_scales_score": lambda weights: lambda s: focal_negative_term(s * weights, 2.0),
}


def stock_negative_term(cls_logits, score_logits, pair_entries, entries, weights, gamma,
                        weight_scales_score):
    """The same quantities from plain torch ops on a dense weight map."""
    joint = (cls_logits.sigmoid() * score_logits.sigmoid()).reshape(-1)
    weight = torch.ones_like(joint)
    weight[entries] = weights
    if weight_scales_score:
        scaled = joint * weight
        term = scaled ** gamma * F.binary_cross_entropy(scaled, torch.zeros_like(scaled),
                                                         reduction="none")
    else:
        term = weight * joint ** gamma * F.binary_cross_entropy(
            joint, torch.zeros_like(joint), reduction="none")
    return joint[pair_entries], term.sum()


def random_case(seed, num_images=2, num_points=150, num_classes=7, num_pairs=400,
                dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    cls_logits = torch.randn(num_images, num_points, num_classes, generator=generator,
                             dtype=dtype) * 3 - 2
    # Saturated logits: S rounds to 0 and to 1 somewhere.
    cls_logits.view(-1)[:5] = torch.tensor([-800.0, -40.0, 40.0, 800.0, 0.0], dtype=dtype)
    score_logits = torch.randn(num_images, num_points, 1, generator=generator, dtype=dtype) * 2
    score_logits.view(-1)[2:4] = 800.0
    pair_entries = torch.randint(cls_logits.numel(), (num_pairs,), generator=generator)
    pair_entries[:3] = torch.tensor([0, 2, 3])
    pair_entries = torch.sort(pair_entries).values[torch.randperm(num_pairs, generator=generator)]
    return cls_logits, score_logits, pair_entries


@pytest.mark.parametrize("entry_term", list(ENTRY_TERMS))
@pytest.mark.parametrize("block_entries", [1, 64, 1 << 20])
def test_focal_negative_sum_matches_stock_ops_across_blocks(entry_term, block_entries,
                                                            monkeypatch):
    monkeypatch.setattr(negative_term, "CPU_BLOCK_ENTRIES", block_entries)
    cls_logits, score_logits, pair_entries = random_case(seed=block_entries)
    grouped = distinct_score_entries(pair_entries, cls_logits.numel())
    weights = torch.rand(grouped.entries.shape, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1))
    results = []
    for function in ("ours", "plain", "stock"):
        cls = cls_logits.clone().requires_grad_()
        score = score_logits.clone().requires_grad_()
        if function == "stock":
            p_cls, neg_sum = stock_negative_term(cls, score, pair_entries, grouped.entries,
                                                 weights, 2.0,
                                                 entry_term == "weight_scales_score")
        else:
            negative_sum = {"ours": negative_term.focal_negative_sum,
                            "plain": negative_term.plain_negative_sum}[function]
            neg_sum, entry_scores = negative_sum(cls, score, grouped.entries,
                                                 ENTRY_TERMS[entry_term](weights))
            p_cls = entry_scores[grouped.entry_of_pair]
        pair_grad = torch.linspace(-1, 1, p_cls.numel(), dtype=torch.float64)
        loss = (p_cls * pair_grad).sum() + 0.37 * neg_sum
        grads = torch.autograd.grad(loss, (cls, score))
        results.append((p_cls.detach(), neg_sum.detach(), *grads))
    for ours, plain, stock in zip(*results):
        torch.testing.assert_close(ours, stock, rtol=1e-9, atol=0)
        torch.testing.assert_close(plain, stock, rtol=1e-9, atol=0)


def test_focal_negative_sum_second_backward_through_retained_graph():
    cls_logits, score_logits, pair_entries = random_case(seed=3)
    grouped = distinct_score_entries(pair_entries, cls_logits.numel())
    weights = torch.rand(grouped.entries.shape, dtype=torch.float64)
    cls = cls_logits.clone().requires_grad_()
    score = score_logits.clone().requires_grad_()
    neg_sum, entry_scores = negative_term.focal_negative_sum(
        cls, score, grouped.entries, ENTRY_TERMS["weight_scales_term"](weights))
    loss = entry_scores[grouped.entry_of_pair].sum() + neg_sum
    first = torch.autograd.grad(loss, (cls, score), retain_graph=True)
    first = [g.clone() for g in first]
    second = torch.autograd.grad(loss, (cls, score))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_focal_negative_sum_without_grad_gives_the_same_values():
    cls_logits, score_logits, pair_entries = random_case(seed=4, dtype=torch.float32)
    grouped = distinct_score_entries(pair_entries, cls_logits.numel())
    weights = torch.rand(grouped.entries.shape)
    args = (grouped.entries, ENTRY_TERMS["weight_scales_score"](weights))
    with torch.no_grad():
        no_grad = negative_term.focal_negative_sum(cls_logits.requires_grad_(), score_logits,
                                                   *args)
    with_grad = negative_term.focal_negative_sum(cls_logits, score_logits, *args)
    for a, b in zip(no_grad, with_grad):
        assert torch.equal(a, b.detach())


def test_distinct_score_entries_groups_pairs_and_keeps_the_last_pair():
    pair_entries = torch.tensor([7, 3, 7, 9, 3, 7])
    grouped = distinct_score_entries(pair_entries, 10)
    assert grouped.entries.tolist() == [3, 7, 9]
    assert grouped.entries[grouped.entry_of_pair].tolist() == pair_entries.tolist()
    assert grouped.last_pair_of_entry.tolist() == [4, 5, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_equals_torch_exp_across_underflow(dtype):
    info = torch.finfo(dtype)
    zero_from = math.log(info.tiny * info.eps)
    x = torch.cat([torch.linspace(zero_from - 30, 5, 20997, dtype=dtype),
                   torch.tensor([-math.inf, math.log(info.tiny), zero_from], dtype=dtype)])
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))]
    x = x.reshape(7, -1).t()  # non-contiguous on purpose
    ours = elementwise.exp(x.requires_grad_())
    expected = torch.exp(x.detach())
    assert (expected > 0).any() and (expected == 0).any()
    assert ((expected > 0) & (expected < info.tiny)).any(), "no subnormal result tested"
    # The band computed in float64 rounds once; torch's float32 kernel may differ by a
    # subnormal ulp there.
    atol = info.tiny * info.eps if dtype == torch.float32 else 0.0
    torch.testing.assert_close(ours.detach(), expected, rtol=4 * info.eps, atol=atol)
    grad = torch.linspace(-1, 1, x.numel(), dtype=dtype).reshape(x.shape)
    ours.backward(grad)
    torch.testing.assert_close(x.grad, grad * ours.detach(), rtol=0, atol=0)


def test_bce_with_one_target_matches_torch():
    p = torch.cat([torch.rand(1000, dtype=torch.float64),
                   torch.tensor([0.0, 1.0, 1e-300, 1 - 1e-16, 0.5], dtype=torch.float64)])
    ours_in, stock_in = p.clone().requires_grad_(), p.clone().requires_grad_()
    ours = elementwise.bce_with_one_target(ours_in)
    stock = F.binary_cross_entropy(stock_in, torch.ones_like(p), reduction="none")
    torch.testing.assert_close(ours, stock, rtol=1e-15, atol=0)
    grad = torch.linspace(0.5, 2, p.numel(), dtype=torch.float64)
    ours.backward(grad)
    stock.backward(grad)
    torch.testing.assert_close(ours_in.grad, stock_in.grad, rtol=1e-15, atol=0)


def test_gather_coordinates_gives_a_contiguous_gradient():
    table = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, 0, 4, 2])
    gathered = gather_coordinates(table, index)
    assert gathered.shape == (4, 4) and gathered.is_contiguous()
    assert torch.equal(gathered, table[index].t())
    (gathered * torch.arange(16.0, dtype=torch.float64).reshape(4, 4)).sum().backward()
    assert table.grad.is_contiguous()
    expected = torch.zeros(5, 4, dtype=torch.float64)
    expected.index_add_(0, index, torch.arange(16.0, dtype=torch.float64).reshape(4, 4).t())
    assert torch.equal(table.grad, expected)


def test_aligned_giou_backward_matches_the_op_by_op_graph():
    from dw_d2.assign.kernels.box_overlap import (_aligned_overlaps, aligned_iou_and_giou,
                                                  decode_distances)
    generator = torch.Generator().manual_seed(0)
    num = 4000
    x, y = (torch.rand(2, num, dtype=torch.float64, generator=generator) * 100).unbind()
    gt = torch.stack([x - torch.rand(num, dtype=torch.float64, generator=generator) * 30,
                      y - torch.rand(num, dtype=torch.float64, generator=generator) * 30,
                      x + torch.rand(num, dtype=torch.float64, generator=generator) * 30,
                      y + torch.rand(num, dtype=torch.float64, generator=generator) * 30])
    distances = torch.rand(4, num, dtype=torch.float64, generator=generator) * 30
    exact = torch.stack([x - gt[0], y - gt[1], gt[2] - x, gt[3] - y])
    distances[:, :500] = exact[:, :500]  # min / max ties on every side
    distances[0, 500:1000] = exact[0, 500:1000]
    distances[1:4:2, 1000:1500] = 0.0  # zero height: overlap exactly 0
    distances[:, 1500:1600] = 0.0  # zero area: union and enclose at the eps clamp
    gt[:, 1500:1600] = torch.stack([x, y, x, y])[:, 1500:1600]
    upstream = torch.randn(2, num, dtype=torch.float64, generator=generator)
    results = []
    for function in (aligned_iou_and_giou, _aligned_overlaps):
        leaf = distances.clone().requires_grad_()
        iou, giou = function(decode_distances(x, y, leaf), tuple(gt), 1e-6)
        (iou * upstream[0] + giou * upstream[1]).sum().backward()
        results.append((iou.detach(), giou.detach(), leaf.grad))
    for ours, graph in zip(*results):
        torch.testing.assert_close(ours, graph, rtol=1e-12, atol=1e-15)


def test_expand_per_gt_gradient_is_the_per_gt_segment_sum():
    from dw_d2.assign.kernels.gather import expand_per_gt
    per_gt = torch.arange(8.0, dtype=torch.float64).reshape(2, 4).requires_grad_()
    gt_index = torch.tensor([0, 0, 2, 2, 2, 3])
    expanded = expand_per_gt(per_gt, gt_index, torch.tensor([2, 0, 3, 1]))
    assert torch.equal(expanded, per_gt.detach()[:, gt_index])
    upstream = torch.arange(12.0, dtype=torch.float64).reshape(2, 6)
    expanded.backward(upstream)
    expected = torch.zeros(2, 4, dtype=torch.float64).index_add_(1, gt_index, upstream)
    assert torch.equal(per_gt.grad, expected)
