"""Render a ``fusion.group`` as one C++17 / OpenMP kernel.

Two strategies, chosen per group:

- ``rows`` (FusionStitching's regional stitching, CPU form): every reduction is a row reduction
  over the same ``R`` rows of ``L`` trailing elements. One OpenMP loop over rows; inside, one
  vectorised loop over the row per *phase* (phase k computes what needs the reductions of phase
  k - 1). Reduction results are per-row scalars in registers; row values needed again in a later
  phase are kept in a per-thread row buffer (L1 / L2 resident) instead of memory.
- ``phases`` (global stitching, and plain loop kernels): each materialised value — an output, a
  reduction, a scatter — gets its own work-shared loop nest inside one parallel region; the
  implicit barrier between them is the grid barrier. Intermediates that are not outputs live in
  scratch buffers the runtime passes in. Element-wise producers are inlined into each loop.

Kernel ABI: ``extern "C" int <symbol>(void* const* args)`` with ``args`` = the group's operands
(in order), its results, then scratch buffers; returns 0, or 1 when a gathered index was out of
range. Sizes are compiled in.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from codegen.cpp.emit import (
    HALF,
    STORED,
    Emitter,
    Unsupported,
    compute_itemsize,
    ctype,
    delinearize,
    dims,
    linearize,
    literal,
    round_to,
    sets_err,
    storage_ctype,
    symbols_of,
)
from codegen.cpp.emit import hint as size_hint
from codegen.cpp.layout import interchange, loop_order, transposed_view
from stitch_ir.core import Value
from stitch_ir.dialects import fusion, st
from stitch_ir.types import Sym

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
    lstrip_blocks=True)
MATH_HEADER = (Path(__file__).parent / "stitch_math.h").read_text()
# What every kernel source starts with after its comment; a batch of kernels compiled as one
# translation unit shares one copy (runtime.build.build_kernels).
PRELUDE = """#include <cstdint>
#include <cmath>
#include <limits>
#include <vector>
#if STITCH_OPENMP
#include <omp.h>
#endif
""" + MATH_HEADER.replace("#pragma once\n", "")
SCATTERS = (st.IndexAddOp, st.ScatterAddOp, st.ScatterReduceOp)
LAYOUT_OPS = (st.ReshapeOp, st.PermuteOp, st.BroadcastOp, st.SliceOp, st.PadOp, st.CatOp)


@dataclass
class KernelSource:
    symbol: str
    source: str
    strategy: str  # rows | phases
    n_inputs: int
    n_outputs: int
    scratch: list = field(default_factory=list)  # bytes of each scratch buffer (int or Sym)
    body: str = ""  # the source without PRELUDE: what a batch of kernels concatenates
    # the symbolic sizes the kernel reads (an int64 array after the scratch pointers), by name
    symbols: list[str] = field(default_factory=list)


def _shape_nz(v: Value) -> tuple[int, ...]:
    return tuple(n for n in dims(v) if n != 1)


def _split(shape: list[int], rows: int) -> int | None:
    """The position k with prod(shape[:k]) == rows (the row / column split), or None."""
    p = 1
    for k, n in enumerate(shape):
        if p == rows:
            return k
        p *= n
    return len(shape) if p == rows else None


class RowsUnfit(Unsupported):
    """The group does not fit the rows strategy (the phases strategy handles it)."""


# ----------------------------------------------------------------------------------------------
# rows


class RowKernel:
    """The ``rows`` strategy (see the module docstring)."""

    def __init__(self, group: fusion.GroupOp, buffers: dict[int, str], out_ptrs: dict[int, str],
                 stored: dict[str, object] | None = None):
        self.group = group
        self.body = group.body.ops[:-1]
        self.outputs = list(dict.fromkeys(group.body.terminator.operands))
        self.out_ptrs = out_ptrs
        reduces = [op for op in self.body if isinstance(op, st.ReduceOp)]
        if not reduces or any(isinstance(op, SCATTERS) for op in self.body):
            raise RowsUnfit("no reduction, or a scatter")
        dom = max(reduces, key=lambda r: size_hint(math.prod(dims(r.operand(0)))))
        self.R = at_least_1(math.prod(dims(dom.result)))
        self.L = math.prod(dims(dom.operand(0))) // self.R
        for r in reduces:
            shape = dims(r.operand(0))
            k = _split(shape, self.R)
            trailing = k is not None and {d for d in range(k, len(shape)) if shape[d] != 1} <= \
                set(r.dims) and all(d >= k or shape[d] == 1 for d in r.dims)
            if not trailing or math.prod(shape) != self.R * self.L or \
                    isinstance(r, st.ArgReduceOp):
                raise RowsUnfit(f"'{r.name}' is not a row reduction over the dominant rows")
        self.reduces = reduces
        self.em = Emitter(buffers, stored)
        self.names: dict[tuple, list[str]] = {}
        self.row_decl: list[str] = []
        self.col_decl: list[str] = []

    # -- index variables -----------------------------------------------------------------------
    def idx_of(self, v: Value) -> list[str]:
        """v's multi-index at the current (row r, column j) of the loops."""
        shape = dims(v)
        n = math.prod(shape)
        if n == self.R * self.L:
            k = _split(shape, self.R)
            if k is not None:
                return self.split_vars(shape[:k], "r") + self.split_vars(shape[k:], "j")
            return delinearize(f"(r * {self.L} + j)", shape)
        if n == self.R:
            return self.split_vars(shape, "r")
        raise RowsUnfit(f"a value of shape {shape} is neither a row nor a row scalar")

    def split_vars(self, shape: list[int], base: str) -> list[str]:
        """Index variables for ``base`` (r or j) split over ``shape``; named by the non-1 dims,
        so every shape with the same non-1 dims shares them (and the emitter's memo hits)."""
        nz = tuple(n for n in shape if n != 1)
        key = (base, nz)
        if key not in self.names:
            if len(nz) <= 1:
                self.names[key] = [base] * len(nz)
            else:
                names = []
                for k, part in enumerate(delinearize(base, list(nz))):
                    name = f"{base}{len(self.names)}_{k}"
                    (self.row_decl if base == "r" else self.col_decl).append(
                        f"const int64_t {name} = {part};")
                    self.em.deps[name] = frozenset({base})
                    names.append(name)
                self.names[key] = names
        it = iter(self.names[key])
        return [next(it) if n != 1 else "0" for n in shape]

    def _same_position(self, idx: list[str], v: Value) -> bool:
        shape = dims(v)
        want = self.idx_of(v)
        return [i for i, n in zip(idx, shape) if n != 1] == [i for i, n in zip(want, shape)
                                                             if n != 1]

    def _register(self, v: Value, expr: str) -> None:
        def hook(idx, v=v, expr=expr):
            if self._same_position(idx, v):
                return expr
            raise RowsUnfit("a row value is read at another row or column")

        self.em.known[id(v)] = hook

    # -- rendering -----------------------------------------------------------------------------
    def render(self) -> dict:
        em = self.em
        avail: dict[int, int] = {id(a): 0 for a in self.group.body.args}
        loop_of: dict[int, int] = {}
        for op in self.body:
            p = max([avail.get(id(o), 0) for o in op.operands] or [0])
            if isinstance(op, st.ReduceOp):
                loop_of[id(op)] = p
                avail[id(op.result)] = p + (2 if isinstance(op, st.VarOp) else 1)
            else:
                for r in op.results:
                    avail[id(r)] = p
        full = self.R * self.L
        outs_full = [v for v in self.outputs if math.prod(dims(v)) == full]
        outs_row = [v for v in self.outputs if v not in outs_full]
        if any(math.prod(dims(v)) != self.R for v in outs_row):
            raise RowsUnfit("an output is neither a row nor a row scalar")
        # Row values read in more than one loop are kept in per-thread row buffers.
        used_in: dict[int, set[int]] = {}
        for op in self.body:
            where = loop_of.get(id(op), avail[id(op.results[0])] if op.results else 0)
            for o in op.operands:
                used_in.setdefault(id(o), set()).add(where)
        for v in outs_full:
            used_in.setdefault(id(v), set()).add(avail[id(v)])
        cheap = (st.ReduceOp, st.ReshapeOp, st.BroadcastOp, st.ConstantOp, st.IotaOp)
        regional: list[Value] = []
        for op in self.body:
            if isinstance(op, cheap) or len(op.results) != 1 or \
                    math.prod(dims(op.result)) != full or len(used_in.get(id(op.result), ())) < 2:
                continue
            if _recompute_cost(op.result, {id(v) for v in regional}) > RECOMPUTE_LIMIT:
                regional.append(op.result)
        bufs = {id(v): f"rowbuf{k}" for k, v in enumerate(regional)}
        ends = [loop_of[id(r)] + (1 if isinstance(r, st.VarOp) else 0) for r in self.reduces]
        n_loops = 1 + max(ends + [avail[id(v)] for v in outs_full + regional])
        # Large outputs are written row by row from an L1 row buffer with streaming stores: no
        # read-for-ownership of the destination, and 32 MiB of results do not evict the inputs.
        out_bytes = sum(size_hint(full) * v.type.dtype.itemsize for v in outs_full)
        streams = {id(v): f"streambuf{k}" for k, v in enumerate(outs_full)} \
            if out_bytes >= STREAM_MIN_BYTES else {}
        for v in outs_full:  # a stream buffer holds its output's stored bits
            if id(v) in streams and v.type.dtype in STORED:
                em.stored[streams[id(v)]] = v.type.dtype
        lines: list[str] = []
        em.push(lines, "      ", loop_vars={"r"})
        # the next row of each row-major input is fetched while this row computes
        for a in self.group.body.args:
            if math.prod(dims(a)) == full and size_hint(self.R) > 1:
                em.line(f"st_prefetch_row({self.em.buffers[id(a)]} + (r + 1 < {self.R} ? r + 1 : r)"
                        f" * {self.L}, {self.L * a.type.dtype.itemsize});")
        means: dict[int, str] = {}
        done_row_outs: set[int] = set()
        for loop in range(n_loops):
            steps = [(r, "main") for r in self.reduces if loop_of[id(r)] == loop]
            steps += [(r, "dev") for r in self.reduces
                      if isinstance(r, st.VarOp) and loop_of[id(r)] + 1 == loop]
            stores = [((streams[id(v)], "j") if id(v) in streams else
                       (self.out_ptrs[id(v)], f"r * {self.L} + j"), v)
                      for v in outs_full if avail[id(v)] == loop]
            stores += [((bufs[id(v)], "j"), v) for v in regional if avail[id(v)] == loop]
            if not steps and not stores:
                continue
            accs = []
            clauses = []
            for k, (r, mode) in enumerate(steps):
                acc = f"acc{loop}_{k}"
                accs.append((r, mode, acc))
                init, clause = _acc_init(r, mode)
                em.line(f"{_acc_ctype(r)} {acc} = {init};")
                clauses.append(f"reduction({clause}:{acc})")
                if isinstance(r, st.MaxOp | st.MinOp):
                    em.line(f"int {acc}_nan = 0;")  # an int flag vectorises; a bool does not
                    clauses.append(f"reduction(|:{acc}_nan)")
            if self.em_has_gather:
                clauses.append("reduction(|:err)")
            em.mark()
            em.line(" ".join(["#pragma omp simd"] + clauses))
            em.line(f"for (int64_t j = 0; j < {self.L}; ++j) {{")
            inner: list[str] = []
            em.push(inner, "        ", loop_vars={"j"})
            self.col_decl = []
            self.names = {k: v for k, v in self.names.items() if k[0] == "r"}
            body: list[str] = []
            em.scopes[-1].lines = body
            for r, mode, acc in accs:
                x = em.value(r.operand(0), self.idx_of(r.operand(0)))
                em.line(_acc_update(r, mode, acc, x, means.get(id(r))))
            for (ptr, lin), v in stores:
                em.line(em.store(ptr, lin, v.type.dtype, em.value(v, self.idx_of(v))))
            em.pop()
            lines.extend("        " + d for d in self.col_decl)
            lines.extend(body)
            em.line("}")
            for _, v in stores:
                if id(v) in streams:
                    em.line(f"st_stream_row({self.out_ptrs[id(v)]} + r * {self.L}, {streams[id(v)]}, "
                            f"{self.L * v.type.dtype.itemsize});")
            for v in regional:
                if avail[id(v)] == loop:
                    self._register(v, f"{bufs[id(v)]}[j]")
            for r, mode, acc in accs:
                name = f"red{loop}_{accs.index((r, mode, acc))}"
                if isinstance(r, st.VarOp) and mode == "main":
                    means[id(r)] = name
                    em.line(f"const {_acc_ctype(r)} {name} = {acc} / ({_acc_ctype(r)}){self.L};")
                    continue
                final = round_to(r.result.type.dtype, _acc_final(r, acc, self.L))
                em.line(f"const {ctype(r.result.type.dtype)} {name} = {final};")
                self._register(r.result, name)
            for v in outs_row:
                if id(v) not in done_row_outs and avail[id(v)] <= loop + 1:
                    em.line(em.store(self.out_ptrs[id(v)], "r", v.type.dtype,
                                     em.value(v, self.idx_of(v))))
                    done_row_outs.add(id(v))
        for v in outs_row:
            if id(v) not in done_row_outs:
                em.line(em.store(self.out_ptrs[id(v)], "r", v.type.dtype,
                                 em.value(v, self.idx_of(v))))
        em.pop()
        return {"R": f"{self.R}", "L": f"{self.L}", "row_decl": self.row_decl, "lines": lines,
                "row_buffers": [(bufs[id(v)], ctype(v.type.dtype)) for v in regional] +
                [(streams[id(v)], storage_ctype(v.type.dtype)) for v in outs_full
                 if id(v) in streams],
                "streaming": bool(streams)}

    @property
    def em_has_gather(self) -> bool:
        return sets_err(self.body)


# A row value read in several phases is either kept in a row buffer (one store, then one L1
# load per later phase) or recomputed in each phase from the row's inputs, which are in L1 by
# then. Recomputing wins for short chains of cheap ops (x * 0.125, y + b + res): the buffer's
# store and loads cost as much as the ops, and the buffer competes for L1. Anything with a
# transcendental, a division or a gather is buffered.
RECOMPUTE_LIMIT = 4
# Reductions that keep the innermost dim (column sums: weight gradients): outputs per task (an
# L1 accumulator row), and how the reduced index space is cut (at most COLUMN_CHUNKS chunks of
# at least COLUMN_CHUNK_MIN terms; the partial rows go to scratch).
COLUMN_BLOCK = 1024
COLUMN_CHUNKS = 16
COLUMN_CHUNK_MIN = 64
# Outputs of a rows kernel at least this large are written with streaming stores (a fraction of
# a server L3: results this large leave the cache before a consumer reads them anyway).
STREAM_MIN_BYTES = 8 << 20
_EXPENSIVE = frozenset({
    "st.exp", "st.exp2", "st.log", "st.log2", "st.log1p", "st.expm1", "st.sqrt", "st.rsqrt",
    "st.sin", "st.cos", "st.tan", "st.tanh", "st.sigmoid", "st.erf", "st.div", "st.pow",
    "st.remainder", "st.floor_div", "st.atan2", "st.reciprocal"})


def _recompute_cost(v: Value, buffered: set[int]) -> int:
    """Ops plus loads needed to recompute ``v`` inside a phase; > RECOMPUTE_LIMIT means keep it.
    Stops at block arguments (a load), reductions (a register) and buffered values (a load)."""
    seen: set[int] = set()
    cost = 0

    def walk(u: Value, root: bool) -> None:
        nonlocal cost
        if id(u) in seen:
            return
        seen.add(id(u))
        op = getattr(u, "owner", None)  # block arguments have none
        if op is None or (not root and id(u) in buffered):
            cost += 1  # a load
            return
        if isinstance(op, st.ReduceOp | st.ConstantOp | st.IotaOp):
            return
        if op.name in _EXPENSIVE or isinstance(op, st.EmbeddingOp | st.IndexSelectOp | st.GatherOp):
            cost += RECOMPUTE_LIMIT + 1
            return
        if not isinstance(op, st.ReshapeOp | st.BroadcastOp):
            cost += 1
        for o in op.operands:
            walk(o, False)

    walk(v, True)
    return cost


def _acc_ctype(r: st.ReduceOp) -> str:
    return ctype(r.result.type.dtype)


def _acc_init(r: st.ReduceOp, mode: str) -> tuple[str, str]:
    t = r.result.type.dtype
    if isinstance(r, st.MaxOp):
        init = literal(-math.inf, t) if t.is_float else f"std::numeric_limits<{ctype(t)}>::lowest()"
        return init, "max"
    if isinstance(r, st.MinOp):
        init = literal(math.inf, t) if t.is_float else f"std::numeric_limits<{ctype(t)}>::max()"
        return init, "min"
    if isinstance(r, st.ProdOp):
        return literal(1, t), "*"
    if isinstance(r, st.AnyOp):
        return "false", "||"
    return literal(0, t), "+"


def _acc_update(r: st.ReduceOp, mode: str, acc: str, x: str, mean: str | None) -> str:
    t = ctype(r.result.type.dtype)
    if isinstance(r, st.MaxOp):
        return f"{acc} = ({t}){x} > {acc} ? ({t}){x} : {acc}; {acc}_nan |= (int)({x} != {x});"
    if isinstance(r, st.MinOp):
        return f"{acc} = ({t}){x} < {acc} ? ({t}){x} : {acc}; {acc}_nan |= (int)({x} != {x});"
    if isinstance(r, st.ProdOp):
        return f"{acc} *= ({t}){x};"
    if isinstance(r, st.AnyOp):
        return f"{acc} = {acc} || ({x} != 0);"
    if mode == "dev":
        return f"{acc} += (({t}){x} - {mean}) * (({t}){x} - {mean});"
    return f"{acc} += ({t}){x};"


def reshape_root(v: Value) -> Value:
    """The value ``v`` is a chain of reshapes of (``v`` itself when it is not a reshape)."""
    while isinstance(getattr(v, "owner", None), st.ReshapeOp):
        v = v.owner.operand(0)
    return v


def _combine(clause: str, a: str, b: str) -> str:
    """``a = a (clause) b`` for two partial accumulators."""
    if clause in ("max", "min"):
        cmp = ">" if clause == "max" else "<"
        return f"{a} = {b} {cmp} {a} ? {b} : {a};"
    if clause == "||":
        return f"{a} = {a} || {b};"
    return f"{a} = {a} {clause} {b};"


def _acc_final(r: st.ReduceOp, acc: str, n) -> str:
    t = ctype(r.result.type.dtype)
    if isinstance(r, st.MaxOp | st.MinOp):
        return f"({acc}_nan ? ({t})NAN : {acc})"
    if isinstance(r, st.MeanOp):
        return f"({acc} / ({t}){n})"
    if isinstance(r, st.VarOp):
        c = r.attr("correction", 1)
        if isinstance(n, Sym):
            return f"({acc} / ({t})({n} - {c} > 0 ? {n} - {c} : 0))"
        return f"({acc} / ({t}){max(n - c, 0)})"
    return acc


def at_least_1(n):
    """max(1, n) for a size (a symbolic size is at least 1 already)."""
    return n if isinstance(n, Sym) else max(1, n)


# ----------------------------------------------------------------------------------------------
# phases


class PhaseKernel:
    """The ``phases`` strategy (see the module docstring)."""

    def __init__(self, group: fusion.GroupOp, buffers: dict[int, str], out_names: dict[int, list],
                 stored: dict[str, object] | None = None):
        self.group = group
        self.body = group.body.ops[:-1]
        self.em = Emitter(buffers, stored)
        self.out_names = out_names  # id(value) -> every output pointer it is written to
        self.scratch: list[int] = []
        self.n_loops = 0
        self.gathers = sets_err(self.body)  # the loops reduce the error flag

    def materialised(self) -> list[Value]:
        """Values with a loop nest of their own, in an order producers-first. An output that is
        a reshape chain of an in-group value (GELU-backward's result, reshaped on its way out)
        is computed right after that value's op, so later phases (its column sum) read it from
        the output buffer instead of recomputing it (see ``reshape_root``)."""
        out: list[tuple[int, Value]] = []
        position = {id(op): k for k, op in enumerate(self.body)}
        reread = self.reread_values()
        for k, op in enumerate(self.body):
            for r in op.results:
                if id(r) in self.out_names or isinstance(op, (st.ReduceOp, *SCATTERS)) or \
                        id(r) in reread:
                    root = reshape_root(r)
                    at = position.get(id(getattr(root, "owner", None)), k) if root is not r else k
                    out.append((at, r))
        return [r for _, r in sorted(out, key=lambda t: t[0])]

    # A computed value read at this many different positions per element of a materialised
    # value (through slices, pads: a 3x3 max pool reads its input 9 times) is materialised in
    # scratch first, not recomputed for every read (ResNet's stem: batch norm + ReLU computed 9
    # times per pooled element, scalar: 6.9 ms).
    REREAD = 4

    def reread_values(self) -> set[int]:
        """Values (ids) to materialise because materialised values read them at REREAD or more
        positions per element: read counts propagated from consumers to producers in reverse
        program order; a value that is materialised (an output, a reduction, a scatter, or
        one chosen here) counts as read once by its own producers."""
        cheap = (st.ConstantOp, st.IotaOp, *LAYOUT_OPS)
        count: dict[int, int] = {}
        chosen: set[int] = set()
        for op in reversed(self.body):
            materialised = isinstance(op, (st.ReduceOp, *SCATTERS)) or any(
                id(r) in self.out_names for r in op.results)
            c = sum(count.get(id(r), 0) for r in op.results)
            if len(op.results) == 1 and not materialised and c >= self.REREAD and \
                    not isinstance(op, cheap) and op.result.type.numel() > 1:
                chosen.add(id(op.result))
                materialised = True
            if materialised:
                c = 1
            for o in op.operands:
                count[id(o)] = count.get(id(o), 0) + c
        return chosen

    def render(self, first_scratch_arg: int) -> dict:
        em = self.em
        self.first_scratch = first_scratch_arg
        phases: list[list[str]] = []
        for v in self.materialised():
            # A half-typed scatter accumulates in float and rounds once at the end, as eager's
            # index_add / scatter_add / scatter_reduce do: its target is a float scratch.
            wide = isinstance(v.owner, SCATTERS) and v.type.dtype in HALF
            if id(v) not in self.out_names or wide:
                k = len(self.scratch)
                self.scratch.append(at_least_1(math.prod(dims(v))) * compute_itemsize(v.type.dtype))
                name = f"scr{k}"
                phases.append([f"    {ctype(v.type.dtype)}* __restrict {name} = "
                               f"({ctype(v.type.dtype)}*)args[{first_scratch_arg + k}];"])
                targets = [name]
            else:
                targets = list(self.out_names[id(v)])
            lines: list[str] = []
            em.push(lines, "    ")
            op = v.owner
            if isinstance(op, st.ArgReduceOp):
                self.arg_reduce(op, targets)
            elif isinstance(op, st.ReduceOp):
                self.reduce(op, targets)
            elif isinstance(op, SCATTERS):
                em.wide.add(targets[0])
                self.scatter(op, targets)
                if wide:
                    self._round_scattered(v, targets[0])
            else:
                self.elementwise(v, targets)
            em.pop()
            phases.append(lines)
            em.buffers[id(v)] = targets[0]
            root = reshape_root(v)
            if root is not v and id(root) not in em.buffers and \
                    getattr(root, "owner", None) in self.body:
                em.buffers[id(root)] = targets[0]  # same elements, same row-major order
        return {"phases": phases}

    def _round_scattered(self, v: Value, acc: str) -> None:
        """Round a half scatter's float accumulator to its type, in place, and write it to the
        outputs that ``v`` is."""
        lin_of = lambda idx: linearize(idx, dims(v))  # noqa: E731
        dt = v.type.dtype

        def body(idx):
            self.em.line(f"{acc}[{lin_of(idx)}] = {round_to(dt, f'{acc}[{lin_of(idx)}]')};")
            for t in self.out_names.get(id(v), []):
                self.em.line(self.em.store(t, lin_of(idx), dt, f"{acc}[{lin_of(idx)}]"))

        self.nest(dims(v), body)

    # one loop nest over ``shape``; ``emit(idx)`` writes the body
    def nest(self, shape: list[int], emit, reductions: str = "",
             order: list[int] | None = None) -> None:
        """One loop nest over ``shape``; ``emit(idx)`` writes the body. ``order``: the dims from
        outermost to innermost (row-major by default; the innermost is always the last dim)."""
        em = self.em
        self.n_loops += 1
        names = [f"i{self.n_loops}_{k}" for k in range(len(shape))]
        order = order or list(range(len(shape)))
        err = " reduction(|:err)" if self.gathers else ""
        if not shape:
            em.line("#pragma omp single")
            em.line("{")
            emit([])
            em.line("}")
            return
        em.mark()
        if len(shape) == 1:
            em.line("#pragma omp for simd schedule(static)")
            em.line(f"for (int64_t {names[0]} = 0; {names[0]} < {shape[0]}; ++{names[0]}) {{")
            body: list[str] = []
            em.push(body, em.scopes[-1].indent + "  ", loop_vars=set(names))
            emit(names)
            em.pop()
            em.scopes[-1].lines.extend(body)
            em.line("}")
            return
        em.line(f"#pragma omp for collapse({len(shape) - 1}) schedule(static)")
        for k in order[:-1]:
            em.line(f"for (int64_t {names[k]} = 0; {names[k]} < {shape[k]}; ++{names[k]})")
        em.line("{")
        # Two scopes: what depends only on the collapsed (outer) loops -- a channel's scale, a
        # row's statistics -- is computed once per pass of the innermost loop, above it.
        outer: list[str] = []
        em.push(outer, em.scopes[-1].indent + "  ", loop_vars=set(names[:-1]))
        em.line(f"#pragma omp simd{err}")
        em.mark()
        em.scopes[-1].hoist_at -= 1  # above the pragma, which must precede its loop directly
        em.line(f"for (int64_t {names[-1]} = 0; {names[-1]} < {shape[-1]}; ++{names[-1]}) {{")
        body = []
        em.push(body, em.scopes[-1].indent + "  ", loop_vars={names[-1]})
        emit(names)
        em.pop()
        em.scopes[-1].lines.extend(body)
        em.line("}")
        em.pop()
        em.scopes[-1].lines.extend(outer)
        em.line("}")

    def store(self, targets: list[str], v: Value, idx: list[str], expr: str) -> None:
        lin = linearize(idx, dims(v))
        for t in targets:
            self.em.line(self.em.store(t, lin, v.type.dtype, expr))

    def elementwise(self, v: Value, targets: list[str]) -> None:
        sizes = {self.em.buffers[id(x)]: size_hint(math.prod(dims(x))) * x.type.dtype.itemsize
                 for x in self.values_in_buffers()}
        emit = lambda idx: self.store(targets, v, idx, self.em.value(v, idx))  # noqa: E731
        staged = transposed_view(v, self.em.buffers, sizes)
        if staged is not None:
            self.nest_staged(dims(v), staged[1], staged[0], emit)
            return
        inner = interchange(v, self.em.buffers, sizes)
        self.nest(dims(v), emit, order=loop_order(dims(v), inner))

    STAGE = 32  # a staged tile is STAGE x STAGE elements (4 KiB of float): L1-resident

    def nest_staged(self, shape: list[int], p: int, u: Value, emit) -> None:
        """A loop nest over ``shape`` in tiles of dims ``p`` and the last one, for a value that
        reads ``u`` -- a buffer contiguous along ``p`` but strided along the last dim (a
        transpose). Each tile first copies ``u`` into a small buffer in the output's order,
        reading the input contiguously (a scalar transpose, in L1); the computation then runs
        vectorised over contiguous tile rows. GCC vectorises no strided load: this kernel ran
        scalar and branchy at 0.65 GB/s before."""
        em = self.em
        self.n_loops += 1
        L, B = self.n_loops, self.STAGE
        last = len(shape) - 1
        names = [f"i{L}_{k}" for k in range(len(shape))]
        outer = [k for k in range(len(shape)) if k not in (p, last)]
        pt, lt, pl, ll, buf = f"pt{L}", f"lt{L}", f"pl{L}", f"ll{L}", f"stage{L}"
        ct = ctype(u.type.dtype)
        err = " reduction(|:err)" if self.gathers else ""
        em.mark()
        em.line(f"#pragma omp for collapse({len(outer) + 2}) schedule(static)")
        for k in outer:
            em.line(f"for (int64_t {names[k]} = 0; {names[k]} < {shape[k]}; ++{names[k]})")
        em.line(f"for (int64_t {pt} = 0; {pt} < ({shape[p]} + {B - 1}) / {B}; ++{pt})")
        em.line(f"for (int64_t {lt} = 0; {lt} < ({shape[last]} + {B - 1}) / {B}; ++{lt})")
        em.line("{")
        tile: list[str] = []
        em.push(tile, em.scopes[-1].indent + "  ", loop_vars={names[k] for k in outer} | {pt, lt})
        em.line(f"const int64_t {pl}_n = {shape[p]} - {pt} * {B} < {B} ? {shape[p]} - {pt} * {B} "
                f": {B};")
        em.line(f"const int64_t {ll}_n = {shape[last]} - {lt} * {B} < {B} ? "
                f"{shape[last]} - {lt} * {B} : {B};")
        em.line(f"{ct} {buf}[{B}][{B}];")
        idx = list(names)
        idx[p], idx[last] = f"({pt} * {B} + {pl})", f"({lt} * {B} + {ll})"
        # 1. the tile of u, read along p (contiguous), written to the buffer in output order
        em.mark()
        em.line(f"for (int64_t {ll} = 0; {ll} < {ll}_n; ++{ll})")
        em.line(f"for (int64_t {pl} = 0; {pl} < {pl}_n; ++{pl}) {{")
        copy: list[str] = []
        em.push(copy, em.scopes[-1].indent + "  ", loop_vars={ll, pl})
        em.line(f"{buf}[{pl}][{ll}] = {em.value(u, idx)};")
        em.pop()
        em.scopes[-1].lines.extend(copy)
        em.line("}")
        # 2. the value, over contiguous rows of the tile
        em.known[id(u)] = lambda at, want=list(idx): f"{buf}[{pl}][{ll}]" if at == want else None
        em.mark()
        em.line(f"for (int64_t {pl} = 0; {pl} < {pl}_n; ++{pl}) {{")
        row: list[str] = []
        em.push(row, em.scopes[-1].indent + "  ", loop_vars={pl})
        em.line(f"#pragma omp simd{err}")
        em.mark()
        em.scopes[-1].hoist_at -= 1  # above the pragma, which must precede its loop directly
        em.line(f"for (int64_t {ll} = 0; {ll} < {ll}_n; ++{ll}) {{")
        body: list[str] = []
        em.push(body, em.scopes[-1].indent + "  ", loop_vars={ll})
        emit(idx)
        em.pop()
        em.scopes[-1].lines.extend(body)
        em.line("}")
        em.pop()
        em.scopes[-1].lines.extend(row)
        em.line("}")
        del em.known[id(u)]
        em.pop()
        em.scopes[-1].lines.extend(tile)
        em.line("}")

    def values_in_buffers(self) -> list[Value]:
        """The group's arguments and the values materialised so far (all have a buffer)."""
        known = list(self.group.body.args) + [r for op in self.body for r in op.results]
        return [x for x in known if id(x) in self.em.buffers]

    def _input_index(self, op: st.ReduceOp, out_idx: list[str], red_idx: list[str]) -> list[str]:
        shape = dims(op.operand(0))
        it_out = iter(out_idx)
        it_red = iter(red_idx)
        idx = []
        for d in range(len(shape)):
            if d in op.dims:
                idx.append(next(it_red))
                if op.keepdim:
                    next(it_out)
            else:
                idx.append(next(it_out))
        return idx

    def reduce(self, op: st.ReduceOp, targets: list[str]) -> None:
        em = self.em
        shape = dims(op.operand(0))
        red_shape = [shape[d] for d in op.dims]
        t = ctype(op.result.type.dtype)
        n = math.prod(red_shape)  # 0 for an empty reduction: its mean is 0 / 0 = NaN, as eager
        # The simd lanes here are usually the outputs, so each output adds its terms one at a
        # time: a float accumulator's error grows with the length (adder_quant's 144-term sums
        # were many ulps off torch's cascade sum, enough to flip later round()s). float32 sums
        # accumulate in double and round once at the store, as the reference interpreter does.
        at = "double" if t == "float" and isinstance(op, st.SumOp | st.MeanOp | st.VarOp) else t
        if len(shape) - 1 not in op.dims and dims(op.result) and dims(op.result)[-1] > 1 \
                and not isinstance(op, st.VarOp):
            return self._column_reduce(op, targets, at)

        def body(out_idx):
            names = [f"k{self.n_loops}_{k}" for k in range(len(red_shape))]

            def loops(mode: str, acc: str, mean: str | None):
                init, clause = _acc_init(op, mode)
                em.line(f"{at} {acc} = {init};")
                extra = ""
                if isinstance(op, st.MaxOp | st.MinOp):
                    em.line(f"int {acc}_nan = 0;")  # an int flag vectorises; a bool does not
                    extra = f" reduction(|:{acc}_nan)"
                em.mark()
                for k, size in enumerate(red_shape):
                    if k == len(red_shape) - 1:
                        em.line(f"#pragma omp simd reduction({clause}:{acc}){extra}")
                    em.line(f"for (int64_t {names[k]} = 0; {names[k]} < {size}; ++{names[k]}) {{")
                inner: list[str] = []
                em.push(inner, em.scopes[-1].indent + "  ", loop_vars=set(names))
                x = em.value(op.operand(0), self._input_index(op, out_idx, names))
                em.line(_acc_update(op, mode, acc, x, mean))
                em.pop()
                em.scopes[-1].lines.extend(inner)
                for _ in red_shape:
                    em.line("}")

            acc = f"acc{self.n_loops}"
            if isinstance(op, st.VarOp):
                loops("main", acc + "s", None)
                em.line(f"const {at} {acc}m = {acc}s / ({at}){n};")
                loops("dev", acc, f"{acc}m")
            else:
                loops("main", acc, None)
            self.store(targets, op.result, out_idx,
                       round_to(op.result.type.dtype, _acc_final(op, acc, n)))

        self.nest(dims(op.result), body)

    def _column_reduce(self, op: st.ReduceOp, targets: list[str], at: str) -> None:
        """A reduction that keeps the innermost (contiguous) dim (column sums: weight
        gradients). Walking an output's terms would stride through the input a page per step,
        so the reduced index space is cut into a fixed number of chunks (not one per thread:
        the answer must not depend on the thread count); a task takes one chunk and a block of
        up to COLUMN_BLOCK outputs and reads its rows contiguously into an L1 accumulator row,
        then writes that partial row to scratch; after the barrier each output combines its
        chunks in order."""
        em = self.em
        shape = dims(op.operand(0))
        out_shape = dims(op.result)
        red_shape = [shape[d] for d in op.dims]
        n = math.prod(red_shape)  # 0 for an empty reduction: its mean is 0 / 0 = NaN, as eager
        J = out_shape[-1]
        O = at_least_1(math.prod(out_shape[:-1]))
        B = COLUMN_BLOCK if isinstance(J, Sym) else min(J, COLUMN_BLOCK)
        # tasks without chunking; chunk only to reach COLUMN_CHUNKS (a symbolic size: decided
        # at its hint; the chunk bounds below hold for any size)
        blocks = size_hint(O) * -(-size_hint(J) // B)
        chunks = max(1, min(-(-COLUMN_CHUNKS // blocks), size_hint(n) // COLUMN_CHUNK_MIN))
        self.n_loops += 1
        L = self.n_loops
        o, c, jb, jj, kk = f"o{L}", f"c{L}", f"jb{L}", f"j{L}", f"kk{L}"
        cnt, acc, nan = f"n{L}", f"cacc{L}", f"cnan{L}"
        minmax = isinstance(op, st.MaxOp | st.MinOp)
        err = " reduction(|:err)" if self.gathers else ""
        init, clause = _acc_init(op, "main")
        # partial rows [O, chunks, J] (and their NaN flags) in scratch
        part = f"part{L}"
        k = len(self.scratch)
        self.scratch.append(O * chunks * J * (8 if at == "double" else
                                              compute_itemsize(op.result.type.dtype)))
        em.line(f"{at}* __restrict {part} = ({at}*)args[{self.first_scratch + k}];")
        if minmax:
            self.scratch.append(O * chunks * J * 4)
            em.line(f"int* __restrict {part}_nan = (int*)args[{self.first_scratch + k + 1}];")
        onames = delinearize(o, out_shape[:-1]) if out_shape[:-1] else []
        em.mark()
        em.line("#pragma omp for collapse(3) schedule(static)")
        em.line(f"for (int64_t {o} = 0; {o} < {O}; ++{o})")
        em.line(f"for (int64_t {c} = 0; {c} < {chunks}; ++{c})")
        em.line(f"for (int64_t {jb} = 0; {jb} < {J}; {jb} += {B})")
        em.line("{")
        outer: list[str] = []
        em.push(outer, em.scopes[-1].indent + "  ", loop_vars={o, c, jb})
        em.line(f"const int64_t {cnt} = {J} - {jb} < {B} ? {J} - {jb} : {B};")
        em.line(f"{at} {acc}[{B}];")
        if minmax:
            em.line(f"int {nan}[{B}];")
        em.line(f"for (int64_t {jj} = 0; {jj} < {B}; ++{jj}) {{ {acc}[{jj}] = {init};"
                + (f" {nan}[{jj}] = 0;" if minmax else "") + " }")
        em.mark()
        em.line(f"for (int64_t {kk} = {n} * {c} / {chunks}; {kk} < {n} * ({c} + 1) / {chunks}; "
                f"++{kk}) {{")
        knames = delinearize(kk, red_shape)
        em.line(f"#pragma omp simd{err}")
        em.line(f"for (int64_t {jj} = 0; {jj} < {cnt}; ++{jj}) {{")
        inner: list[str] = []
        em.push(inner, em.scopes[-1].indent + "  ", loop_vars={kk, jj})
        out_idx = onames + [f"({jb} + {jj})"]
        x = em.value(op.operand(0), self._input_index(op, out_idx, knames))
        em.line(_acc_update(op, "main", "ACC", x, None).replace("ACC_nan", f"{nan}[{jj}]")
                .replace("ACC", f"{acc}[{jj}]"))
        em.pop()
        em.scopes[-1].lines.extend(inner)
        em.line("}")
        em.line("}")
        slot = f"({o} * {chunks} + {c}) * {J} + {jb}"
        em.line("#pragma omp simd")
        em.line(f"for (int64_t {jj} = 0; {jj} < {cnt}; ++{jj}) {{ {part}[{slot} + {jj}] = "
                f"{acc}[{jj}];" + (f" {part}_nan[{slot} + {jj}] = {nan}[{jj}];" if minmax else "")
                + " }")
        em.pop()
        em.scopes[-1].lines.extend(outer)
        em.line("}")
        # combine each output's chunks in chunk order
        em.mark()
        em.line("#pragma omp for schedule(static)")
        em.line(f"for (int64_t {o} = 0; {o} < {O}; ++{o})")
        em.line("{")
        comb: list[str] = []
        em.push(comb, em.scopes[-1].indent + "  ", loop_vars={o})
        em.line(f"#pragma omp simd{err}")
        em.line(f"for (int64_t {jj} = 0; {jj} < {J}; ++{jj}) {{")
        em.line(f"  {at} a = {part}[{o} * {chunks} * {J} + {jj}];")
        if minmax:
            em.line(f"  int a_nan = {part}_nan[{o} * {chunks} * {J} + {jj}];")
        em.line(f"  for (int64_t {c} = 1; {c} < {chunks}; ++{c}) {{")
        p = f"{part}[({o} * {chunks} + {c}) * {J} + {jj}]"
        if minmax:
            em.line(f"    a_nan |= {part}_nan[({o} * {chunks} + {c}) * {J} + {jj}];")
        em.line(f"    {_combine(clause, 'a', p)}")
        em.line("  }")
        body: list[str] = []
        em.push(body, em.scopes[-1].indent + "  ", loop_vars={jj})
        self.store(targets, op.result, onames + [jj],
                   round_to(op.result.type.dtype, _acc_final(op, "a", n)))
        em.pop()
        em.scopes[-1].lines.extend(body)
        em.line("}")
        em.pop()
        em.scopes[-1].lines.extend(comb)
        em.line("}")

    def arg_reduce(self, op: st.ArgReduceOp, targets: list[str]) -> None:
        em = self.em
        (d,) = op.dims
        size = dims(op.operand(0))[d]
        t = ctype(op.operand(0).type.dtype)
        better = ">" if isinstance(op, st.ArgMaxOp) else "<"

        def body(out_idx):
            k = f"k{self.n_loops}"
            em.line(f"{t} best = {em.value(op.operand(0), self._input_index(op, out_idx, ['0']))};")
            em.line("int64_t where = 0;")
            em.mark()
            em.line(f"for (int64_t {k} = 1; {k} < {size}; ++{k}) {{")
            inner: list[str] = []
            em.push(inner, em.scopes[-1].indent + "  ", loop_vars={k})
            x = em.value(op.operand(0), self._input_index(op, out_idx, [k]))
            em.line(f"if (best == best && ({x} {better} best || {x} != {x})) "
                    f"{{ best = {x}; where = {k}; }}")
            em.pop()
            em.scopes[-1].lines.extend(inner)
            em.line("}")
            self.store(targets, op.result, out_idx, "where")

        self.nest(dims(op.result), body)

    # The owned-destination index_add loop (see ``scatter``). Random row reads and writes are
    # what it waits on: a row (256 B for 64 floats) costs ~50 ns from DRAM however it is
    # prefetched, so the loop keeps a few rows of every random stream in flight.
    SCATTER_CHUNK = 1024  # owned edges listed at once (a few KiB, L1 resident)
    PREFETCH = 6  # owned edges ahead for the random rows (gathered rows, destination rows)
    PREFETCH_EDGE = 16  # owned edges ahead for the rows indexed by the edge (read in order)
    PREFETCH_BYTES = 512  # of one row; the hardware prefetcher follows a longer row by itself

    def _prefetch(self, ptr: str, nbytes: int, write: bool, hint: int) -> None:
        """Prefetch every cache line of the ``nbytes`` at ``ptr`` (up to PREFETCH_BYTES)."""
        n = min(size_hint(nbytes), self.PREFETCH_BYTES)
        args = f", {int(write)}, {hint})"
        if n <= 64:
            self.em.line(f"__builtin_prefetch((const char*)({ptr}){args};")
            if n > 1:  # a short row may straddle two lines
                self.em.line(f"__builtin_prefetch((const char*)({ptr}) + {n - 1}{args};")
            return
        self.em.line(f"for (int64_t q = 0; q < {n}; q += 64) "
                     f"__builtin_prefetch((const char*)({ptr}) + q{args};")
        if n % 64:
            self.em.line(f"__builtin_prefetch((const char*)({ptr}) + {n - 1}{args};")

    def _prefetch_rows(self, edge: str, n_edges: int) -> None:
        """Prefetch the table rows the gathers of edge ``edge`` will read: random row reads are
        latency-bound, and the hardware prefetcher cannot guess them."""
        em = self.em
        for g in self.body:
            if not isinstance(g, st.EmbeddingOp | st.IndexSelectOp):
                continue
            table, ids = (g.operand(0), g.operand(1))
            dim = 0 if isinstance(g, st.EmbeddingOp) else g.attributes["dim"]
            if dim != 0 or id(table) not in em.buffers or id(ids) not in em.buffers or \
                    len(dims(ids)) != 1 or dims(ids)[0] != n_edges:
                continue
            row = math.prod(dims(table)[1:])
            self._prefetch(f"{em.buffers[id(table)]} + {em.buffers[id(ids)]}[{edge}] * {row}",
                           row * table.type.dtype.itemsize, False, 3)

    def _edge_rows(self, src: Value) -> list[tuple[str, int]]:
        """(buffer, row bytes) of the buffers ``src`` reads at its own index, i.e. the row of
        edge ``e`` (same shape, through element-wise ops only)."""
        em = self.em
        shape = dims(src)
        found: dict[str, int] = {}
        seen: set[int] = set()

        def walk(v: Value) -> None:
            if id(v) in seen or dims(v) != shape:
                return
            seen.add(id(v))
            if id(v) in em.buffers:
                found.setdefault(em.buffers[id(v)],
                                 math.prod(shape[1:]) * v.type.dtype.itemsize)
                return
            op = getattr(v, "owner", None)
            if op is None or isinstance(op, (st.EmbeddingOp, st.IndexSelectOp, st.GatherOp,
                                             st.PermuteOp, st.ReshapeOp, *SCATTERS)):
                return
            for o in op.operands:
                walk(o)

        walk(src)
        return list(found.items())

    def scatter(self, op, targets: list[str]) -> None:
        """out = x, then accumulate src; index_add along dim 0 in parallel with every thread
        owning a range of destination rows (deterministic, no atomics); others serially."""
        em = self.em
        x, idx, src = op.operands
        out = op.result
        xs = dims(x)
        self.nest(xs, lambda i: self.store(targets, out, i, em.value(x, i)))
        ct = ctype(out.type.dtype)
        target = targets[0]
        if isinstance(op, st.IndexAddOp) and op.attributes["dim"] == 0:
            self._index_add_rows(op, target, xs, ct)
            return
        if isinstance(op, st.ScatterReduceOp) and op.attributes["reduce"] == "mean":
            raise Unsupported("scatter_reduce 'mean' in the cpp target")
        # scatter_add / scatter_reduce / index_add along another dim: serial, in index order
        em.line("#pragma omp single")
        em.line("{")
        ishape = dims(idx) if not isinstance(op, st.IndexAddOp) else dims(src)
        names = [f"s{k}" for k in range(len(ishape))]
        dim = op.attributes["dim"]
        if isinstance(op, st.ScatterReduceOp) and not op.attributes["include_self"]:
            self._reset_scattered(op, target, ishape, xs)
        self._open_serial(names, ishape)
        if isinstance(op, st.IndexAddOp):
            pos = em.checked_index(em.value(idx, [names[dim]]), xs[dim], op.attr("wrap", True))
        else:
            pos = em.checked_index(em.value(idx, names), xs[dim], op.attr("wrap", True))
        dst = list(names)
        dst[dim] = pos
        val = em.value(src, names)
        lin = linearize(dst, xs)
        dt = out.type.dtype
        if isinstance(op, st.ScatterReduceOp):
            red = op.attributes["reduce"]
            fn = {"sum": lambda c: f"{c} + {val}", "mean": lambda c: f"{c} + {val}",
                  "prod": lambda c: f"{c} * {val}",
                  "amax": lambda c: f"st_max({c}, ({ct}){val})",
                  "amin": lambda c: f"st_min({c}, ({ct}){val})"}[red]
        else:
            alpha = op.attr("alpha", 1)
            scale = "" if alpha == 1 else f"({ct}){literal(alpha, dt)} * "
            fn = lambda c: f"{c} + {scale}{val}"  # noqa: E731
        em.line(em.update(target, lin, dt, fn))
        self._close_serial(len(ishape))
        em.line("}")

    def _index_add_rows(self, op, target: str, xs: list[int], ct: str) -> None:
        """index_add along dim 0, every thread owning the destination rows [lo, hi): a thread
        reads the edges in order and lists the next SCATTER_CHUNK it owns (edge and checked
        destination; as many whatever the thread count), then accumulates them in edge order
        with the rows of the owned edge PREFETCH ahead in flight.
        Each destination row sums its edges in increasing edge order whatever the thread count,
        so the result is the same bits for any number of threads."""
        em = self.em
        _, idx, src = op.operands
        rows, inner = xs[0], xs[1:]
        width = math.prod(inner)
        n_edges = dims(idx)[0]
        alpha = op.attr("alpha", 1)
        chunk = self.SCATTER_CHUNK if isinstance(n_edges, Sym) else min(self.SCATTER_CHUNK, n_edges)
        et = "int32_t" if not isinstance(n_edges, Sym) and n_edges < 2 ** 31 else "int64_t"
        dt = "int32_t" if not isinstance(rows, Sym) and rows < 2 ** 31 else "int64_t"
        em.line("{")
        em.line("#if STITCH_OPENMP")
        em.line("const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();")
        em.line("#else")
        em.line("const int64_t nt = 1, tid = 0;")
        em.line("#endif")
        em.line(f"const int64_t lo = {rows} * tid / nt, hi = {rows} * (tid + 1) / nt;")
        em.line(f"{et} own_e[{chunk}];")
        em.line(f"{dt} own_d[{chunk}];")
        em.mark()
        em.line(f"for (int64_t e0 = 0; e0 < {n_edges};) {{")
        outer: list[str] = []
        em.push(outer, em.scopes[-1].indent + "  ", loop_vars={"e0"})
        em.line("int64_t n = 0;")
        # 1. the next `chunk` owned edges, in order (branch-free)
        em.line("{")
        em.line("int64_t e = e0;")
        em.mark()
        em.line(f"for (; e < {n_edges} && n < {chunk}; ++e) {{")
        listing: list[str] = []
        em.push(listing, em.scopes[-1].indent + "  ", loop_vars={"e"})
        d = em.checked_index(em.value(idx, ["e"]), rows, op.attr("wrap", True))
        em.line(f"own_e[n] = ({et})e;")
        em.line(f"own_d[n] = ({dt}){d};")
        em.line(f"n += ({d} >= lo) & ({d} < hi);")
        em.pop()
        em.scopes[-1].lines.extend(listing)
        em.line("}")
        em.line("e0 = e;")
        em.line("}")
        # 2. accumulate them
        em.mark()
        em.line("for (int64_t k = 0; k < n; ++k) {")
        body: list[str] = []
        em.push(body, em.scopes[-1].indent + "  ", loop_vars={"k", "e", "d"})
        em.line("{")
        em.line(f"const int64_t ka = k + {self.PREFETCH} < n ? k + {self.PREFETCH} : n - 1;")
        em.line("const int64_t ea = own_e[ka];")
        em.line("(void)ea;")
        self._prefetch_rows("ea", n_edges)
        self._prefetch(f"{target} + (int64_t)own_d[ka] * {width}",
                       width * op.result.type.dtype.itemsize, True, 3)
        em.line("}")
        edge_rows = [(b, n) for b, n in self._edge_rows(src) if n >= 64]
        if edge_rows:  # read in edge order, but with gaps when the thread owns few edges
            em.line("{")
            em.line(f"const int64_t eb = own_e[k + {self.PREFETCH_EDGE} < n ? "
                    f"k + {self.PREFETCH_EDGE} : n - 1];")
            for buf, nbytes in edge_rows:
                self._prefetch(f"{buf} + eb * {math.prod(dims(src)[1:])}", nbytes, False, 0)
            em.line("}")
        em.line("const int64_t e = own_e[k];")
        em.line("const int64_t d = own_d[k];")
        names = [f"c{k}" for k in range(len(inner))]
        em.mark()
        for k, n in enumerate(inner):
            if k == len(inner) - 1:
                em.line("#pragma omp simd")
            em.line(f"for (int64_t {names[k]} = 0; {names[k]} < {n}; ++{names[k]}) {{")
        deep: list[str] = []
        em.push(deep, em.scopes[-1].indent + "  ", loop_vars=set(names))
        val = em.value(src, ["e"] + names)
        scale = "" if alpha == 1 else f"({ct}){literal(alpha, op.result.type.dtype)} * "
        em.line(em.update(target, linearize(["d"] + names, xs), op.result.type.dtype,
                          lambda c: f"{c} + {scale}{val}"))
        em.pop()
        em.scopes[-1].lines.extend(deep)
        for _ in inner:
            em.line("}")
        em.pop()
        em.scopes[-1].lines.extend(body)
        em.line("}")
        em.pop()
        em.scopes[-1].lines.extend(outer)
        em.line("}")
        em.line("}")
        em.line("#pragma omp barrier")

    def _reset_scattered(self, op, target: str, ishape: list[int], xs: list[int]) -> None:
        """include_self=False: every position some element scatters to starts from the
        reduction's identity instead of the input's value."""
        em = self.em
        red = op.attributes["reduce"]
        t = op.result.type.dtype
        ident = {"sum": literal(0, t), "prod": literal(1, t),
                 "amax": literal(-math.inf, t) if t.is_float else
                 f"std::numeric_limits<{ctype(t)}>::lowest()",
                 "amin": literal(math.inf, t) if t.is_float else
                 f"std::numeric_limits<{ctype(t)}>::max()"}[red]
        names = [f"z{k}" for k in range(len(ishape))]
        self._open_serial(names, ishape)
        pos = em.checked_index(em.value(op.operand(1), names), xs[op.attributes["dim"]],
                               op.attr("wrap", True))
        dst = list(names)
        dst[op.attributes["dim"]] = pos
        em.line(em.store(target, linearize(dst, xs), t, ident))
        self._close_serial(len(ishape))

    def _open_serial(self, names: list[str], shape: list[int]) -> None:
        """Open a serial loop nest over ``shape`` with one emitter scope per level, so what
        depends only on the outer loops (an edge's gathered index) is computed once per outer
        iteration, not once per element of the inner ones."""
        em = self.em
        self._serial = []
        em.mark()
        for name, n in zip(names, shape):
            em.line(f"for (int64_t {name} = 0; {name} < {n}; ++{name}) {{")
            level: list[str] = []
            em.push(level, em.scopes[-1].indent + "  ", loop_vars={name})
            em.mark()
            self._serial.append(level)

    def _close_serial(self, depth: int) -> None:
        em = self.em
        for level in reversed(self._serial[-depth:] if depth else []):
            em.pop()
            em.scopes[-1].lines.extend(level)
            em.line("}")
        self._serial = self._serial[:-depth] if depth else self._serial


# ----------------------------------------------------------------------------------------------


def render_group(group: fusion.GroupOp, name: str = "") -> KernelSource:
    """The C++ source of one kernel for ``group``; raises ``Unsupported`` when the cpp target
    cannot compile it (the runtime then runs the group some other way)."""
    args = list(group.body.args)
    outputs = list(group.body.terminator.operands)
    for v in args + outputs:
        ctype(v.type.dtype)
    if all(0 in dims(v) for v in outputs):
        raise Unsupported("every output is empty (the runtime allocates them; nothing to run)")
    buffers = {id(a): f"in{k}" for k, a in enumerate(args)}
    out_names: dict[int, list[str]] = {}
    for k, v in enumerate(outputs):
        out_names.setdefault(id(v), []).append(f"out{k}")
    # half types are stored as their 16 bits, i1 as bytes; the kernel computes in float / bool
    stored = {f"in{k}": a.type.dtype for k, a in enumerate(args) if a.type.dtype in STORED}
    stored.update({f"out{k}": v.type.dtype for k, v in enumerate(outputs)
                   if v.type.dtype in STORED})
    ops = [op.name for op in group.body.ops[:-1]]
    context = {
        "ops": ops, "kind": group.kind, "mapping": group.attr("mapping", ""),
        "inputs": [(f"in{k}", storage_ctype(a.type.dtype), str(a.type)) for k, a in enumerate(args)],
        "outputs": [(f"out{k}", storage_ctype(v.type.dtype), str(v.type))
                    for k, v in enumerate(outputs)],
        "prelude": PRELUDE,
        # a kernel too small to feed a thread team runs on the calling thread (the schedule's
        # choice): the parallel region is serialised, no threads are woken
        "serial": group.attr("team", 0) == 1,
    }
    symbols = symbols_of(args + [r for op in group.body.ops for r in op.results])
    context["symbols"] = symbols
    strategy = "rows"
    scratch: list = []
    try:
        if len(set(map(id, outputs))) != len(outputs):
            raise RowsUnfit("an output yielded twice")
        try:
            rk = RowKernel(group, dict(buffers), {k: v[0] for k, v in out_names.items()}, stored)
            context.update(rk.render(), gathers=rk.em_has_gather)
        except TypeError as e:  # arithmetic a symbolic size does not have
            raise RowsUnfit(f"symbolic sizes: {e}") from None
        template = "rows.cpp.jinja"
    except RowsUnfit:
        strategy = "phases"
        try:
            pk = PhaseKernel(group, dict(buffers), out_names, stored)
            context.update(pk.render(len(args) + len(outputs)), gathers=pk.gathers)
        except TypeError as e:
            raise Unsupported(f"symbolic sizes: {e}") from None
        scratch = pk.scratch
        template = "phases.cpp.jinja"
    context["syms_arg"] = len(args) + len(outputs) + len(scratch)
    context["strategy"] = strategy
    body_hash = hashlib.sha256(repr((ops, str(group.attributes), strategy)).encode())
    context["symbol"] = "stitch_" + (name or "k") + "_" + body_hash.hexdigest()[:10]
    source = TEMPLATES.get_template(template).render(**context)
    body = TEMPLATES.get_template(template).render(**{**context, "prelude": ""})
    symbol = context["symbol"]
    # the symbol names the source: two different kernels never share one
    final = "stitch_" + (name or "k") + "_" + hashlib.sha256(source.encode()).hexdigest()[:12]
    return KernelSource(final, source.replace(symbol, final), strategy, len(args), len(outputs),
                        scratch, body.replace(symbol, final), symbols)
