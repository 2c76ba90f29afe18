"""Triton expression emission: a value of a ``fusion.group`` evaluated at a multi-index of tiles.

``Emitter.value(v, idx)`` returns a Triton expression (usually a temporary's name) for ``v`` at
the multi-index ``idx``: one expression per dimension of ``v``, each an integer tile (``o`` of
shape [BLOCK_O, 1], ``k`` of shape [1, BLOCK_K], a flat ``offs`` ...) or a constant. Tiles
broadcast, so a value that depends only on the row index is a [BLOCK_O, 1] column and costs one
load per row, not one per element. Layout ops are index maps, never copies (as in
``codegen.cpp.emit``): a broadcast drops indices, a permute reorders them, a reshape re-splits
them, a slice offsets them, pad and cat select between clamped loads; gathers load their index
tile first.

Invariants:
- every load is masked by the masks of the index tiles its address depends on (``masks``: base
  tile name -> mask name), and gives ``other=`` explicitly; pads and cats clamp their indices
  before loading, gathers check theirs and raise the kernel's error flag instead of reading
  outside the table (the index then reads row 0);
- float16 / bfloat16 values are loaded into float32 and computed in float32 (torch's opmath);
  they are rounded only by an explicit ``st.cast`` and by the store;
- temporaries are memoised per (value, index) within a scope and hoisted to the outermost scope
  whose tiles they use (a row's scalar is computed once per row, outside the loop over columns).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from stitch_ir.core import BlockArgument, Value
from stitch_ir.dialects import st
from stitch_ir.types import DType

TL = {DType.f64: "tl.float64", DType.f32: "tl.float32", DType.f16: "tl.float16",
      DType.bf16: "tl.bfloat16", DType.i64: "tl.int64", DType.i32: "tl.int32",
      DType.i16: "tl.int16", DType.i8: "tl.int8", DType.u8: "tl.uint8", DType.i1: "tl.int1"}
# Pointer element types in a kernel signature (``triton.compile``'s spelling).
SIG = {DType.f64: "fp64", DType.f32: "fp32", DType.f16: "fp16", DType.bf16: "bf16",
       DType.i64: "i64", DType.i32: "i32", DType.i16: "i16", DType.i8: "i8", DType.u8: "u8",
       DType.i1: "i1"}
HALF = (DType.f16, DType.bf16)


class Unsupported(Exception):
    """The group uses something the Triton code generator does not handle; the message names it."""


def tl_type(dt: DType) -> str:
    try:
        return TL[dt]
    except KeyError:
        raise Unsupported(f"element type {dt} is not supported by the Triton target") from None


def compute_type(dt: DType) -> str:
    """The type a value is computed in: float32 for the half types (opmath), else its own."""
    return "tl.float32" if dt in HALF else tl_type(dt)


def dims(v: Value) -> list[int]:
    out = []
    for d in v.type.shape:
        if not isinstance(d, int):
            raise Unsupported("symbolic shapes: the Triton target compiles static shapes")
        out.append(d)
    return out


_INT = re.compile(r"^-?\d+$")


def is_int_literal(expr: str) -> bool:
    return bool(_INT.match(expr.strip()))


def literal(value, dt: DType) -> str:
    """A Python literal Triton reads as a constant of a compatible type (float literals are
    float32, integer literals int32 / int64: both promote to the other operand's type)."""
    if dt.is_bool:
        return "1" if value else "0"
    if dt.is_int:
        return str(int(value))
    v = float(value)
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INF" if v > 0 else "-INF"
    return repr(v)


def linearize(idx: list[str], shape: list[int]) -> str:
    expr = ""
    for i, n in zip(idx, shape):
        if n == 1:
            continue
        expr = i if not expr else f"({expr}) * {n} + {i}"
    return expr or "0"


def delinearize(lin: str, shape: list[int]) -> list[str]:
    out = []
    stride = 1
    for n in reversed(shape):
        if n == 1:
            out.append("0")
        else:
            out.append(f"({lin}) // {stride} % {n}" if stride > 1 else f"({lin}) % {n}")
        stride *= n
    out.reverse()
    return out


def reshape_index(idx: list[str], out_shape: list[int], in_shape: list[int]) -> list[str]:
    """An index of the reshaped value as an index of its operand (row-major). Dims are matched
    in groups of equal products from the right, so [B, S, H] <-> [B*S, H] divides nothing."""
    out_nz = [(i, n) for i, n in zip(idx, out_shape) if n != 1]
    in_pos = [k for k, n in enumerate(in_shape) if n != 1]
    in_nz = [in_shape[k] for k in in_pos]
    result = ["0"] * len(in_shape)
    a, b = len(out_nz), len(in_nz)
    while a > 0 or b > 0:
        ga, gb = [a - 1], [b - 1]
        pa = out_nz[a - 1][1] if a > 0 else 1
        pb = in_nz[b - 1] if b > 0 else 1
        while pa != pb:
            if pa < pb:
                ga.insert(0, ga[0] - 1)
                pa *= out_nz[ga[0]][1]
            else:
                gb.insert(0, gb[0] - 1)
                pb *= in_nz[gb[0]]
        ga = [k for k in ga if k >= 0]
        gb = [k for k in gb if k >= 0]
        if len(ga) == 1 and len(gb) == 1:
            result[in_pos[gb[0]]] = out_nz[ga[0]][0]
        else:
            lin = linearize([out_nz[k][0] for k in ga], [out_nz[k][1] for k in ga])
            for k, p in zip(gb, delinearize(lin, [in_nz[k] for k in gb])):
                result[in_pos[k]] = p
        a -= len(ga)
        b -= len(gb)
        if not ga and not gb:
            break
    return result


# NaN-propagating maximum / minimum (torch.maximum): keep a when a wins or is NaN, else b
# (b is NaN whenever the comparison fails because of it).
def nan_max(a: str, b: str) -> str:
    return f"tl.where(({a} > {b}) | ({a} != {a}), {a}, {b})"


def nan_min(a: str, b: str) -> str:
    return f"tl.where(({a} < {b}) | ({a} != {a}), {a}, {b})"


UNARY: dict[type, Callable[[str, str], str]] = {
    st.NegOp: lambda x, t: f"-{x}", st.AbsOp: lambda x, t: f"tl.abs({x})",
    st.ExpOp: lambda x, t: f"tl.exp({x})", st.Exp2Op: lambda x, t: f"tl.exp2({x})",
    st.LogOp: lambda x, t: f"tl.log({x})", st.Log2Op: lambda x, t: f"tl.log2({x})",
    st.Log1pOp: lambda x, t: f"libm.log1p({x})", st.Expm1Op: lambda x, t: f"libm.expm1({x})",
    st.SqrtOp: lambda x, t: f"tl.sqrt_rn({x})" if t == "tl.float32" else f"tl.sqrt({x})",
    st.RsqrtOp: lambda x, t: f"tl.rsqrt({x})",
    st.SinOp: lambda x, t: f"tl.sin({x})", st.CosOp: lambda x, t: f"tl.cos({x})",
    st.TanOp: lambda x, t: f"libm.tan({x})", st.TanhOp: lambda x, t: f"libm.tanh({x})",
    st.SigmoidOp: lambda x, t: f"(1.0 / (1.0 + tl.exp(-{x})))", st.ErfOp: lambda x, t: f"tl.erf({x})",
    # relu keeps NaN (torch.relu(nan) is nan): only what compares below zero becomes zero
    st.ReluOp: lambda x, t: f"tl.where({x} < 0, 0, {x}).to({t})",
    st.ReciprocalOp: lambda x, t: f"tl.div_rn(tl.full([], 1.0, tl.float32), {x})"
    if t == "tl.float32" else f"(1.0 / {x})",
    st.FloorOp: lambda x, t: f"tl.floor({x})", st.CeilOp: lambda x, t: f"tl.ceil({x})",
    st.RoundOp: lambda x, t: f"libm.rint({x})", st.TruncOp: lambda x, t: f"libm.trunc({x})",
    st.SignOp: lambda x, t: f"tl.where({x} != {x}, {x}, tl.where({x} > 0, 1, "
                            f"tl.where({x} < 0, -1, 0)).to({t}))",
    st.LogicalNotOp: lambda x, t: f"({x} == 0)", st.BitwiseNotOp: lambda x, t: f"(~{x})",
    st.IsNanOp: lambda x, t: f"({x} != {x})", st.IsInfOp: lambda x, t: f"(tl.abs({x}) == INF)",
}
INT_IDENTITY = (st.FloorOp, st.CeilOp, st.RoundOp, st.TruncOp)
BINARY: dict[type, str] = {
    st.AddOp: "({a} + {b})", st.SubOp: "({a} - {b})", st.MulOp: "({a} * {b})",
    st.PowOp: "libm.pow({a}, {b})", st.Atan2Op: "libm.atan2({a}, {b})",
    st.BitwiseAndOp: "({a} & {b})", st.BitwiseOrOp: "({a} | {b})", st.BitwiseXorOp: "({a} ^ {b})",
    st.LogicalAndOp: "({a} & {b})", st.LogicalOrOp: "({a} | {b})",
    st.EqOp: "({a} == {b})", st.NeOp: "({a} != {b})", st.LtOp: "({a} < {b})",
    st.LeOp: "({a} <= {b})", st.GtOp: "({a} > {b})", st.GeOp: "({a} >= {b})",
}


@dataclass
class Scope:
    lines: list[str]
    indent: str
    memo: dict[tuple, str] = field(default_factory=dict)
    tiles: set[str] = field(default_factory=set)  # index tiles this scope's loop defines
    hoist_at: int = 0  # where statements hoisted into this scope go (above its inner loop)
    uid: int = 0  # unique per emitter (never id(): a later loop's scope may reuse a freed id)


IDENT = re.compile(r"[A-Za-z_]\w*")


class Emitter:
    """Emits statements into nested scopes. ``buffers``: id(value) -> pointer argument name;
    ``masks``: frozenset of base tile names -> mask name (a missing set is the conjunction of
    its members' masks)."""

    def __init__(self, buffers: dict[int, str], masks: dict[frozenset, str] | None = None,
                 err: str | None = None):
        self.buffers = buffers
        self.masks = dict(masks or {})
        self.err = err  # the error-flag pointer, when the kernel has gathers or scatters
        # id(value) -> hook(idx) giving an expression already computed for that index
        self.known: dict[int, Callable[[list[str]], str | None]] = {}
        self.scopes: list[Scope] = []
        self.counter = 0
        self.deps: dict[str, frozenset[str]] = {}  # name -> base tiles it depends on
        self.uses_err = False
        self.same: dict[tuple, str] = {}  # (scope uid, expression) -> temporary
        self.scope_count = 0

    # -- scopes --------------------------------------------------------------------------------
    def push(self, lines: list[str], indent: str, tiles=()) -> None:
        parent = dict(self.scopes[-1].memo) if self.scopes else {}
        self.scope_count += 1
        self.scopes.append(Scope(lines, indent, parent, set(tiles), len(lines), self.scope_count))

    def pop(self) -> None:
        self.scopes.pop()

    def mark(self) -> None:
        """Call before writing a loop header: statements hoisted out of the loop go above it."""
        s = self.scopes[-1]
        s.hoist_at = len(s.lines)

    def line(self, text: str) -> None:
        s = self.scopes[-1]
        s.lines.append(s.indent + text)

    def tile(self, name: str, expr: str, bases: frozenset[str] | None = None) -> str:
        """Declare an index tile ``name = expr``: with ``bases`` a base tile (its own mask) in
        the current scope, else a derived one, placed where the tiles it uses are."""
        if bases is not None:
            self.deps[name] = bases
            self.line(f"{name} = {expr}")
        else:
            self.deps[name] = self.deps_of(expr)
            self._put(self._home(self.deps[name]), f"{name} = {expr}")
        return name

    def _home(self, deps: frozenset[str]) -> int:
        for k in range(len(self.scopes) - 1, -1, -1):
            if self.scopes[k].tiles & deps:
                return k
        return 0

    def deps_of(self, expr: str) -> frozenset[str]:
        out: set[str] = set()
        for name in IDENT.findall(expr):
            if name in self.deps:
                out |= self.deps[name]
        return frozenset(out)

    def _put(self, k: int, text: str) -> None:
        s = self.scopes[k]
        if k == len(self.scopes) - 1:
            s.lines.append(s.indent + text)
        else:
            s.lines.insert(s.hoist_at, s.indent + text)
            s.hoist_at += 1

    def temp(self, expr: str, prefix: str = "t") -> str:
        deps = self.deps_of(expr)
        home = self._home(deps)
        key = (self.scopes[home].uid, expr)
        if key in self.same:  # the same expression in the same scope: computed once
            return self.same[key]
        name = f"{prefix}{self.counter}"
        self.counter += 1
        self.deps[name] = deps
        self._put(home, f"{name} = {expr}")
        self.same[key] = name
        return name

    def stmt_with(self, anchor: str, text: str) -> None:
        """A statement placed in the same scope as the temporary ``anchor``."""
        self._put(self._home(self.deps.get(anchor, frozenset())), text)

    def mask_for(self, deps: frozenset[str]) -> str | None:
        if not deps:
            return None
        if deps in self.masks:
            return self.masks[deps]
        # tiles without a mask of their own (a loop's scalar) are in range by construction
        names = [self.masks[frozenset({d})] for d in sorted(deps) if frozenset({d}) in self.masks]
        return " & ".join(names) or None

    # -- memory --------------------------------------------------------------------------------
    def load(self, ptr: str, offset: str, dt: DType) -> str:
        mask = self.mask_for(self.deps_of(offset))
        args = f"{ptr} + {offset}" if offset != "0" else ptr
        if mask:
            args += f", mask={mask}, other=0"
        expr = f"tl.load({args})"
        if dt in HALF:
            expr += ".to(tl.float32)"
        return self.temp(expr, "x")

    def store(self, ptr: str, v: Value, idx: list[str], expr: str, shape: str = "",
              tile: str = "") -> None:
        """Store ``expr`` (v at idx) with the mask of the tiles its address uses; ``shape`` is
        the tile shape a constant is widened to, ``tile`` the index tile(s) the stored value
        spans (``o + k``): an address that does not use all of them (a size-1 output) is
        widened over them, and their masks leave one valid lane per address."""
        offset = linearize(idx, dims(v))
        deps = self.deps_of(offset) | self.deps_of(expr)
        if tile and self.deps_of(tile) - self.deps_of(offset):
            offset = f"{offset} + 0 * ({tile})"
        mask = self.mask_for(self.deps_of(offset))
        dt = v.type.dtype
        if expr in ("INF", "-INF", "NAN") or is_int_literal(expr) or _is_float_literal(expr):
            expr = f"tl.full({shape or '[]'}, {expr}, {tl_type(dt)})"
        else:
            expr = f"{expr}.to({tl_type(dt)})"
        target = f"{ptr} + {offset}" if offset != "0" else ptr
        text = f"tl.store({target}, {expr}" + (f", mask={mask})" if mask else ")")
        self._put(self._home(deps | self.deps_of(offset)), text)

    # -- values --------------------------------------------------------------------------------
    def value(self, v: Value, idx: list[str]) -> str:
        key = (id(v), tuple(idx))
        memo = self.scopes[-1].memo
        if key in memo:
            return memo[key]
        expr = self._value(v, idx)
        home = self._home(self.deps.get(expr, frozenset())) if expr in self.deps else \
            len(self.scopes) - 1
        for s in self.scopes[home:]:
            s.memo[key] = expr
        return expr

    def _value(self, v: Value, idx: list[str]) -> str:
        hook = self.known.get(id(v))
        if hook is not None:
            got = hook(idx)
            if got is not None:
                return got
        if id(v) in self.buffers:
            return self.load(f"{self.buffers[id(v)]}_ptr", linearize(idx, dims(v)), v.type.dtype)
        if isinstance(v, BlockArgument):
            raise Unsupported("a block argument without a buffer")
        return self.op_value(v, idx)

    def op_value(self, v: Value, idx: list[str]) -> str:
        op = v.owner
        t = v.type
        ct = compute_type(t.dtype)
        if isinstance(op, st.ConstantOp):
            if not op.is_splat:
                raise Unsupported("a dense constant inside a kernel")
            return literal(op.attributes["value"], t.dtype)
        if isinstance(op, st.IotaOp):
            a = op.attributes
            return self.temp(f"({literal(a['start'], t.dtype)} + {literal(a['step'], t.dtype)} * "
                             f"{idx[0]}).to({ct})")
        if isinstance(op, st.RandOp):  # the stream st.RandOp defines (tl.rand's, see _rand)
            seed = self.value(op.operand(0), idx)
            pos = linearize(idx, dims(v))
            return self.temp(f"_rand({seed}, ({op.attributes['offset']} + {pos}).to(tl.uint32))")
        if isinstance(op, tuple(UNARY)):
            if isinstance(op, INT_IDENTITY) and not t.dtype.is_float:
                return self.value(op.operand(0), idx)
            if isinstance(op, st.SignOp | st.AbsOp | st.NegOp) and t.dtype.is_bool:
                raise Unsupported(f"'{op.name}' on i1")
            return self.temp(UNARY[type(op)](self.value(op.operand(0), idx), ct))
        if isinstance(op, st.MaximumOp | st.MinimumOp):
            a, b = (self.value(o, idx) for o in op.operands)
            f = nan_max if isinstance(op, st.MaximumOp) else nan_min
            return self.temp(self._typed(f(a, b), ct, a, b))
        if isinstance(op, tuple(BINARY)):
            a, b = (self.value(o, idx) for o in op.operands)
            return self.temp(self._typed(BINARY[type(op)].format(a=a, b=b), ct, a, b,
                                         cmp=isinstance(op, st.CompareOp)))
        if isinstance(op, st.DivOp):
            a, b = (self.value(o, idx) for o in op.operands)
            if t.dtype.is_float:
                # IEEE division: a quotient feeding round() must round as torch's does
                return self.temp(div_rn(a, b, ct))
            return self.temp(f"({a} // {b})")  # integers truncate toward zero, as st.div does
        if isinstance(op, st.FloorDivOp | st.RemainderOp):
            return self._floor_div(op, idx, ct)
        if isinstance(op, st.WhereOp):
            c, a, b = (self.value(o, idx) for o in op.operands)
            return self.temp(self._typed(f"tl.where({c}, {a}, {b})", ct, a, b, force=True))
        if isinstance(op, st.ClampOp):
            x, lo, hi = (self.value(o, idx) for o in op.operands)
            return self.temp(self._typed(nan_min(nan_max(x, lo), hi), ct, x, lo, hi, force=True))
        if isinstance(op, st.CastOp):
            x = self.value(op.operand(0), idx)
            if t.dtype.is_bool:
                return self.temp(f"({x} != 0)")
            if _lit(x):
                return literal(float(x) if t.dtype.is_float else int(float(x)), t.dtype) \
                    if x not in ("INF", "-INF", "NAN") else x
            if t.dtype in HALF:  # round to the half type, keep computing in float32
                return self.temp(f"{x}.to({tl_type(t.dtype)}).to(tl.float32)")
            return self.temp(f"{x}.to({ct})")
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
            src[d] = f"({a['start']} + {a['step']} * {idx[d]})" if a["step"] != 1 else \
                f"({a['start']} + {idx[d]})"
            return self.value(op.operand(0), src)
        if isinstance(op, st.PadOp):
            return self._pad(op, idx, ct)
        if isinstance(op, st.CatOp):
            return self._cat(op, idx, ct)
        if isinstance(op, st.EmbeddingOp):
            table, ids = op.operands
            n_idx = len(dims(ids))
            row = self.checked_index(self.value(ids, idx[:n_idx]), dims(table)[0],
                                     op.attr("wrap", True))
            return self.value(table, [row] + idx[n_idx:])
        if isinstance(op, st.IndexSelectOp | st.GatherOp):
            x, ids = op.operands
            d = op.attributes["dim"]
            src = list(idx)
            at = [idx[d]] if isinstance(op, st.IndexSelectOp) else idx
            src[d] = self.checked_index(self.value(ids, at), dims(x)[d], op.attr("wrap", True))
            return self.value(x, src)
        raise Unsupported(f"'{op.name}' cannot be inlined into a Triton kernel expression")

    def _typed(self, expr: str, ct: str, *operands: str, cmp: bool = False,
               force: bool = False) -> str:
        """Literal operands promote to int32 / float32: cast back to the value's type when the
        result's type could come from a literal."""
        if cmp:
            return expr
        if force or any(_lit(o) for o in operands):
            return f"({expr}).to({ct})" if not all(_lit(o) for o in operands) else \
                f"tl.full([], {expr}, {ct})"
        return expr

    def _floor_div(self, op, idx: list[str], ct: str) -> str:
        a, b = (self.value(o, idx) for o in op.operands)
        if op.result.type.dtype.is_float:
            q = self.temp(f"tl.floor(tl.div_rn({as_tensor(a, ct)}, {as_tensor(b, ct)}))"
                          if ct == "tl.float32" else
                          f"tl.floor({a} / {b})")
            if isinstance(op, st.FloorDivOp):
                return q
            r = self.temp(f"libm.fmod({a}, {b})")
            # torch's remainder takes the divisor's sign: fmod, then shift by b when they differ
            return self.temp(f"tl.where(({r} != 0) & (({r} < 0) != ({b} < 0)), {r} + {b}, {r})")
        # Triton's // and % truncate toward zero (C): correct toward minus infinity
        if isinstance(op, st.FloorDivOp):
            return self.temp(f"({a} // {b}) - ((({a} % {b}) != 0) & (({a} < 0) != ({b} < 0)))"
                             f".to({ct})")
        r = self.temp(f"{a} % {b}")
        return self.temp(f"tl.where(({r} != 0) & (({r} < 0) != ({b} < 0)), {r} + {b}, {r})")

    def checked_index(self, expr: str, size: int, wrap: bool = True) -> str:
        """An index read from a tensor: negative counts from the end where ``wrap`` (Python
        indexing) and is out of range where not; out of range raises the error flag and reads
        row 0 instead."""
        if self.err is None:
            raise Unsupported("a gather in a kernel without an error flag")
        raw = self.temp(f"{expr}.to(tl.int64)" if not is_int_literal(expr) else
                        f"tl.full([], {expr}, tl.int64)", "ix")
        wrapped = self.temp(f"tl.where({raw} < 0, {raw} + {size}, {raw})", "ix") if wrap else raw
        bad = self.temp(f"({wrapped} < 0) | ({wrapped} >= {size})", "bad")
        self.uses_err = True
        mask = self.mask_for(self.deps.get(bad, frozenset()))
        self.stmt_with(bad, f"tl.store({self.err}_ptr + {wrapped} * 0, 1, mask={bad}"
                            + (f" & {mask})" if mask else ")"))
        return self.temp(f"tl.where({bad}, 0, {wrapped})", "ix")

    def _clamp(self, j: str, n: int) -> str:
        if is_int_literal(j):
            return str(min(max(int(j), 0), n - 1))
        return f"tl.minimum(tl.maximum({j}, 0), {n - 1})"

    def _pad(self, op: st.PadOp, idx: list[str], ct: str) -> str:
        src_shape = dims(op.operand(0))
        conds, src = [], []
        for i, lo, n in zip(idx, op.attributes["low"], src_shape):
            j = f"({i} - {lo})" if lo else i
            if is_int_literal(i):
                jv = int(i) - lo
                if not 0 <= jv < n:
                    return literal(op.attributes["value"], op.result.type.dtype)
                src.append(str(jv))
                continue
            conds.append(f"(({j} >= 0) & ({j} < {n}))")
            src.append(self._clamp(j, n))
        inner = self.value(op.operand(0), src)
        if not conds:
            return inner
        fill = literal(op.attributes["value"], op.result.type.dtype)
        return self.temp(self._typed(f"tl.where({' & '.join(conds)}, {inner}, {fill})", ct,
                                     inner, fill, force=True))

    def _cat(self, op: st.CatOp, idx: list[str], ct: str) -> str:
        d = op.attributes["dim"]
        parts, start = [], 0
        for o in op.operands:
            n = dims(o)[d]
            src = list(idx)
            src[d] = self._clamp(f"({idx[d]} - {start})", n) if not is_int_literal(idx[d]) else \
                str(min(max(int(idx[d]) - start, 0), n - 1))
            if is_int_literal(idx[d]) and start <= int(idx[d]) < start + n:
                return self.value(o, src)
            if not is_int_literal(idx[d]):
                parts.append((start + n, self.value(o, src)))
            start += n
        expr = parts[-1][1]
        for hi, e in reversed(parts[:-1]):
            expr = f"tl.where({idx[d]} < {hi}, {e}, {expr})"
        return self.temp(self._typed(expr, ct, *[e for _, e in parts], force=True))


_FLOAT = re.compile(r"^-?\d+\.\d*(e[-+]?\d+)?$|^-?\d+e[-+]?\d+$")


def _is_float_literal(expr: str) -> bool:
    return bool(_FLOAT.match(expr.strip()))


def is_literal(expr: str) -> bool:
    return _lit(expr)


def div_rn(a: str, b: str, ct: str) -> str:
    """a / b rounded as IEEE division (Triton's ``/`` on float32 may be approximate)."""
    if ct != "tl.float32":
        return f"({a} / {b})"
    return f"tl.div_rn({as_tensor(a, ct)}, {as_tensor(b, ct)})"


def as_tensor(expr: str, ct: str) -> str:
    """A literal as a typed scalar tensor (for functions that take tensors only)."""
    return f"tl.full([], {expr}, {ct})" if _lit(expr) else expr


def _lit(expr: str) -> bool:
    return is_int_literal(expr) or _is_float_literal(expr) or expr in ("INF", "-INF", "NAN")
