"""CharFormer: channel LayerNorm, window attention locality, CBAM fusion, two outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import charformer as cf


def test_channel_layernorm_formula():
    torch.manual_seed(0)
    ln = cf.ChannelLayerNorm(6)
    with torch.no_grad():
        ln.g.normal_()
        ln.b.normal_()
    x = torch.randn(2, 6, 5, 4) * 3 + 1
    mean = x.mean(1, keepdim=True)
    std = ((x - mean) ** 2).mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(ln(x), (x - mean) / (std + 1e-5) * ln.g + ln.b)
    # Close to LayerNorm over the channel axis (which puts eps inside the sqrt).
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6,), eps=0).permute(0, 3, 1, 2) * ln.g + ln.b
    torch.testing.assert_close(ln(x), ref, rtol=1e-3, atol=1e-3)


def test_window_partition_roundtrip_and_layout():
    torch.manual_seed(0)
    x = torch.randn(2, 2 * 3, 8, 12)
    win = cf.window_partition(x, heads=2, w=4)
    assert win.shape == (2 * 2 * 2 * 3, 16, 3)
    # window (b=1, head=1, x=1, y=2), pixel (w1=2, w2=3), channel 0
    row = ((1 * 2 + 1) * 2 + 1) * 3 + 2
    assert win[row, 2 * 4 + 3, 0] == x[1, 1 * 3 + 0, 1 * 4 + 2, 2 * 4 + 3]
    torch.testing.assert_close(cf.window_merge(win, 2, 2, 4, 8, 12), x)


def test_window_attention_is_local_to_its_window():
    torch.manual_seed(0)
    attn = cf.WindowAttention(8, dim_head=4, heads=2, window=4).eval()
    x = torch.randn(1, 8, 8, 8)
    skip = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        base = attn(x)
        moved = x.clone()
        moved[:, :, 4:, :] += torch.randn(1, 8, 4, 8)  # every window except the top row
        after = attn(moved)
        torch.testing.assert_close(after[:, :, :4], base[:, :, :4])
        assert (after[:, :, 4:] - base[:, :, 4:]).abs().max() > 1e-3
        # With a skip, a window attends to itself and the same window of the skip.
        base = attn(x, skip)
        s2 = skip.clone()
        s2[:, :, 4:, :] += 1.0
        torch.testing.assert_close(attn(x, s2)[:, :, :4], base[:, :, :4])
        s3 = skip.clone()
        s3[:, :, :4, :4] += 1.0
        assert (attn(x, s3)[:, :, :4, :4] - base[:, :, :4, :4]).abs().max() > 1e-4


def test_cbam_matches_reference():
    torch.manual_seed(0)
    cbam = cf.CBAM(32, reduction=16)
    x = torch.randn(2, 32, 9, 7)
    ca = torch.sigmoid(cbam.se(nn.AdaptiveMaxPool2d(1)(x)) + cbam.se(nn.AdaptiveAvgPool2d(1)(x)))
    out = x * ca
    sa = torch.sigmoid(cbam.spatial(torch.cat([out.max(1, keepdim=True)[0], out.mean(1, keepdim=True)], 1)))
    torch.testing.assert_close(cbam(x), out * sa + x)


def test_two_outputs_and_loss(workload):
    w = workload("charformer")
    image, glyph = w.forward()
    assert image.shape == glyph.shape == w.example_inputs[0].shape
    assert not torch.allclose(image, glyph)
    want = (
        100 * (image - w.targets["clean"]).abs().mean() + 100 * (glyph - w.targets["skeleton"]).abs().mean()
    )
    torch.testing.assert_close(w.loss((image, glyph)), want)
    # the skeleton is thinner than the glyph: fewer ink pixels
    assert (w.targets["skeleton"] < 0).sum() < (w.targets["clean"] < 0).sum()
