"""The analytic cost of a group counts the recomputation its kernel does: a value computed
inside a reduction's loop nest and read there under an outer broadcast or a gather is
computed once per read (``passes.fusion.features._recompute``). AdderNet's quantised im2col
([4, K, N], one quantiser per group, gathered to 16 output channels inside the L1-distance
sum) was costed as computed once, fused into the sum, and ran 16 times: 0.2 s of a 0.22 s
inference; costed right, the planner materialises it (adder_quant 197 -> 21 ms)."""

from __future__ import annotations

import torch

from cost_model import cpu_spec
from passes import PassContext, PassManager, parse_pipeline
from passes.fusion.features import describe
from passes.fusion.graph import build_graph, members_of
from runtime.graph import compile_program
from stitch_ir.dialects import st
from stitch_ir.importer import import_model


class _AdderQuant(torch.nn.Module):
    """-sum_k |w[o, k] - quant(x)[group(o), k, n]|: a quantiser per group of output channels."""

    def __init__(self, groups: int = 4, out: int = 16, k: int = 18):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(out, k))
        self.scale = torch.nn.Parameter(torch.rand(groups) + 0.5)
        self.register_buffer("group", torch.arange(out) % groups)

    def forward(self, x, cols=None):  # x: [1, k, n]; cols: im2col indices into x
        if cols is not None:
            x = x.reshape(-1).index_select(0, cols).reshape(x.shape)
        q = torch.clamp(torch.round(x * 15 / self.scale[:, None, None]), 0, 15) \
            * self.scale[:, None, None] / 15  # [groups, k, n]
        return -(self.w[:, :, None] - q.index_select(0, self.group)).abs().sum(1)


def _graph(n: int = 64):
    x = torch.randn(1, 18, n)
    prog = import_model(_AdderQuant().eval(), (x,))
    PassManager(parse_pipeline("canonicalize,cse,dce")).run(prog.module, PassContext())
    return build_graph(prog.module.func()), x, prog


def test_a_gathered_value_inside_a_reduction_is_costed_per_read():
    g, _, _ = _graph()
    nodes = g.fusible()
    (gather,) = [i for i in nodes if isinstance(g.ops[i], st.IndexSelectOp)]
    (red,) = [i for i in nodes if isinstance(g.ops[i], st.SumOp)]
    # the quantiser chain: element-wise nodes feeding the gather
    chain = [i for i in nodes if (g.anc_bits[gather] >> i) & 1 and
             g.ops[i].kind == st.ELEMENTWISE and g.ops[i].result.type.numel() == 4 * 18 * 64]
    assert chain
    bits_all = sum(1 << i for i in nodes if (g.anc_bits[red] >> i) & 1 or i == red)
    spec = cpu_spec(measure=False)
    fused = describe(g, bits_all, spec).desc.flops
    alone = describe(g, sum(1 << i for i in chain), spec).desc.flops
    rest = sum(describe(g, 1 << i, spec).desc.flops for i in members_of(bits_all)
               if i not in chain)
    # inside the sum's nest the chain runs once per output channel (16), not once per group
    # (4): four times its own cost, plus what the gather, the subtraction and the sum do
    assert fused >= 4 * alone + rest, (fused, alone, rest)


def test_a_row_statistic_broadcast_along_its_row_is_costed_once():
    """An [R, 1] statistic broadcast along its row is computed once per row (hoisted out of
    the row's loop): no recompute counted for it, the layer norm costs what it did."""
    class LN(torch.nn.Module):
        def forward(self, x):
            m = x.mean(-1, keepdim=True)
            v = ((x - m) ** 2).mean(-1, keepdim=True)
            return ((x - m) * torch.rsqrt(v + 1e-5)).sum(-1)

    prog = import_model(LN(), (torch.randn(33, 70),))
    PassManager(parse_pipeline("canonicalize,cse,dce")).run(prog.module, PassContext())
    g = build_graph(prog.module.func())
    nodes = g.fusible()
    spec = cpu_spec(measure=False)
    total = describe(g, sum(1 << i for i in nodes), spec).desc.flops
    assert total <= sum(describe(g, 1 << i, spec).desc.flops for i in nodes)


def test_an_adder_layer_with_its_quantiser_matches_eager():
    """At AdderNet's sizes (144 taps, 2048 positions, an im2col gather) the plan the recompute
    cost chooses computes eager's values. (Whether the quantiser leaves the sum's kernel
    depends on sizes: in the adder_quant workload it does, 197 -> 21 ms an inference; in this
    one-layer graph the planner still fuses it.)"""
    torch.manual_seed(0)
    x = torch.randn(1, 144, 2047)
    cols = torch.randint(0, x.numel(), (x.numel(),))
    model = _AdderQuant(k=144).eval()
    prog = import_model(model, (x, cols))
    cg = compile_program(prog, device_spec=cpu_spec(measure=False))
    assert not cg.fallbacks
    with torch.no_grad():
        want = model(x, cols)
    torch.testing.assert_close(cg(x, cols)[0], want, atol=1e-4, rtol=1e-5)


def test_a_gather_under_an_outer_broadcast_in_a_loop_kernel_is_costed_per_read():
    """No reduction needed: a loop kernel computes a value it does not materialise once per
    read too. adder_quant's im2col gather fused below its four per-group quantisers ran four
    times (1.3-4.9 ms a kernel); costed once, it was chosen wherever the probe had measured a
    slow memory, and that plan ran twice as slow."""
    class Quant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.rand(4) + 0.5)

        def forward(self, x, cols):  # x: [2, 3, 6, 7]; cols: indices into the padded map
            flat = torch.nn.functional.pad(x, (1, 1, 1, 1)).reshape(2, -1)
            q = flat.index_select(1, cols).reshape(1, 2, -1)
            return torch.round(q * 15 / self.scale[:, None, None])  # [4, 2, n]

    x, cols = torch.randn(2, 3, 6, 7), torch.randint(0, 3 * 8 * 9, (90,))
    prog = import_model(Quant().eval(), (x, cols))
    PassManager(parse_pipeline("canonicalize,cse,dce")).run(prog.module, PassContext())
    g = build_graph(prog.module.func())
    nodes = g.fusible()
    (gather,) = [i for i in nodes if isinstance(g.ops[i], st.IndexSelectOp)]
    spec = cpu_spec(measure=False)
    alone = describe(g, 1 << gather, spec).desc.flops
    fused = describe(g, sum(1 << i for i in nodes), spec).desc.flops
    rest = sum(describe(g, 1 << i, spec).desc.flops for i in nodes if i != gather)
    assert fused >= 4 * alone + rest, (fused, alone, rest)


def test_an_element_gather_costs_more_than_a_row_gather():
    """Gathering element by element (an index per element: an im2col column, torch.gather) costs
    per element what a vector gather does; gathering rows (an embedding's, index_select of
    rows longer than a vector) copies contiguous runs."""
    from passes.fusion import features

    table = torch.randn(50, 64)
    idx = torch.randint(0, 50, (30,))

    class Rows(torch.nn.Module):
        def forward(self, t, i):
            return t.index_select(0, i), torch.nn.functional.embedding(i, t), \
                t.reshape(-1).index_select(0, i), torch.gather(t, 1, i[:, None].expand(30, 64))

    prog = import_model(Rows().eval(), (table, idx))
    g = build_graph(prog.module.func())
    per = {}
    for i in g.fusible():
        op = g.ops[i]
        if isinstance(op, features.GATHERS):
            per[type(op).__name__ + str(op.result.type.rank)] = \
                features._facts(g)[i].flops / op.result.type.numel()
    assert per == {"IndexSelectOp2": features.GATHER_FLOPS, "EmbeddingOp2": features.GATHER_FLOPS,
                   "IndexSelectOp1": features.ELEMENT_GATHER_FLOPS,
                   "GatherOp2": features.ELEMENT_GATHER_FLOPS}, per
