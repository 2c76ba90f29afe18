"""The scalar side of C++ emission: the C type a value is computed and stored in, literals,
loads and stores of half and bool values, the error codes a kernel returns, and the C spelling
of element-wise ops (``UNARY_C``, ``BINARY_C``). No loop or index logic (``emit``, ``index``)."""

from __future__ import annotations

import math
from collections.abc import Callable

from stitch_ir.core import Value
from stitch_ir.dialects import st
from stitch_ir.types import DType, Sym

# The C type a value is computed in. Half types (f16, bf16) are computed in float and stored as
# their 16 bits (STORAGE): loads widen (``load``), stores narrow (``store``). Between the two,
# ``HALF_PRECISION`` says which values are rounded to their type (``round_to``):
# - ``float32`` (the default; Inductor's rule): a kernel's half values stay float32 between its
#   loads and stores -- casts to a half type included, which is how torch's decompositions
#   spell eager's rounding of each op -- except iotas and the values a discontinuous function
#   reads (rounding, comparisons, integer casts, floor division, isinf, arg-reductions:
#   ``_DISCONTINUOUS``), which are rounded first: there a one-ulp difference could become a
#   whole step, so a quantiser's buckets and a mask's comparisons match eager's;
# - ``eager``: every half-typed result is rounded, one rounding per op as eager's cpu kernels
#   do (eager's bits; a float16 rounding is about 14 vector instructions an element).
CTYPE = {DType.f64: "double", DType.f32: "float", DType.f16: "float", DType.bf16: "float",
         DType.i64: "int64_t", DType.i32: "int32_t", DType.i16: "int16_t", DType.i8: "int8_t",
         DType.u8: "uint8_t", DType.i1: "bool"}
HALF = (DType.f16, DType.bf16)
# Element types a buffer stores differently from how they are computed: half types as their
# bits, and i1 as bytes (a ``bool`` load stops GCC from vectorising a loop: a masked softmax
# with a bool mask ran branchy scalar code, 2.3x slower with a random mask).
STORED = (*HALF, DType.i1)
_WIDEN = {DType.f16: "st_h2f", DType.bf16: "st_bf2f"}
_NARROW = {DType.f16: "st_f2h", DType.bf16: "st_f2bf"}
_ROUND = {DType.f16: "st_round_h", DType.bf16: "st_round_bf"}
HALF_PRECISION = ("float32", "eager")


# A kernel returns a bit set of these (0: fine); the runtime turns them into the error eager raises.
ERR_INDEX = 1  # an index read from a tensor is out of range
ERR_DIV_ZERO = 2  # an integer division by zero
ERRORS = {ERR_INDEX: "an index read from a tensor is out of range",
          ERR_DIV_ZERO: "integer division by zero (ZeroDivisionError in eager)"}


def sets_err(ops) -> bool:
    """Whether a kernel of ``ops`` may set its error flag (gathers, integer divisions)."""
    return any(isinstance(op, st.EmbeddingOp | st.IndexSelectOp | st.GatherOp) or (
        isinstance(op, st.DivOp | st.FloorDivOp | st.RemainderOp)
        and not op.result.type.dtype.is_float) for op in ops)


class Unsupported(Exception):
    """The group uses something this code generator does not handle (the runtime falls back)."""


def ctype(dt: DType) -> str:
    """The C type values of ``dt`` are computed in (float for the half types)."""
    try:
        return CTYPE[dt]
    except KeyError:
        raise Unsupported(f"element type {dt} is not supported by the cpp target") from None


def storage_ctype(dt: DType) -> str:
    """The C element type of a buffer holding ``dt`` (the half types: their bits; i1: bytes)."""
    return "uint16_t" if dt in HALF else "uint8_t" if dt is DType.i1 else ctype(dt)


def compute_itemsize(dt: DType) -> int:
    """Bytes of one element in a kernel's own scratch (computed type: float for half)."""
    return 4 if dt in HALF else dt.itemsize


def load(dt: DType, raw: str) -> str:
    """An element read from a buffer of ``dt`` (stored as ``storage_ctype``), as its computed
    type."""
    if dt is DType.i1:
        return f"({raw} != 0)"
    return f"{_WIDEN[dt]}({raw})" if dt in HALF else raw


def store(dt: DType, expr: str) -> str:
    """A computed value of ``dt`` as the element written to a buffer of ``dt``."""
    if dt is DType.i1:
        return f"(uint8_t)({expr})"
    return f"{_NARROW[dt]}({expr})" if dt in HALF else expr


def round_to(dt: DType, expr: str) -> str:
    """A float result rounded to ``dt``'s precision (a no-op but for the half types)."""
    return f"{_ROUND[dt]}({expr})" if dt in HALF else expr


def half_value(value: float, dt: DType) -> float:
    """``value`` rounded to the half type ``dt`` (nearest even), as a Python float."""
    import numpy as np

    if dt is DType.f16:
        return float(np.float32(np.float16(value)))
    u = int(np.array(value, dtype=np.float32).view(np.uint32))
    if math.isnan(value):
        return value
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return float(np.array(u & 0xFFFFFFFF, dtype=np.uint32).view(np.float32))


def literal(value, dt: DType) -> str:
    if dt.is_bool:
        return "true" if value else "false"
    if dt.is_int:
        return f"((int64_t){int(value)}LL)" if dt is DType.i64 else f"(({ctype(dt)}){int(value)})"
    v = float(value)
    if dt in HALF:  # a half constant holds a half value, computed in float
        v, dt = half_value(v, dt), DType.f32
    if math.isnan(v):
        return "NAN" if dt is DType.f32 else "(double)NAN"
    if math.isinf(v):
        text = "INFINITY" if v > 0 else "(-INFINITY)"
        return text if dt is DType.f32 else f"(double){text}"
    return f"({v!r}f)" if dt is DType.f32 else f"({v!r})"


def dims(v: Value) -> list:
    """The sizes of ``v``: ints, or symbolic sizes (``Sym``: ``coef * S_name`` in C, an argument
    of the kernel; an f-string writes them as such). A symbolic size is never 1 here: a kernel
    compiled for it indexes that dim, which stays right when the size is 1 at run time."""
    return list(v.type.shape)


def symbols_of(values) -> list[str]:
    """The symbols (sorted names) in the types of ``values``."""
    return sorted(set().union(*(v.type.symbols for v in values)))


def hint(n) -> int:
    """A size as a number for decisions (tile sizes, thresholds): a symbolic one at its hint;
    nothing decided with it may change what the kernel computes."""
    return n.size_hint if isinstance(n, Sym) else n


UNARY_C: dict[type, Callable[[str, str], str]] = {
    st.NegOp: lambda x, t: f"(-{x})", st.AbsOp: lambda x, t: f"({x} < 0 ? -{x} : {x})",
    st.ExpOp: lambda x, t: f"st_exp({x})", st.Exp2Op: lambda x, t: f"std::exp2({x})",
    st.LogOp: lambda x, t: f"std::log({x})", st.Log2Op: lambda x, t: f"std::log2({x})",
    st.Log1pOp: lambda x, t: f"std::log1p({x})", st.Expm1Op: lambda x, t: f"std::expm1({x})",
    st.SqrtOp: lambda x, t: f"std::sqrt({x})", st.RsqrtOp: lambda x, t: f"st_rsqrt({x})",
    st.SinOp: lambda x, t: f"std::sin({x})", st.CosOp: lambda x, t: f"std::cos({x})",
    st.TanOp: lambda x, t: f"std::tan({x})", st.TanhOp: lambda x, t: f"st_tanh({x})",
    st.SigmoidOp: lambda x, t: f"st_sigmoid({x})", st.ErfOp: lambda x, t: f"st_erf({x})",
    st.ReluOp: lambda x, t: f"st_relu({x})", st.ReciprocalOp: lambda x, t: f"(({t})1 / {x})",
    st.FloorOp: lambda x, t: f"std::floor({x})", st.CeilOp: lambda x, t: f"std::ceil({x})",
    st.RoundOp: lambda x, t: f"std::nearbyint({x})", st.TruncOp: lambda x, t: f"std::trunc({x})",
    st.SignOp: lambda x, t: f"st_sign({x})", st.LogicalNotOp: lambda x, t: f"(!{x})",
    st.BitwiseNotOp: lambda x, t: f"(({t})~{x})", st.IsNanOp: lambda x, t: f"({x} != {x})",
    st.IsInfOp: lambda x, t: f"std::isinf({x})",
}
INT_IDENTITY = (st.FloorOp, st.CeilOp, st.RoundOp, st.TruncOp)
BINARY_C: dict[type, str] = {
    st.AddOp: "({a} + {b})", st.SubOp: "({a} - {b})", st.MulOp: "({a} * {b})",
    st.MaximumOp: "st_max({a}, {b})", st.MinimumOp: "st_min({a}, {b})",
    st.PowOp: "std::pow({a}, {b})", st.Atan2Op: "std::atan2({a}, {b})",
    st.BitwiseAndOp: "({a} & {b})", st.BitwiseOrOp: "({a} | {b})", st.BitwiseXorOp: "({a} ^ {b})",
    st.LogicalAndOp: "({a} && {b})", st.LogicalOrOp: "({a} || {b})",
    st.EqOp: "({a} == {b})", st.NeOp: "({a} != {b})", st.LtOp: "({a} < {b})",
    st.LeOp: "({a} <= {b})", st.GtOp: "({a} > {b})", st.GeOp: "({a} >= {b})",
}
