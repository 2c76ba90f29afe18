"""``FusionPlan``: the planner's decision as data — groups, costs, solver report, and the reason
every edge between memory-intensive ops was left unfused.

``make_plan`` runs one planner (``none`` | ``greedy`` | ``stitch``) over a function. The plan is
applied by a separate pass (``fusion-apply``); tests inspect it as data.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from cost_model import DeviceSpec
from passes.fusion import plan_cache
from passes.fusion.features import GroupInfo
from passes.fusion.graph import FUSIBLE, GLUE, PlanGraph, build_graph, members_of
from passes.fusion.planner import (
    Costs,
    SolveResult,
    beam_search,
    candidates,
    is_acyclic,
    plan_greedy,
    plan_none,
    reduction_broadcast_back,
    solve_cpsat,
)
from stitch_ir.core import FuncOp
from stitch_ir.dialects import st

PLANNERS = ("none", "greedy", "stitch")


@dataclass(frozen=True)
class EdgeReason:
    src: int  # node of the producer
    dst: int  # node of the consumer
    reason: str  # cycle | resource | cost | policy | library | unsupported
    detail: str


@dataclass
class FusionPlan:
    planner: str
    target: str
    graph: PlanGraph
    groups: list[GroupInfo]
    baseline: list[GroupInfo]  # the one-kernel-per-op plan, for "before" numbers
    reasons: list[EdgeReason] = field(default_factory=list)
    solver: dict = field(default_factory=dict)
    planning_seconds: float = 0.0
    cost_model: str = "analytic"  # which model costed the groups: analytic | learned
    cost_model_note: str = ""  # where the learned model came from, or why it was not used

    # -- totals ------------------------------------------------------------------------------
    @staticmethod
    def _kernels(groups: list[GroupInfo]) -> int:
        return sum(gi.kernels for gi in groups)

    @property
    def kernels(self) -> int:
        return self._kernels(self.groups)

    @property
    def kernels_before(self) -> int:
        return self._kernels(self.baseline)

    @property
    def bytes(self) -> int:
        return sum(gi.desc.traffic for gi in self.groups)

    @property
    def bytes_before(self) -> int:
        return sum(gi.desc.traffic for gi in self.baseline)

    @property
    def seconds(self) -> float:
        return sum(gi.seconds for gi in self.groups)

    @property
    def seconds_before(self) -> float:
        return sum(gi.seconds for gi in self.baseline)

    @property
    def glue(self) -> int:
        return sum(1 for r in self.graph.role if r == GLUE)

    def group_of(self) -> dict[int, int]:
        return {i: k for k, gi in enumerate(self.groups) for i in gi.members}

    # -- reporting ---------------------------------------------------------------------------
    def summary(self) -> str:
        s = self.solver
        lines = [
            f"fusion plan ({self.planner}, target {self.target})",
            f"  memory-intensive kernels  {self.kernels_before} -> {self.kernels}"
            f"   (+ {sum(1 for r in self.graph.role if r == 'library')} library steps, "
            f"{self.glue} layout ops absorbed into them)",
            f"  estimated bytes           {_mb(self.bytes_before)} -> {_mb(self.bytes)}",
            f"  estimated kernel time     {self.seconds_before * 1e6:.1f} us -> "
            f"{self.seconds * 1e6:.1f} us",
            f"  planner time              {self.planning_seconds:.2f} s",
            f"  cost model                {self.cost_model}"
            + (f" ({self.cost_model_note})" if self.cost_model_note else ""),
        ]
        if s:
            lines.append(f"  solver                    {s['status']}, gap {100 * s['gap']:.2f}%, "
                         f"{s['candidates']} candidates, {s['solver_seconds']:.2f} s")
        counts: dict[str, int] = {}
        for r in self.reasons:
            counts[r.reason] = counts.get(r.reason, 0) + 1
        if counts:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            lines.append(f"  unfused edges by reason   {shown}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        g = self.graph

        def node(i: int) -> dict:
            op = g.ops[i]
            return {"id": i, "op": op.name, "type": str(op.results[0].type) if op.results else "",
                    "role": g.role[i]}

        return {
            "planner": self.planner,
            "target": self.target,
            "kernels_before": self.kernels_before,
            "kernels_after": self.kernels,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes,
            "seconds_before": self.seconds_before,
            "seconds_after": self.seconds,
            "planning_seconds": self.planning_seconds,
            "cost_model": self.cost_model,
            "cost_model_note": self.cost_model_note,
            "solver": self.solver,
            "nodes": [node(i) for i in range(g.n)],
            "groups": [{
                "id": k, "kind": gi.kind, "members": list(gi.members),
                "bytes_read": gi.desc.bytes_read, "bytes_written": gi.desc.bytes_written,
                "estimated_us": gi.seconds * 1e6, "regional_values": len(gi.regional),
                "global_values": gi.desc.num_global, "demoted": gi.demoted,
                **({"analytic_us": gi.analytic_seconds * 1e6} if gi.analytic_seconds >= 0 else {}),
            } for k, gi in enumerate(self.groups)],
            "unfused_edges": [{"src": r.src, "dst": r.dst, "reason": r.reason,
                               "detail": r.detail} for r in self.reasons],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


CANDIDATES_PER_SECOND = 3000  # groups described per second of planning, measured here


def make_plan(func: FuncOp, planner: str, device: DeviceSpec, *, time_limit: float = 10.0,
              beam: int = 4, max_size: int = 40, max_solver_nodes: int = 6000,
              workers: int = 1, cost_model=None, cost_model_note: str = "") -> FusionPlan:
    """Plan ``func``. With the default single solver worker the plan is deterministic (CP-SAT
    with several workers may return a different one of several optimal plans per run).
    ``cost_model``: a learned model (``cost_model.learned.LearnedModel``) costing every group
    in place of the analytic estimate; None: the analytic model."""
    if planner not in PLANNERS:
        raise ValueError(f"unknown planner {planner!r} (one of {', '.join(PLANNERS)})")
    t0 = time.perf_counter()
    g = build_graph(func)
    costs = Costs(g, device, model=cost_model)
    costed_by = "analytic" if cost_model is None else f"learned:{cost_model.digest}"
    none = plan_none(g, costs)
    solver: dict = {}
    if planner == "none":
        groups = none
    elif planner == "greedy":
        groups = plan_greedy(g, costs)
    elif (hit := _cached(func, g, planner, device, time_limit, beam, max_size,
                         max_solver_nodes, costed_by))[0] is not None:
        groups, solver = hit[0], {**hit[1], "cache": "hit"}
    else:
        greedy = plan_greedy(g, costs)
        if len(g.fusible()) > max_solver_nodes:
            groups = beam_search(g, costs)
            solver = {"status": "BEAM_SEARCH", "gap": float("nan"), "candidates": 0,
                      "solver_seconds": 0.0}
        else:
            # Budgets are work, not wall time, so a plan does not depend on the machine's load
            # (and a second compile hits the kernel cache): candidate growth may describe
            # CANDIDATES_PER_SECOND x time_limit / 2 groups (about half the time on this
            # class of machine), the solver gets time_limit / 2 of CP-SAT's deterministic time.
            cands = candidates(g, costs, beam, max_size, seeds=[greedy],
                               deadline=t0 + 2 * time_limit,
                               budget=int(CANDIDATES_PER_SECOND * 0.5 * time_limit))
            res: SolveResult = solve_cpsat(g, costs, cands, greedy, 0.5 * time_limit, workers)
            if not res.groups:  # no solution within the limit: fall back
                groups = beam_search(g, costs)
            else:
                groups = res.groups
            solver = {"status": res.status if res.groups else f"{res.status} -> beam search",
                      "objective_seconds": res.objective, "bound_seconds": res.bound,
                      "gap": res.gap if res.groups else float("nan"),
                      "candidates": res.candidates, "cycle_cuts": res.cuts,
                      "solver_seconds": res.seconds}
        # Never worse than the baseline in the same cost model, and never cyclic.
        if costs.total(greedy) < costs.total(groups):
            groups = greedy
            solver["status"] = solver.get("status", "") + " (greedy plan kept: cheaper)"
        elif not is_acyclic(g, groups):
            groups = greedy
            solver["status"] = solver.get("status", "") + " (greedy plan kept: the other was cyclic)"
        plan_cache.store(hit[1], [members_of(b) for b in groups], solver)
    assert is_acyclic(g, groups), "planner produced a cyclic plan"
    groups = broadcasts_join_consumers(g, groups)
    plan = FusionPlan(planner, device.name, g, [costs(b) for b in groups],
                      [costs(b) for b in none], solver=solver,
                      cost_model="analytic" if cost_model is None else "learned",
                      cost_model_note=cost_model_note)
    plan.reasons = explain(plan, costs, planner)
    plan.planning_seconds = time.perf_counter() - t0
    return plan


def broadcasts_join_consumers(g: PlanGraph, groups: list[int]) -> list[int]:
    """Move each broadcast whose users all sit in one other group into that group.

    A broadcast is an index map (``sink-broadcasts`` gives each one a single user). Placed in
    its operand's group, it would be written out expanded and read back: GIN's scatter index,
    [E, 1] expanded to [E, 64] int64, was a 102 MB output. That cost 68 ms a call against
    12 ms. The cost model chose it under one probe of the machine's bandwidth and not under
    another, so this is a rule rather than a cost.

    Moving a node whose users are all in group B into B adds at most the edge from its
    operand's group to B. That group already reached B through the broadcast, so no cycle is
    made, and the group it leaves stays convex: none of its members read it."""
    owner: dict[int, int] = {}
    for k, b in enumerate(groups):
        for i in members_of(b):
            owner[i] = k
    moved = list(groups)
    for i in g.fusible():
        if not isinstance(g.ops[i], st.BroadcastOp) or i in g.returned or not g.succs[i]:
            continue
        targets = {owner.get(u) for u in g.succs[i]}
        if len(targets) != 1 or None in targets:
            continue
        t = targets.pop()
        if t != owner[i]:
            moved[owner[i]] &= ~(1 << i)
            moved[t] |= 1 << i
            owner[i] = t
    moved = [b for b in moved if b]
    return moved if is_acyclic(g, moved) else groups


def _cached(func, g, planner, device, time_limit, beam, max_size, max_solver_nodes,
            cost_model: str = "analytic"):
    """(groups as bitsets, solver report) from the plan cache, or (None, the cache key)."""
    from stitch_ir.printer import print_op

    k = plan_cache.key(print_op(func), {"planner": planner, "time_limit": time_limit,
                                        "beam": beam, "max_size": max_size,
                                        "max_solver_nodes": max_solver_nodes,
                                        "cost_model": cost_model}, device)
    got = plan_cache.load(k, g.n)
    if got is None:
        return None, k
    groups = [_bits(m) for m in got[0]]
    if not is_acyclic(g, groups) or sum(len(m) for m in got[0]) != len(g.fusible()):
        return None, k
    return groups, got[1]


def explain(plan: FusionPlan, costs: Costs, planner: str) -> list[EdgeReason]:
    """Why each producer -> consumer edge crossing groups was not fused."""
    g = plan.graph
    owner = plan.group_of()
    out = []
    for u in range(g.n):
        for v in g.succs[u]:
            ru, rv = g.role[u], g.role[v]
            if ru == FUSIBLE and rv == FUSIBLE:
                a, b = owner[u], owner[v]
                if a == b:
                    continue
                ga, gb = plan.groups[a], plan.groups[b]
                merged = _bits(ga.members) | _bits(gb.members)
                if planner == "none":
                    out.append(EdgeReason(u, v, "policy", "planner 'none': one kernel per op"))
                elif not g.is_convex(merged):
                    path = members_of(g.desc_bits[u] & g.anc_bits[v] & ~merged)
                    via = g.ops[path[0]].name if path else "another group"
                    out.append(EdgeReason(u, v, "cycle", f"fusing would create a cycle through "
                                          f"{via}"))
                else:
                    info = costs(merged)
                    if not info.legal:
                        out.append(EdgeReason(u, v, "resource", info.reason))
                    elif planner == "greedy" and reduction_broadcast_back(g, _bits(ga.members),
                                                                          u, v):
                        out.append(EdgeReason(u, v, "policy", "greedy never fuses a reduction "
                                              "with its broadcast-back consumers"))
                    elif info.seconds >= ga.seconds + gb.seconds:
                        out.append(EdgeReason(
                            u, v, "cost", f"fused {info.seconds * 1e6:.2f} us >= separate "
                            f"{(ga.seconds + gb.seconds) * 1e6:.2f} us"))
                    else:
                        out.append(EdgeReason(u, v, "cost", "a cheaper plan overall keeps them "
                                              "apart (selection trade-off)"))
            elif ru == FUSIBLE or rv == FUSIBLE:
                lib = g.ops[v] if rv != FUSIBLE else g.ops[u]
                if lib.name == "st.torch_call":
                    out.append(EdgeReason(u, v, "unsupported", f"{lib.attributes['target']} runs "
                                          "through torch"))
                else:
                    out.append(EdgeReason(u, v, "library", f"{lib.name} is a library call"))
    return out


def _bits(members) -> int:
    b = 0
    for i in members:
        b |= 1 << i
    return b
