"""Frozen-statistics BatchNorm and dw-d2's norm names."""
import pytest
import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d
from dw_d2.layers import FrozenStatisticsBatchNorm2d, get_norm, resolve_norm


def _random_bn(cls):
    bn = cls(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([0.25, 4.0, 1.0]))
        bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    return bn


def test_statistics_stay_frozen_in_training_while_the_affine_parameters_learn():
    bn = _random_bn(FrozenStatisticsBatchNorm2d).train()
    frozen = _random_bn(FrozenBatchNorm2d)
    x = torch.randn(4, 3, 5, 5) * 3 + 7
    out = bn(x)
    torch.testing.assert_close(out, frozen(x))
    assert torch.equal(bn.running_mean, torch.tensor([0.5, -1.0, 2.0]))
    assert torch.equal(bn.running_var, torch.tensor([0.25, 4.0, 1.0]))
    assert int(bn.num_batches_tracked) == 0
    out.sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None
    assert bn.weight.requires_grad and bn.bias.requires_grad


def test_it_keeps_batchnorm_names_and_counts_as_a_norm_layer():
    bn = FrozenStatisticsBatchNorm2d(8)
    assert isinstance(bn, nn.BatchNorm2d)  # what Detectron2's optimizer builder checks
    assert sorted(bn.state_dict()) == sorted(nn.BatchNorm2d(8).state_dict())


def test_norm_names():
    assert isinstance(get_norm("FrozenStatsBN", 4), FrozenStatisticsBatchNorm2d)
    assert isinstance(get_norm("FrozenBN", 4), FrozenBatchNorm2d)  # Detectron2's names pass
    assert isinstance(get_norm("GN", 64), nn.GroupNorm)
    assert get_norm("", 4) is None
    assert resolve_norm("FrozenStatsBN") is FrozenStatisticsBatchNorm2d
    assert resolve_norm("BN") == "BN"
    with pytest.raises(ValueError, match=r"MODEL.RESNETS.NORM 'FrozenStatBN' is not a norm layer"
                                         r".*\['FrozenStatsBN'\]"):
        resolve_norm("FrozenStatBN", "MODEL.RESNETS.NORM")
