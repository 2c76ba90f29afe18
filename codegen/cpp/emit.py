"""C++ expression emission: a value of a ``fusion.group`` evaluated at a multi-index.

``Emitter.value(v, idx)`` returns a C++ expression (usually a temporary's name) for ``v`` at the
multi-index ``idx`` (one C++ index expression per dimension of ``v``), emitting temporaries into
the current scope. Layout ops are index maps, never copies: a broadcast drops or zeroes indices,
a permute reorders them, a reshape re-splits them, a slice offsets them, pad and cat select
between clamped loads. Gathers load their index tensor first. Values that a kernel keeps
(materialised buffers, row-buffer values, per-row scalars) are looked up in ``self.known``
before anything is recomputed.

Invariants: every load is in bounds (pads and cats clamp before loading; gathers check their
indices and set the kernel's error flag instead of reading outside the table); temporaries are
memoised per (value, index) within a scope, so a DAG is emitted once per scope, not once per
path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from codegen.cpp.index import delinearize, linearize
from codegen.cpp.scalars import (
    BINARY_C,
    ERR_DIV_ZERO,
    ERR_INDEX,
    HALF,
    HALF_PRECISION,
    INT_IDENTITY,
    UNARY_C,
    Unsupported,
    ctype,
    dims,
    hint,
    literal,
    load,
    round_to,
    store,
)
from stitch_ir.core import BlockArgument, Value
from stitch_ir.dialects import st
from stitch_ir.types import DType


@dataclass
class Scope:
    lines: list[str]
    indent: str
    memo: dict[tuple, str] = field(default_factory=dict)
    loop_vars: set[str] = field(default_factory=set)  # variables this scope's loop defines
    hoist_at: int = 0  # where statements hoisted into this scope go (before the inner loop)
    rows: dict = field(default_factory=dict)  # (buffer, base, n) -> its widened float16 row
    strides: dict = field(default_factory=dict)  # stride -> the opaque variable holding it


IDENT = re.compile(r"[A-Za-z_]\w*")
# GCC 12 vectorises no loop that loads with a constant power-of-two stride of 64 bytes or more
# (``in[j * 16]`` in float: "no vectype for stmt", it takes the load for an interleaving group
# as wide as the stride); the same load with the stride in a register vectorises, as element
# loads put together into vectors. Such a transposed read kept a whole loop scalar, its exps
# with it (bert-tiny's attention backward: 44 us for 4096 elements, 14 us with the stride opaque).
OPAQUE_STRIDE_BYTES = 64
# Ops that compute a new value (as opposed to layout ops, gathers and constants, which pass an
# already rounded value through): their half-typed results are rounded.
_ROUNDED = (*UNARY_C, *BINARY_C, st.DivOp, st.FloorDivOp, st.RemainderOp, st.CastOp, st.IotaOp)


def _splat_value(v: Value) -> float | None:
    """The value of a splat constant (through broadcasts and reshapes), else None."""
    while isinstance(getattr(v, "owner", None), st.BroadcastOp | st.ReshapeOp):
        v = v.owner.operand(0)
    op = getattr(v, "owner", None)
    if isinstance(op, st.ConstantOp) and op.is_splat:
        return float(op.attributes["value"])
    return None


# pow(x, e) for the exponents ATen's cpu kernel special-cases, written as it computes them (the
# same bits; measured equal on 1e5 values each). Others call std::pow, which does not vectorise
# (GPT-2's gelu_new: pow(x, 3) was half of a tiny model's time).
_POW_SPECIAL: dict[float, Callable[[str, str], str]] = {
    2.0: lambda x, t: f"({x} * {x})", 3.0: lambda x, t: f"({x} * {x} * {x})",
    0.5: lambda x, t: f"std::sqrt({x})", -1.0: lambda x, t: f"(({t})1 / {x})",
    -2.0: lambda x, t: f"(({t})1 / ({x} * {x}))",
}


def _exact_reciprocal(c: float) -> bool:
    """Whether x / c == x * (1 / c) for every x: c a power of two whose reciprocal is normal."""
    if c == 0 or not math.isfinite(c):
        return False
    m, e = math.frexp(abs(c))
    return m == 0.5 and -125 <= e <= 126


# Ops whose result is exactly one of their (already rounded) operands, or an integer-valued
# function of one: no rounding needed when they are computed in float on half values.
_EXACT_ON_HALF = (st.NegOp, st.AbsOp, st.ReluOp, st.SignOp, st.FloorOp, st.CeilOp, st.RoundOp,
                  st.TruncOp, st.MaximumOp, st.MinimumOp, st.WhereOp, st.ClampOp)


# Functions whose result can move a whole step when an operand moves by an ulp. Under
# ``float32`` half precision every half value they read -- directly or through any chain of ops
# (floor(a / 3) flips when a does) -- is rounded as eager rounds it.
_DISCONTINUOUS = (st.FloorOp, st.CeilOp, st.RoundOp, st.TruncOp, st.SignOp, st.CompareOp,
                  st.FloorDivOp, st.RemainderOp, st.IsInfOp, st.ArgReduceOp)


def _number_bound(v: Value) -> bool:
    """Whether ``v`` is a splat constant other than NaN (through broadcasts, reshapes and
    casts): a clamp bound that ``st_max_c`` / ``st_min_c`` take."""
    op = getattr(v, "owner", None)
    while isinstance(op, st.BroadcastOp | st.ReshapeOp | st.CastOp):
        op = getattr(op.operand(0), "owner", None)
    if not (isinstance(op, st.ConstantOp) and op.is_splat):
        return False
    value = op.attributes["value"]
    return isinstance(value, bool | int) or (isinstance(value, float) and value == value)


def _discontinuous(op) -> bool:
    return isinstance(op, _DISCONTINUOUS) or (
        isinstance(op, st.CastOp) and not op.result.type.dtype.is_float)


class Emitter:
    def __init__(self, buffers: dict[int, str], stored: dict[str, DType] | None = None,
                 half_precision: str = "float32"):
        if half_precision not in HALF_PRECISION:
            raise ValueError(f"half_precision {half_precision!r}: expected one of {HALF_PRECISION}")
        self.half_precision = half_precision
        self._feeds_step: dict[int, bool] = {}  # id(value) -> whether a discontinuous op reads it
        # a vector loop's variable -> its extent, where float16 rows it reads may be widened whole
        self.simd_rows: dict[str, int] = {}
        # id(value) -> C pointer name, for block arguments and materialised values
        self.buffers = buffers
        # pointer name -> element type, for buffers that store it differently from how it is
        # computed (STORED: f16 / bf16 bits, i1 bytes; the group's inputs and outputs)
        self.stored: dict[str, DType] = dict(stored or {})
        # float buffers a scatter accumulates a half value in, rounded once when it is done
        self.wide: set[str] = set()
        # id(value) -> C expression valid for the current row (row scalars, row buffers)
        self.known: dict[int, Callable[[list[str]], str | None]] = {}
        self.scopes: list[Scope] = []
        self.counter = 0
        self.deps: dict[str, frozenset[str]] = {}  # temporary -> loop variables it depends on
        # a half value's rounding temporary -> (its type, the value before rounding)
        self.unrounded: dict[str, tuple[DType, str]] = {}
        # computed indices (``ix`` temporaries: read from tensors by ``checked_index``, clamped
        # by pads and cats): a float16 load at one that varies along the innermost loop is a
        # gather, which GCC never vectorises (there is no 16-bit gather)
        self.index_temps: set[str] = set()
        # index expression -> the range [lo, hi) it stays in where the code is being written
        # (a staged tile inside one operand of a cat: ``StagedPhases.nest_staged``)
        self.ranges: dict[str, tuple[int, int]] = {}

    # -- scopes --------------------------------------------------------------------------------
    def push(self, lines: list[str], indent: str, loop_vars=()) -> None:
        parent = dict(self.scopes[-1].memo) if self.scopes else {}
        self.scopes.append(Scope(lines, indent, parent, set(loop_vars), len(lines)))

    def pop(self) -> None:
        self.scopes.pop()

    @contextmanager
    def loop_body(self, loop_vars=()) -> Iterator[None]:
        """The body of the loop whose header (ending in ``{``) was just written: a scope of its
        own, so statements invariant in ``loop_vars`` hoist above the header; on exit its lines
        join the enclosing scope and the brace closes."""
        lines: list[str] = []
        self.push(lines, self.scopes[-1].indent + "  ", loop_vars)
        try:
            yield
        finally:
            self.pop()
        self.scopes[-1].lines.extend(lines)
        self.line("}")

    @contextmanager
    def vector_rows(self, var: str, n) -> Iterator[None]:
        """While a vector loop over ``var`` in [0, ``n``) is written: float16 rows it reads are
        widened whole before it (``f16_row``), for rows of 16-4096 elements."""
        if not isinstance(n, int) or not 16 <= n <= 4096:
            yield
            return
        self.simd_rows[var] = n
        try:
            yield
        finally:
            self.simd_rows.pop(var, None)

    def mark(self) -> None:
        """Call before writing a loop header: hoisted statements go above it."""
        s = self.scopes[-1]
        s.hoist_at = len(s.lines)

    def add_loop_vars(self, *names: str) -> None:
        self.scopes[-1].loop_vars.update(names)

    def line(self, text: str) -> None:
        s = self.scopes[-1]
        s.lines.append(s.indent + text)

    def _home(self, deps: frozenset[str]) -> int:
        """The outermost scope where every loop variable in ``deps`` is defined."""
        for k in range(len(self.scopes) - 1, -1, -1):
            if self.scopes[k].loop_vars & deps:
                return k
        return 0

    def _deps(self, expr: str) -> frozenset[str]:
        out: set[str] = set()
        loop_vars = set().union(*(s.loop_vars for s in self.scopes))
        for name in IDENT.findall(expr):
            if name in self.deps:
                out |= self.deps[name]
            elif name in loop_vars:
                out.add(name)
        return frozenset(out)

    def _put(self, k: int, text: str) -> None:
        """Write a statement into scope k: at its end when it is the current scope, else just
        above the loop that scope k is running (loop-invariant code motion)."""
        s = self.scopes[k]
        if k == len(self.scopes) - 1:
            s.lines.append(s.indent + text)
        else:
            s.lines.insert(s.hoist_at, s.indent + text)
            s.hoist_at += 1

    def temp(self, c_type: str, expr: str, prefix: str = "t") -> str:
        name = f"{prefix}{self.counter}"
        self.counter += 1
        deps = self._deps(expr)
        self.deps[name] = deps
        if prefix == "ix":
            self.index_temps.add(name)
        self._put(self._home(deps), f"const {c_type} {name} = {expr};")
        return name

    def stmt_with(self, anchor: str, text: str) -> None:
        """A statement placed in the same scope as the temporary ``anchor``."""
        self._put(self._home(self.deps.get(anchor, frozenset())), text)

    # -- values --------------------------------------------------------------------------------
    def value(self, v: Value, idx: list[str]) -> str:
        key = (id(v), tuple(idx))
        memo = self.scopes[-1].memo
        if key in memo:
            return memo[key]
        expr = self._value(v, idx, key)
        # remember it in every scope from the one it was placed in down to this one
        home = self._home(self.deps.get(expr, frozenset())) if expr in self.deps else \
            len(self.scopes) - 1
        for s in self.scopes[home:]:
            s.memo[key] = expr
        return expr

    def _value(self, v: Value, idx: list[str], key: tuple) -> str:
        memo = self.scopes[-1].memo
        hook = self.known.get(id(v))
        if hook is not None:
            got = hook(idx)
            if got is not None:
                memo[key] = got
                return got
        if id(v) in self.buffers:
            name = self.buffers[id(v)]
            stored = self.stored.get(name, v.type.dtype)
            raw = f"{name}[{self.load_index(idx, dims(v), stored.itemsize)}]"
            expr = self.f16_row(name, v, idx) if self.stored.get(name) is DType.f16 else None
            if expr is None and self.stored.get(name) is DType.f16 and self._gathers(idx):
                # the loop stays scalar: the conversion instruction (F16C) where the target has
                # it, one instruction where st_h2f's selects are ten
                expr = self.temp("float", f"st_h2f_s({raw})")
            elif expr is None:
                expr = self.temp(ctype(v.type.dtype), load(self.stored[name], raw)
                                 if name in self.stored else raw)
        elif isinstance(v, BlockArgument):
            raise Unsupported("a block argument without a buffer")
        else:
            expr = self.op_value(v, idx)
        memo[key] = expr
        return expr

    def load_index(self, idx: list[str], shape: list, itemsize: int) -> str:
        """The flat index of a load at ``idx`` of a row-major buffer of ``shape``: ``linearize``,
        except that a stride along the innermost loop that GCC would not vectorise (a constant
        power of two of ``OPAQUE_STRIDE_BYTES`` or more) is read from an opaque variable."""
        lin = linearize(idx, shape)
        inner = self.scopes[-1].loop_vars if self.scopes else set()
        along = [k for k, e in enumerate(idx) if self._deps(e) & inner]
        if len(along) != 1:
            return lin
        k = along[0]
        var = idx[k].strip("()")
        tail = shape[k + 1:]
        if var not in inner or shape[k] == 1 or not all(isinstance(n, int) for n in tail):
            return lin
        stride = math.prod(tail)
        if stride & (stride - 1) or stride * itemsize < OPAQUE_STRIDE_BYTES:
            return lin
        base = linearize(idx[:k] + ["0"] + idx[k + 1:], shape)
        term = f"({var})*{self._opaque_stride(stride)}"
        return term if base == "0" else f"{base} + {term}"

    def _opaque_stride(self, stride: int) -> str:
        """A variable holding ``stride`` that the compiler cannot see through (declared once in
        the outermost scope: once per phase, or per row)."""
        top = self.scopes[0]
        name = top.strides.get(stride)
        if name is None:
            name = top.strides[stride] = f"sv{self.counter}"
            self.counter += 1
            self.deps[name] = frozenset()
            self._put(0, f"const int64_t {name} = st_opaque({stride});")
        return name

    def store(self, ptr: str, lin: str, dt: DType, expr: str) -> str:
        """The statement writing computed value ``expr`` of ``dt`` to ``ptr[lin]``. A half value
        stored to its own type narrows the value before its rounding: narrowing rounds to
        nearest even too, and rounding twice to one format is rounding once (14 vector
        instructions of a float16 rounding saved per element stored)."""
        if ptr not in self.stored:
            return f"{ptr}[{lin}] = {expr};"
        h, before = self.unrounded.get(expr, (None, expr))
        return f"{ptr}[{lin}] = {store(dt, before if h is self.stored[ptr] else expr)};"

    def update(self, ptr: str, lin: str, dt: DType, fn: Callable[[str], str]) -> str:
        """The statement ``ptr[lin] = fn(ptr[lin])`` (a scatter's read-modify-write), widening
        and narrowing where ``ptr`` holds half bits: one rounding per update, as eager."""
        cell = f"{ptr}[{lin}]"
        if ptr in self.stored:
            h = self.stored[ptr]
            return f"{cell} = {store(h, fn(load(h, cell)))};"
        if ptr in self.wide:
            return f"{cell} = {fn(cell)};"
        return f"{cell} = {round_to(dt, fn(cell))};"  # a half value kept in float scratch

    def op_value(self, v: Value, idx: list[str]) -> str:
        expr = self._op_value(v, idx)
        if self.rounds(v):
            rounded = self.temp("float", round_to(v.type.dtype, expr))
            self.unrounded[rounded] = (v.type.dtype, expr)
            return rounded
        return expr

    def unrounded_value(self, v: Value, idx: list[str]) -> str:
        """Op result ``v`` at ``idx`` before any rounding to its half type (whoever asks rounds
        it another way: a row at a time). Not memoised: nothing else in this loop reads it."""
        return self._op_value(v, idx)

    def rounds(self, v: Value) -> bool:
        """Whether computing op result ``v`` rounds it to its half type (``HALF_PRECISION``)."""
        op = v.owner
        if v.type.dtype not in HALF or not isinstance(op, _ROUNDED) or \
                isinstance(op, _EXACT_ON_HALF):
            return False
        if isinstance(op, st.CastOp) and op.operand(0).type.dtype is v.type.dtype:
            return False
        return self.half_precision == "eager" or isinstance(op, st.IotaOp) or \
            self.feeds_discontinuous(v)

    def f16_row(self, name: str, v: Value, idx: list[str]) -> str | None:
        """A float16 element of buffer ``name`` read along a vector loop (``simd_rows``: the
        flat index is the loop's variable plus what does not depend on it), as an element of
        the whole row widened before the loop (``st_h2f_row``: the conversion instructions,
        where a per-element ``st_h2f`` is 10-15 vector instructions), placed as far out as the
        row's start allows -- once per thread for a vector that every row reads. None where
        the read is not such."""
        # the flat index is "<base> + (<var>)" or "<var>" (``linearize``'s forms)
        m = re.fullmatch(r"(?:(.*) \+ )?(\(*)(\w+)(\)*)", linearize(idx, dims(v)))
        if m is None or len(m.group(2)) != len(m.group(4)):
            return None
        var, base = m.group(3), m.group(1) or "0"
        n = self.simd_rows.get(var)
        if n is None or var not in self.scopes[-1].loop_vars or var in IDENT.findall(base):
            return None
        deps = self._deps(base)
        home = self._home(deps)
        if home == len(self.scopes) - 1:
            return None
        rows = self.scopes[home].rows
        if (name, base, n) not in rows:
            row = f"hrow{self.counter}"
            self.counter += 1
            self._put(home, f"float {row}[{n}];")
            self._put(home, f"st_h2f_row({row}, {name} + {base}, {n});")
            self.deps[row] = deps
            rows[(name, base, n)] = row
        return f"{rows[(name, base, n)]}[{var}]"

    def feeds_discontinuous(self, v: Value) -> bool:
        """Whether a discontinuous function (``_DISCONTINUOUS``) of this kernel reads ``v``,
        directly or through other ops (an iterative post-order walk: chains run long)."""
        memo = self._feeds_step
        stack = [v]
        while stack:
            u = stack[-1]
            if id(u) in memo:
                stack.pop()
                continue
            todo = [r for op in u.users for r in op.results if id(r) not in memo]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            memo[id(u)] = any(_discontinuous(op) or any(memo[id(r)] for r in op.results)
                              for op in u.users)
        return memo[id(v)]

    def _op_value(self, v: Value, idx: list[str]) -> str:
        op = v.owner
        t = v.type
        ct = ctype(t.dtype)
        if isinstance(op, st.ConstantOp):
            if not op.is_splat:
                raise Unsupported("dense constants inside a kernel")
            return literal(op.attributes["value"], t.dtype)
        if isinstance(op, st.IotaOp):
            a = op.attributes
            return self.temp(ct, f"({ct})({literal(a['start'], t.dtype)} + "
                                 f"{literal(a['step'], t.dtype)} * ({ct})({idx[0]}))")
        if isinstance(op, st.RandOp):
            seed = self.value(op.operand(0), idx)
            pos = linearize(idx, dims(v))
            return self.temp(ct, f"st_rand({seed}, (uint32_t)({op.attributes['offset']}LL + {pos}))")
        if isinstance(op, tuple(UNARY_C)):
            if isinstance(op, INT_IDENTITY) and not t.dtype.is_float:
                return self.value(op.operand(0), idx)
            x = self.value(op.operand(0), idx)
            return self.temp(ct, UNARY_C[type(op)](x, ct))
        if isinstance(op, st.PowOp) and t.dtype.is_float:
            e = _splat_value(op.operand(1))
            if e in _POW_SPECIAL:  # eager's own special cases: its bits, and no powf call
                x = self.value(op.operand(0), idx)
                return self.temp(ct, _POW_SPECIAL[e](x, ct))
        if isinstance(op, tuple(BINARY_C)):
            a, b = (self.value(o, idx) for o in op.operands)
            return self.temp(ct, BINARY_C[type(op)].format(a=a, b=b))
        if isinstance(op, st.DivOp):
            # Always a true division, as eager divides: a hoisted reciprocal and a multiply is
            # up to an ulp off, and what follows may amplify that (a round() flips; Attention
            # Round's (w / s - q)^2 / sigma^2 feeding a softmax moved by 1e-2). Only a power of
            # two divides as an exact multiply. A vector division costs less than a load.
            a, b = (self.value(o, idx) for o in op.operands)
            const = _splat_value(op.operand(1))
            if t.dtype.is_float and const is not None and _exact_reciprocal(const):
                return self.temp(ct, f"({a} * {literal(1.0 / const, t.dtype)})")
            if not t.dtype.is_float:
                b = self.nonzero_divisor(b, ct)
            return self.temp(ct, f"({a} / {b})")
        if isinstance(op, st.FloorDivOp | st.RemainderOp):
            a, b = (self.value(o, idx) for o in op.operands)
            kind = "floordiv" if isinstance(op, st.FloorDivOp) else "remainder"
            if not t.dtype.is_float:
                b = self.nonzero_divisor(b, ct)
            fn = f"st_{kind}_f" if t.dtype.is_float else f"({ct})st_{kind}_i"
            return self.temp(ct, f"{fn}({a}, {b})")
        if isinstance(op, st.WhereOp):
            c, a, b = (self.value(o, idx) for o in op.operands)
            return self.temp(ct, f"({c} ? {a} : {b})")
        if isinstance(op, st.ClampOp):
            x, lo, hi = (self.value(o, idx) for o in op.operands)
            up = "st_max_c" if _number_bound(op.operand(1)) else "st_max"
            down = "st_min_c" if _number_bound(op.operand(2)) else "st_min"
            return self.temp(ct, f"{down}({up}({x}, {lo}), {hi})")
        if isinstance(op, st.CastOp):
            x = self.value(op.operand(0), idx)
            if t.dtype.is_bool:
                return self.temp(ct, f"({x} != 0)")
            if op.operand(0).type.dtype.is_bool:
                # a select, not ``(float)(b)``: GCC 12 finds no vector type for a loop that
                # converts a bool to float and also stores it as a byte (a dropout mask kept
                # and applied), and leaves the whole loop scalar
                return self.temp(ct, f"({x} ? ({ct})1 : ({ct})0)")
            return self.temp(ct, f"({ct})({x})")
        if isinstance(op, st.BroadcastOp):
            src = dims(op.operand(0))
            off = len(idx) - len(src)
            return self.value(op.operand(0), ["0" if n == 1 else idx[off + k]
                                              for k, n in enumerate(src)])
        if isinstance(op, st.ReshapeOp):
            return self.value(op.operand(0), reshape_index(idx, dims(v), dims(op.operand(0))))
        if isinstance(op, st.PermuteOp):
            perm = op.attributes["perm"]
            src = [""] * len(perm)
            for k, p in enumerate(perm):
                src[p] = idx[k]
            return self.value(op.operand(0), src)
        if isinstance(op, st.SliceOp):
            a = op.attributes
            src = list(idx)
            d = a["dim"]
            src[d] = f"({a['start']} + {a['step']} * ({idx[d]}))" if a["step"] != 1 else \
                f"({a['start']} + {idx[d]})"
            return self.value(op.operand(0), src)
        if isinstance(op, st.PadOp):
            return self.pad(op, idx, ct)
        if isinstance(op, st.CatOp):
            return self.cat(op, idx, ct)
        if isinstance(op, st.EmbeddingOp):
            table, ids = op.operands
            n_idx = len(dims(ids))
            row = self.checked_index(self.value(ids, idx[:n_idx]), dims(table)[0],
                                     op.attr("wrap", True))
            return self.value(table, [row] + idx[n_idx:])
        if isinstance(op, st.IndexSelectOp):
            x, ids = op.operands
            d = op.attributes["dim"]
            src = list(idx)
            src[d] = self.checked_index(self.value(ids, [idx[d]]), dims(x)[d], op.attr("wrap", True))
            return self.value(x, src)
        if isinstance(op, st.GatherOp):
            x, ids = op.operands
            d = op.attributes["dim"]
            src = list(idx)
            src[d] = self.checked_index(self.value(ids, idx), dims(x)[d], op.attr("wrap", True))
            return self.value(x, src)
        raise Unsupported(f"'{op.name}' cannot be inlined into a kernel expression")

    def nonzero_divisor(self, b: str, ct: str) -> str:
        """An integer divisor that is never 0: a zero sets the error flag (ERR_DIV_ZERO; eager
        raises ZeroDivisionError) and divides by 1 instead of killing the process (SIGFPE)."""
        self.stmt_with(b, f"if ({b} == 0) err |= {ERR_DIV_ZERO};")
        return self.temp(ct, f"({b} == 0 ? ({ct})1 : {b})", "dv")

    def checked_index(self, expr: str, size: int, wrap: bool = True) -> str:
        """An index read from a tensor: negative counts from the end where ``wrap`` (Python
        indexing) and is out of range where not; out of range sets the error flag and reads row 0
        instead."""
        raw = self.temp("int64_t", f"(int64_t)({expr})", "ix")
        wrapped = self.temp("int64_t", f"({raw} < 0 ? {raw} + {size} : {raw})", "ix") if wrap \
            else raw
        self.stmt_with(wrapped, f"if ({wrapped} < 0 || {wrapped} >= {size}) err |= {ERR_INDEX};")
        return self.temp(index_type(size),
                         f"(({wrapped} < 0 || {wrapped} >= {size}) ? 0 : {wrapped})", "ix")

    def _gathers(self, idx: list[str]) -> bool:
        """Whether an element index goes through a computed index (read from a tensor, or
        clamped) that varies along the innermost loop: an element-wise gather, not a row
        gather."""
        inner = self.scopes[-1].loop_vars
        return any(n in self.index_temps and self.deps.get(n, frozenset()) & inner
                   for n in IDENT.findall(" ".join(idx)))

    def pad(self, op: st.PadOp, idx: list[str], ct: str) -> str:
        src_shape = dims(op.operand(0))
        low = op.attributes["low"]
        conds, src = [], []
        for i, lo, n, m in zip(idx, low, src_shape, dims(op.result)):
            if lo == 0 and n == m:  # not padded along this dim: every index is in range
                src.append(i)
                continue
            j = f"({i} - {lo})" if lo else i
            # temporaries, so that a bounds test and clamp that do not depend on the vector
            # loop's index hoist above it (and the select below becomes a blend, ``st_pick``:
            # a 3x3 max pool's nine padded taps after a batch norm ran scalar, 15 ms)
            conds.append(self.temp("bool", f"({j} >= 0 && {j} < {n})", "ok"))
            src.append(self.temp(index_type(n), f"({j} < 0 ? 0 : ({j} >= {n} ? {n - 1} : {j}))",
                                 "ix"))
        inner = self.value(op.operand(0), src)
        if not conds:
            return inner
        fill = f"({ct}){literal(op.attributes['value'], op.result.type.dtype)}"
        # One select per padded dim, not one select on ``ok_a && ok_b``: GCC 12 finds no vector
        # type for a loop that ANDs two bools from compares of different widths (an int64
        # index read from a tensor, int32 clamps), and left adder_quant's unfold gathers scalar.
        for ok in reversed(conds):
            inner = self.select(ok, inner, fill, ct)
        return inner

    def select(self, cond: str, a: str, b: str, ct: str) -> str:
        """``cond ? a : b`` as a temporary; a bit blend (``st_pick``) where ``cond`` (a
        temporary) does not change in the current loop: written as ``?:`` there, GCC threaded or
        unswitched the loop on it and vectorised nothing."""
        if self._home(self.deps[cond]) < len(self.scopes) - 1:
            return self.temp(ct, f"st_pick<{ct}>({cond}, {a}, {b})")
        return self.temp(ct, f"({cond} ? {a} : {b})")

    def cat(self, op: st.CatOp, idx: list[str], ct: str) -> str:
        d = op.attributes["dim"]
        lo, hi = self.ranges.get(idx[d], (None, None))
        start = 0
        for o in op.operands:  # an index known to stay in one part reads only that part
            if lo is not None and start <= lo and hi <= start + dims(o)[d]:
                return self.value(o, idx[:d] + [f"({idx[d]} - {start})"] + idx[d + 1:])
            start += dims(o)[d]
        parts, start = [], 0
        for o in op.operands:  # each part's index, clamped (a temporary: see ``pad``)
            n = dims(o)[d]
            src = list(idx)
            src[d] = self.temp("int64_t", f"({idx[d]} < {start} ? 0 : ({idx[d]} >= {start + n} ? "
                                          f"{n - 1} : {idx[d]} - {start}))", "ix")
            parts.append((start, start + n, self.value(o, src)))
            start += n
        expr = parts[-1][2]
        for _lo, hi, e in reversed(parts[:-1]):
            expr = self.select(self.temp("bool", f"({idx[d]} < {hi})", "ok"), e, expr, ct)
        return expr


def index_type(size) -> str:
    """The C type of an index clamped into [0, ``size``): 32-bit where it fits. The reshapes
    after a gather divide it by constants (an im2col's ``(ix / 34) % 34``), and a 64-bit
    division by a constant has no vector form (no 64-bit multiply-high): AdderNet's unfolded
    convolutions ran their gathers at 6 ns an element."""
    return "int32_t" if isinstance(size, int) and size < 2 ** 31 else "int64_t"


def reshape_index(idx: list[str], out_shape: list[int], in_shape: list[int]) -> list[str]:
    """Map an index of the reshaped value to an index of its operand (row-major order).

    Dimensions are matched in groups of equal products from the right, so a reshape that only
    splits or merges some dims leaves the others' indices untouched (no division in the inner
    loop for the common [B, S, H] <-> [B*S, H])."""
    out_nz = [(i, n) for i, n in zip(idx, out_shape) if n != 1]
    in_pos = [k for k, n in enumerate(in_shape) if n != 1]
    in_nz = [in_shape[k] for k in in_pos]
    result = ["0"] * len(in_shape)
    a, b = len(out_nz), len(in_nz)
    while a > 0 or b > 0:
        # take the smallest groups from the right with equal products
        ga, gb = [a - 1], [b - 1]
        pa = out_nz[a - 1][1] if a > 0 else 1
        pb = in_nz[b - 1] if b > 0 else 1
        while pa != pb:
            if hint(pa) < hint(pb):
                ga.insert(0, ga[0] - 1)
                if ga[0] < 0:
                    raise Unsupported(f"reshape {in_shape} -> {out_shape}: no dims match")
                pa = pa * out_nz[ga[0]][1]
            else:
                gb.insert(0, gb[0] - 1)
                if gb[0] < 0:
                    raise Unsupported(f"reshape {in_shape} -> {out_shape}: no dims match")
                pb = pb * in_nz[gb[0]]
        ga = [k for k in ga if k >= 0]
        gb = [k for k in gb if k >= 0]
        if len(ga) == 1 and len(gb) == 1:
            result[in_pos[gb[0]]] = out_nz[ga[0]][0]
        else:
            lin = linearize([out_nz[k][0] for k in ga], [out_nz[k][1] for k in ga])
            parts = delinearize(lin, [in_nz[k] for k in gb])
            for k, p in zip(gb, parts):
                result[in_pos[k]] = p
        a -= len(ga)
        b -= len(gb)
        if not ga and not gb:
            break
    return result
