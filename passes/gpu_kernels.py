"""GPU kernels of a ``fusion.group``: where a group is cut at grid barriers, and each part's schedule.

A GPU kernel cannot wait for all of its blocks (without a cooperative launch), so a group whose
values depend on each other "globally" (a reduction of another parallel shape than the dominant
one, a scatter read back, a column reduction after a row one) runs as several kernels in order,
the kernel boundary being the grid barrier. This module decides the cut; ``stitch-schedule``
records it on the group and the Triton code generator follows it (it never re-decides).

Input: a group body. Output (``gpu_kernels``): per kernel, the values it materialises (as
``kernel_values``: body-op index, or ``-1 - i`` for block argument ``i`` yielded unchanged),
and its schedule (``kernel_mappings``, ``kernel_threads``, ``kernel_blocks``,
``kernel_rows_per_block``, ``kernel_split``, ``kernel_why``, ``kernel_smem``, ``kernel_regs``),
from the cost model on that kernel's own ops.

Invariants:
- every yielded value, every scatter and every reduction is materialised by exactly one
  kernel (a reduction only in registers unless another kernel reads it); everything else is
  recomputed (inlined) where used; only reductions and scatters order kernels;
- kernels are listed in execution order: each reads only values of earlier kernels, or values
  of its own kernel when it is a reduction kernel (in-kernel stitching: registers / shared
  memory across the levels of a row);
- one reduction kernel holds reductions of one parallel shape: the same kept (non-1) sizes and
  the same reduced extent, so one thread mapping serves all of them.
"""

from __future__ import annotations

import math

from cost_model import schedule
from passes.fusion.features import SCATTERS, describe, reduce_desc
from passes.fusion.graph import bits, build_graph
from stitch_ir.core import BlockArgument, OpResult, Value
from stitch_ir.dialects import fusion, st


def _nz(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if d != 1)


def reduce_class(op: st.ReduceOp) -> tuple:
    """(kept non-1 sizes, reduced extent, layout) of a reduction: its parallel shape."""
    shape = [int(d) for d in op.operand(0).type.shape]
    kept = _nz(s for d, s in enumerate(shape) if d not in op.dims)
    k = math.prod(shape[d] for d in op.dims)
    layout = "row" if reduce_desc(op).kind != "column" else "column"
    return ("reduce", kept, k, layout)


def _numel(v: Value) -> int:
    return math.prod(int(d) for d in v.type.shape)


def _moves(op, k: int) -> bool:
    """Whether ``op`` reads its operand ``k`` at other positions than its result's own."""
    if isinstance(op, st.PermuteOp):
        shape = op.operand(0).type.shape
        kept = [p for p in op.attributes["perm"] if shape[p] != 1]
        return kept != sorted(kept)
    if isinstance(op, st.SliceOp | st.PadOp | st.CatOp):
        return True
    if isinstance(op, st.EmbeddingOp | st.IndexSelectOp | st.GatherOp):
        return k == 0  # the table; the index is read in place
    return False


class _Kernel:
    def __init__(self, cls: tuple):
        self.cls = cls
        self.values: list[Value] = []

    @property
    def is_reduce(self) -> bool:
        return self.cls[0] == "reduce"


def split_group(group: fusion.GroupOp) -> list[_Kernel]:
    """The group's kernels in execution order (see the module docstring)."""
    body = group.body.ops[:-1]
    outputs = list(dict.fromkeys(group.body.terminator.operands))
    out_ids = {id(v) for v in outputs}
    materialised: list[Value] = []
    for op in body:
        for r in op.results:
            if id(r) in out_ids or isinstance(op, (st.ReduceOp, *SCATTERS)):
                materialised.append(r)
    materialised += [v for v in outputs if isinstance(v, BlockArgument)]
    # Only reductions and scatters are barriers: an element-wise output is recomputed by any
    # kernel that needs it, so it never orders kernels.
    m_ids = {id(v) for v in materialised if isinstance(v, OpResult)
             and isinstance(v.owner, (st.ReduceOp, *SCATTERS))}

    def deps(v: Value) -> dict[int, bool]:
        """Barrier values ``v`` reads through inlined ops -> whether some path reads it at
        another position than ``v``'s own (through a permute, slice, pad, cat or gather): such
        a value comes from memory, so it must be computed by an earlier kernel."""
        out: dict[int, bool] = {}
        seen: set[tuple[int, bool]] = set()
        stack = [(o, _moves(v.owner, k)) for k, o in enumerate(v.owner.operands)] \
            if isinstance(v, OpResult) else []
        while stack:
            u, moved = stack.pop()
            if (id(u), moved) in seen:
                continue
            seen.add((id(u), moved))
            if id(u) in m_ids:
                out[id(u)] = out.get(id(u), False) or moved
            elif isinstance(u, OpResult):
                stack.extend((o, moved or _moves(u.owner, k)) for k, o in enumerate(u.owner.operands))
        return out

    kernels: list[_Kernel] = []
    where: dict[int, int] = {}

    def place(v: Value, cls: tuple, fits) -> None:
        d = deps(v)
        for k, kern in enumerate(kernels):
            if not fits(kern):
                continue
            if all(where[x] < k or (where[x] == k and kern.is_reduce and not moved)
                   for x, moved in d.items()):
                kern.values.append(v)
                where[id(v)] = k
                return
        kernels.append(_Kernel(cls))
        kernels[-1].values.append(v)
        where[id(v)] = len(kernels) - 1

    # barriers first (in program order), then the element-wise outputs join a kernel they fit
    materialised.sort(key=lambda v: id(v) not in m_ids)
    for v in materialised:
        op = v.owner if isinstance(v, OpResult) else None
        if isinstance(op, st.ReduceOp):
            cls = reduce_class(op)
            place(v, cls, lambda kern, cls=cls: kern.cls == cls)
        elif isinstance(op, SCATTERS):
            place(v, ("scatter", id(v)), lambda kern: False)
        else:
            n = _numel(v)

            def fits(kern, n=n):
                if kern.is_reduce:
                    _, kept, k, _ = kern.cls
                    return n in (math.prod(kept) * k, math.prod(kept))
                return kern.cls == ("elem", n)

            place(v, ("elem", n), fits)
    return kernels


def _cone(group: fusion.GroupOp, kern: _Kernel, elsewhere: set[int]) -> list[int]:
    """Body-op indices a kernel evaluates: its values' producers, up to values other kernels
    materialise (those it reads from memory)."""
    index = {id(op): k for k, op in enumerate(group.body.ops[:-1])}
    found: set[int] = set()
    stack = [v for v in kern.values if isinstance(v, OpResult)]
    while stack:
        v = stack.pop()
        k = index[id(v.owner)]
        if k in found:
            continue
        found.add(k)
        for o in v.owner.operands:
            if isinstance(o, OpResult) and id(o) not in elsewhere:
                stack.append(o)
    return sorted(found)


def gpu_kernels(group: fusion.GroupOp, device) -> dict:
    """The ``kernel_*`` attributes of ``group`` on a GPU ``device`` (see the module docstring);
    a group that is one kernel gets the group's own schedule (same ops, same model)."""
    kernels = split_group(group)
    body = group.body.ops[:-1]
    index = {id(op): k for k, op in enumerate(body)}
    args = {id(a): k for k, a in enumerate(group.body.args)}

    def ref(v: Value) -> int:
        return index[id(v.owner)] if isinstance(v, OpResult) else -1 - args[id(v)]

    attrs: dict[str, list] = {k: [] for k in ("kernel_values", "kernel_mappings", "kernel_threads",
                                              "kernel_blocks", "kernel_rows_per_block",
                                              "kernel_split", "kernel_why", "kernel_smem",
                                              "kernel_regs")}
    g = build_graph(group.body)
    for kern in kernels:
        mine = {id(v) for v in kern.values}
        elsewhere = {id(v) for other in kernels if other is not kern for v in other.values
                     if id(v) not in mine}
        nodes = [g.index[id(body[k])] for k in _cone(group, kern, elsewhere)
                 if id(body[k]) in g.index]
        if nodes:
            sched = schedule(describe(g, bits(nodes), device).desc, device)
            mapping, threads, blocks = sched.mapping, sched.threads_per_block, sched.blocks
            rpb, split, why = sched.rows_per_block, sched.split, sched.why
            smem, regs = sched.smem_per_block, sched.regs_per_thread
        else:  # a yielded argument or constant: a copy
            mapping, threads, blocks, rpb, split = "elementwise", 128, 1, 1, 1
            why, smem, regs = "a copy of a group argument", 0, 16
        attrs["kernel_values"].append([ref(v) for v in kern.values])
        attrs["kernel_mappings"].append(mapping)
        attrs["kernel_threads"].append(threads)
        attrs["kernel_blocks"].append(blocks)
        attrs["kernel_rows_per_block"].append(rpb)
        attrs["kernel_split"].append(split)
        attrs["kernel_why"].append(why)
        attrs["kernel_smem"].append(smem)  # the cost model's estimates (CUDA C stitching)
        attrs["kernel_regs"].append(regs)
    return attrs
