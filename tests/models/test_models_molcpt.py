"""MolCPT: index_add message passing, segment mean, masked motif attention, the prompt."""

from __future__ import annotations

import json

import pytest
import torch

from models import molcpt


def test_gin_aggregate_equals_loop():
    torch.manual_seed(0)
    n, e, d = 7, 15, 5
    x = torch.randn(n, d)
    edge_index = torch.randint(0, n, (2, e))
    edge_emb = torch.randn(e, d)
    want = torch.zeros(n, d)
    for k in range(e):
        s, t = edge_index[0, k].item(), edge_index[1, k].item()
        want[t] += x[s] + edge_emb[k]
    torch.testing.assert_close(molcpt.gin_aggregate(x, edge_index, edge_emb), want)


def test_gin_conv_adds_self_loops_with_bond_type_4():
    torch.manual_seed(0)
    conv = molcpt.GINConv(8)
    x = torch.randn(3, 8)
    edge_index = torch.tensor([[0, 1], [1, 0]])
    edge_attr = torch.tensor([[1, 0], [1, 0]])
    bond = conv.bond_type.weight[1] + conv.bond_dir.weight[0]
    loop = conv.bond_type.weight[4] + conv.bond_dir.weight[0]
    agg = x + loop
    agg[1] += x[0] + bond
    agg[0] += x[1] + bond
    torch.testing.assert_close(conv(x, edge_index, edge_attr), conv.mlp(agg))


def test_mean_pool_is_segment_mean():
    torch.manual_seed(0)
    h = torch.randn(6, 4)
    batch = torch.tensor([0, 0, 1, 1, 1, 2])
    want = torch.stack([h[:2].mean(0), h[2:5].mean(0), h[5:].mean(0)])
    torch.testing.assert_close(molcpt.mean_pool(h, batch, 3), want)


def test_motif_attention_is_masked_softmax(workload):
    w = workload("molcpt")
    model = w.model
    x, ei, ea, batch, ids, mask = w.example_inputs
    assert not mask.all(), "the example batch must pad a motif slot"
    with torch.no_grad():
        graph = molcpt.mean_pool(model.gnn(x, ei, ea), batch, ids.shape[0])
        m = model.motif_norm(model.motif_enc(model.motif_embedding(ids)))
        a = model.motif_pool.attention(graph[:, None], m, mask)  # [heads*B, 1, M]
    a = a.view(model.cfg.heads, ids.shape[0], ids.shape[1])
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    assert (a[:, ~mask] == 0).all() and (a[:, mask] > 0).all()


def test_padded_motif_slots_do_not_matter(workload):
    w = workload("molcpt")
    *rest, ids, mask = w.example_inputs
    other = ids.clone()
    other[~mask] = (ids[~mask] + 5) % w.model.motif_embedding.num_embeddings
    with torch.no_grad():
        base = w.model(*rest, ids, mask)[1]
        moved = w.model(*rest, other, mask)[1]
        real = ids.clone()
        real[0, 0] = (ids[0, 0] + 1) % w.model.motif_embedding.num_embeddings
        changed = w.model(*rest, real, mask)[1]
    torch.testing.assert_close(moved, base)
    assert (changed - base).abs().max() > 1e-6


def test_code_quirk_softmax_over_query_axis_weights_all_slots_one(workload):
    w = workload("molcpt")
    mab = w.model.motif_pool
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 64), torch.randn(2, 3, 64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    quirk = molcpt.MAB(64, 4, softmax_dim=1)
    quirk.load_state_dict(mab.state_dict())
    assert (quirk.attention(q, k, mask) == 1).all()


def test_representation_is_the_normalised_prompted_graph(workload):
    w = workload("molcpt")
    x, ei, ea, batch, ids, mask = w.example_inputs
    with torch.no_grad():
        graph, logits = w.model(*w.example_inputs)
        rep = torch.nn.functional.normalize(graph + w.model.prompt(graph, ids, mask), dim=1)
        torch.testing.assert_close(logits, w.model.head(rep))
    assert graph.shape == (2, 64) and graph.abs().sum() > 0


def test_motif_table_covers_every_molecule(workload):
    table = workload("molcpt").extras["motif_table"]
    assert len(table["molecules"]) == 32 and len(table["vocab"]) > 20
    for m in table["molecules"]:
        assert m["motif_ids"] and len(m["motif_ids"]) == len(m["cliques"])
        covered = sorted({a for c in m["cliques"] for a in c})
        assert covered == list(range(len(m["atoms"])))


def test_shipped_table_matches_rdkit():
    pytest.importorskip("rdkit")
    shipped = json.loads(molcpt.MOTIF_FILE.read_text())
    fresh = molcpt.motif_table_from_rdkit()
    assert len(fresh["vocab"]) == len(shipped["vocab"])
    relabel: dict[int, int] = {}  # canonical SMILES may differ across rdkit versions
    for a, b in zip(fresh["molecules"], shipped["molecules"]):
        for key in ("name", "smiles", "atoms", "edges", "cliques"):
            assert a[key] == b[key], (a["name"], key)
        for x, y in zip(a["motif_ids"], b["motif_ids"]):
            assert relabel.setdefault(x, y) == y
    assert len(set(relabel.values())) == len(relabel)


def test_fallback_without_rdkit_builds_the_same_model(workload):
    w = workload("molcpt")
    fallback = molcpt.build(use_rdkit=False)
    for a, b in zip(fallback.example_inputs, w.example_inputs):
        assert torch.equal(a, b)
    torch.testing.assert_close(fallback.loss(), w.loss())
