"""A plan never writes out an expanded broadcast for another kernel to read back: a broadcast
whose users all sit in one other group moves into that group (``broadcasts_join_consumers``),
whatever the cost model chose."""

from __future__ import annotations

import torch

from passes import PassContext, PassManager, parse_pipeline
from passes.fusion.graph import build_graph, members_of
from passes.fusion.plan import broadcasts_join_consumers
from passes.fusion.planner import is_acyclic
from stitch_ir.dialects import st
from stitch_ir.importer import import_model


class _Scatter(torch.nn.Module):
    """A GIN aggregation: rows gathered along edges, summed into their targets through an
    index expanded over the feature dim (PyG's ``index.view(-1, 1).expand_as(src)``)."""

    def forward(self, x, edges):
        src = torch.relu(x).index_select(0, edges[0])
        index = edges[1].view(-1, 1).expand_as(src)
        return torch.zeros_like(x).scatter_add(0, index, src) + x


def test_a_broadcast_placed_with_its_operand_moves_to_its_consumer():
    x, edges = torch.randn(7, 5), torch.randint(0, 7, (2, 19))
    prog = import_model(_Scatter(), (x, edges))
    PassManager(parse_pipeline("canonicalize,cse,dce,sink-broadcasts")).run(prog.module,
                                                                             PassContext())
    g = build_graph(prog.module.func())
    fusible = g.fusible()
    (b,) = [i for i in fusible if isinstance(g.ops[i], st.BroadcastOp)]
    (user,) = g.succs[b]
    # a plan that puts every node in its own group, except the broadcast with its operand's
    # producer (what the cost model once chose): the expanded index is a group output
    producer = next((p for p in g.preds[b] if p in fusible), None)
    groups = [1 << i for i in fusible if i not in (b, producer)]
    groups.append((1 << b) | ((1 << producer) if producer is not None else 0))
    assert is_acyclic(g, groups)
    fixed = broadcasts_join_consumers(g, groups)
    assert is_acyclic(g, fixed)
    (home,) = [m for m in fixed if m >> b & 1]
    assert home >> user & 1, "the broadcast sits with its scatter"
    assert sorted(i for m in fixed for i in members_of(m)) == sorted(fusible)


def test_no_kernel_writes_an_expanded_broadcast():
    """End to end (odd sizes): no kernel's output is a broadcast, and the result is eager's."""
    from cost_model import cpu_spec
    from runtime.graph import compile_program

    x, edges = torch.randn(9, 13), torch.randint(0, 9, (2, 31))
    g = compile_program(import_model(_Scatter(), (x, edges)),
                        device_spec=cpu_spec(measure=False))
    for op in g.func.body.ops:
        if op.name == "fusion.group":
            outs = op.body.terminator.operands
            assert not any(isinstance(v.owner, st.BroadcastOp) for v in outs), str(op)
    torch.testing.assert_close(g(x, edges)[0], _Scatter()(x, edges))
