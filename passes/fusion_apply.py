"""``fusion-apply``: outline every group of the plan into a ``fusion.group``.

Input: a module and ``ctx.results["plan"]`` from ``fusion-plan``. Output: each function body is
re-ordered topologically over *units* (a fused group, or a library / glue / view op left as
is: a group of reshapes only is a view and needs no kernel); each
group becomes one ``fusion.group`` whose operands are the values it reads from outside (splat
constants and iotas are cloned inside instead: recomputing them is free) and whose results are
the values used outside. The function computes the same values as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from passes.fusion.graph import FUSIBLE, is_free_constant
from passes.pass_manager import Pass, PassContext, register_pass
from stitch_ir.core import FuncOp, IRError, Module, Operation, Value
from stitch_ir.dialects import fusion, st


def _clone(op: Operation, operands: list[Value]) -> Operation:
    return type(op)(operands, [r.type for r in op.results], dict(op.attributes), loc=op.loc)


def apply_plan(f: FuncOp, plan) -> list[fusion.GroupOp]:
    g = plan.graph
    owner = plan.group_of()
    # Groups of reshapes only are views: their ops stay as they are, outside any kernel.
    unit = [("g", owner[i]) if g.role[i] == FUSIBLE and not plan.groups[owner[i]].is_view
            else ("op", i) for i in range(g.n)]
    dag = nx.DiGraph()
    first: dict[tuple, int] = {}
    for i in range(g.n):
        dag.add_node(unit[i])
        first[unit[i]] = min(first.get(unit[i], i), i)
        for j in g.succs[i]:
            if unit[i] != unit[j]:
                dag.add_edge(unit[i], unit[j])
    order = list(nx.lexicographical_topological_sort(dag, key=lambda u: first[u]))

    body = f.body
    ret = body.ops[-1]
    constants = [op for op in body.ops[:-1] if isinstance(op, st.ConstantOp | st.IotaOp)]
    new_ops: list[Operation] = list(constants)
    created = []
    for u in order:
        if u[0] == "op":
            new_ops.append(g.ops[u[1]])
            continue
        info = plan.groups[u[1]]
        members = [g.ops[i] for i in sorted(info.members)]
        group = _outline(members, info)
        if group is not None:  # None: dead code, nothing used its values
            new_ops.append(group)
            created.append(group)
    # Old member ops are gone from the new order: drop their operand uses bottom-up.
    kept = {id(op) for op in new_ops}
    for op in reversed(body.ops[:-1]):
        if id(op) not in kept:
            op.drop_operand_uses()
            op.parent = None
    body.ops = []
    for op in new_ops + [ret]:
        body.append(op)
    for op in constants:  # constants now only used inside groups
        if all(not r.uses for r in op.results):
            body.ops.remove(op)
            op.drop_operand_uses()
    return created


def _outline(members: list[Operation], info) -> fusion.GroupOp | None:
    member_ids = {id(op) for op in members}
    inside: set[int] = {id(r) for op in members for r in op.results}
    inputs: dict[int, Value] = {}
    for op in members:
        for v in op.operands:
            if id(v) not in inside and not is_free_constant(v):
                inputs.setdefault(id(v), v)
    outputs = [r for op in members for r in op.results
               if any(id(user) not in member_ids for user in r.users)]
    if not outputs:
        return None
    group = fusion.GroupOp.create(list(inputs.values()), [v.type for v in outputs], info.kind,
                                  estimated_us=round(info.seconds * 1e6, 3),
                                  bytes_read=info.desc.bytes_read,
                                  bytes_written=info.desc.bytes_written)
    gbody = group.body
    mapping: dict[int, Value] = {vid: a for vid, a in zip(inputs, gbody.args)}
    for op in members:
        operands = []
        for v in op.operands:
            if id(v) not in mapping:  # a free constant: recompute it inside the group
                c = _clone(v.owner, [])
                gbody.append(c)
                mapping[id(v)] = c.results[0]
            operands.append(mapping[id(v)])
        clone = _clone(op, operands)
        gbody.append(clone)
        for r, cr in zip(op.results, clone.results):
            mapping[id(r)] = cr
    gbody.append(fusion.YieldOp([mapping[id(v)] for v in outputs]))
    for v, r in zip(outputs, group.results):
        v.replace_all_uses_with(r)
    return group


@register_pass
@dataclass(frozen=True)
class FusionApplyPass(Pass):
    name = "fusion-apply"

    def run(self, module: Module, ctx: PassContext) -> None:
        plans = ctx.results.get("plan")
        if not plans:
            raise IRError("fusion-apply needs a plan: run fusion-plan earlier in the pipeline")
        groups = ctx.results.setdefault("groups", {})
        for f in module.funcs:
            plan = plans.get(f.sym_name)
            if plan is None:
                raise IRError(f"fusion-apply: no plan for @{f.sym_name}")
            groups[f.sym_name] = apply_plan(f, plan)
