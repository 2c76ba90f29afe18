"""The CUDA C reduction renderer: one scheduled kernel's reductions of one parallel shape, with
their stitched prologue and epilogue, as phases (``codegen.cuda.phase``) following the
schedule's thread mapping. It never re-decides the mapping.

The dominant reduction reads ``S`` and reduces ``dims``: ``O`` positions (rows) of ``K`` terms.
A *team* of threads reduces one position:

- ``warp_per_row``: a warp per row (``T`` = 32), ``rows_per_block`` rows per block; the row is
  reduced by warp shuffles, and every lane ends with the result (no shared memory, no barrier);
- ``rows_per_block`` (packed short rows): ``T`` < 32 lanes per row, ``32 / T`` rows per warp,
  shuffles within each ``T``-lane segment;
- ``block_per_row``: the block is the team; warps reduce by shuffles, their partials meet in
  ``__shared__`` between two ``__syncthreads()`` and every thread reads the block's result
  back (regional stitching: the row's result broadcast through shared memory);
- ``split_row``: as ``block_per_row`` over a chunk of the row; each chunk's partial goes to a
  global scratch buffer, and after the barrier (``grid.sync()`` or the next kernel) every
  block combines the row's partials in chunk order (deterministic) and goes on;
- ``column_tiles``: 32 columns per block and ``threads / 32`` thread rows walking the reduced
  dim; the thread rows' partials meet in ``__shared__`` (regional), split like rows.

Each thread takes ``VEC`` consecutive terms per step (row layout: 16-byte vector loads and
stores of every buffer read or written at the row's own positions, when the row length is a
multiple of ``VEC``). Levels as in the Triton renderer: level 0 needs no reduction of this
kernel, a value one level above the deepest reduction it needs; one pass over the row per
level. A buffer read at the row's positions in more than one level is kept, when first
loaded, in registers (the thread's whole share of the row: at most ``reg_elems`` elements), or
else in a shared-memory row cache (regional stitching), or else read again (global: L2).
"""

from __future__ import annotations

import math

from codegen.cpp.emit import delinearize, reshape_index
from codegen.cuda.emit import (
    CudaEmitter,
    Unsupported,
    acc_ctype,
    ctype,
    dims,
    identity_literal,
    linearize,
    storage_ctype,
)
from codegen.cuda.phase import CTYPE_SIZE, Phase, Smem, buffer_uses
from stitch_ir.core import BlockArgument, Value
from stitch_ir.dialects import st
from stitch_ir.types import DType

SMEM_CACHE_MAX = 48 * 1024  # a row cache beyond the static limit would need the opt-in


def _nz(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if d != 1)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Step:
    """One accumulation: ``main`` (a reduction's terms) or ``dev`` (a variance's squared
    deviations from its mean, one level later)."""

    OPS = {"sum": "StSum()", "prod": "StProd()", "max": "StMax()", "min": "StMin()",
           "any": "StAny()"}

    def __init__(self, op: st.ReduceOp, mode: str, level: int, index: int):
        self.op, self.mode, self.level = op, mode, level
        t = op.operand(0).type.dtype
        if isinstance(op, st.ArgReduceOp):
            self.kind = "argmax" if isinstance(op, st.ArgMaxOp) else "argmin"
        elif isinstance(op, st.MaxOp | st.MinOp):
            self.kind = "max" if isinstance(op, st.MaxOp) else "min"
        elif isinstance(op, st.ProdOp):
            self.kind = "prod"
        elif isinstance(op, st.AnyOp):
            self.kind = "any"
        else:
            self.kind = "sum"
        self.acc = acc_ctype(self.kind, t) if self.kind not in ("argmax", "argmin") else \
            (ctype(t) if t.is_float else "int64_t")
        self.name = f"acc{index}"
        self.ident = identity_literal(self.kind, self.acc)

    @property
    def is_arg(self) -> bool:
        return self.kind in ("argmax", "argmin")

    def combine(self, a: str, b: str) -> str:
        return f"{self.OPS[self.kind]}({a}, {b})"


class ReducePart:
    """One reduction kernel of a group (see the module docstring). ``phases()`` renders it."""

    def __init__(self, group, values: list[Value], sched: dict, buffers: dict[int, str],
                 targets: dict[int, list[str]], half: dict, new_scratch, names,
                 reg_elems: int = 32):
        self.sched = sched
        self.buffers = buffers
        self.targets = targets
        self.half = half
        self.names = names  # every buffer name of the group (inputs, outputs, scratch)
        self.reg_elems = reg_elems
        self.reduces = [v.owner for v in values if not isinstance(v, BlockArgument)
                        and isinstance(v.owner, st.ReduceOp)]
        dom = max(self.reduces, key=lambda r: math.prod(dims(r.operand(0))))
        self.S = dims(dom.operand(0))
        self.D = tuple(dom.dims)
        self.kept = [n for d, n in enumerate(self.S) if d not in self.D]
        self.O = max(1, math.prod(self.kept))
        self.K = max(1, math.prod(self.S[d] for d in self.D))
        trailing = all(self.S[d] == 1 for d in range(min(self.D), len(self.S)) if d not in self.D)
        self.layout = "row" if trailing or self.O == 1 else "column"
        for r in self.reduces:
            shape = dims(r.operand(0))
            kept = _nz(n for d, n in enumerate(shape) if d not in r.dims)
            if kept != _nz(self.kept) or math.prod(shape[d] for d in r.dims) != self.K:
                raise Unsupported(f"'{r.name}' over {shape} dims {list(r.dims)} is not of the "
                                  f"kernel's parallel shape ({self.O} x {self.K})")
        if self.O * self.K >= 2 ** 31:
            raise Unsupported("a reduction over 2^31 elements or more (int32 index arithmetic)")
        self.outputs = [v for v in values if id(v) in targets]
        self.scalar = [v for v in self.outputs if math.prod(dims(v)) == self.O]
        self.full = [v for v in self.outputs if v not in self.scalar]
        for v in self.full:
            if math.prod(dims(v)) != self.O * self.K:
                raise Unsupported(f"an output of shape {dims(v)} in a {self.O} x {self.K} "
                                  "reduction kernel")
        self._levels()
        self._launch_shape()
        if self.split > 1 and any(s.is_arg for s in self.steps):
            raise Unsupported("argmax / argmin with a split reduced dim")
        self.partials = {}
        if self.split > 1:
            for s in self.steps:
                dt = {"float": DType.f32, "double": DType.f64, "int64_t": DType.i64,
                      "int": DType.i32}[s.acc]
                self.partials[id(s)] = new_scratch(self.O * self.split, dt,
                                                   f"partial results of {s.op.name} ({s.acc})")

    # -- structure -----------------------------------------------------------------------------
    def _levels(self) -> None:
        mine = {id(r) for r in self.reduces}
        self.avail: dict[int, int] = {}

        def level(v: Value) -> int:
            if id(v) in self.avail:
                return self.avail[id(v)]
            if isinstance(v, BlockArgument) or (id(v) in self.buffers and id(v.owner) not in mine):
                lv = 0
            else:
                op = v.owner
                lv = max([level(o) for o in op.operands] or [0])
                if id(op) in mine:
                    lv += 2 if isinstance(op, st.VarOp) else 1
            self.avail[id(v)] = lv
            return lv

        self.steps: list[Step] = []
        for r in self.reduces:
            at = level(r.operand(0))
            self.steps.append(Step(r, "main", at, len(self.steps)))
            if isinstance(r, st.VarOp):
                self.steps.append(Step(r, "dev", at + 1, len(self.steps)))
            level(r.result)
        for v in self.outputs:
            level(v)
        self.n_levels = 1 + max([s.level for s in self.steps] +
                                [self.avail[id(v)] for v in self.full] + [0])

    def _launch_shape(self) -> None:
        s = self.sched
        self.mapping, self.tpb = s["mapping"], int(s["threads"])
        if self.mapping not in ("warp_per_row", "rows_per_block", "block_per_row", "split_row",
                                "column_tiles"):
            raise Unsupported(f"mapping '{self.mapping}' for a reduction kernel")
        self.split = int(s["split"]) if self.mapping in ("split_row", "column_tiles") else 1
        if self.layout == "column" and self.mapping != "column_tiles":
            raise Unsupported(f"a column reduction under mapping '{self.mapping}'")
        if self.layout == "row" and self.mapping == "column_tiles":
            raise Unsupported("a row reduction under mapping 'column_tiles'")
        if self.layout == "column":
            self.T, self.RPB, self.VEC = 32, 32, 1
            self.TY = max(1, self.tpb // 32)
            self.chunk = _cdiv(self.K, self.split)
            self.iters = _cdiv(self.chunk, self.TY)
            self.units = _cdiv(self.O, 32) * self.split
            return
        if self.mapping in ("warp_per_row", "rows_per_block"):
            self.RPB = max(1, int(s["rows_per_block"]))
            self.T = max(1, min(32, self.tpb // self.RPB))
        else:
            self.RPB, self.T = 1, self.tpb
        # VEC consecutive terms per thread: 16 bytes of the widest buffer read at row positions
        widest = max([v.type.dtype.itemsize for v in self._row_buffers()] +
                     [v.type.dtype.itemsize for v in self.full if dims(v) == self.S] or [4])
        self.VEC = max(1, 16 // widest) if self.K % max(1, 16 // widest) == 0 else 1
        step = self.T * self.VEC
        self.chunk = self.K if self.split == 1 else _cdiv(_cdiv(self.K, self.split), step) * step
        self.iters = _cdiv(self.chunk, step)
        self.units = _cdiv(self.O, self.RPB) * self.split

    def _row_buffers(self) -> list[Value]:
        """Values read from memory with the dominant operand's own shape (the row's terms)."""
        found, seen = [], set()
        stack = [r.operand(0) for r in self.reduces] + list(self.full)
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            if id(v) in self.buffers:
                if dims(v) == self.S:
                    found.append(v)
            elif not isinstance(v, BlockArgument):
                stack.extend(v.owner.operands)
        return found

    # -- phases --------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        if self.split == 1:
            return [self._phase_cached(None, True)]
        levels = sorted({s.level for s in self.steps})
        return [self._phase_cached(lv, False) for lv in levels] + [self._phase_cached(None, True)]

    def _phase_cached(self, level: int | None, final: bool) -> Phase:
        """Render once to see which buffers are read at the row's positions in which levels,
        then again keeping those read in two levels or more (registers or a shared row cache)."""
        self.cache: dict[int, str] = {}
        self.usage: dict[int, set[int]] = {}
        self._phase(level, final)
        again = [k for k, lv in self.usage.items() if len(lv) > 1]
        if not again:
            return self._phase(level, final)
        per_thread = self.iters * self.VEC
        if per_thread <= self.reg_elems:
            self.cache = {k: "registers" for k in again}
        elif self.layout == "row":
            row_bytes = self.RPB * self.chunk * 4 * len(again)
            self.cache = {k: "shared" for k in again} if row_bytes <= SMEM_CACHE_MAX else {}
        return self._phase(level, final)

    def _phase(self, level: int | None, final: bool) -> Phase:
        self.em = em = CudaEmitter(self.buffers, self.half)
        self.smem = Smem()
        self.loaded: set[int] = set()
        self.reads: set[str] = set()
        self.vector: set[str] = set()
        self.o_cache: dict = {}
        self.n_sync = 0
        body: list[str] = []
        em.push(body, "    ")
        self.col = self.layout == "column"
        em.line("const int tid = threadIdx.x;")
        if self.col:
            em.line("const int tx = tid % 32;  // this thread's column in the tile")
            em.line("const int ty = tid / 32;  // its thread row")
        else:
            em.line(f"const int lane = tid % {self.T};  // this thread's place in its row's team")
            em.line(f"const int team = tid / {self.T};")
        self.unit_lines: list[str] = []
        em.mark()
        em.line(f"for (int unit = blockIdx.x; unit < {self.units}; unit += gridDim.x) {{")
        em.push(self.unit_lines, "      ", loop_vars={"unit", "o", "c", "lo", "hi", "o_ok"})
        split = self.split
        ob = f"unit / {split}" if split > 1 else "unit"
        if self.col:
            em.line(f"const int o = ({ob}) * 32 + tx;  // the column")
            em.line(f"const bool o_ok = o < {self.O} && tid < {self.tpb};")
        else:
            em.line(f"const int o = ({ob}) * {self.RPB} + team;  // the row")
            em.line(f"const bool o_ok = o < {self.O} && team < {self.RPB};")
        if split > 1:
            em.line(f"const int c = unit % {split};  // the chunk of the reduced dim")
            em.line(f"const int lo = c * {self.chunk};")
            em.line(f"const int hi = lo + {self.chunk} < {self.K} ? lo + {self.chunk} : {self.K};")
        else:
            em.line("const int lo = 0;")
            em.line(f"const int hi = {self.K};")
        means: dict[int, str] = {}
        upto = self.n_levels if final else level
        if split > 1:
            for s in self.steps:
                if s.level < upto:
                    self._combine_partials(s, means)
        levels = range(self.n_levels) if split == 1 else ([level] if not final else [])
        for lv in levels:
            steps = [s for s in self.steps if s.level == lv]
            stores = [v for v in self.full if self.avail[id(v)] == lv and split == 1]
            if steps or stores:
                self._pass(steps, stores, means, lv)
                self._team_reduce(steps, means, write_partials=not final)
        if final:
            if split > 1 and self.full:
                self._pass([], list(self.full), means, self.n_levels)
            self._store_scalars()
        em.pop()
        body.extend(self.unit_lines)
        body.append("    }")
        em.pop()
        text = "\n".join(body)
        lines = [f"    {d}" for d in self.smem.decls] + body
        reads, writes = buffer_uses(text, self.names)
        return Phase(lines, self.tpb, self.units, self.smem.size, self._what(level, final),
                     self.mapping, reads=reads, writes=writes, vector=set(self.vector),
                     uses_err="err |= " in text, syncthreads=self.n_sync)

    def _what(self, level, final) -> str:
        cached = {v: k for k, v in self.cache.items()}
        s = (f"{self.mapping}: {self.O} positions x {self.K} terms ({self.layout} layout), "
             + (f"{self.T} threads per row, {self.RPB} rows per block" if not self.col else
                f"32 columns x {self.TY} thread rows per block")
             + f", {self.VEC} terms per step, {self.iters} steps")
        if cached:
            s += f", rows kept in {'registers' if 'registers' in cached else 'shared memory'}"
        if self.split > 1:
            s += f", split {self.split} ways: " + ("combine + epilogue" if final else
                                                   f"partials of level {level}")
        return s

    # -- index maps ----------------------------------------------------------------------------
    def _parts(self, flat: str, sizes: tuple[int, ...], cache: dict) -> list[str]:
        """A flat position split over ``sizes`` (row-major), spelled as ``delinearize`` spells
        it: the emitter's reshapes produce the same strings, so a reduction's result read
        through a reshape is recognised as read at its own position."""
        if sizes not in cache:
            cache[sizes] = [flat] * len(sizes) if len(sizes) <= 1 else \
                delinearize(flat, list(sizes))
        return cache[sizes]

    def o_index(self, v: Value) -> list[str]:
        parts = iter(self._parts("o", _nz(self.kept), self.o_cache))
        idx = ["0" if n == 1 else next(parts) for n in self.kept]
        shape = dims(v)
        if _nz(shape) != _nz(self.kept):  # the same positions re-split (row-major)
            nz = _nz(shape)
            parts = iter(["o"] if len(nz) <= 1 else delinearize("o", list(nz)))
            return ["0" if n == 1 else next(parts) for n in shape]
        it = iter(i for i, n in zip(idx, self.kept) if n != 1)
        return ["0" if n == 1 else next(it) for n in shape]

    def full_index(self, shape_of: list[int], rdims: tuple) -> list[str]:
        oparts = iter(self._parts("o", _nz(self.kept), self.o_cache))
        red = _nz(shape_of[d] for d in rdims)
        kparts = iter(self._parts("k", red, self.k_cache))
        return ["0" if n == 1 else next(kparts) if d in rdims else next(oparts)
                for d, n in enumerate(shape_of)]

    def _register(self, r: st.ReduceOp, name: str) -> None:
        want = None

        def hook(idx, r=r, name=name):
            nonlocal want
            want = want or self.o_index(r.result)
            if [i for i, n in zip(idx, dims(r.result)) if n != 1] == \
                    [i for i, n in zip(want, dims(r.result)) if n != 1]:
                return name
            raise Unsupported(f"the result of '{r.name}' is read at another position than its "
                              "own (a transposed or shifted read of a reduction)")

        self.em.known[id(r.result)] = hook
        self.em.deps[name] = frozenset({"o"})

    # -- buffers read at the row's positions ---------------------------------------------------
    def _row_hook(self, v: Value, lv: int, sidx: list[str]):
        """Reads of buffer ``v`` at the row's own positions: a vector element (VEC terms loaded
        at once per step), kept in registers or shared memory when the cache says so."""
        em = self.em
        name = self.buffers[id(v)]
        st_t = storage_ctype(v.type.dtype)
        vec_ok = not self.col and self.VEC > 1 and dims(v) == self.S
        row_off = f"o * {self.K} + kb" if not self.col else None

        def hook(idx):
            if list(idx) != sidx:
                return None
            self.usage.setdefault(id(v), set()).add(lv)
            self.reads.add(name)
            where = self.cache.get(id(v))
            arr = f"c_{name}" if where == "registers" else f"r_{name}" if where == "shared" \
                else f"v_{name}"
            elem = {"registers": f"{arr}[it * {self.VEC} + j]",
                    "shared": f"{arr}[team * {self.chunk} + (kb - lo) + j]" if not self.col
                    else None}.get(where, f"{arr}[j]")
            loaded = self.loaded if where else self.pass_loaded
            if id(v) not in loaded:
                loaded.add(id(v))
                unit_k = len(em.scopes) - 4  # unit scope (phase, unit, it, j, guard)
                it_k = unit_k + 1
                n = self.VEC * CTYPE_SIZE[st_t]
                if where == "registers":
                    em._put(unit_k, f"__align__(16) {st_t} {arr}[{self.iters * self.VEC}];")
                    dst = f"&{arr}[it * {self.VEC}]"
                elif where == "shared":
                    self.smem.carve(arr, st_t, self.RPB * self.chunk, CTYPE_SIZE[st_t])
                    dst = f"&{arr}[team * {self.chunk} + (kb - lo)]"
                else:
                    em._put(it_k, f"__align__(16) {st_t} {arr}[{self.VEC}];")
                    dst = arr
                if vec_ok:
                    self.vector.add(name)
                    em._put(it_k, f"if (o_ok && kb < hi) st_loadv<{n}>({dst}, {name} + {row_off});")
                else:
                    em._put(it_k, f"for (int jj = 0; jj < {self.VEC}; ++jj) "
                                  f"({dst})[jj] = (o_ok && kb + jj < hi) ? "
                                  f"{name}[{self._lin_at(v, 'kb + jj')}] : ({st_t})0;")
            return em.temp(ctype(v.type.dtype), em.load_expr(name, elem, v.type.dtype), "x")

        return hook

    def _lin_at(self, v: Value, kexpr: str) -> str:
        """Linear offset of ``v`` (shape S) at the row / column position and term ``kexpr``."""
        if not self.col:
            return f"o * {self.K} + ({kexpr})"
        oparts = iter(self._parts("o", _nz(self.kept), self.o_cache))
        red = _nz(self.S[d] for d in self.D)
        if len(red) <= 1:
            kparts = iter([f"({kexpr})"] * len(red))
        else:
            stride, ks = math.prod(red), []
            for n in red:
                stride //= n
                ks.append(f"(({kexpr}) / {stride} % {n})")
            kparts = iter(ks)
        idx = ["0" if n == 1 else next(kparts) if d in self.D else next(oparts)
               for d, n in enumerate(self.S)]
        return linearize(idx, self.S)

    # -- passes --------------------------------------------------------------------------------
    def _pass(self, steps: list[Step], stores: list[Value], means: dict, lv: int) -> None:
        """One loop over this thread's terms of the row (or column) chunk."""
        em = self.em
        for s in steps:
            em.line(f"{s.acc} {s.name} = {s.ident};")
            if s.is_arg:
                em.line(f"int64_t {s.name}_i = INT64_MAX;")
            em.deps[s.name] = em.deps[f"{s.name}_i"] = frozenset({"o"})
        em.mark()
        full_unroll = self.iters * self.VEC <= self.reg_elems
        em.line("#pragma unroll" if full_unroll else "#pragma unroll 1")
        em.line(f"for (int it = 0; it < {self.iters}; ++it) {{")
        it_lines: list[str] = []
        em.push(it_lines, "        ", loop_vars={"it", "kb"})
        if self.col:
            em.line(f"const int kb = lo + it * {self.TY} + ty;")
        else:
            em.line(f"const int kb = lo + (it * {self.T} + lane) * {self.VEC};")
        stores_vec = [v for v in stores if not self.col and self.VEC > 1 and dims(v) == self.S]
        for v in stores_vec:
            for p in self.targets[id(v)]:
                em.line(f"__align__(16) {storage_ctype(v.type.dtype)} s_{p}[{self.VEC}];")
        em.mark()
        em.line("#pragma unroll")
        em.line(f"for (int j = 0; j < {self.VEC}; ++j) {{")
        j_lines: list[str] = []
        em.push(j_lines, "          ")
        em.line("const int k = kb + j;")
        em.line("if (o_ok && k < hi) {")
        g_lines: list[str] = []
        em.push(g_lines, "            ", loop_vars={"j", "k"})
        self.k_cache: dict = {}
        self.pass_loaded: set[int] = set()
        sidx = self.full_index(self.S, self.D)
        saved = {}
        for v in self._row_buffers():
            saved[id(v)] = em.known.get(id(v))
            em.known[id(v)] = self._row_hook(v, lv, sidx)
        for s in steps:
            x = self._term(s, means)
            if s.is_arg:
                em.line(f"if (st_arg_first({'true' if s.kind == 'argmax' else 'false'}, "
                        f"({s.acc})({x}), (int64_t)k, {s.name}, {s.name}_i)) "
                        f"{{ {s.name} = ({s.acc})({x}); {s.name}_i = k; }}")
            else:
                em.line(f"{s.name} = {s.combine(s.name, x)};")
        for v in stores:
            idx = self.full_index(self.S, self.D) if dims(v) == self.S else \
                self._index_as(v)
            expr = em.value(v, idx)
            for p in self.targets[id(v)]:
                if v in stores_vec:
                    if p in em.stored:
                        em.stored[f"s_{p}"] = em.stored[p]
                    em.line(em.store(f"s_{p}", "j", v.type.dtype, expr))
                else:
                    em.line(em.store(p, linearize(idx, dims(v)), v.type.dtype, expr))
        for k, hook in saved.items():
            if hook is None:
                em.known.pop(k, None)
            else:
                em.known[k] = hook
        em.pop()
        j_lines.extend(g_lines)
        j_lines.append("          }")
        em.pop()
        it_lines.extend(j_lines)
        it_lines.append("        }")
        for v in stores_vec:
            for p in self.targets[id(v)]:
                self.vector.add(p)
                n = self.VEC * CTYPE_SIZE[storage_ctype(v.type.dtype)]
                it_lines.append(f"        if (o_ok && kb < hi) st_storev<{n}>({p} + o * {self.K} "
                                f"+ kb, s_{p});")
        em.pop()
        self.unit_lines.extend(it_lines)
        self.unit_lines.append("      }")

    def _index_as(self, v: Value) -> list[str]:
        """A full output of another shape than S (same number of elements): S's index
        re-split row-major."""
        return reshape_index(self.full_index(self.S, self.D), self.S, dims(v))

    def _term(self, s: Step, means: dict) -> str:
        r = s.op
        src = r.operand(0)
        shape = dims(src)
        idx = self.full_index(shape, tuple(r.dims)) if shape == self.S or \
            _nz(shape) == _nz(self.S) else self._index_as(src)
        x = self.em.value(src, idx)
        if s.kind == "any":
            return f"(int)({x} != 0)"
        if s.mode == "dev":
            d = self.em.temp(s.acc, f"({s.acc})({x}) - {means[id(r)]}", "d")
            return f"{d} * {d}"
        return f"({s.acc})({x})"

    # -- combining -----------------------------------------------------------------------------
    def _team_reduce(self, steps: list[Step], means: dict, write_partials: bool) -> None:
        em = self.em
        if not steps:
            return
        if self.col:
            self._shared_reduce(steps, self.TY, "ty * 32 + tx", "w * 32 + tx", f"tid < {self.tpb}")
        elif self.T <= 32:
            if self.T > 1:
                em.line(f"// the row's {self.T} lanes combine by shuffles: every lane gets the "
                        "result")
                for s in steps:
                    if s.is_arg:
                        em.line(f"st_warp_allreduce_arg({'true' if s.kind == 'argmax' else 'false'}"
                                f", {s.name}, {s.name}_i, {self.T});")
                    else:
                        em.line(f"{s.name} = st_warp_allreduce({s.name}, {Step.OPS[s.kind]}, "
                                f"{self.T});")
        else:
            for s in steps:
                if s.is_arg:
                    em.line(f"st_warp_allreduce_arg({'true' if s.kind == 'argmax' else 'false'}, "
                            f"{s.name}, {s.name}_i, 32);")
                else:
                    em.line(f"{s.name} = st_warp_allreduce({s.name}, {Step.OPS[s.kind]}, 32);")
            self._shared_reduce(steps, self.T // 32, "lane / 32", "w",
                                "team == 0 && lane % 32 == 0")
        for s in steps:
            if write_partials:
                p = self.partials[id(s)]
                lead = "ty == 0" if self.col else "lane == 0"
                em.line(f"if ({lead} && o_ok) {p}[o * {self.split} + c] = {s.name};")
            else:
                self._finish(s, s.name, means)

    def _shared_reduce(self, steps: list[Step], n: int, slot: str, read: str, writer: str) -> None:
        """The partials of ``n`` warps (or thread rows) meet in shared memory between two block
        barriers; every thread reads them all, in order (the same bits in every thread)."""
        em = self.em
        per = 32 if self.col else 1
        em.line(f"// {n} partials per position meet in shared memory; every thread reads them "
                "back (regional)")
        red = {}
        for s in steps:
            red[id(s)] = self.smem.carve(f"sh_red{s.name[3:]}", s.acc, n * per, CTYPE_SIZE[s.acc])
            if s.is_arg:
                self.smem.carve(f"sh_redi{s.name[3:]}", "int64_t", n * per, 8)
        em.line(f"if ({writer}) {{")
        for s in steps:
            em.line(f"  {red[id(s)]}[{slot}] = {s.name};")
            if s.is_arg:
                em.line(f"  sh_redi{s.name[3:]}[{slot}] = {s.name}_i;")
        em.line("}")
        em.line("__syncthreads();")
        self.n_sync += 1
        for s in steps:
            r = red[id(s)]
            first = read.replace("w", "0", 1) if read.startswith("w") else "0"
            if s.is_arg:
                ri = f"sh_redi{s.name[3:]}"
                em.line(f"{s.name} = {r}[{first}];")
                em.line(f"{s.name}_i = {ri}[{first}];")
                em.line(f"for (int w = 1; w < {n}; ++w) if (st_arg_first("
                        f"{'true' if s.kind == 'argmax' else 'false'}, {r}[{read}], {ri}[{read}], "
                        f"{s.name}, {s.name}_i)) {{ {s.name} = {r}[{read}]; {s.name}_i = {ri}[{read}]; }}")
            else:
                em.line(f"{s.name} = {r}[{first}];")
                em.line(f"for (int w = 1; w < {n}; ++w) {s.name} = {s.combine(s.name, f'{r}[{read}]')};")
        em.line("__syncthreads();  // before the partials' slots are written again")
        self.n_sync += 1

    def _combine_partials(self, s: Step, means: dict) -> None:
        em = self.em
        p = self.partials[id(s)]
        em.line(f"{s.acc} {s.name} = {s.ident};")
        em.deps[s.name] = frozenset({"o"})
        em.line(f"if (o_ok) for (int q = 0; q < {self.split}; ++q) "
                f"{s.name} = {s.combine(s.name, f'{p}[o * {self.split} + q]')};")
        self._finish(s, s.name, means)

    def _finish(self, s: Step, acc: str, means: dict) -> None:
        """A combined accumulator -> the reduction's value (or a variance's mean)."""
        em = self.em
        r = s.op
        t = ctype(r.result.type.dtype)
        if isinstance(r, st.VarOp) and s.mode == "main":
            means[id(r)] = em.temp(s.acc, f"{acc} / ({s.acc}){self.K}", "mean")
            em.deps[means[id(r)]] = frozenset({"o"})
            return
        if isinstance(r, st.VarOp):
            n = max(self.K - r.attr("correction", 1), 0)
            val = f"({t})({acc} / ({s.acc}){n})"
        elif isinstance(r, st.MeanOp):
            val = f"({t})({acc} / ({s.acc}){self.K})"
        elif s.kind == "any":
            val = f"({acc} != 0)"
        elif s.is_arg:
            val = f"({t}){acc}_i"
        else:
            val = f"({t}){acc}"
        name = em.temp(t, val, "red")
        em.deps[name] = frozenset({"o"})
        self._register(r, name)

    def _store_scalars(self) -> None:
        em = self.em
        lead = "ty == 0" if self.col else "lane == 0"
        cond = f"{lead} && o_ok" + (" && c == 0" if self.split > 1 else "")
        for v in self.scalar:
            idx = self.o_index(v)
            expr = em.value(v, idx)
            for p in self.targets[id(v)]:
                em.line(f"if ({cond}) {em.store(p, linearize(idx, dims(v)), v.type.dtype, expr)}")
