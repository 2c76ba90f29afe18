"""RZCR: DSAL gating, YOLO decode, tensor knowledge-graph reasoning, target assignment."""

from __future__ import annotations

import torch

from models import glyphs, rzcr


def test_dsal_gates_are_per_sample_scalars():
    torch.manual_seed(0)
    dsal = rzcr.DSAL()
    x = torch.randn(2, 6, 5, 5)
    g1 = dsal.attention_1(x)
    assert g1.shape == (2, 1, 1, 1) and ((g1 > 0) & (g1 < 1)).all()
    # On the pooled 1x1 map only the 7x7 conv's centre tap acts.
    s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1).amax((2, 3))
    w = dsal.attention_1.conv.weight[0, :, 3, 3]
    torch.testing.assert_close(g1.flatten(), torch.sigmoid(s @ w))
    y = x * g1
    torch.testing.assert_close(dsal(x), y * dsal.attention_2(y))
    quirk = rzcr.DSAL(code_quirk=True)
    quirk.load_state_dict(dsal.state_dict())
    torch.testing.assert_close(quirk(x), y * dsal.attention_1(y))


def test_darknet_depth_matches_the_code():
    net = rzcr.Darknet(blocks=(1, 2, 8, 8, 4))
    convs = [m for m in net.body.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 5 + 2 * (1 + 2 + 8 + 8 + 4)  # 52
    assert all(
        isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.1
        for m in net.body.modules()
        if isinstance(m, torch.nn.LeakyReLU)
    )


def test_yolo_decode(workload):
    w = workload("rzcr")
    model = w.model
    opr = torch.zeros(1, 3 * (5 + 59), 4, 4)
    opr[0, 64 + 2, 1, 3] = 0.5  # anchor 1, tw at row 1, col 3
    boxes = model.decode(opr).view(1, 3, 4, 4, 64)
    torch.testing.assert_close(boxes[0, 1, 1, 3, :2], torch.tensor([3.5 * 32, 1.5 * 32]))
    torch.testing.assert_close(boxes[0, 1, 1, 3, 2], model.anchors[1, 0] * torch.exp(torch.tensor(0.5)))
    torch.testing.assert_close(boxes[0, 0, 0, 0, 3], model.anchors[0, 1])
    assert (boxes[..., 4:] == 0.5).all()


def test_kgr_masked_mean_and_fusion(workload):
    kgr = workload("rzcr").model.kgr
    torch.manual_seed(0)
    rad, st = torch.rand(2, 59), torch.softmax(torch.randn(2, 6), -1)
    got = kgr(rad, st)
    for c in (0, 17, 99):
        members = kgr.char_radical[c].nonzero()[:, 0]
        s = int(kgr.char_structure[c].argmax())
        want = 0.7 * rad[:, members].mean(1) + 0.3 * st[:, s]
        torch.testing.assert_close(got[:, c], want)


def test_kgr_recognises_a_character_from_its_radicals(workload):
    w = workload("rzcr")
    kgr, structures, radical_ids = w.model.kgr, w.extras["structures"], w.extras["radical_ids"]
    for c in (3, 58, 101):
        rad = torch.zeros(1, 59)
        rad[0, radical_ids[c]] = 0.9
        st = torch.full((1, 6), 0.02)
        st[0, structures[c]] = 0.9
        assert int(kgr(rad, st).argmax()) == c


def test_forward_outputs_and_topk(workload):
    w = workload("rzcr")
    opr, structure, chars, top_v, top_i = w.forward()
    assert opr.shape == (2, 192, 4, 4) and structure.shape == (2, 6) and chars.shape == (2, 120)
    torch.testing.assert_close(top_v, chars.gather(1, top_i))
    assert (top_v[:, :-1] >= top_v[:, 1:]).all()


def test_yolo_targets_assign_every_radical(workload):
    w = workload("rzcr")
    t = w.targets["yolo"]
    ids = w.extras["radical_ids"]
    n = sum(len(ids[c]) for c in w.targets["character"].tolist())
    assert int(t[..., 4].sum()) == n
    assert torch.equal(t[..., 5:].sum(-1), t[..., 4])
    assert ((t[..., :2] >= 0) & (t[..., :2] < 1)).all()


def test_layouts_have_six_structures():
    assert len(glyphs.STRUCTURES) == 6 and glyphs.NUM_RADICALS == 59
    clean, boxes = glyphs.compose(4, [0, 1, 2], glyphs.radicals(), 64)
    assert clean.shape == (3, 64, 64) and len(boxes) == 3 and (clean < 0).any()
