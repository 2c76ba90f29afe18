"""Summarise a candidate group of ops as a ``KernelDesc`` for the cost model.

A group's kernel reads each external input once and writes each value used outside once
(minimum traffic); gathered tables count only the rows gathered. Its reductions give the
parallel structure (row / column / all); values that a row reduction's consumers need again
after the reduction are kept *regionally* (shared memory on a GPU, a per-thread row buffer on
a CPU), and reductions of a different parallel shape than the dominant one are stitched
*globally* (grid barrier), as AStitch describes. When the regional values do not fit the
target's shared memory, they are demoted to global memory: re-read instead of cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cost_model import DeviceSpec, KernelDesc, ReduceDesc, latency, legal
from passes.fusion.graph import PlanGraph, is_free_constant, members_of
from stitch_ir.core import Value
from stitch_ir.dialects import st

TRANSCENDENTAL = (st.ExpOp, st.Exp2Op, st.LogOp, st.Log2Op, st.Log1pOp, st.Expm1Op, st.TanhOp,
                  st.SigmoidOp, st.ErfOp, st.RsqrtOp, st.SqrtOp, st.SinOp, st.CosOp, st.TanOp,
                  st.PowOp, st.Atan2Op)
GATHERS = (st.EmbeddingOp, st.IndexSelectOp, st.GatherOp)
SCATTERS = (st.IndexAddOp, st.ScatterAddOp, st.ScatterReduceOp)


def numel(v: Value) -> int:
    return v.type.numel() if v.type.is_static else 1 << 20


def nbytes(v: Value) -> int:
    return numel(v) * v.type.dtype.itemsize


def reduce_desc(op: st.ReduceOp) -> ReduceDesc:
    shape = [int(d) if isinstance(d, int) else 1 << 10 for d in op.operand(0).type.shape]
    dims = op.dims
    length = math.prod(shape[d] for d in dims) or 1
    rows = max(1, math.prod(shape) // length)
    if rows == 1:
        return ReduceDesc("all", 1, length)
    trailing = all(shape[d] == 1 for d in range(min(dims), len(shape)) if d not in dims)
    return ReduceDesc("row" if trailing else "column", rows, length)


@dataclass(frozen=True)
class GroupInfo:
    """A costed candidate group."""

    members: tuple[int, ...]
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    desc: KernelDesc
    kind: str  # view | loop | gather | scatter | reduce | stitch
    seconds: float
    legal: bool
    reason: str
    regional: tuple[Value, ...] = ()  # values kept in shared memory / row buffers
    demoted: bool = False  # regional values demoted to global memory (did not fit)

    @property
    def is_view(self) -> bool:
        return self.kind == "view"

    @property
    def kernels(self) -> int:
        return 0 if self.is_view else 1


def describe(g: PlanGraph, member_bits: int, device: DeviceSpec) -> GroupInfo:
    members = members_of(member_bits)
    ops = [g.ops[i] for i in members]
    inside = {id(r) for op in ops for r in op.results}
    inputs: dict[int, Value] = {}
    for op in ops:
        for v in op.operands:
            if id(v) not in inside and not is_free_constant(v):
                inputs.setdefault(id(v), v)
    outputs: list[Value] = []
    member_ops = {id(op) for op in ops}
    for op in ops:
        for r in op.results:
            if any(id(u) not in member_ops for u in r.users):  # func.return counts as outside
                outputs.append(r)

    if all(isinstance(op, st.ReshapeOp) for op in ops):
        desc = KernelDesc(0, 0, 1, num_ops=len(ops))
        return GroupInfo(tuple(members), tuple(inputs.values()), tuple(outputs), desc, "view",
                         0.0, True, "")

    # Global traffic: gathered tables count the rows actually gathered.
    gathered = {}
    for op in ops:
        if isinstance(op, GATHERS):
            table = op.operand(0)
            gathered[id(table)] = min(nbytes(table), gathered.get(id(table), 0) + nbytes(op.result))
    bytes_read = sum(gathered.get(id(v), nbytes(v)) for v in inputs.values())
    bytes_written = sum(nbytes(v) for v in outputs)

    flops = trans = 0
    for op in ops:
        if op.kind in (st.ELEMENTWISE, st.REDUCE, st.SCATTER):
            n = max([numel(r) for r in op.results] + [numel(v) for v in op.operands])
            flops += n
            if isinstance(op, TRANSCENDENTAL):
                trans += n

    reduces = [op for op in ops if isinstance(op, st.ReduceOp)]
    rdescs = [reduce_desc(op) for op in reduces]
    dominant = max(rdescs, key=lambda r: r.elements) if rdescs else None
    num_global = 0
    if dominant is not None:
        num_global = sum(1 for r in rdescs if r.kind != dominant.kind)
    # A scatter whose result is consumed inside the group needs every contribution first.
    member_set = set(members)
    for i, op in zip(members, ops):
        if isinstance(op, SCATTERS) and any(j in member_set for j in g.succs[i]):
            num_global += 1

    # Regional values: consumed both before (or by) a reduction and after it.
    regional: dict[int, Value] = {}
    reduce_consumed_after = 0
    for i, op in zip(members, ops):
        if not isinstance(op, st.ReduceOp):
            continue
        after = g.desc_bits[i]
        if any(j in member_set for j in g.succs[i]):
            reduce_consumed_after += 1
        before = g.anc_bits[i] | (1 << i)
        for v in _values_used(ops):
            users = [g.index.get(id(u)) for u in v.users]
            users = [u for u in users if u is not None and u in member_set]
            if any((before >> u) & 1 for u in users) and any((after >> u) & 1 for u in users):
                regional.setdefault(id(v), v)
    row_len = dominant.length if dominant is not None and dominant.kind == "row" else 0
    big = [v for v in regional.values() if row_len and numel(v) >= row_len * (dominant.rows or 1)]
    smem_per_row = sum(row_len * v.type.dtype.itemsize for v in big)
    parallel = dominant.rows if dominant is not None else max(
        [numel(v) for v in outputs] or [1])
    elem_bytes = max([v.type.dtype.itemsize for v in outputs] or [4])

    def make(smem: int, extra_read: int, n_global: int) -> KernelDesc:
        return KernelDesc(bytes_read=bytes_read + extra_read, bytes_written=bytes_written,
                          parallel_size=max(1, parallel), flops=flops, transcendentals=trans,
                          reduce=tuple(rdescs), smem_bytes_per_row=smem,
                          num_regional=len(regional) + reduce_consumed_after,
                          num_global=n_global, num_ops=len(ops),
                          needs_grid_sync=n_global > 0, elem_bytes=elem_bytes)

    desc = make(smem_per_row, 0, num_global)
    ok, reason = legal(desc, device)
    demoted = False
    if not ok and smem_per_row and "shared memory" in reason:
        # Demote the regional values to global memory: re-read them after the reduction.
        desc = make(0, sum(nbytes(v) for v in big), num_global)
        ok, reason = legal(desc, device)
        demoted = True
    if any(isinstance(op, SCATTERS) for op in ops):
        kind = "scatter"
    elif reduces:
        kind = "stitch" if (reduce_consumed_after or len(reduces) > 1 or num_global) else "reduce"
    elif any(isinstance(op, GATHERS) for op in ops):
        kind = "gather"
    else:
        kind = "loop"
    secs = latency(desc, device) if ok else math.inf
    return GroupInfo(tuple(members), tuple(inputs.values()), tuple(outputs), desc, kind, secs,
                     ok, reason, tuple(regional.values()), demoted)


def _values_used(ops) -> list[Value]:
    seen: dict[int, Value] = {}
    for op in ops:
        for v in op.operands:
            if not is_free_constant(v):
                seen.setdefault(id(v), v)
    return list(seen.values())
