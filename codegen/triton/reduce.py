"""The reduction renderer: one kernel's reductions of one parallel shape, with their stitched
prologue and epilogue, as Triton tiles following the schedule's thread mapping.

The kernel's dominant reduction reads ``S`` (a shape) and reduces ``dims``: the kept dims are the
``O`` output positions, the reduced dims the ``K`` terms of each. A program owns ``BLOCK_O``
positions and walks ``K`` in tiles of ``BLOCK_K``: a row layout puts positions on tile axis 0
([BLOCK_O, 1] against [1, BLOCK_K]: row reductions, contiguous terms), a column layout on axis 1
([BLOCK_K, 1] against [1, BLOCK_O]: column reductions, contiguous positions). The mapping sets
the tile and the launch:

- ``warp_per_row`` / ``rows_per_block``: ``BLOCK_O`` = the schedule's rows per block, a whole row
  per tile (short rows packed into one program), ``num_warps`` = its threads / 32;
- ``block_per_row``: one row per program, the row in one tile when it fits the block's registers,
  else walked tile by tile;
- ``split_row``: each row split over ``split`` programs; each writes partial results, and the
  next kernel combines them (deterministically, in chunk order) in its prologue;
- ``column_tiles``: ``BLOCK_O`` columns per program, the reduced dim walked (and split the same
  way when the schedule splits it).

Levels: a value is at level 0 when it needs no reduction of this kernel, else one more than the
deepest reduction it needs (a variance needs two: its mean, then its squared deviations). When
the whole reduced extent fits one tile, every level runs on the same tile and values reused
after a reduction stay in registers (regional stitching); otherwise each level is one loop over
the tiles and values needed again are recomputed from the inputs (Triton has no explicit shared
memory: the inputs come back from L2). With a split, level l's partials are written by kernel
l, and the last kernel combines every level and writes the outputs: the kernel boundary is the
grid barrier.
"""

from __future__ import annotations

import math

from codegen.triton.emit import (
    Emitter,
    Unsupported,
    compute_type,
    dims,
    div_rn,
    is_literal,
    nan_max,
    nan_min,
    reshape_index,
)
from stitch_ir.core import BlockArgument, Value
from stitch_ir.dialects import st
from stitch_ir.types import DType

REGS_PER_LANE = 32  # a tile keeps at most this many elements per thread of one live value
COLUMN_TILE = 32  # columns per program of column_tiles (one 128-byte line per warp row)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _nz(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if d != 1)


class Step:
    """One accumulation of a reduction: ``main`` (its terms) or ``dev`` (a variance's squared
    deviations from its mean, one level later)."""

    def __init__(self, op: st.ReduceOp, mode: str, level: int, k: int):
        self.op, self.mode, self.level, self.k = op, mode, level, k
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
        if self.kind == "any":
            self.acc = "tl.int32"
        elif self.kind in ("sum", "prod") and not t.is_float:
            self.acc = "tl.int64"
        elif self.kind in ("argmax", "argmin"):
            self.acc = compute_type(t) if t.is_float else "tl.int64"
        else:
            self.acc = compute_type(t) if t.is_float else compute_type(op.result.type.dtype)
        self.float = t.is_float

    def identity(self) -> str:
        if self.kind in ("sum", "any"):
            return "0"
        if self.kind == "prod":
            return "1"
        if self.kind in ("max", "argmax"):
            return "-INF" if self.float else str(_int_min(self.acc))
        return "INF" if self.float else str(_int_max(self.acc))

    def term(self, x: str, mean: str | None) -> str:
        """What is accumulated for term ``x``."""
        if self.kind == "any":
            return f"({x} != 0).to(tl.int32)"
        if self.mode == "dev":
            return f"(({x} - {mean}) * ({x} - {mean}))"
        if is_literal(x):
            return f"tl.full([], {x}, {self.acc})"
        return f"{x}.to({self.acc})"


def _int_min(t: str) -> int:
    return {"tl.int64": -(2 ** 63), "tl.int32": -(2 ** 31), "tl.int16": -(2 ** 15),
            "tl.int8": -128, "tl.uint8": 0, "tl.int1": 0}[t]


def _int_max(t: str) -> int:
    return {"tl.int64": 2 ** 63 - 1, "tl.int32": 2 ** 31 - 1, "tl.int16": 2 ** 15 - 1,
            "tl.int8": 127, "tl.uint8": 255, "tl.int1": 1}[t]


def tile_reduce(step: Step, x: str, axis: int) -> str:
    """A tile reduced along ``axis`` (kept as a size-1 dim), torch's semantics (NaN wins max)."""
    if step.kind == "sum":
        return f"tl.reduce({x}, {axis}, _sum, keep_dims=True)"
    if step.kind == "any":
        return f"tl.reduce({x}, {axis}, _max, keep_dims=True)"
    if step.kind == "prod":
        return f"tl.reduce({x}, {axis}, _mul, keep_dims=True)"
    if step.kind in ("max", "min"):
        fn = "max" if step.kind == "max" else "min"
        return f"_{fn}_nan({x}, {axis})" if step.float else \
            f"tl.reduce({x}, {axis}, _{fn}, keep_dims=True)"
    raise Unsupported(f"tile_reduce of {step.kind}")


def combine(step: Step, a: str, b: str) -> str:
    """Two accumulators of a step combined element-wise."""
    if step.kind in ("sum",):
        return f"{a} + {b}"
    if step.kind == "any":
        return f"tl.maximum({a}, {b})"
    if step.kind == "prod":
        return f"{a} * {b}"
    return (nan_max if step.kind == "max" else nan_min)(a, b)


class ReduceKernel:
    """Renders one reduction kernel (or, with a split, its chain of kernels)."""

    def __init__(self, group, values: list[Value], sched: dict, buffers: dict[int, str],
                 targets: dict[int, list[str]], err: str | None, shrink: int = 1):
        self.group = group
        self.sched = sched
        self.buffers = buffers
        self.targets = targets  # id(value) -> pointers it is stored to
        self.err = err
        self.reduces = [v.owner for v in values if not isinstance(v, BlockArgument)
                        and isinstance(v.owner, st.ReduceOp)]
        if not self.reduces:
            raise Unsupported("a reduction kernel without a reduction")
        dom = max(self.reduces, key=lambda r: math.prod(dims(r.operand(0))))
        self.S = dims(dom.operand(0))
        self.D = tuple(dom.dims)
        self.kept = [n for d, n in enumerate(self.S) if d not in self.D]
        self.O = max(1, math.prod(self.kept))
        self.K = max(1, math.prod(self.S[d] for d in self.D))
        trailing = all(self.S[d] == 1 for d in range(min(self.D), len(self.S)) if d not in self.D)
        self.layout = "row" if trailing or self.O == 1 else "column"
        self.axis = 1 if self.layout == "row" else 0
        for r in self.reduces:
            shape = dims(r.operand(0))
            kept = _nz(n for d, n in enumerate(shape) if d not in r.dims)
            if kept != _nz(self.kept) or math.prod(shape[d] for d in r.dims) != self.K:
                raise Unsupported(f"'{r.name}' over {shape} dims {list(r.dims)} is not of the "
                                  f"kernel's parallel shape ({self.O} x {self.K})")
        if any(math.prod(dims(v)) >= 2 ** 31 for r in self.reduces for v in r.operands):
            raise Unsupported("a reduction over 2^31 elements or more (its index arithmetic is "
                              "int32)")
        self.outputs = [v for v in values if id(v) in targets]
        # one value per position is stored once per position (also when K == 1)
        self.scalar = [v for v in self.outputs if math.prod(dims(v)) == self.O]
        self.full = [v for v in self.outputs if v not in self.scalar]
        for v in self.full:
            if math.prod(dims(v)) != self.O * self.K:
                raise Unsupported(f"an output of shape {dims(v)} in a {self.O} x {self.K} "
                                  "reduction kernel")
        self._levels()
        self._tiles(shrink)

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
            self.steps.append(Step(r, "main", at, self.K))
            if isinstance(r, st.VarOp):
                self.steps.append(Step(r, "dev", at + 1, self.K))
            level(r.result)
        for v in self.outputs:
            level(v)
        self.n_levels = 1 + max([s.level for s in self.steps] +
                                [self.avail[id(v)] for v in self.full] + [0])

    def _tiles(self, shrink: int) -> None:
        s = self.sched
        mapping, threads = s["mapping"], int(s["threads"])
        self.mapping = mapping
        self.num_warps = max(1, threads // 32)
        elem = max(r.operand(0).type.dtype.itemsize for r in self.reduces)
        vec = max(1, 16 // elem)
        self.split = int(s["split"]) if mapping in ("split_row", "column_tiles") else 1
        if mapping in ("warp_per_row", "rows_per_block"):
            bo, tile_k = int(s["rows_per_block"]), pow2(self.K)
        elif mapping in ("block_per_row", "split_row"):
            bo, tile_k = 1, min(pow2(-(-self.K // self.split)), pow2(threads * vec))
        elif mapping == "column_tiles":
            tiles = max(1, int(s["blocks"]) // self.split)
            bo = pow2(-(-self.O // tiles))
            tile_k = min(pow2(-(-self.K // self.split)), max(1, pow2(threads * vec // bo)))
        else:
            raise Unsupported(f"mapping '{mapping}' for a reduction kernel")
        self.BO = max(1, pow2(bo) if bo & (bo - 1) else bo)
        max_tile = max(1, threads * REGS_PER_LANE // shrink)
        self.single = self.split == 1 and self.BO * pow2(self.K) <= max_tile
        self.BK = pow2(self.K) if self.single else max(1, min(tile_k, pow2(max_tile // self.BO)
                                                              if max_tile >= self.BO else 1))
        self.o_blocks = -(-self.O // self.BO)
        per_program = _cdiv(self.K, self.split)
        self.chunk = _cdiv(per_program, self.BK) * self.BK  # a multiple of BLOCK_K
        if self.split > 1 and any(s.kind in ("argmax", "argmin") for s in self.steps):
            raise Unsupported("argmax / argmin with a split reduced dim")

    # -- index maps ----------------------------------------------------------------------------
    def _parts(self, em: Emitter, flat: str, sizes: tuple[int, ...], cache: dict) -> list[str]:
        if sizes not in cache:
            if len(sizes) <= 1:
                cache[sizes] = [flat] * len(sizes)
            else:
                names = []
                stride = math.prod(sizes)
                for k, n in enumerate(sizes):
                    stride //= n
                    expr = f"{flat} // {stride} % {n}" if stride > 1 else f"{flat} % {n}"
                    if k == 0:
                        expr = f"{flat} // {stride}" if stride > 1 else flat
                    names.append(em.tile(f"{flat}_{len(cache)}_{k}", expr))
                cache[sizes] = names
        return cache[sizes]

    def o_index(self, em: Emitter, v: Value) -> list[str]:
        """v (numel O) at the program's positions."""
        parts = iter(self._parts(em, "o", _nz(self.kept), self.o_cache))
        idx = ["0" if n == 1 else next(parts) for n in self.kept]
        shape = dims(v)
        if _nz(shape) == _nz(self.kept):
            it = iter(i for i, n in zip(idx, self.kept) if n != 1)
            return ["0" if n == 1 else next(it) for n in shape]
        return reshape_index(idx, self.kept, shape)

    def full_index(self, em: Emitter, v: Value, shape_of: list[int], rdims: tuple) -> list[str]:
        """v (numel O x K) at the program's positions and the current tile of terms, laid out
        as ``shape_of`` reduced over ``rdims`` (the reduction it feeds)."""
        oparts = iter(self._parts(em, "o", _nz(self.kept), self.o_cache))
        red = _nz(shape_of[d] for d in rdims)
        kparts = iter(self._parts(em, "k", red, self.k_cache))
        idx = []
        for d, n in enumerate(shape_of):
            idx.append("0" if n == 1 else next(kparts) if d in rdims else next(oparts))
        shape = dims(v)
        if shape == shape_of:
            return idx
        if _nz(shape) == _nz(shape_of):
            it = iter(i for i, n in zip(idx, shape_of) if n != 1)
            return ["0" if n == 1 else next(it) for n in shape]
        return reshape_index(idx, shape_of, shape)

    def _register(self, em: Emitter, r: st.ReduceOp, expr: str) -> None:
        def hook(idx, r=r, expr=expr):
            want = self.o_index(em, r.result)
            if [i for i, n in zip(idx, dims(r.result)) if n != 1] == \
                    [i for i, n in zip(want, dims(r.result)) if n != 1]:
                return expr
            raise Unsupported(f"the result of '{r.name}' is read at another position than "
                              "its own (a transposed or shifted read of a reduction)")

        em.known[id(r.result)] = hook

    # -- rendering -----------------------------------------------------------------------------
    def _o_tile(self) -> str:
        ar = "tl.arange(0, BLOCK_O)"
        return f"{ar}[:, None]" if self.layout == "row" else f"{ar}[None, :]"

    def _k_tile(self, n: str) -> str:
        ar = f"tl.arange(0, {n})"
        return f"{ar}[None, :]" if self.layout == "row" else f"{ar}[:, None]"

    def _tile_shape(self, bk: str) -> str:
        return f"[BLOCK_O, {bk}]" if self.layout == "row" else f"[{bk}, BLOCK_O]"

    def render(self) -> list[dict]:
        """One dict per kernel: ``lines`` (its body), ``grid``, ``num_warps``, ``partials``
        (scratch it writes: (name, elements, acc type)), ``reads_partials``."""
        self.partials = {id(s): f"part{k}" for k, s in enumerate(self.steps)}
        if self.split == 1:
            return [self._kernel(final=True, level=None)]
        out = [self._kernel(final=False, level=lv) for lv in sorted({s.level for s in self.steps})]
        return out + [self._kernel(final=True, level=None)]

    def _kernel(self, final: bool, level: int | None) -> dict:
        em = Emitter(self.buffers, {frozenset({"o"}): "o_mask", frozenset({"k"}): "k_mask",
                                    frozenset({"o", "k"}): "mask"}, self.err)
        self.o_cache: dict = {}
        self.k_cache: dict = {}
        lines: list[str] = []
        em.push(lines, "    ")
        split = self.split
        em.line("pid = tl.program_id(0)")
        if split > 1:
            em.line(f"# {split} programs share a position's terms: program c takes chunk c")
            em.line(f"ob = pid // {split}")
            em.line(f"c = pid % {split}")
            em.line(f"k_lo = c * {self.chunk}")
            em.line(f"k_hi = tl.minimum(k_lo + {self.chunk}, {self.K})")
        em.tile("o", f"{'ob' if split > 1 else 'pid'} * BLOCK_O + {self._o_tile()}",
                frozenset({"o"}))
        em.line(f"o_mask = o < {self.O}")
        done: set[int] = set()
        means: dict[int, str] = {}
        # the combined results of earlier levels (a split: from the partials in scratch)
        upto = self.n_levels if final else level
        if split > 1 and any(s.level < upto for s in self.steps):
            em.tile("sp", self._k_tile(pow2(split)), frozenset())
            em.line(f"sp_mask = o_mask & (sp < {split})")
            for s in self.steps:
                if s.level < upto:
                    p = self.partials[id(s)]
                    x = em.temp(f"tl.load({p}_ptr + o * {split} + sp, mask=sp_mask, other=0)"
                                f".to({s.acc})", "p")
                    x = em.temp(f"tl.where(sp_mask, {x}, {s.identity()})", "p")
                    acc = em.temp(tile_reduce(s, x, self.axis), "acc")
                    self._finish(em, s, acc, means, done)
        if self.single:
            em.tile("k", self._k_tile("BLOCK_K"), frozenset({"k"}))
            em.line(f"k_mask = k < {self.K}")
            em.line("mask = o_mask & k_mask")
        levels = range(self.n_levels) if split == 1 else ([level] if not final else [])
        for lv in levels:
            self._level(em, lv, means, done, partial=not final)
        if final:
            if split > 1 and self.full:
                self._pass(em, [], [v for v in self.full], means, partial=False)
            elif split == 1 and not self.single:
                pass  # full outputs were stored in their level's loop
            elif self.single:
                for v in self.full:
                    self._store_full(em, v)
            if split > 1 and self.scalar:
                em.line("o_first = o_mask & (c == 0)  # one program per position stores")
                em.masks[frozenset({"o"})] = "o_first"
            for v in self.scalar:
                for ptr in self.targets[id(v)]:
                    em.store(f"{ptr}_ptr", v, self.o_index(em, v),
                             em.value(v, self.o_index(em, v)), self._tile_shape("1"), "o")
        em.pop()
        grid = self.o_blocks * split
        writes = [] if final else [(self.partials[id(s)], self.O * split, s.acc)
                                   for s in self.steps if s.level == level]
        reads = [self.partials[id(s)] for s in self.steps
                 if split > 1 and s.level < (self.n_levels if final else level)]
        return {"lines": lines, "grid": grid, "num_warps": self.num_warps, "partials": writes,
                "reads_partials": reads, "uses_err": em.uses_err,
                "constexprs": {"BLOCK_O": self.BO, "BLOCK_K": self.BK},
                "what": self._what(final, level)}

    def _what(self, final: bool, level: int | None) -> str:
        s = f"{self.mapping}: {self.O} positions x {self.K} terms ({self.layout} layout), " \
            f"BLOCK_O={self.BO} BLOCK_K={self.BK}" + (" in one tile" if self.single else
                                                      " walked tile by tile")
        if self.split > 1:
            s += f", split {self.split} ways, " + ("combine + epilogue" if final else
                                                    f"partials of level {level}")
        return s

    def _level(self, em: Emitter, lv: int, means, done, partial: bool) -> None:
        steps = [s for s in self.steps if s.level == lv]
        stores = [v for v in self.full if self.avail[id(v)] == lv and not partial]
        if self.single:
            for s in steps:
                x = self._term(em, s, means)
                if s.kind in ("argmax", "argmin"):
                    acc = self._arg_single(em, s, x)
                else:
                    acc = em.temp(tile_reduce(s, f"tl.where(mask, {x}, {s.identity()})",
                                              self.axis), "acc")
                self._finish(em, s, acc, means, done)
            return
        if steps or stores:
            self._pass(em, steps, stores, means, partial)

    def _term(self, em: Emitter, s: Step, means) -> str:
        r = s.op
        x = em.value(r.operand(0), self.full_index(em, r.operand(0), dims(r.operand(0)),
                                                   tuple(r.dims)))
        return s.term(x, means.get(id(r)))

    def _arg_single(self, em: Emitter, s: Step, x: str) -> str:
        kidx = self._parts(em, "k", (self.K,), self.k_cache)[0] if self.K > 1 else "0"
        v = em.temp(f"tl.where(mask, {x}, {s.identity()})", "av")
        i = em.temp(f"tl.where(mask, {kidx} + o * 0, {self.K}).to(tl.int64)", "ai")
        name = f"best{em.counter}"
        em.counter += 1
        fn = "_argmax_combine" if s.kind == "argmax" else "_argmin_combine"
        em.line(f"{name}_v, {name} = tl.reduce(({v}, {i}), {self.axis}, {fn}, keep_dims=True)")
        em.deps[name] = frozenset({"o"})
        return name

    def _pass(self, em: Emitter, steps: list[Step], stores: list[Value], means,
              partial: bool) -> None:
        """One loop over the tiles of terms (this program's chunk, with a split)."""
        accs = []
        shape = self._tile_shape("BLOCK_K")
        for s in steps:
            if s.kind in ("argmax", "argmin"):
                raise Unsupported("argmax / argmin over a reduced extent walked tile by tile")
            acc = f"acc{em.counter}"
            em.counter += 1
            em.line(f"{acc} = tl.full({shape}, {s.identity()}, {s.acc})")
            accs.append((s, acc))
        lo, hi = ("k_lo", "k_hi") if self.split > 1 else ("0", str(self.K))
        em.mark()
        em.line(f"for k0 in range({lo}, {hi}, BLOCK_K):")
        body: list[str] = []
        em.push(body, "        ", tiles={"k", "k0"})
        em.deps["k0"] = frozenset({"k0"})
        self.k_cache = {}
        em.tile("k", f"k0 + {self._k_tile('BLOCK_K')}", frozenset({"k"}))
        em.line(f"k_mask = k < {hi}")
        em.line("mask = o_mask & k_mask")
        for s, acc in accs:
            x = self._term(em, s, means)
            em.line(f"{acc} = {combine(s, acc, f'tl.where(mask, {x}, {s.identity()})')}")
        for v in stores:
            self._store_full(em, v)
        em.pop()
        em.scopes[-1].lines.extend(body)
        for s, acc in accs:
            red = em.temp(tile_reduce(s, acc, self.axis), "acc")
            if partial:
                p = self.partials[id(s)]
                em.line(f"tl.store({p}_ptr + o * {self.split} + c, {red}, mask=o_mask)")
            else:
                self._finish(em, s, red, means, set())

    def _store_full(self, em: Emitter, v: Value) -> None:
        idx = self.full_index(em, v, self.S, self.D)
        expr = em.value(v, idx)
        for ptr in self.targets[id(v)]:
            em.store(f"{ptr}_ptr", v, idx, expr, self._tile_shape("BLOCK_K"), "o + k")

    def _finish(self, em: Emitter, s: Step, acc: str, means: dict, done: set) -> None:
        """A step's reduced accumulator -> the reduction's value (or a variance's mean)."""
        r = s.op
        t = compute_type(r.result.type.dtype)
        k = self.K
        if isinstance(r, st.VarOp) and s.mode == "main":
            means[id(r)] = em.temp(div_rn(acc, repr(float(k)), t), "mean")
            return
        if isinstance(r, st.VarOp):
            n = max(k - r.attr("correction", 1), 0)
            val = em.temp(div_rn(acc, repr(float(n)), t), "red")
        elif isinstance(r, st.MeanOp):
            val = em.temp(div_rn(acc, repr(float(k)), t), "red")
        elif s.kind == "any":
            val = em.temp(f"{acc} != 0", "red")
        elif r.result.type.dtype is DType.i1 or t != s.acc:
            val = em.temp(f"{acc}.to({t})", "red")
        else:
            val = acc
        self._register(em, r, val)
        done.add(id(r.result))

