"""The ``phases`` strategy of a cpu kernel (global stitching, and plain loop kernels): each
materialised value -- an output, a reduction, a scatter -- gets its own work-shared loop nest
inside one parallel region; the implicit barrier between them is the grid barrier.
Intermediates that are not outputs live in scratch buffers the runtime passes in. Element-wise
producers are inlined into each loop."""

from __future__ import annotations

import contextlib
import math

from codegen.cpp.accumulate import (
    LAYOUT_OPS,
    SCATTERS,
    _acc_final,
    _acc_update,
    acc_declaration,
    at_least_1,
    reshape_root,
)
from codegen.cpp.columns import ColumnPhases
from codegen.cpp.emit import Emitter, delinearize, linearize
from codegen.cpp.index import bounded
from codegen.cpp.layout import (
    broken_inner_run,
    buffer_bytes,
    cat_starts,
    contiguous_run,
    interchange,
    loop_order,
    merged_tail,
    transposed_dim,
    transposed_view,
)
from codegen.cpp.scalars import HALF, compute_itemsize, ctype, dims, round_to, sets_err
from codegen.cpp.scatter import ScatterPhases
from codegen.cpp.staged import StagedPhases
from stitch_ir.core import Value
from stitch_ir.dialects import fusion, st
from stitch_ir.types import DType


def _acc_type(op: st.ReduceOp) -> str:
    """A reduction's accumulator type. The simd lanes are usually the outputs, so each output
    adds its terms one at a time: a float accumulator's error grows with the length
    (adder_quant's 144-term sums were many ulps off torch's cascade sum, enough to flip later
    round()s). float32 sums accumulate in double and round once at the store, as the reference
    interpreter does."""
    t = ctype(op.result.type.dtype)
    return "double" if t == "float" and isinstance(op, st.SumOp | st.MeanOp | st.VarOp) else t


def _elementwise_value(v: Value) -> bool:
    """A value a plain loop nest computes (not a reduction, a scatter or a gather's result)."""
    op = getattr(v, "owner", None)
    return op is not None and not isinstance(op, (st.ReduceOp, *SCATTERS))


def _merges_innermost(shape: list, inner_shape: list) -> bool:
    """Whether a reshape from ``inner_shape`` to ``shape`` merges the former's innermost dim, a
    vector loop's worth (16 or more), with others into the latter's innermost dim."""
    if not shape or not inner_shape or not all(isinstance(n, int) for n in (*shape, *inner_shape)):
        return False
    return inner_shape[-1] >= 16 and shape[-1] > inner_shape[-1] and \
        shape[-1] % inner_shape[-1] == 0


def _plain_reduce(op) -> bool:
    return isinstance(op, st.ReduceOp) and not isinstance(op, st.ArgReduceOp)


# A float32 variance over an innermost loop of at most this many terms adds its squared
# deviations in float (16 lanes of at most 256 terms each with AVX-512), then in double.
PARTIAL_MAX = 4096



def _without_trailing_ones(shape: list) -> list:
    """``shape`` less its trailing static dims of 1, keeping at least one dim."""
    k = len(shape)
    while k > 1 and shape[k - 1] == 1:
        k -= 1
    return shape[:k]

class PhaseKernel(ColumnPhases, ScatterPhases, StagedPhases):
    """The ``phases`` strategy (see the module docstring)."""

    def __init__(self, group: fusion.GroupOp, buffers: dict[int, str], out_names: dict[int, list],
                 stored: dict[str, object] | None = None, half_precision: str = "float32"):
        self.group = group
        self.body = group.body.ops[:-1]
        self.em = Emitter(buffers, stored, half_precision)
        self.out_names = out_names  # id(value) -> every output pointer it is written to
        self.scratch: list[int] = []
        self.n_loops = 0
        self.gathers = sets_err(self.body)  # the loops reduce the error flag
        # float16 rows converted whole around a plain nest's vector loop (``_half_rows``):
        # output pointer -> the float row buffer its stores go to, and the nest's index
        self.half_out: dict[str, str] = {}
        self.half_idx: list[str] = []
        self.half_var = ""
        self.n_half = 0

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
        positions per element. A read's position is the path of non-element-wise ops (slices,
        pads, broadcasts, gathers) it is seen through: element-wise users read at their own
        position, so a value several element-wise ops use (a max-pool scan's running maximum:
        a compare and a select) is one read, computed once (the emitter shares it). Paths
        propagate from consumers to producers in reverse program order; a materialised value
        (an output, a reduction, a scatter, or one chosen here) is read at one position by its
        own producers."""
        cheap = (st.ConstantOp, st.IotaOp, *LAYOUT_OPS)
        paths: dict[int, set[tuple]] = {}
        chosen: set[int] = set()
        for op in reversed(self.body):
            materialised = isinstance(op, (st.ReduceOp, *SCATTERS)) or any(
                id(r) in self.out_names for r in op.results)
            seen: set[tuple] = set().union(*(paths.get(id(r), set()) for r in op.results))
            if len(op.results) == 1 and not materialised and len(seen) >= self.REREAD and \
                    not isinstance(op, cheap) and op.result.type.numel() > 1:
                chosen.add(id(op.result))
                materialised = True
            if materialised:
                seen = {()}
            step = () if op.kind == st.ELEMENTWISE else (id(op),)
            for o in op.operands:
                into = paths.setdefault(id(o), set())
                for path in seen:
                    if len(into) > self.REREAD:  # enough to decide; the set stays small
                        break
                    into.add(path + step)
        return chosen

    def render(self, first_scratch_arg: int) -> dict:
        em = self.em
        self.first_scratch = first_scratch_arg
        phases: list[list[str]] = []
        values = self.materialised()
        siblings = self.sibling_reductions(values)
        beside = self.sibling_outputs(values)
        done: set[int] = set()
        for v in values:
            if id(v) in done:
                continue
            # A half-typed scatter accumulates in float and rounds once at the end, as eager's
            # index_add / scatter_add / scatter_reduce do: its target is a float scratch.
            wide = isinstance(v.owner, SCATTERS) and v.type.dtype in HALF
            targets = self._targets(v, wide, phases)
            lines: list[str] = []
            em.push(lines, "    ")
            op = v.owner
            together = [(w.owner, self._targets(w, False, phases))
                        for w in siblings.get(id(v), [])]
            made = [(r.result, tg) for r, tg in together]  # computed with v, in v's nest
            if isinstance(op, st.ArgReduceOp):
                self.arg_reduce(op, targets)
            elif isinstance(op, st.ReduceOp):
                self.reduce(op, targets, together)
            elif isinstance(op, SCATTERS):
                em.wide.add(targets[0])
                self.scatter(op, targets)
                if wide:
                    self._round_scattered(v, targets[0])
            else:
                made = [(w, self.out_names[id(w)]) for w in self.elementwise(
                    v, targets, [w for w in beside.get(id(v), []) if id(w) not in done])]
            em.pop()
            phases.append(lines)
            for w, tg in [(v, targets)] + made:
                done.add(id(w))
                em.buffers[id(w)] = tg[0]
                root = reshape_root(w)
                if root is not w and id(root) not in em.buffers and \
                        getattr(root, "owner", None) in self.body:
                    em.buffers[id(root)] = tg[0]  # same elements, same row-major order
        return {"phases": phases}

    def _targets(self, v: Value, wide: bool, phases: list[list[str]]) -> list[str]:
        """Where materialised ``v`` is written: its outputs, else a new scratch buffer (declared
        at the top of the next phase)."""
        if id(v) in self.out_names and not wide:
            return list(self.out_names[id(v)])
        k = len(self.scratch)
        self.scratch.append(at_least_1(math.prod(dims(v))) * compute_itemsize(v.type.dtype))
        name = f"scr{k}"
        phases.append([f"    {ctype(v.type.dtype)}* __restrict {name} = "
                       f"({ctype(v.type.dtype)}*)args[{self.first_scratch + k}];"])
        return [name]

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
    BLOCK = 4096  # elements a work-shared block of a long 1-D nest hands a thread at once

    def nest(self, shape: list[int], emit, reductions: str = "",
             order: list[int] | None = None, half: list[tuple[Value, list[str]]] = (),
             unmerge=None, run: int | None = None, blocked: bool = False,
             splits: list[int] | None = None) -> None:
        """One loop nest over ``shape``; ``emit(idx)`` writes the body. ``order``: the dims from
        outermost to innermost (row-major by default; the innermost is always the last dim).
        ``half``: the (value, output pointers) the body computes, for ``_half_rows``;
        ``unmerge``: where the nest's dims merge the values' trailing dims (``merged_nest``),
        the values' shape and the map from the nest's indices to theirs; ``run``: the length
        of the contiguous runs the innermost dim's reads come in (``contiguous_run``), where the
        vector loop runs over one run at a time."""
        ones = len(shape) - len(_without_trailing_ones(shape))
        if ones and len(shape) - ones >= 2 and unmerge is None and \
                (order is None or order == list(range(len(shape)))):
            # trailing dims of 1 ([2, 320, 256, 1]: rffs_net's points as a 1-wide image) loop
            # over nothing: the vector loop is the last dim that has a length (a loop of one
            # had left the 256 scalar, 659 us where 26 were due). Not down to one dim: a
            # row statistic [R, 1] computed by an inner reduction loop keeps that loop the
            # vector one (as ``omp for simd`` over R, GCC vectorised across the rows instead:
            # an MLP's layer norm backward, 69 -> 237 us)
            self.nest(shape[:-ones], lambda idx: emit(list(idx) + ["0"] * ones), reductions,
                      half=half)
            return
        lead = next((k for k, n in enumerate(shape) if n != 1), len(shape))
        rest = shape[lead:]
        if 0 < lead < len(shape) and unmerge is None and \
                (order is None or order == list(range(len(shape)))) and \
                (len(rest) >= 2 or (run is not None and run < rest[0]) or
                 (isinstance(rest[0], int) and rest[0] > self.BLOCK)) and \
                (len(rest) >= 2 or not any(
                    self.em.stored.get(t) is DType.f16 for _, ts in half for t in ts)):
            # leading dims of 1 ([1, 219991]: GAT's edge list with its self loops) are not
            # the work-shared loops: with a collapsed loop of one, one thread ran all of it
            # (a float16 row keeps its nest: the whole-row conversions need an outer loop)
            self.nest(rest, lambda idx: emit(["0"] * lead + list(idx)), reductions,
                      half=half, run=run, blocked=True)
            return
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
        if len(shape) == 1 and blocked and (run is not None and run < shape[0] or
                                            isinstance(shape[0], int) and shape[0] > self.BLOCK):
            # work-shared blocks (contiguous runs, or BLOCK elements), each a vector loop: the
            # same inner loop as a nest of two or more dims has
            h, q = f"{names[0]}h", f"{names[0]}q"
            em.line("#pragma omp for schedule(static)")
            if run is not None and run < shape[0]:
                self._run_loops(h, q, shape[0] // run, run, err,
                                lambda: emit([f"({h} * {run} + {q})"]))
                return
            n, b = shape[0], self.BLOCK
            em.line(f"for (int64_t {h} = 0; {h} < {-(-n // b)}; ++{h}) {{")
            with em.loop_body([h]):
                em.line(f"const int64_t {h}n = {h} * {b} + {b} <= {n} ? {b} : {n} - {h} * {b};")
                self._simd_loop(q, f"{h}n", err, lambda: emit([f"({h} * {b} + {q})"]))
            return
        if len(shape) == 1:
            em.line("#pragma omp for simd schedule(static)")
            em.line(f"for (int64_t {names[0]} = 0; {names[0]} < {shape[0]}; ++{names[0]}) {{")
            with em.loop_body(names):
                emit(names)
            return
        em.line(f"#pragma omp for collapse({len(shape) - 1}) schedule(static)")
        for k in order[:-1]:
            em.line(f"for (int64_t {names[k]} = 0; {names[k]} < {shape[k]}; ++{names[k]})")
        em.line("{")
        # Two scopes: what depends only on the collapsed (outer) loops -- a channel's scale, a
        # row's statistics -- is computed once per pass of the innermost loop, above it.
        with em.loop_body(names[:-1]):
            post = self._half_rows(half, shape, names, unmerge) if half and order == list(
                range(len(shape))) else None
            if splits and run is None and post is None:
                # one vector loop per part of a cat along the innermost dim
                for lo, hi in zip([0, *splits], [*splits, shape[-1]]):
                    q = f"{names[-1]}s{lo}"
                    at = f"({q} + {lo})" if lo else q
                    em.ranges[at] = (lo, hi)
                    self._simd_loop(q, hi - lo, err, lambda at=at: emit(names[:-1] + [at]))
                    del em.ranges[at]
            elif run is None or post is not None:
                self._simd_loop(names[-1], shape[-1], err, lambda: emit(names))
            else:
                # runs of the innermost dim a reshape split from another: the vector loop reads
                # one run, its index exact without a / or % of the loop's variable
                # (charformer's head split: [256, 64, 16] read as [2, 64, 64, 32], 16-float runs)
                h, q = f"{names[-1]}h", f"{names[-1]}q"
                at = names[:-1] + [f"({h} * {run} + {q})"]
                self._run_loops(h, q, shape[-1] // run, run, err, lambda: emit(at))
            if post is not None:
                post()

    def _half_rows(self, half: list[tuple[Value, list[str]]], shape: list[int],
                   names: list[str], unmerge=None):
        """Send a plain nest's float16 stores to float row buffers narrowed whole after its
        vector loop (``st_f2h_row``, the conversion instruction; as the rows strategy does;
        the rows it reads are widened whole by ``Emitter.f16_row``). A merged nest's row
        (``unmerge``) is its merged trailing dims, contiguous in row-major buffers. Returns
        what to run after the loop, or None where nothing is converted."""
        n = shape[-1]
        if not isinstance(n, int) or not 16 <= n <= 4096:
            return None
        em = self.em
        base = linearize(names[:-1] + ["0"], shape)
        vshape, at = (unmerge[0], unmerge[1](list(names))) if unmerge else (shape, list(names))
        outs = [t for v, ts in half if dims(v) == vshape for t in ts
                if em.stored.get(t) is DType.f16]
        if not outs:
            return None
        for t in outs:
            self.half_out[t] = f"hout{self.n_half}"
            self.n_half += 1
            em.line(f"float {self.half_out[t]}[{n}];")
        self.half_idx, self.half_var = list(at), names[-1]

        def post():
            for t in outs:
                em.line(f"st_f2h_row({t} + {base}, {self.half_out.pop(t)}, {n});")
            self.half_idx = []
        return post

    def _simd_loop(self, var: str, bound, err: str, body) -> None:
        """``#pragma omp simd`` over ``var`` in [0, ``bound``); ``body()`` writes the loop body,
        whose invariant statements hoist above the pragma (which must precede its loop)."""
        em = self.em
        em.line(f"#pragma omp simd{err}")
        em.mark()
        em.scopes[-1].hoist_at -= 1
        em.line(f"for (int64_t {var} = 0; {var} < {bound}; ++{var}) {{")
        with em.vector_rows(var, bound), em.loop_body([var]):
            body()

    def _run_loops(self, h: str, q: str, count, run: int, err: str, body,
                   bound: int | None = None) -> None:
        """A loop over ``count`` contiguous runs (``h``, at most ``bound``, default ``count``)
        and the vector loop along one run (``q``, ``run`` long), their ranges declared
        (``bounded``) so that the body's indices split exactly, without a / or % of ``q``."""
        em = self.em
        em.mark()
        em.line(f"for (int64_t {h} = 0; {h} < {count}; ++{h}) {{")
        with em.loop_body([h]), bounded(**{h: count if bound is None else bound, q: run}):
            self._simd_loop(q, run, err, body)

    def store(self, targets: list[str], v: Value, idx: list[str], expr: str) -> None:
        lin = linearize(idx, dims(v))
        for t in targets:
            row = self.half_out.get(t)
            if row is not None and list(idx) == self.half_idx:  # narrowed whole after the loop
                self.em.line(f"{row}[{self.half_var}] = "
                             f"{self.em.unrounded.get(expr, (None, expr))[1]};")
            else:
                self.em.line(self.em.store(t, lin, v.type.dtype, expr))

    def elementwise(self, v: Value, targets: list[str], others: list[Value] = ()) -> list[Value]:
        """``v``'s loop nest; returns those of ``others`` (outputs of ``v``'s shape that can be
        computed beside it, ``sibling_outputs``) it also computed: those that, like ``v``, run
        as a plain nest with the same merged dims, sharing its loads and common subexpressions
        (a max pool's values and indices)."""
        sizes = buffer_bytes(self.values_in_buffers(), self.em.buffers)
        emit = lambda idx: self.store(targets, v, idx, self.em.value(v, idx))  # noqa: E731
        staged = transposed_view(v, self.em.buffers, sizes)
        if staged is not None:
            self.nest_staged(dims(v), staged[1], staged[0], emit)
            return []
        # A transpose after element-wise ops (rffs_net's batch norm + ReLU, then a permute,
        # often reshaped on the way out, merging the batch with the old innermost dim): loop
        # over the permuted value (a reshape keeps the row-major order: the same linear index
        # into the output) and stage the computed value itself in tiles, its inputs read along
        # their contiguous dim.
        u = reshape_root(v)
        if isinstance(getattr(u, "owner", None), st.PermuteOp) and u.owner in self.body and \
                (u is v or id(u) not in self.em.buffers):
            found = transposed_dim(u, self.em.buffers, sizes)
            if found is not None:
                self.nest_staged(dims(u), found[1], [u],
                                 lambda idx: self.store(targets, u, idx, self.em.value(u, idx)))
                return []
        # A value computed by a layout op, reshaped so that the nest's innermost dim would merge
        # several of that op's dims (a head merge, [B, S, H, D] -> [B*S, H*D], of a gradient
        # read head-major): loop over the unreshaped value instead, the same flat index into the
        # output, so the inner loop runs along its innermost dim without a / and % of the loop
        # variable in every load (bert's backward, a 256 KiB head merge and its bias gradient:
        # 50-57 us in place, 31-39 us so).
        if u is not v and isinstance(getattr(u, "owner", None), LAYOUT_OPS) and \
                u.owner in self.body and id(u) not in self.em.buffers and \
                _merges_innermost(dims(v), dims(u)):
            self.nest(dims(u), lambda idx: self.store(targets, u, idx, self.em.value(u, idx)))
            return []
        inner = interchange(v, self.em.buffers, sizes)
        if inner is not None:
            self.nest(dims(v), emit, order=loop_order(dims(v), inner))
            return []
        serial = self.group.attr("team", 0) == 1  # no team to balance work over
        tail = merged_tail(v, self.em.buffers, outer_min=1 if serial else 16)
        plain = [w for w in others if transposed_view(w, self.em.buffers, sizes) is None and
                 not isinstance(getattr(reshape_root(w), "owner", None), st.PermuteOp) and
                 interchange(w, self.em.buffers, sizes) is None and
                 merged_tail(w, self.em.buffers, outer_min=1 if serial else 16) == tail]

        def emit_all(idx):
            emit(idx)
            for w in plain:
                self.store(self.out_names[id(w)], w, idx, self.em.value(w, idx))

        half = [(v, targets), *((w, self.out_names[id(w)]) for w in plain)]
        if tail <= 1 and len(dims(v)) >= 2:
            run = None
            if any(broken_inner_run(w, self.em.buffers) for w in [v, *plain]):
                run = contiguous_run([v, *plain], len(dims(v)) - 1, self.em.buffers,
                                     dims(v)[-1])
            # a cat along the innermost dim: a vector loop per part, each reading only its part
            # (``Emitter.cat`` resolves it by ``em.ranges``), where one loop loaded every part,
            # clamped, and blended them (EdgeConv's message [x_i, x_j - x_i]: three gathered rows
            # an element, 30 ms of a 90 ms bf16 call)
            splits = None if run is not None else sorted(
                {at for w in [v, *plain] for at in cat_starts(w, self.em.buffers)}) or None
            self.nest(dims(v), emit_all, half=half, run=run, splits=splits)
        else:
            self.merged_nest(dims(v), tail, emit_all, half)
        return plain

    def sibling_outputs(self, values: list[Value]) -> dict[int, list[Value]]:
        """Element-wise values among the materialised ``values`` -> later outputs of the same
        shape whose loop nest can be the same: element-wise too, and reading no value
        materialised at or after it (so computing them early reads only what is ready)."""
        at = {id(v): k for k, v in enumerate(values)}
        out: dict[int, list[Value]] = {}
        taken: set[int] = set()
        for k, v in enumerate(values):
            if id(v) in taken or not _elementwise_value(v):
                continue
            for w in values[k + 1:]:
                if id(w) in taken or not _elementwise_value(w) or dims(w) != dims(v) or \
                        id(w) not in self.out_names:
                    continue
                if all(at[r] < k or (r == id(v) and self._in_place(w, v, at))
                       for r in self._materialised_reads(w, at)):
                    out.setdefault(id(v), []).append(w)
                    taken.add(id(w))
        return out

    def _in_place(self, w: Value, v: Value, at: dict[int, int]) -> bool:
        """Whether ``w`` reads ``v`` only at its own index, through element-wise ops (other
        materialised values, ids in ``at``, are read from their buffers): in ``v``'s nest the
        value is then in a register (a bias add saved for the backward and the GELU of it: one
        pass over the rows, not a second one reading the first's output back). Not for half
        types, whose stored value is rounded and the register's is not."""
        if v.type.dtype in HALF:
            return False
        memo: dict[int, tuple[bool, bool]] = {}

        def walk(x) -> tuple[bool, bool]:  # (reaches v, every path to v element-wise)
            if x is v:
                return True, True
            if id(x) in memo:
                return memo[id(x)]
            op = getattr(x, "owner", None)
            if op is None or op not in self.body or id(x) in at or id(reshape_root(x)) in at:
                return False, True
            reaches, ok = False, True
            for y in op.operands:
                r, o = walk(y)
                reaches |= r
                ok &= o and not (r and (op.kind != st.ELEMENTWISE or dims(x) != dims(v)))
            memo[id(x)] = (reaches, ok)
            return reaches, ok

        return all(walk(x)[1] for x in w.owner.operands)

    def _materialised_reads(self, w: Value, at: dict[int, int]) -> set[int]:
        """The materialised values (ids in ``at``) that computing ``w`` reads."""
        found: set[int] = set()
        todo = [x for x in w.owner.operands]
        seen: set[int] = set()
        while todo:
            x = todo.pop()
            if id(x) in seen:
                continue
            seen.add(id(x))
            root = reshape_root(x)
            if id(x) in at or id(root) in at:
                found.add(id(x) if id(x) in at else id(root))
                continue
            op = getattr(x, "owner", None)
            if op is not None and op in self.body:
                todo.extend(op.operands)
        return found

    def merged_nest(self, shape: list[int], tail: int, emit,
                    half: list[tuple[Value, list[str]]] = ()) -> None:
        """``nest`` with the last ``tail`` dims run by its innermost loop (``merged_tail``):
        [B, C, 64, 8] times a per-channel scale vectorises over 512 elements a pass, not 8.
        ``half``: as ``nest``'s (a merged nest of two or more dims converts whole rows too)."""
        if tail <= 1:
            self.nest(shape, emit)
            return
        k = len(shape) - tail
        unmerged = lambda idx: idx[:k] + delinearize(idx[k], shape[k:])  # noqa: E731
        merged = shape[:k] + [math.prod(shape[k:])]
        if len(merged) < 2:
            half = ()
        self.nest(merged, lambda idx: emit(unmerged(idx)), half=half, unmerge=(shape, unmerged))

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

    def reduce(self, op: st.ReduceOp, targets: list[str],
               siblings: list[tuple[st.ReduceOp, list[str]]] = ()) -> None:
        """``op``'s loop nest, which also computes ``siblings`` (``(reduction, targets)``: same
        operand, dims and result shape, see ``sibling_reductions``): the operand is read once
        for all of them (a group norm's sum and variance)."""
        em = self.em
        shape = dims(op.operand(0))
        red_shape = [shape[d] for d in op.dims]
        n = math.prod(red_shape)  # 0 for an empty reduction: its mean is 0 / 0 = NaN, as eager
        col = self._column_dim(op)
        if col is not None:
            return self._column_reduce(op, targets, _acc_type(op), col)
        members = [(op, targets)] + list(siblings)

        def body(out_idx):
            names = [f"k{self.n_loops}_{k}" for k in range(len(red_shape))]

            def loops(accs: list[tuple[st.ReduceOp, str, str, str | None]]):
                """One loop nest over the reduced dims updating every (op, mode, acc, mean)."""
                for r, mode, acc, _ in accs:
                    decl, _ = acc_declaration(r, mode, acc, _acc_type(r))
                    for text in decl:
                        em.line(text)
                # a float32 variance's squared deviations: a float partial sum per innermost
                # loop (split over the vector lanes, as the rows strategy sums a row), added
                # into the double accumulator once the loop ends. Sums stay double term by
                # term: a float32 sum is correctly rounded (a later round(y / s) lands where
                # eager's does; test_long_sum_feeding_round_is_correctly_rounded)
                inner = red_shape[-1]
                split = [mode == "dev" and _acc_type(r) == "double"
                         and ctype(r.result.type.dtype) == "float"
                         and isinstance(inner, int) and inner <= PARTIAL_MAX
                         for r, mode, _, _ in accs]
                for (_, _, _, mean), sp in zip(accs, split):
                    if sp:
                        em.line(f"const float {mean}f = (float){mean};")
                inner_accs = [(r, mode, acc + "p", mean + "f") if sp else (r, mode, acc, mean)
                              for (r, mode, acc, mean), sp in zip(accs, split)]
                # a scope per reduced dim: what the innermost loop reads invariantly (a float16
                # row widened whole) is placed above it, inside the outer ones
                with contextlib.ExitStack() as outer:
                    em.mark()
                    for k, size in enumerate(red_shape[:-1]):
                        em.line(f"for (int64_t {names[k]} = 0; {names[k]} < {size}; ++{names[k]}) {{")
                        outer.enter_context(em.loop_body([names[k]]))
                        em.mark()

                    clauses = []
                    for (r, mode, acc, _), sp in zip(inner_accs, split):
                        decl, more = acc_declaration(r, mode, acc, "float" if sp else _acc_type(r))
                        if sp:
                            for text in decl:
                                em.line(text)
                        clauses += more

                    def update():
                        x = em.value(op.operand(0), self._input_index(op, out_idx, names))
                        for r, mode, acc, mean in inner_accs:
                            em.line(_acc_update(r, mode, acc, x, mean))
                    self._simd_loop(names[-1], red_shape[-1], " " + " ".join(clauses)
                                    if clauses else "", update)
                    for (_, _, acc, _), sp in zip(accs, split):
                        if sp:
                            em.line(f"{acc} += {acc}p;")

            base = f"acc{self.n_loops}"
            accs = [f"{base}_{j}" if j else base for j in range(len(members))]
            # the sums first (a variance's mean among them), then the deviations; a variance
            # whose sibling is a sum or mean of the same type takes that sum (a group norm's
            # mean and variance: one accumulator, not two adding the same terms)
            sums = {_acc_type(r): acc for (r, _), acc in zip(members, accs)
                    if isinstance(r, st.SumOp | st.MeanOp)}
            loops([(r, "main", acc + ("s" if isinstance(r, st.VarOp) else ""), None)
                   for (r, _), acc in zip(members, accs)
                   if not (isinstance(r, st.VarOp) and _acc_type(r) in sums)])
            dev = []
            for (r, _), acc in zip(members, accs):
                if isinstance(r, st.VarOp):
                    total = sums.get(_acc_type(r), f"{acc}s")
                    em.line(f"const {_acc_type(r)} {acc}m = {total} / ({_acc_type(r)}){n};")
                    dev.append((r, "dev", acc, f"{acc}m"))
            if dev:
                loops(dev)
            for (r, tg), acc in zip(members, accs):
                self.store(tg, r.result, out_idx, round_to(r.result.type.dtype,
                                                           _acc_final(r, acc, n)))

        self.nest(dims(op.result), body)

    def sibling_reductions(self, values: list[Value]) -> dict[int, list[Value]]:
        """Reductions among the materialised ``values`` that share one loop nest: a reduction
        (not an arg-reduce, not run as a column) -> the later ones of the same operand, dims,
        keepdim and result shape. Moving a later one up is safe: its operand is ready then."""
        out: dict[int, list[Value]] = {}
        taken: set[int] = set()
        for i, v in enumerate(values):
            op = v.owner
            if id(v) in taken or not _plain_reduce(op) or self._column_dim(op) is not None:
                continue
            for w in values[i + 1:]:
                o = w.owner
                if id(w) not in taken and _plain_reduce(o) and o.operand(0) is op.operand(0) and \
                        list(o.dims) == list(op.dims) and o.keepdim == op.keepdim and \
                        dims(w) == dims(v) and self._column_dim(o) is None:
                    out.setdefault(id(v), []).append(w)
                    taken.add(id(w))
        return out

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
