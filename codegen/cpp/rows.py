"""The ``rows`` strategy of a cpu kernel (FusionStitching's regional stitching, CPU form): every
reduction is a row reduction over the same ``R`` rows of ``L`` trailing elements. One OpenMP loop
over rows; inside, one vectorised loop over the row per *phase* (phase k computes what needs the
reductions of phase k - 1). Reduction results are per-row scalars in registers; row values needed
again in a later phase are kept in a per-thread row buffer (L1 / L2 resident) or recomputed.
A group this strategy cannot take raises ``RowsUnfit`` (``codegen.cpp.phases`` takes it)."""

from __future__ import annotations

import math

from codegen.cpp.accumulate import (
    SCATTERS,
    _acc_ctype,
    _acc_final,
    _acc_update,
    acc_declaration,
    at_least_1,
)
from codegen.cpp.emit import Emitter, delinearize
from codegen.cpp.layout import buffer_bytes, transposed_dim
from codegen.cpp.scalars import STORED, Unsupported, ctype, dims, round_to, sets_err, storage_ctype
from codegen.cpp.scalars import hint as size_hint
from stitch_ir.core import Value
from stitch_ir.dialects import fusion, st
from stitch_ir.types import DType


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




class RowKernel:
    """The ``rows`` strategy (see the module docstring)."""

    def __init__(self, group: fusion.GroupOp, buffers: dict[int, str], out_ptrs: dict[int, str],
                 stored: dict[str, object] | None = None, half_precision: str = "float32"):
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
        found = transposed_dim(dom.operand(0), buffers, buffer_bytes(group.body.args, buffers))
        if found is not None and found[1] not in dom.dims:
            raise RowsUnfit("the rows are strided in memory (the phases strategy runs along the "
                            "contiguous dim)")
        self.reduces = reduces
        self.em = Emitter(buffers, stored, half_precision)
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
            elif base == "j":
                # the vector loop's own index split inline, not into temporaries: a load
                # through all of them (a row over [32, 32] of a [C, 32, 32] map) is then
                # ``linearize``d back to ``j`` itself, one contiguous load, where
                # ``(j1_0)*32 + (j1_1)`` kept a ``/`` and a ``%`` per element
                self.names[key] = delinearize(base, list(nz))
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

    def _register(self, v: Value, expr: str, strict: bool = True) -> None:
        """Reads of ``v`` at the current row and column become ``expr``; elsewhere they are not
        possible (``strict``) or read ``v``'s buffer as usual."""
        def hook(idx, v=v, expr=expr):
            if self._same_position(idx, v):
                return expr
            if not strict:
                return None
            raise RowsUnfit("a row value is read at another row or column")

        self.em.known[id(v)] = hook

    # -- rendering -----------------------------------------------------------------------------
    def render(self) -> dict:
        em = self.em
        full = self.R * self.L
        avail: dict[int, int] = {id(a): 0 for a in self.group.body.args}
        loop_of: dict[int, int] = {}
        # float16 values rounded along the row (what a discontinuous function reads) end their
        # loop: stored unrounded to a row buffer, rounded whole (st_round_h_row), read by the
        # next loop
        rounded: list[Value] = []
        for op in self.body:
            p = max([avail.get(id(o), 0) for o in op.operands] or [0])
            if isinstance(op, st.ReduceOp):
                loop_of[id(op)] = p
                avail[id(op.result)] = p + (2 if isinstance(op, st.VarOp) else 1)
            else:
                for r in op.results:
                    avail[id(r)] = p
                    if self._rounds_along_row(r):
                        rounded.append(r)
                        avail[id(r)] = p + 1
        hround = {id(v): f"hround{k}" for k, v in enumerate(rounded)}
        outs_full = [v for v in self.outputs if math.prod(dims(v)) == full]
        outs_row = [v for v in self.outputs if v not in outs_full]
        if any(math.prod(dims(v)) != self.R for v in outs_row):
            raise RowsUnfit("an output is neither a row nor a row scalar")
        # Row values computed in more than one loop are kept in per-thread row buffers. The
        # emitter computes a value where it is read: an output in the loop that stores it, a
        # reduction's operand in the reduction's loop(s), a float16 value rounded along the row
        # in the loop before its own, a buffered value in the loop where it becomes available
        # (its buffer is written there), and any other value in every loop that reads it (a
        # dropout mask stored in the first loop and applied in the last was drawn twice).
        # Decided from the last op back, so a buffered value's operands are not counted in the
        # loops that read the buffer.
        used_in: dict[int, set[int]] = {}
        for v in outs_full:
            used_in.setdefault(id(v), set()).add(avail[id(v)])
        cheap = (st.ReduceOp, st.ReshapeOp, st.BroadcastOp, st.ConstantOp, st.IotaOp)
        chosen: set[int] = set()
        for op in reversed(self.body):
            if isinstance(op, st.ReduceOp):
                p = loop_of[id(op)]
                loops = {p, p + 1} if isinstance(op, st.VarOp) else {p}
            elif op.results and id(op.results[0]) in hround:
                loops = {avail[id(op.results[0])] - 1}
            else:
                loops = set().union(*(used_in.get(id(r), set()) for r in op.results))
                if len(loops) > 1 and not isinstance(op, cheap) and len(op.results) == 1 and \
                        math.prod(dims(op.result)) == full and \
                        _recompute_cost(op.result, chosen) > RECOMPUTE_LIMIT:
                    chosen.add(id(op.result))
                    loops = {avail[id(op.result)]}
            for o in op.operands:
                used_in.setdefault(id(o), set()).update(loops)
        regional: list[Value] = [op.result for op in self.body
                                 if len(op.results) == 1 and id(op.result) in chosen]
        bufs = {id(v): f"rowbuf{k}" for k, v in enumerate(regional)}
        ends = [loop_of[id(r)] + (1 if isinstance(r, st.VarOp) else 0) for r in self.reduces]
        n_loops = 1 + max(ends + [avail[id(v)] for v in outs_full + regional + rounded])
        # Large outputs are written row by row from an L1 row buffer with streaming stores: no
        # read-for-ownership of the destination, and 32 MiB of results do not evict the inputs.
        out_bytes = sum(size_hint(full) * v.type.dtype.itemsize for v in outs_full)
        streams = {id(v): f"streambuf{k}" for k, v in enumerate(outs_full)} \
            if self.group.attr("stream_stores", False) or out_bytes >= STREAM_MIN_BYTES else {}
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
        # float16 rows widened whole before the vector loops, and float16 results narrowed whole
        # after them (st_h2f_row / st_f2h_row: the conversion instructions, which GCC does not
        # vectorise itself); the loops read and write float
        half_in = [a for a in self.group.body.args if math.prod(dims(a)) == full and
                   a.type.dtype is DType.f16 and self.em.stored.get(self.em.buffers.get(id(a)))
                   is DType.f16 and used_in.get(id(a))]
        for k, a in enumerate(half_in):
            em.line(f"st_h2f_row(hrow{k}, {self.em.buffers[id(a)]} + r * {self.L}, {self.L});")
            self._register(a, f"hrow{k}[j]", strict=False)
        # a float16 vector of one row's length read along the row (a norm's weight): widened
        # once per thread, on its first row
        half_vec = [a for a in self.group.body.args if dims(a) == [self.L] and
                    isinstance(self.L, int) and size_hint(self.R) > 1 and
                    a.type.dtype is DType.f16 and used_in.get(id(a)) and
                    self.em.stored.get(self.em.buffers.get(id(a))) is DType.f16]
        if half_vec:
            em.line("if (!hvec_ready) {")
            for k, a in enumerate(half_vec):
                em.line(f"  st_h2f_row(hvec{k}, {self.em.buffers[id(a)]}, {self.L});")
            em.line("  hvec_ready = true;")
            em.line("}")
        for k, a in enumerate(half_vec):
            self.em.known[id(a)] = lambda idx, k=k: f"hvec{k}[j]" if list(idx) == ["j"] else None
        half_out = {id(v): f"hout{k}" for k, v in enumerate(
            v for v in outs_full if v.type.dtype is DType.f16 and id(v) not in streams and
            self.em.stored.get(self.out_ptrs[id(v)]) is DType.f16)}
        means: dict[int, str] = {}
        done_row_outs: set[int] = set()
        for loop in range(n_loops):
            steps = [(r, "main") for r in self.reduces if loop_of[id(r)] == loop]
            steps += [(r, "dev") for r in self.reduces
                      if isinstance(r, st.VarOp) and loop_of[id(r)] + 1 == loop]
            stores = [((streams[id(v)], "j") if id(v) in streams else
                       (half_out[id(v)], "j") if id(v) in half_out else
                       (self.out_ptrs[id(v)], f"r * {self.L} + j"), v)
                      for v in outs_full if avail[id(v)] == loop]
            stores += [((bufs[id(v)], "j"), v) for v in regional if avail[id(v)] == loop]
            stores += [((hround[id(v)], "j"), v) for v in rounded if avail[id(v)] == loop + 1]
            if not steps and not stores:
                continue
            accs = []
            clauses = []
            for k, (r, mode) in enumerate(steps):
                acc = f"acc{loop}_{k}"
                accs.append((r, mode, acc))
                decl, more = acc_declaration(r, mode, acc, _acc_ctype(r))
                for text in decl:
                    em.line(text)
                clauses += more
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
                if id(v) in hround and ptr == hround[id(v)]:  # rounded by st_round_h_row
                    em.line(f"{ptr}[{lin}] = {em.unrounded_value(v, self.idx_of(v))};")
                    continue
                x = em.value(v, self.idx_of(v))
                if id(v) in half_out:  # narrowed by st_f2h_row, which rounds: not rounded here
                    em.line(f"{ptr}[{lin}] = {em.unrounded.get(x, (None, x))[1]};")
                else:
                    em.line(em.store(ptr, lin, v.type.dtype, x))
            em.pop()
            lines.extend("        " + d for d in self.col_decl)
            lines.extend(body)
            em.line("}")
            for _, v in stores:
                if id(v) in half_out:
                    em.line(f"st_f2h_row({self.out_ptrs[id(v)]} + r * {self.L}, "
                            f"{half_out[id(v)]}, {self.L});")
                if id(v) in streams:
                    em.line(f"st_stream_row({self.out_ptrs[id(v)]} + r * {self.L}, {streams[id(v)]}, "
                            f"{self.L * v.type.dtype.itemsize});")
            for v in regional:
                if avail[id(v)] == loop:
                    self._register(v, f"{bufs[id(v)]}[j]")
            for v in rounded:
                if avail[id(v)] == loop + 1:
                    em.line(f"st_round_h_row({hround[id(v)]}, {self.L});")
                    self._register(v, f"{hround[id(v)]}[j]")
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
                # (a bool row as bytes: std::vector<bool> is a bitset)
                "row_buffers": [(bufs[id(v)], "uint8_t" if v.type.dtype is DType.i1 else
                                 ctype(v.type.dtype)) for v in regional] +
                [(f"hrow{k}", "float") for k in range(len(half_in))] +
                [(name, "float") for name in hround.values()] +
                [(f"hvec{k}", "float") for k in range(len(half_vec))] +
                [(name, "float") for name in half_out.values()] +
                [(streams[id(v)], storage_ctype(v.type.dtype)) for v in outs_full
                 if id(v) in streams],
                "streaming": bool(streams), "half_vectors": bool(half_vec)}

    def _rounds_along_row(self, v: Value) -> bool:
        """Whether ``v`` is a float16 value of the whole row that the loops would round element
        by element (``Emitter.rounds``), in rows long enough to round with the row conversion
        (``ROUND_ROW_MIN``). Under ``float32`` half precision only, where such values are few
        (what discontinuous functions read); ``eager`` rounds every op's result, and a loop per
        op was not measured."""
        return (v.type.dtype is DType.f16 and self.em.half_precision == "float32" and
                isinstance(self.L, int) and self.L >= ROUND_ROW_MIN and
                math.prod(dims(v)) == self.R * self.L and self.em.rounds(v))

    @property
    def em_has_gather(self) -> bool:
        return sets_err(self.body)


# A row value read in several phases is either kept in a row buffer (one store, then one L1
# load per later phase) or recomputed in each phase from the row's inputs, which are in L1 by
# then. Recomputing wins for short chains of cheap ops (x * 0.125, y + b + res): the buffer's
# store and loads cost as much as the ops, and the buffer competes for L1. Anything with a
# transcendental, a division, a random draw or a gather is buffered.
RECOMPUTE_LIMIT = 4
# Rows from this length round their float16 values whole (``RowKernel._rounds_along_row``): a
# loop boundary and a row buffer cost less than 8 vector instructions per 16 elements there.
ROUND_ROW_MIN = 32
# Outputs of a rows kernel are written with streaming stores where the schedule says so
# (``stream_stores``: at least the device's last-level cache, whose results leave the cache
# before a consumer reads them anyway), or from this size whatever the device (tests force it).
STREAM_MIN_BYTES = 1 << 62
_EXPENSIVE = frozenset({
    "st.exp", "st.exp2", "st.log", "st.log2", "st.log1p", "st.expm1", "st.sqrt", "st.rsqrt",
    "st.sin", "st.cos", "st.tan", "st.tanh", "st.sigmoid", "st.erf", "st.div", "st.pow",
    "st.remainder", "st.floor_div", "st.atan2", "st.reciprocal",
    "st.rand"})  # Philox4x32-10: ten rounds of two 32x32->64 multiplies an element


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


