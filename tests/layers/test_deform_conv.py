"""dw-d2's deformable convolutions against a direct transcription of mmcv's DCN rule.

dw-d2 computes DCN with ``torchvision.ops.deform_conv2d``; the official models were trained with
mmcv's operator. ``mmcv_modulated_deform_conv`` below transcribes, one sample at a time, what
mmcv's ``modulated_deformable_im2col`` kernel does (mmcv 1.x, ``pytorch/cpu/
modulated_deform_conv.cpp``): for output cell (ho, wo), kernel position (i, j) and deformable
group g, the offsets are read at channel ``2 * (g * K + i * kw + j)`` (dy) and the next one (dx),
the mask at ``g * K + i * kw + j``; the input is read bilinearly at (ho * s - p + i * d + dy,
wo * s - p + j * d + dx), zero outside (-1, H) x (-1, W) and for each corner outside the map.
"""
import math

import pytest
import torch

from dw_d2.layers import DeformConv, ModulatedDeformConvWithOffsets, split_offsets_and_mask


def _bilinear(image, h, w):
    height, width = image.shape
    h_low, w_low = math.floor(h), math.floor(w)
    lh, lw = h - h_low, w - w_low
    value = 0.0
    for y, wy in ((h_low, 1 - lh), (h_low + 1, lh)):
        for x, wx in ((w_low, 1 - lw), (w_low + 1, lw)):
            if 0 <= y <= height - 1 and 0 <= x <= width - 1:
                value += wy * wx * float(image[y, x])
    return value


@torch.no_grad()
def mmcv_modulated_deform_conv(x, offset, mask, weight, bias, stride, padding, dilation,
                               deform_groups):
    n_images, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    out_h, out_w = offset.shape[2:]
    per_group = channels // deform_groups
    columns = torch.zeros(n_images, channels, kh, kw, out_h, out_w, dtype=torch.float64)
    for n in range(n_images):
        for c in range(channels):
            g = c // per_group
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    for ho in range(out_h):
                        for wo in range(out_w):
                            dy = float(offset[n, g * 2 * kh * kw + 2 * k, ho, wo])
                            dx = float(offset[n, g * 2 * kh * kw + 2 * k + 1, ho, wo])
                            m = 1.0 if mask is None else float(mask[n, g * kh * kw + k, ho, wo])
                            h = ho * stride - padding + i * dilation + dy
                            w = wo * stride - padding + j * dilation + dx
                            if -1 < h < height and -1 < w < width:
                                columns[n, c, i, j, ho, wo] = _bilinear(x[n, c], h, w) * m
    out = torch.einsum("ocij,ncijhw->nohw", weight.double(), columns)
    return out if bias is None else out + bias.double()[None, :, None, None]


@pytest.mark.parametrize("stride,padding,dilation,deform_groups",
                         [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 2, 2)])
def test_deform_conv_follows_mmcv_rule(stride, padding, dilation, deform_groups):
    generator = torch.Generator().manual_seed(stride + 10 * deform_groups)
    x = torch.randn(2, 4, 6, 7, generator=generator, dtype=torch.float64)
    conv = DeformConv(4, 3, 3, stride=stride, padding=padding, dilation=dilation,
                      deformable_groups=deform_groups, bias=True).double()
    torch.nn.init.normal_(conv.bias)
    out_h = (6 + 2 * padding - dilation * 2 - 1) // stride + 1
    out_w = (7 + 2 * padding - dilation * 2 - 1) // stride + 1
    offset = 2.5 * torch.randn(2, conv.offset_channels, out_h, out_w, generator=generator,
                               dtype=torch.float64)
    # Kernel position (0, 0) of output row 0 samples rows -1, -0.5, 0, H - 1 and H exactly (of
    # image 0) and columns -1, -0.5, 0, W - 1 and W (of image 1): where the bilinear rule switches.
    columns = torch.arange(out_w, dtype=torch.float64)[:5] * stride
    offset[0, 0, 0, :5] = torch.tensor([-1.0, -0.5, 0.0, 5.0, 6.0], dtype=torch.float64)[
        :out_w] + padding
    offset[1, 1, 0, :5] = torch.tensor([-1.0, -0.5, 0.0, 6.0, 7.0], dtype=torch.float64)[
        :out_w] + padding - columns
    mask = torch.rand(2, conv.offset_channels // 2, out_h, out_w, generator=generator,
                      dtype=torch.float64)
    for m in (mask, None):
        expected = mmcv_modulated_deform_conv(x, offset, m, conv.weight.detach(),
                                              conv.bias.detach(), stride, padding, dilation,
                                              deform_groups)
        torch.testing.assert_close(conv(x, offset, m), expected, rtol=1e-12, atol=1e-12)


def test_offsets_are_dy_then_dx():
    """A 1x1 identity conv whose first offset channel is +1 reads the row below."""
    x = torch.arange(2 * 5 * 6, dtype=torch.float64).reshape(1, 2, 5, 6)
    conv = DeformConv(2, 2, 1, groups=2, bias=False).double()
    torch.nn.init.ones_(conv.weight)
    offset = torch.zeros(1, 2, 5, 6, dtype=torch.float64)
    offset[:, 0] = 1.0
    shifted = conv(x, offset)
    assert torch.equal(shifted[..., :4, :], x[..., 1:, :])
    assert torch.equal(shifted[..., 4, :], torch.zeros(1, 2, 6, dtype=torch.float64))


def test_layer_with_offsets_reads_them_as_mmcv_pack_and_starts_plain():
    generator = torch.Generator().manual_seed(0)
    layer = ModulatedDeformConvWithOffsets(4, 5, 3, padding=1).double()
    assert sorted(layer.state_dict()) == ["bias", "conv_offset.bias", "conv_offset.weight",
                                          "weight"]
    assert layer.conv_offset.out_channels == 27
    x = torch.randn(1, 4, 5, 6, generator=generator, dtype=torch.float64)
    # Zero offset conv: a plain convolution whose samples are weighted by sigmoid(0) = 0.5.
    plain = torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), 0.5 * (plain - layer.bias[:, None, None])
                               + layer.bias[:, None, None])
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3, generator=generator)
    torch.nn.init.normal_(layer.conv_offset.bias, generator=generator)
    raw = layer.conv_offset(x)
    first, second, mask_logits = raw[:, :9], raw[:, 9:18], raw[:, 18:]
    expected = mmcv_modulated_deform_conv(x, torch.cat((first, second), 1), mask_logits.sigmoid(),
                                          layer.weight.detach(), layer.bias.detach(), 1, 1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    offsets, mask = split_offsets_and_mask(raw)
    assert offsets.shape[1] == 18 and mask.shape[1] == 9


def test_wrong_offset_channels_are_named():
    conv = DeformConv(4, 4, 3, padding=1)
    with pytest.raises(ValueError, match="expects 18 offset channels .* got 27"):
        conv(torch.zeros(1, 4, 5, 5), torch.zeros(1, 27, 5, 5))


def test_gradients_reach_input_offsets_and_weights():
    layer = ModulatedDeformConvWithOffsets(2, 2, 3, padding=1).double()
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert layer.weight.grad.abs().sum() > 0
    assert layer.conv_offset.weight.grad.abs().sum() > 0
