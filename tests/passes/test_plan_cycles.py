"""Acyclic plans from the solver: ``find_group_cycle`` (a depth-first search over the contracted
graph) agrees with networkx on drawn groupings, ``break_cycles`` splits groups until the plan is
acyclic, and ``solve_cpsat`` answers a repaired plan once cycle cuts stop converging."""

from __future__ import annotations

import random

import networkx as nx
import pytest
import torch

from cost_model import cpu_spec
from passes.fusion.graph import build_graph, members_of
from passes.fusion.planner import Costs, break_cycles, find_group_cycle, is_acyclic, solve_cpsat
from stitch_ir.importer import import_model


class _Crossed(torch.nn.Module):
    """Two chains from one input: a -> b and c -> d (a, c read x; b, d are returned)."""

    def forward(self, x):
        a = torch.exp(x)
        c = torch.cos(x)
        return torch.sin(a), torch.tanh(c)


def _graph():
    prog = import_model(_Crossed(), (torch.randn(5, 3),))
    g = build_graph(prog.module.func())
    names = {type(g.ops[i]).__name__: i for i in g.fusible()}
    return g, names["ExpOp"], names["SinOp"], names["CosOp"], names["TanhOp"]


def _networkx_cycle(g, groups) -> bool:
    owner = {i: b for b in groups for i in members_of(b)}
    dg = nx.DiGraph()
    for u in range(g.n):
        dg.add_node(owner.get(u, -1 - u))
        for v in g.succs[u]:
            if owner.get(u, -1 - u) != owner.get(v, -1 - v):
                dg.add_edge(owner.get(u, -1 - u), owner.get(v, -1 - v))
    return not nx.is_directed_acyclic_graph(dg)


def _program():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.GELU(), torch.nn.LayerNorm(6),
                            torch.nn.Softmax(-1))
    prog = import_model(m.eval(), (torch.randn(4, 6),))
    return build_graph(prog.module.func())


@pytest.mark.parametrize("seed", range(20))
def test_find_group_cycle_agrees_with_networkx(seed):
    """Random groupings of a real graph's fusible ops: a cycle is found exactly when networkx
    finds one, and the groups it names close a cycle. Even seeds group ops drawn in any order
    (cyclic), odd ones runs of program order (intervals of a topological order: acyclic)."""
    rng = random.Random(seed)
    g = _program()
    ops = list(g.fusible())
    if seed % 2 == 0:
        rng.shuffle(ops)
    groups, k = [], 0
    while k < len(ops):
        n = rng.randint(1, 4)
        groups.append(sum(1 << i for i in ops[k:k + n]))
        k += n
    cycle = find_group_cycle(g, groups)
    assert (cycle is not None) == _networkx_cycle(g, groups) == (seed % 2 == 0)
    if cycle is not None:
        assert set(cycle) <= set(groups) and any(c.bit_count() > 1 for c in cycle)
        # splitting every group on it into single ops removes that cycle
        rest = [b for b in groups if b not in cycle] + [1 << i for c in cycle for i in members_of(c)]
        assert find_group_cycle(g, rest) != cycle


def test_break_cycles_splits_a_crossed_pair():
    """{a, d} and {b, c} with a -> b and c -> d: each group is convex, together they close a
    cycle; the repair splits one of them and keeps the other."""
    g, a, b, c, d = _graph()
    crossed = [(1 << a) | (1 << d), (1 << b) | (1 << c)]
    assert not is_acyclic(g, crossed)
    costs = Costs(g, cpu_spec(measure=False))
    fixed = break_cycles(g, costs, crossed)
    assert is_acyclic(g, fixed)
    assert sorted(i for grp in fixed for i in members_of(grp)) == sorted([a, b, c, d])
    assert sum(grp.bit_count() > 1 for grp in fixed) == 1  # one group split, one kept


@pytest.mark.parametrize("repair_after, status", [(1, "REPAIRED"), (100, "OPTIMAL")])
def test_solver_repairs_after_its_cut_budget(repair_after, status):
    """The only candidates besides single ops are the crossed pair: the solver's first answer is
    cyclic. With one cut allowed it answers the repaired plan; with more, its own acyclic one.
    Either way every op is covered once and the plan is acyclic."""
    g, a, b, c, d = _graph()
    costs = Costs(g, cpu_spec(measure=False))
    pair = [(1 << a) | (1 << d), (1 << b) | (1 << c)]
    assume = costs.total(pair) < costs.total([1 << i for i in (a, b, c, d)])
    assert assume, "fusing the pairs must look cheaper, or the solver never answers them"
    cands = set(pair) | {1 << i for i in g.fusible()}
    res = solve_cpsat(g, costs, cands, [], 5.0, workers=1, repair_after=repair_after)
    assert res.status == status and res.cuts == 1
    assert is_acyclic(g, res.groups)
    assert sorted(i for grp in res.groups for i in members_of(grp)) == sorted(g.fusible())
    assert res.objective >= res.bound
