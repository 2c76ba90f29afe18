"""Scatters in a ``phases`` kernel (``ScatterPhases``, a mixin of ``PhaseKernel``): index_add
along dim 0 with every thread owning destination rows (prefetching the random rows), and the
other scatters (scatter_add, scatter_reduce, index_add along another dim) work-shared over the
positions before the scattered dim where there are enough of them (their destinations never
meet), else split across threads by the destination index along the scattered dim: each thread
walks every update in order and applies those it owns."""

from __future__ import annotations

import math

from codegen.cpp.accumulate import SCATTERS
from codegen.cpp.emit import linearize
from codegen.cpp.scalars import Unsupported, ctype, dims, literal
from codegen.cpp.scalars import hint as size_hint
from stitch_ir.core import Value
from stitch_ir.dialects import st
from stitch_ir.types import Sym


class ScatterPhases:
    """The scatter methods of ``PhaseKernel`` (which provides ``em``, ``nest`` and ``store``)."""

    # The owned-destination index_add loop (see ``scatter``). Random row reads and writes are
    # what it waits on: a row (256 B for 64 floats) costs ~50 ns from DRAM however it is
    # prefetched, so the loop keeps a few rows of every random stream in flight.
    SCATTER_CHUNK = 1024  # owned edges listed at once (a few KiB, L1 resident)
    PREFETCH = 6  # owned edges ahead for the random rows (gathered rows, destination rows)
    PREFETCH_EDGE = 16  # owned edges ahead for the rows indexed by the edge (read in order)
    PREFETCH_BYTES = 512  # of one row; the hardware prefetcher follows a longer row by itself
    # A scatter along dim > 0 work-shares the dims before it from this many positions on (a few
    # per thread keep a static schedule balanced); fewer, and threads own destination indices
    LEAD_ROWS = 16

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
        if op.attributes["dim"] == 0 and self._row_index(idx):
            self._scatter_rows(op, target, xs, ct)
            return
        # scatter_add / scatter_reduce / index_add along another dim: every thread walks the
        # updates in index order and applies those whose destination index along ``dim`` it
        # owns ([own_lo, own_hi)): each destination is updated by one thread, in the serial
        # order -- the same bits for any thread count, no atomics
        dim = op.attributes["dim"]
        ishape = dims(idx) if not isinstance(op, st.IndexAddOp) else dims(src)
        # The dims before ``dim`` address the destination directly: updates at different
        # positions there never meet, so those dims are work-shared (a thread keeps the serial
        # order of everything it applies) when they are enough to feed the threads
        static = all(isinstance(n, int) for n in ishape[:dim])
        self._lead = dim if dim and static and math.prod(ishape[:dim]) >= self.LEAD_ROWS else 0
        self._owned = bool(ishape) and not self._lead  # else all its own, or one update
        if not ishape:  # one update (a rank-0 index): one thread applies it
            em.line("#pragma omp single")
        em.line("{")
        if self._owned:
            self._own_range(xs[dim])
        names = [f"s{k}" for k in range(len(ishape))]
        if isinstance(op, st.ScatterReduceOp) and not op.attributes["include_self"]:
            self._reset_scattered(op, target, ishape, xs)
        self._open_serial(names, ishape, self._lead)
        if isinstance(op, st.IndexAddOp):
            pos = em.checked_index(em.value(idx, [names[dim]]), xs[dim], op.attr("wrap", True))
        else:
            pos = em.checked_index(em.value(idx, names), xs[dim], op.attr("wrap", True))
        self._skip_unowned(pos)
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
        self._close_serial()
        em.line("}")
        if self._owned:
            em.line("#pragma omp barrier")

    @staticmethod
    def _row_index(idx: Value) -> bool:
        """Whether a scatter's index is one destination row per update row: 1-D, or an
        [E, 1, ..., 1] index broadcast along the update's other dims (PyG's scatter expands an
        edge's destination to its message's shape)."""
        shape = dims(idx)
        if len(shape) <= 1:
            return bool(shape)
        op = getattr(idx, "owner", None)
        if not isinstance(op, st.BroadcastOp):
            return False
        src = dims(op.operand(0))
        return len(src) == len(shape) and all(d == 1 for d in src[1:])

    def _scatter_rows(self, op, target: str, xs: list, ct: str) -> None:
        """scatter_add / scatter_reduce along dim 0 whose index picks a whole destination row per
        update row: the owned-rows walk of index_add (edges listed per thread, the random rows
        prefetched), in place of every thread testing every update (a mispredicted branch an
        update, and each random row waited for: GAT's message sums over 220K edges of 64 bf16,
        19 ms a call)."""
        em = self.em
        _, idx, src = op.operands
        ishape = dims(idx)
        zeros = ["0"] * (len(ishape) - 1)
        val_fn = None
        if isinstance(op, st.ScatterReduceOp):
            red = op.attributes["reduce"]
            if not op.attributes["include_self"]:
                # the identity at every destination some update reaches, by the thread that
                # owns it (the walk below splits the rows the same way: no barrier between)
                self._owned, self._lead = True, 0
                em.line("{")
                self._own_range(xs[0])
                self._reset_scattered(op, target, ishape, xs)
                em.line("}")
            val_fn = {"sum": lambda c, v: f"{c} + {v}", "prod": lambda c, v: f"{c} * {v}",
                      "amax": lambda c, v: f"st_max({c}, ({ct}){v})",
                      "amin": lambda c, v: f"st_min({c}, ({ct}){v})"}[red]
        self._index_add_rows(op, target, xs, ct, index=lambda e: em.value(idx, [e] + zeros),
                             loop_dims=ishape[1:], update=val_fn)

    def _own_range(self, n) -> None:
        """Declare ``[own_lo, own_hi)``: this thread's share of the ``n`` destination indices."""
        em = self.em
        em.line("#if STITCH_OPENMP")
        em.line("const int64_t own_nt = omp_get_num_threads(), own_t = omp_get_thread_num();")
        em.line("#else")
        em.line("const int64_t own_nt = 1, own_t = 0;")
        em.line("#endif")
        em.line(f"const int64_t own_lo = {n} * own_t / own_nt, own_hi = {n} * (own_t + 1) / own_nt;")

    def _skip_unowned(self, pos: str) -> None:
        """Skip the rest of the loop level that computes destination index ``pos`` (a loop
        variable or a temporary) unless this thread owns it: placed with ``pos``, so an edge's
        values are not computed by the threads that do not apply them."""
        em = self.em
        if not self._owned:
            return
        text = f"if ({pos} < own_lo || {pos} >= own_hi) continue;"
        # in the scope that computes pos, but never above the outermost loop of the walk (a
        # destination read once, the same for every update, is tested inside it)
        outer = min(i for i, sc in enumerate(em.scopes) if self._walk[0] in sc.loop_vars)
        em._put(max(em._home(em._deps(pos)), outer), text)

    def _index_add_rows(self, op, target: str, xs: list[int], ct: str, index=None,
                        loop_dims: list | None = None, update=None) -> None:
        """index_add along dim 0, every thread owning the destination rows [lo, hi): a thread
        reads the edges in order and lists the next SCATTER_CHUNK it owns (edge and checked
        destination; as many whatever the thread count), then accumulates them in edge order
        with the rows of the owned edge PREFETCH ahead in flight.
        Each destination row sums its edges in increasing edge order whatever the thread count,
        so the result is the same bits for any number of threads.
        ``index(e)``: the destination of update row ``e`` (default: the 1-D index); ``loop_dims``:
        the update row's dims (default: the destination row's); ``update(c, v)``: the combined
        value (default: ``c + alpha * v``)."""
        em = self.em
        _, idx, src = op.operands
        rows, inner = xs[0], (xs[1:] if loop_dims is None else list(loop_dims))
        width = math.prod(xs[1:])
        n_edges = dims(idx)[0]
        alpha = op.attr("alpha", 1)
        index = index or (lambda e: em.value(idx, [e]))
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
        d = em.checked_index(index("e"), rows, op.attr("wrap", True))
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
        fn = (lambda c: f"{c} + {scale}{val}") if update is None else (lambda c: update(c, val))
        em.line(em.update(target, linearize(["d"] + names, xs), op.result.type.dtype, fn))
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
        self._open_serial(names, ishape, self._lead)
        pos = em.checked_index(em.value(op.operand(1), names), xs[op.attributes["dim"]],
                               op.attr("wrap", True))
        self._skip_unowned(pos)
        dst = list(names)
        dst[op.attributes["dim"]] = pos
        em.line(em.store(target, linearize(dst, xs), t, ident))
        self._close_serial()

    def _open_serial(self, names: list[str], shape: list[int], lead: int = 0) -> None:
        """Open a serial loop nest over ``shape`` with one emitter scope per level, so what
        depends only on the outer loops (an edge's gathered index) is computed once per outer
        iteration, not once per element of the inner ones. The first ``lead`` dims are one
        work-shared loop (static schedule) whose index is split back into theirs."""
        em = self.em
        self._serial = []
        self._walk = list(names)
        em.mark()
        if lead:
            flat = f"{names[0]}f"
            em.line("#pragma omp for schedule(static)")
            em.line(f"for (int64_t {flat} = 0; {flat} < {math.prod(shape[:lead])}; ++{flat}) {{")
            level: list[str] = []
            em.push(level, em.scopes[-1].indent + "  ", loop_vars=set(names[:lead]) | {flat})
            for k in range(lead):
                inner = math.prod(shape[k + 1:lead])
                split = flat if inner == 1 else f"{flat} / {inner}"
                split = split if k == 0 else f"({split}) % {shape[k]}"
                em.line(f"const int64_t {names[k]} = {split};")
            em.mark()
            self._serial.append(level)
        for name, n in zip(names[lead:], shape[lead:]):
            em.line(f"for (int64_t {name} = 0; {name} < {n}; ++{name}) {{")
            level = []
            em.push(level, em.scopes[-1].indent + "  ", loop_vars={name})
            em.mark()
            self._serial.append(level)

    def _close_serial(self) -> None:
        em = self.em
        for level in reversed(self._serial):
            em.pop()
            em.scopes[-1].lines.extend(level)
            em.line("}")
        self._serial = []
