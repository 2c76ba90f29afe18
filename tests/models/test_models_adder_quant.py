"""AdderNet quantisation: the adder, the lossless weight clamp, k-means groups, fake-quant."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models import adder_quant as aq


def _adder_loop(x, w, stride, pad):
    """Direct reference: out[b,o,i,j] = -sum |x_pad[b, :, patch] - w[o]|."""
    b, _, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = F.pad(x, (pad,) * 4)
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = torch.empty(b, o, oh, ow)
    for n in range(b):
        for c in range(o):
            for i in range(oh):
                for j in range(ow):
                    patch = xp[n, :, i * stride : i * stride + k, j * stride : j * stride + k]
                    out[n, c, i, j] = -(patch - w[c]).abs().sum()
    return out


def test_unfold_matches_torch_unfold():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6)
    for k, stride, pad in [(3, 1, 1), (3, 2, 1), (1, 2, 0), (2, 1, 0)]:
        torch.testing.assert_close(aq.unfold(x, k, stride, pad), F.unfold(x, k, padding=pad, stride=stride))


def test_adder_is_negative_l1_distance():
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 6, 5), torch.randn(4, 3, 3, 3)
    for stride, pad in [(1, 1), (2, 1), (1, 0)]:
        torch.testing.assert_close(aq.adder2d(x, w, stride, pad), _adder_loop(x, w, stride, pad))


def test_lossless_range_clamp_for_activations_in_range():
    torch.manual_seed(0)
    s = 1.0
    w = 2.5 * torch.randn(5, 4, 3, 3)  # many |w| > s
    assert (w.abs() > s).any()
    x = torch.rand(2, 4, 6, 6) * s  # activations in [0, s]
    extra_bias = -(w.abs() - s).clamp_min(0).sum((1, 2, 3))
    clamped = aq.adder2d(x, w.clamp(-s, s), 1, 0) + extra_bias[None, :, None, None]
    torch.testing.assert_close(clamped, aq.adder2d(x, w, 1, 0))
    # ... and it is not lossless outside [0, s], as the paper says: hence the outlier clamp.
    x_big = x + 3 * s
    big = aq.adder2d(x_big, w.clamp(-s, s), 1, 0) + extra_bias[None, :, None, None]
    assert (big - aq.adder2d(x_big, w, 1, 0)).abs().max() > 1e-2


def test_fake_quant_grids():
    x = torch.linspace(-1, 5, 101)
    s, bits = torch.tensor(2.0), 4
    a = aq.fake_quant_act(x, s, bits)
    assert a.min() == 0 and a.max() == s
    steps = a * (2**bits - 1) / s
    torch.testing.assert_close(steps, steps.round())
    wq = aq.fake_quant_weight(x - 2, s, bits)
    steps = wq * (2**bits - 1) / (2 * s)
    torch.testing.assert_close(steps, steps.round())
    assert steps.min() == -(2 ** (bits - 1)) and steps.max() == 2 ** (bits - 1) - 1


def test_kmeans_1d_groups_are_intervals():
    torch.manual_seed(0)
    v = torch.cat([torch.randn(10) * 0.1 + c for c in (1.0, 2.0, 4.0, 8.0)])
    labels = aq.kmeans_1d(v, 4)
    for g in range(4):
        assert (labels == g).sum() == 10
    order = torch.argsort(v)
    assert torch.equal(labels[order], labels[order].sort().values)


def test_frozen_layers_hold_group_scales_and_clamped_weights(workload):
    model = workload("adder_quant").model
    any_clipped = any_free = False
    for layer in model.adders():
        assert layer.mode == "quant" and sum(layer.group_sizes) == layer.weight.shape[0]
        assert all(n > 0 for n in layer.group_sizes)
        start = 0
        for g, size in enumerate(layer.group_sizes):
            wg = layer.weight[layer.perm][start : start + size]
            s = layer.scales[g]
            if layer.clipped[g]:
                any_clipped = True
                torch.testing.assert_close(s, layer.act_range)
                assert wg.abs().max() > s and layer.w_grouped[start : start + size].abs().max() <= s
            else:
                any_free = True
                torch.testing.assert_close(s, wg.abs().max())
                assert torch.equal(layer.w_grouped[start : start + size], wg)
            start += size
        # perm followed by inv_perm is the identity
        assert torch.equal(layer.perm[layer.inv_perm], torch.arange(len(layer.perm)))
    assert any_clipped and any_free, "the workload should exercise both kinds of group"


def test_quantised_layer_matches_per_group_reference():
    """The vectorised forward equals the code's loop: per group quantise, adder, concat, reorder."""
    torch.manual_seed(0)
    layer = aq.QAdder2d(3, 8, 3, 1, 1, bits_w=4, bits_a=4, groups=4)
    x = torch.relu(torch.randn(2, 3, 6, 6)) * 2
    layer.mode = "calibrate"
    layer(x)
    layer.freeze()
    outs, start = [], 0
    for g, size in enumerate(layer.group_sizes):
        s = layer.scales[g]
        w = aq.fake_quant_weight(layer.w_grouped[start : start + size], s, 4)
        out = aq.adder2d(aq.fake_quant_act(x, s, 4), w, 1, 1)
        if layer.clipped[g]:
            out = out + layer.extra_bias[start : start + size][None, :, None, None]
        outs.append(out)
        start += size
    grouped = torch.cat(outs, 1)
    want = torch.empty_like(grouped)
    want[:, layer.perm] = grouped  # the code's original_order
    torch.testing.assert_close(layer(x), want)


def test_high_bit_quantisation_approaches_full_precision():
    torch.manual_seed(0)
    layer = aq.QAdder2d(4, 8, 3, 1, 1, bits_w=16, bits_a=16, groups=2)
    x = torch.rand(2, 4, 6, 6)
    layer.mode = "calibrate"
    layer(x)
    layer.act_range.fill_(10.0)  # no activation outliers: every scale covers x
    layer.freeze()
    fp = aq.adder2d(x, layer.weight, 1, 1)
    torch.testing.assert_close(layer(x), fp, rtol=1e-3, atol=1e-2)
