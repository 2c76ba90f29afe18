"""RCRN: MsR dilated branches, SENet -> CIRNet wiring, InstanceNorm, Tanh range, loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models import rcrn


def test_msr_branches_are_dilated_preactivation_convs():
    torch.manual_seed(0)
    msr = rcrn.MsR(4, 3).eval()
    for branch, d in zip(msr.branches, (1, 2, 3)):
        bn, relu, conv = branch
        assert conv.dilation == (d, d) and conv.padding == (d, d)
    x = torch.randn(1, 4, 15, 15)
    out = msr(x)
    assert out.shape == (1, 9, 15, 15)
    want = torch.cat([b[2](F.relu(b[0](x))) for b in msr.branches], 1)
    torch.testing.assert_close(out, want)
    # Receptive field: an impulse reaches +-d pixels in branch d only.
    with torch.no_grad():
        for b in msr.branches:
            b[0].running_mean.zero_()
            b[0].running_var.fill_(1.0)
            b[0].bias.zero_()
            b[0].weight.fill_(1.0)
            b[2].weight.abs_()
    imp = torch.zeros(1, 4, 15, 15)
    imp[..., 7, 7] = 5.0
    out = msr(imp)
    for i, d in enumerate((1, 2, 3)):
        rows = (out[0, 3 * i : 3 * i + 3].abs().sum((0, 2)) > 1e-6).nonzero()[:, 0]
        assert rows.min() == 7 - d and rows.max() == 7 + d


def test_restorer_reads_the_skeleton(workload):
    w = workload("rcrn")
    x = w.example_inputs[0]
    assert w.model.cirnet.ini[0].in_channels == 4
    with torch.no_grad():
        restored, skel = w.model(x)
        again = w.model.cirnet(torch.cat([x, skel], 1))
        other = w.model.cirnet(torch.cat([x, -skel], 1))
    torch.testing.assert_close(restored, again)
    assert (other - restored).abs().max() > 1e-4
    assert restored.shape == x.shape and skel.shape == (2, 1, 64, 64)
    assert restored.abs().max() <= 1 and skel.abs().max() <= 1  # Tanh


def test_init_block_instance_norm_then_leaky_relu(workload):
    w = workload("rcrn")
    conv, norm, act = w.model.cirnet.ini
    x = torch.cat([w.example_inputs[0], torch.zeros(2, 1, 64, 64)], 1)
    with torch.no_grad():
        y = norm(conv(x))
        torch.testing.assert_close(y.mean((2, 3)), torch.zeros(2, y.shape[1]), atol=1e-4, rtol=0)
        torch.testing.assert_close(act(y), torch.where(y > 0, y, 0.2 * y))


def test_unet_skips_are_concatenated(workload):
    net = workload("rcrn").model.cirnet
    torch.manual_seed(0)
    x, skip = torch.randn(1, 8 * 32, 4, 4), torch.randn(1, 8 * 32, 8, 8)
    with torch.no_grad():
        out = net.up1(x, skip)
    assert out.shape == (1, 16 * 32, 8, 8)
    torch.testing.assert_close(out[:, 8 * 32 :], skip)


def test_loss_has_adversarial_and_l1_terms(workload):
    w = workload("rcrn")
    restored, skel = w.forward()
    with torch.no_grad():
        score = w.extras["discriminator"](restored, w.example_inputs[0])
        want = (
            ((score - 1) ** 2).mean()
            + 100 * (restored - w.targets["clean"]).abs().mean()
            + 100 * (skel - w.targets["skeleton"]).abs().mean()
        )
        torch.testing.assert_close(w.loss((restored, skel)), want)
    assert score.shape == (2, 1, 4, 4)
