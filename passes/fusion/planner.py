"""Fusion planners: ``none``, ``greedy`` (XLA / Inductor style) and ``stitch`` (candidates +
CP-SAT set partitioning, beam search as the fallback), all over one ``PlanGraph`` and one cost
model, so their plans compare honestly.

Every planner returns a partition of the graph's fusible nodes into groups (bitsets) such that
each group is convex and legal for the target, and the groups, contracted, form a DAG with the
library steps.

stitch's selection problem (DESIGN.md "Fusion planning"): choose candidates covering every
fusible node exactly once, minimising the summed estimated kernel time, with no cycle between
chosen groups. Acyclicity: every node gets an integer position; nodes joined by an edge inside
one chosen group share it, and every edge between groups strictly increases it. Groups are
connected (or packed with explicit equalities), so equal positions spread through each group and
a cycle of groups would need a position smaller than itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from cost_model import DeviceSpec
from passes.fusion.features import GroupInfo, describe, learned_estimate
from passes.fusion.graph import FUSIBLE, PlanGraph, members_of
from stitch_ir.dialects import st

SECONDS_TO_UNITS = 1e9  # the solver's integer cost unit: nanoseconds
# Cycle cuts after which the solver's cheapest repaired answer is taken. No plan of the nine
# workloads needs a cut under the analytic model; rffs_net's learned one churned through 36,
# and its repair after 1 to 6 cuts was the same plan, 0.1% above the solver's bound.
REPAIR_AFTER_CUTS = 2


@dataclass
class Costs:
    """Describes and costs groups, memoised by their bitset."""

    g: PlanGraph
    device: DeviceSpec
    cache: dict[int, GroupInfo] = field(default_factory=dict)
    calls: int = 0
    model: object = None  # a learned cost model (cost_model.learned) replacing the estimate

    def __call__(self, members: int) -> GroupInfo:
        info = self.cache.get(members)
        if info is None:
            self.calls += 1
            info = describe(self.g, members, self.device)
            if self.model is not None:
                info = learned_estimate(self.g, info, self.device, self.model)
            self.cache[members] = info
        return info

    def total(self, groups: list[int]) -> float:
        return sum(self(b).seconds for b in groups)


def _fusible_neighbours(g: PlanGraph, members: int) -> set[int]:
    out = set()
    for i in members_of(members):
        for j in g.neighbours(i):
            if g.role[j] == FUSIBLE and not (members >> j) & 1:
                out.add(j)
    return out


# ----------------------------------------------------------------------------------------------
# Baselines


def plan_none(g: PlanGraph, costs: Costs) -> list[int]:
    """One kernel per op."""
    return [1 << i for i in g.fusible()]


def reduction_broadcast_back(g: PlanGraph, group: int, u: int, v: int) -> bool:
    """XLA's rule: a reduction is the root of its fusion; nothing that re-expands its result
    (a broadcast back to the input's shape) joins it."""
    reduces = [i for i in members_of(group) if isinstance(g.ops[i], st.ReduceOp)]
    if not reduces:
        return False
    depends = any(i == u or (g.desc_bits[i] >> u) & 1 for i in reduces)
    if not depends:
        return False
    uop, vop = g.ops[u], g.ops[v]
    grows = max(r.type.numel() for r in vop.results) > max(r.type.numel() for r in uop.results)
    return isinstance(vop, st.BroadcastOp) or grows


def plan_greedy(g: PlanGraph, costs: Costs) -> list[int]:
    """Pairwise producer -> consumer fusion in program order, whenever the merged group stays
    convex and legal, never across a reduction whose result is broadcast back. Two groups can
    each be convex and still close a cycle together (one reads the other directly, the other
    reads the first through a library call): such a plan is repaired (``break_cycles``)."""
    group_of = {i: 1 << i for i in g.fusible()}
    for v in g.fusible():
        for u in g.preds[v]:
            if g.role[u] != FUSIBLE:
                continue
            a, b = group_of[u], group_of[v]
            if a == b or reduction_broadcast_back(g, a, u, v):
                continue
            merged = a | b
            if not g.is_convex(merged) or not costs(merged).legal:
                continue
            for i in members_of(merged):
                group_of[i] = merged
    return sorted(break_cycles(g, costs, sorted(set(group_of.values()))))


# ----------------------------------------------------------------------------------------------
# stitch: candidates


def candidates(g: PlanGraph, costs: Costs, beam: int, max_size: int,
               seeds: list[list[int]] = (), deadline: float = math.inf,
               budget: int | None = None) -> set[int]:
    """Connected, convex, legal groups grown from every fusible op, keeping the ``beam`` most
    beneficial of each size per seed (benefit = summed singleton time - fused time).

    A growing group carries its fusible-neighbour, descendant and ancestor bitsets, so adding
    one op and testing convexity are a few big-integer operations. A group already expanded
    from another seed is not expanded again. Growth stops after ``budget`` groups have been
    described (work, not time: the same candidates on a loaded machine), or at ``deadline``
    (perf_counter), a guard for machines far slower than expected.

    Each seed may describe a fair share of the budget left (what it leaves unused passes on):
    spent first come, first served, the budget ran out a quarter of the way through the 686
    seeds of charformer's channels-last graph, and its last attention softmax -- whose seeds
    were never grown -- ran as three kernels (0.79 ms against 0.41 fused). With the shares, the
    estimated plan costs of the five largest workload graphs are within 0.1% of unbudgeted
    growth (which takes 2 s to over 20 s), in 40% less planning time than before."""
    fusible = 0
    for i in g.fusible():
        fusible |= 1 << i
    nbr = [0] * g.n
    for i in g.fusible():
        for j in g.neighbours(i) + g.siblings[i]:
            nbr[i] |= 1 << j
        nbr[i] &= fusible
    single = {i: costs(1 << i).seconds for i in g.fusible()}
    out: set[int] = {1 << i for i in g.fusible()}
    for plan in seeds:
        out.update(b for b in plan if costs(b).legal)
    expanded: set[int] = set()
    stop = math.inf if budget is None else costs.calls + budget
    seeds = list(g.fusible())
    for left, seed in zip(range(len(seeds), 0, -1), seeds):
        if time.perf_counter() > deadline or costs.calls > stop:
            break
        seed_stop = costs.calls + (stop - costs.calls) / left  # a fair share of what is left
        frontier = [(1 << seed, nbr[seed], g.desc_bits[seed], g.anc_bits[seed])]
        for _ in range(max_size - 1):
            if costs.calls > seed_stop:
                break
            scored: dict[int, tuple[float, tuple]] = {}
            for grp, nb_bits, d, a in frontier:
                if grp in expanded:
                    continue
                expanded.add(grp)
                todo = nb_bits & ~grp
                while todo:
                    low = todo & -todo
                    todo ^= low
                    j = low.bit_length() - 1
                    h = grp | low
                    hd, ha, hn = d | g.desc_bits[j], a | g.anc_bits[j], nb_bits | nbr[j]
                    if hd & ha & ~h:  # not convex: take the closure if it stays fusible
                        h = h | (hd & ha)
                        if h & ~fusible:
                            continue
                        hd, ha, hn = d, a, nb_bits
                        for k in members_of(h & ~grp):
                            hd |= g.desc_bits[k]
                            ha |= g.anc_bits[k]
                            hn |= nbr[k]
                    if h in scored or h.bit_count() > max_size:
                        continue
                    info = costs(h)
                    if not info.legal:
                        continue
                    benefit = sum(single[i] for i in info.members) - info.seconds
                    scored[h] = (benefit, (h, hn, hd, ha))
            if not scored:
                break
            best = sorted(scored, key=lambda h: (-scored[h][0], h))[:beam]
            frontier = [scored[h][1] for h in best]
            out.update(best)
    return out


# ----------------------------------------------------------------------------------------------
# stitch: selection


@dataclass
class SolveResult:
    groups: list[int]
    status: str
    objective: float  # seconds
    bound: float  # seconds
    seconds: float  # solver wall time
    candidates: int
    cuts: int = 0  # cycle cuts added

    @property
    def gap(self) -> float:
        if self.objective <= 0:
            return 0.0
        return max(0.0, (self.objective - self.bound) / self.objective)


def solve_cpsat(g: PlanGraph, costs: Costs, cands: set[int], hint: list[int],
                time_limit: float, workers: int = 2, max_rounds: int = 100,
                repair_after: int = REPAIR_AFTER_CUTS) -> SolveResult:
    """Exact cover by candidates at minimum cost, with acyclicity added lazily: solve, look
    for a cycle among the chosen groups, forbid that combination, solve again. Convex groups
    make cycles rare, so this beats carrying a position variable per node (whose weak LP
    bound left a large gap).

    Where they are not rare, each cut forbids one combination and the solver answers with a
    near twin closing the same cycle (rffs_net under the learned model: 36 cuts, 17 s of
    solving, then out of time and down to beam search). Each cyclic answer is also repaired
    (``break_cycles``); after ``repair_after`` cuts without an acyclic answer the cheapest
    repair is the result (status ``REPAIRED``)."""
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    det_left = time_limit  # CP-SAT's deterministic time: the same plan however loaded the machine
    cand = sorted(c for c in cands if costs(c).legal)
    index = {c: k for k, c in enumerate(cand)}
    m = cp_model.CpModel()
    x = [m.NewBoolVar(f"g{k}") for k in range(len(cand))]
    covering: dict[int, list[int]] = {i: [] for i in g.fusible()}
    for k, c in enumerate(cand):
        for i in members_of(c):
            covering[i].append(k)
    for ks in covering.values():
        m.AddExactlyOne(x[k] for k in ks)
    units = [int(round(costs(c).seconds * SECONDS_TO_UNITS)) for c in cand]
    m.Minimize(sum(u * xk for u, xk in zip(units, x)))
    best_hint = [c for c in hint if c in index]
    status, groups, objective, bound = "UNKNOWN", [], math.inf, 0.0
    cuts = 0
    repaired: tuple[float, list[int]] = (math.inf, [])
    for _ in range(max_rounds):
        # a wall-clock guard far above the budget, for machines much slower than the reference
        left = 4 * time_limit - (time.perf_counter() - t0)
        if det_left <= 0.01 or left <= 0.05:
            status = status if groups else "UNKNOWN"
            break
        m.ClearHints()
        chosen = set(best_hint)
        for k, c in enumerate(cand):
            m.AddHint(x[k], c in chosen)
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = left
        solver.parameters.max_deterministic_time = det_left
        solver.parameters.num_workers = workers
        solver.parameters.random_seed = 0
        code = solver.Solve(m)
        det_left -= solver.ResponseProto().deterministic_time
        if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            status = solver.StatusName(code)
            groups = []
            break
        picked = [c for k, c in enumerate(cand) if solver.Value(x[k])]
        cycle = find_group_cycle(g, picked)
        bound = solver.BestObjectiveBound() / SECONDS_TO_UNITS
        if cycle is None:
            status = solver.StatusName(code)
            groups, objective = picked, solver.ObjectiveValue() / SECONDS_TO_UNITS
            break
        fixed = break_cycles(g, costs, picked)
        repaired = min(repaired, (costs.total(fixed), fixed))
        m.Add(sum(x[index[c]] for c in cycle) <= len(cycle) - 1)
        cuts += 1
        if cuts >= repair_after:
            status, (objective, groups) = "REPAIRED", repaired
            break
    res = SolveResult(groups, status, objective, bound, time.perf_counter() - t0, len(cand))
    res.cuts = cuts
    return res


def break_cycles(g: PlanGraph, costs: Costs, groups: list[int]) -> list[int]:
    """``groups`` made acyclic: while their contraction has a cycle, the group on it whose
    split into single ops costs least is split."""
    groups = list(groups)
    while (cycle := find_group_cycle(g, groups)) is not None:
        multi = [c for c in cycle if c.bit_count() > 1]
        worst = min(multi, key=lambda c: (sum(costs(1 << i).seconds for i in members_of(c))
                                          - costs(c).seconds, c))
        groups.remove(worst)
        groups += [1 << i for i in members_of(worst)]
    return groups


def find_group_cycle(g: PlanGraph, groups: list[int]) -> list[int] | None:
    """A cycle among ``groups`` once contracted (as the list of groups on it), or None.

    An iterative depth-first search over the contracted graph (an op outside every group is its
    own node): a few milliseconds for rffs_net's 1,000 ops, where building a networkx graph per
    call took 30 (``break_cycles`` asks once per split)."""
    owner = list(range(-1, -g.n - 1, -1))  # op u alone: -1 - u
    for b in groups:
        for i in members_of(b):
            owner[i] = b
    succ: dict[int, set[int]] = {}
    for u in range(g.n):
        a = owner[u]
        out = succ.setdefault(a, set())
        for v in g.succs[u]:
            if owner[v] != a:
                out.add(owner[v])
    state: dict[int, int] = {}  # 1: on the stack, 2: done
    for root in succ:
        if root in state:
            continue
        path, its = [root], [iter(succ[root])]
        state[root] = 1
        while path:
            nxt = next(its[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                its.pop()
            elif state.get(nxt) == 1:  # a back edge: the cycle is the stack from nxt on
                cyc = path[path.index(nxt):]
                return sorted(n for n in cyc if n >= 0)
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                its.append(iter(succ.get(nxt, ())))
    return None


def beam_search(g: PlanGraph, costs: Costs, width: int = 8) -> list[int]:
    """Fallback for graphs too large for the solver's time limit: visit fusible ops in
    program order; each op starts a group or joins a producer's group (when convex and legal);
    keep the ``width`` cheapest partial plans. Each group is convex, but two groups together
    can still close a cycle (a -> B -> c -> A): the cheapest final plan whose contraction is
    acyclic wins, and with none the ops stay unfused (the caller compares with greedy)."""
    states: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
    for v in g.fusible():
        nxt: dict[tuple[int, ...], float] = {}
        single = costs(1 << v).seconds
        for cost, groups in states:
            options = [(cost + single, groups + (1 << v,))]
            for k, grp in enumerate(groups):
                if any((grp >> u) & 1 for u in g.neighbours(v)):
                    merged = grp | (1 << v)
                    if g.is_convex(merged) and costs(merged).legal:
                        delta = costs(merged).seconds - costs(grp).seconds
                        options.append((cost + delta, groups[:k] + (merged,) + groups[k + 1:]))
            for c, opt in options:
                key = tuple(sorted(opt))
                nxt.setdefault(key, c)
        states = sorted(((c, k) for k, c in nxt.items()), key=lambda s: (s[0], s[1]))[:width]
    for _, groups in states:
        if is_acyclic(g, list(groups)):
            return list(groups)
    return [1 << v for v in g.fusible()]


def is_acyclic(g: PlanGraph, groups: list[int]) -> bool:
    """Whether the groups, contracted, leave the graph acyclic."""
    return find_group_cycle(g, groups) is None
