"""Genus/differentia head: segment softmax and p(leaf) = p(genus)[parent] * conditional."""

from __future__ import annotations

import torch

from models import visual_lexical as vl


def test_segment_softmax_equals_per_segment_softmax():
    torch.manual_seed(0)
    parent = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0])
    logits = torch.randn(3, 8) * 5
    got = vl.segment_softmax(logits, parent, 3)
    want = torch.empty_like(logits)
    for g in range(3):
        members = (parent == g).nonzero()[:, 0]
        want[:, members] = torch.softmax(logits[:, members], dim=1)
    torch.testing.assert_close(got, want)


def test_segment_softmax_is_stable_for_large_logits():
    parent = torch.tensor([0, 0, 1])
    got = vl.segment_softmax(torch.tensor([[1000.0, 999.0, -1000.0]]), parent, 2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0, 2], torch.tensor(1.0))


def test_leaf_probabilities_are_genus_times_conditional(workload):
    w = workload("visual_lexical")
    head = w.model.head
    with torch.no_grad():
        f = w.model.features(*w.example_inputs).mean((2, 3))
        p_genus, p_leaf = head(f)
        leaf_logits = head.differentia(f)
    torch.testing.assert_close(p_leaf.sum(1), torch.ones(2))
    torch.testing.assert_close(p_genus.sum(1), torch.ones(2))
    for leaf, (_, genus) in enumerate(vl.LEAVES):
        siblings = [i for i, (_, g) in enumerate(vl.LEAVES) if g == genus]
        cond = torch.softmax(leaf_logits[:, siblings], 1)[:, siblings.index(leaf)]
        torch.testing.assert_close(p_leaf[:, leaf], p_genus[:, genus] * cond)
    # Summing the leaves of a genus gives back p(genus).
    per_genus = torch.zeros_like(p_genus).index_add(1, head.parent, p_leaf)
    torch.testing.assert_close(per_genus, p_genus)


def test_loss_is_two_level_cross_entropy(workload):
    w = workload("visual_lexical")
    p_genus, p_leaf = w.forward()
    g, leaf = w.targets["genus"], w.targets["leaf"]
    want = -(p_genus[[0, 1], g].log() + p_leaf[[0, 1], leaf].log()).mean()
    torch.testing.assert_close(w.loss((p_genus, p_leaf)), want)
    assert torch.equal(g, w.model.head.parent[leaf])
