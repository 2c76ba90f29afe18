"""Attention Round: soft rounding over all levels, its sigma -> 0 limit, coding-length bits, STE."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models import attention_round as ar


def _grid(bits):
    return torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.float32)


def test_attention_round_equals_explicit_attention():
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, 3)
    scale = w.reshape(3, -1).abs().amax(1).view(3, 1, 1, 1) / 8
    levels, sigma = _grid(4), 0.4
    got = ar.attention_round(w, scale, levels, sigma)
    flat_w, flat_s = w.reshape(-1), scale.expand_as(w).reshape(-1)
    want = torch.empty_like(flat_w)
    for i in range(flat_w.numel()):
        q = levels * flat_s[i]
        logits = -((flat_w[i] - q) ** 2) / (2 * (sigma * flat_s[i]) ** 2)
        want[i] = (torch.softmax(logits, 0) * q).sum()
    torch.testing.assert_close(got, want.view_as(w))


def test_attention_round_tends_to_nearest_rounding():
    torch.manual_seed(0)
    w = torch.randn(4, 8) * 0.3
    scale = torch.full((4, 1), 0.05)
    levels = _grid(4)
    # Keep weights away from the exact midpoints between levels.
    u = w / scale
    w = torch.where((u - u.floor() - 0.5).abs() < 0.05, w + 0.1 * scale, w)
    nearest = torch.clamp(torch.round(w / scale), levels[0], levels[-1]) * scale
    errs = [(ar.attention_round(w, scale, levels, s) - nearest).abs().max() for s in (0.5, 0.2, 0.05)]
    assert errs[0] > errs[1] > errs[2]
    torch.testing.assert_close(ar.attention_round(w, scale, levels, 0.05), nearest, rtol=0, atol=1e-5)


def test_attention_round_reaches_far_levels_for_wide_sigma():
    w, scale, levels = torch.tensor([[0.0]]), torch.tensor([[1.0]]), _grid(3)
    # sigma large: every level weighs in, so the result moves to the grid's mean (-0.5).
    got = ar.attention_round(w, scale, levels, 100.0)
    torch.testing.assert_close(got, torch.tensor([[-0.5]]), rtol=0, atol=1e-3)


def test_coding_length_formula():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    v = (w / w.pow(2).mean().sqrt()).double().numpy()
    m, n, eps = 6, 10, 0.5
    want = (m + n) / 2 * np.linalg.slogdet(np.eye(m) + n / (m * eps**2) * v @ v.T)[1]
    np.testing.assert_allclose(ar.coding_length(w, eps), want, rtol=1e-6)
    # Redundant (low-rank) weights code shorter than independent ones.
    low_rank = torch.randn(6, 1) @ torch.randn(1, 10)
    assert ar.coding_length(low_rank) < ar.coding_length(w)


def test_bits_follow_coding_length():
    scores = [1.0, 2.0, 3.0, 4.0, 5.0]
    bits = ar.allocate_bits(scores, 4, 2, 6)
    assert bits == sorted(bits) and bits[0] < bits[-1] and min(bits) >= 2 and max(bits) <= 6


def test_activation_fake_quant_straight_through():
    aq = ar.ActQuant(bits=4)
    aq.mode = "calibrate"
    aq(torch.linspace(0, 3, 50))
    aq.freeze()
    x = torch.linspace(-1, 4, 37, requires_grad=True)
    y = aq(x)
    steps = y.detach() / aq.scale
    torch.testing.assert_close(steps, steps.round())
    assert y.min() == 0 and torch.isclose(y.max(), aq.scale * 15)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # STE: identity gradient


def test_quantised_model_uses_attention_rounded_weights(workload):
    w = workload("attention_round")
    layers = w.model.ar_layers()
    assert len(layers) == 21 and all(2 <= lay.bits <= 6 for lay in layers)
    assert len(set(w.extras["bits"])) > 1, "mixed precision expected"
    conv = layers[3]
    wq = conv.weight()
    assert not torch.equal(wq, conv.layer.weight)
    lo, hi = conv.levels[0] * conv.scale, conv.levels[-1] * conv.scale
    assert ((wq >= lo - 1e-6) & (wq <= hi + 1e-6)).all()
    x = torch.randn(1, conv.layer.in_channels, 8, 8).relu()
    torch.testing.assert_close(
        conv(x), F.conv2d(conv.act(x), wq, conv.layer.bias, conv.layer.stride, conv.layer.padding)
    )
    assert w.model.conv1.act.signed and not conv.act.signed


def test_bn_folding_is_exact():
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False), torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(ar._fold(conv, bn)(x), bn(conv(x)), rtol=1e-4, atol=1e-5)
