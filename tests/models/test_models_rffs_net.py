"""RFFS-Net: dilated / annular neighbourhoods, density, interpolation, FPS, MRFA loss."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from models import rffs_net as rf


def _code_graph_dilated(ids, sample, rate, step=4):
    """The code's GraphDilatedKNN slicing loop, verbatim in structure."""
    n = int(sample // step) * (rate - 1 + step)
    out = []
    last = math.ceil(n // (rate - 1 + step)) - 1
    for i in range(math.ceil(n // (rate - 1 + step))):
        lo = (i + 1) * (rate - 1) + i * step
        hi = (i + 1) * (rate - 1 + step)
        out.append(ids[..., lo:] if i == last else ids[..., lo:hi])
    return torch.cat(out, -1)


def _code_annular(ids, sample, rate):
    if rate == 1:
        return ids[..., :sample]
    return torch.cat([ids[..., :1], ids[..., (rate - 1) * sample : rate * sample - 1]], -1)


def test_neighbour_index_patterns_match_the_code():
    ids = torch.arange(64).expand(2, 5, 64)
    for rate in (1, 2, 4, 8):
        n = 16 // 4 * (rate + 3)
        got = rf.dilated_graph_index(ids[..., :n], 16, rate)
        assert torch.equal(got, _code_graph_dilated(ids[..., :n], 16, rate))
        assert got.shape[-1] == 16
        assert torch.equal(rf.annular_index(ids, 8, rate), _code_annular(ids, 8, rate))
    assert rf.dilated_graph_index(ids, 16, 2)[0, 0, :8].tolist() == [1, 2, 3, 4, 6, 7, 8, 9]
    assert rf.annular_index(ids, 8, 4)[0, 0].tolist() == [0, 24, 25, 26, 27, 28, 29, 30]


def test_annular_conv_reads_only_its_ring(workload):
    w = workload("rffs_net")
    ad_idx = w.example_inputs[rf.INPUT_ORDER.index("ad_idx") + 1]
    conv = w.model.dagfusion.adconv[0]
    torch.manual_seed(0)
    n = ad_idx.shape[1]
    feats = torch.randn(2, n, conv.conv.in_channels)
    rate_slot, centre = 2, 5  # dilation 4: centre + ring [24, 31) of the sorted list
    idx = ad_idx[:, :, rate_slot]
    read = set(idx[0, centre].tolist())
    assert len(read) == 8 and centre in read
    outside = [p for p in range(n) if p not in read]
    with torch.no_grad():
        base = conv(feats, idx)
        moved = feats.clone()
        moved[0, outside] += 10 * torch.randn(len(outside), feats.shape[2])
        after = conv(moved, idx)
        torch.testing.assert_close(after[0, centre], base[0, centre])
        inside = feats.clone()
        ring_point = [p for p in read if p != centre][0]
        inside[0, ring_point] += 10
        assert (conv(inside, idx)[0, centre] - base[0, centre]).abs().max() > 1e-4


def test_annular_ring_excludes_nearer_neighbours(workload):
    w = workload("rffs_net")
    points = w.example_inputs[0]
    l3 = rf.index_points(
        rf.index_points(rf.index_points(points[..., :3], w.example_inputs[1]), w.example_inputs[3]),
        w.example_inputs[5],
    )
    ad_idx = w.example_inputs[rf.INPUT_ORDER.index("ad_idx") + 1]
    d = rf.square_distance(l3, l3)
    ring = ad_idx[:, :, 3, 1:]  # dilation 8, without the centre
    ring_d = d.gather(2, ring)
    nearest7 = d.topk(8, -1, largest=False).values[..., 1:]
    assert (ring_d.min(-1).values >= nearest7.max(-1).values - 1e-5).all()


def test_index_points_is_batched_gather():
    torch.manual_seed(0)
    pts = torch.randn(3, 10, 4)
    idx = torch.randint(0, 10, (3, 5, 2))
    want = pts[torch.arange(3)[:, None, None], idx]
    assert torch.equal(rf.index_points(pts, idx), want)


def test_density_is_gaussian_kernel_mean():
    torch.manual_seed(0)
    xyz = torch.randn(2, 30, 3)
    bw = 2.0
    d2 = torch.cdist(xyz.double(), xyz.double()) ** 2
    want = (torch.exp(-d2 / (2 * bw * bw)) / (2.5 * bw)).mean(-1)
    torch.testing.assert_close(rf.compute_density(xyz, bw).double(), want, rtol=1e-4, atol=1e-5)


def test_three_interpolate_weights():
    torch.manual_seed(0)
    known = torch.randn(1, 12, 3)
    feats = torch.randn(1, 4, 12)
    unknown = torch.cat([known[:, :3], torch.randn(1, 5, 3)], 1)
    nn_idx = rf.sorted_neighbours(known, unknown, 3)
    got = rf.three_interpolate(unknown, known, feats, nn_idx)
    torch.testing.assert_close(got[:, :, :3], feats[:, :, :3], rtol=1e-5, atol=1e-5)
    const = torch.ones(1, 4, 12) * 2.5
    torch.testing.assert_close(
        rf.three_interpolate(unknown, known, const, nn_idx), torch.full((1, 4, 8), 2.5)
    )
    d = torch.cdist(unknown, known).gather(2, nn_idx)
    wts = (1 / (d + 1e-8)) / (1 / (d + 1e-8)).sum(-1, keepdim=True)
    want = (feats[0][:, nn_idx[0]] * wts[0][None]).sum(-1)
    torch.testing.assert_close(got[0, :, 3:], want[:, 3:])


def test_farthest_point_sampling_is_greedy():
    torch.manual_seed(0)
    xyz = torch.randn(1, 50, 3)
    idx = rf.farthest_point_sample(xyz, 10)[0]
    assert idx[0] == 0 and len(set(idx.tolist())) == 10
    for i in range(1, 10):
        chosen = xyz[0, idx[:i]]
        dmin = torch.cdist(xyz[0], chosen).min(1).values
        assert idx[i] == dmin.argmax()


def test_synthetic_scene_has_all_classes():
    feats, labels = rf.synthetic_scene(np.random.default_rng(0), 1024)
    assert feats.shape == (1024, 8) and labels.shape == (1024,)
    assert set(labels.tolist()) == set(range(9))
    roof, ground = labels == 5, labels == 2
    assert feats[roof, 2].mean() > feats[ground, 2].mean() + 3  # roofs are above roads


def test_mrfa_loss(workload):
    w = workload("rffs_net")
    out = w.forward()
    logits, *levels = out
    wt = w.targets["class_weights"]
    assert wt.argmax() == 0  # powerlines are the rarest class
    want = F.cross_entropy(logits.reshape(-1, 9), w.targets["labels"].reshape(-1), wt)
    for lv, key in zip(levels, ("labels_l3", "labels_l2", "labels_l1")):
        assert lv.shape[:2] == w.targets[key].shape
        torch.testing.assert_close(lv.exp().sum(-1), torch.ones(lv.shape[:2]))
        want = want + 0.3 * F.nll_loss(lv.reshape(-1, 9), w.targets[key].reshape(-1), wt)
    torch.testing.assert_close(w.loss(out), want)
