"""CUDA C expression emission: the cpu target's emitter with CUDA's math table.

A thread of a CUDA C kernel computes scalars, exactly as one iteration of a cpu kernel's loop
does, so ``codegen.cpp.emit.Emitter`` (values at a multi-index, layout ops as index maps,
gathers checked, half types stored as bits and rounded once per op, temporaries memoised per
scope and hoisted out of loops) is reused unchanged; only the functions an op calls differ.
They are the overloaded ``st_*`` functions of ``stitch_cuda.h``, which exist for float and
double both on the device (``expf`` / ``exp`` ...) and in the cpu emulation (libm), so one
kernel source serves nvcc and the emulation.

Invariants (besides the cpu emitter's): no ``std::`` call is emitted (device code cannot make
one); float division is ``/`` (IEEE on the device: nvcc divides with -prec-div=true unless told
otherwise, and stitch never passes --use_fast_math).
"""

from __future__ import annotations

from collections.abc import Callable

from codegen.cpp.emit import Emitter, linearize
from codegen.cpp.scalars import HALF, INT_IDENTITY, Unsupported, ctype, dims, storage_ctype
from stitch_ir.core import Value
from stitch_ir.dialects import st
from stitch_ir.types import DType

__all__ = ["HALF", "CudaEmitter", "Unsupported", "ctype", "dims", "linearize", "storage_ctype",
           "acc_ctype", "identity_literal"]

UNARY_CU: dict[type, Callable[[str, str], str]] = {
    st.NegOp: lambda x, t: f"(-{x})", st.AbsOp: lambda x, t: f"st_abs({x})",
    st.ExpOp: lambda x, t: f"st_exp({x})", st.Exp2Op: lambda x, t: f"st_exp2({x})",
    st.LogOp: lambda x, t: f"st_log({x})", st.Log2Op: lambda x, t: f"st_log2({x})",
    st.Log1pOp: lambda x, t: f"st_log1p({x})", st.Expm1Op: lambda x, t: f"st_expm1({x})",
    st.SqrtOp: lambda x, t: f"st_sqrt({x})", st.RsqrtOp: lambda x, t: f"st_rsqrt({x})",
    st.SinOp: lambda x, t: f"st_sin({x})", st.CosOp: lambda x, t: f"st_cos({x})",
    st.TanOp: lambda x, t: f"st_tan({x})", st.TanhOp: lambda x, t: f"st_tanh({x})",
    st.SigmoidOp: lambda x, t: f"st_sigmoid({x})", st.ErfOp: lambda x, t: f"st_erf({x})",
    st.ReluOp: lambda x, t: f"st_relu({x})", st.ReciprocalOp: lambda x, t: f"(({t})1 / {x})",
    st.FloorOp: lambda x, t: f"st_floor({x})", st.CeilOp: lambda x, t: f"st_ceil({x})",
    st.RoundOp: lambda x, t: f"st_rint({x})", st.TruncOp: lambda x, t: f"st_trunc({x})",
    st.SignOp: lambda x, t: f"st_sign({x})", st.LogicalNotOp: lambda x, t: f"(!{x})",
    st.BitwiseNotOp: lambda x, t: f"(({t})~{x})", st.IsNanOp: lambda x, t: f"({x} != {x})",
    st.IsInfOp: lambda x, t: f"st_isinf({x})",
}
BINARY_CU: dict[type, str] = {
    st.MaximumOp: "st_max({a}, {b})", st.MinimumOp: "st_min({a}, {b})",
    st.PowOp: "st_pow({a}, {b})", st.Atan2Op: "st_atan2({a}, {b})",
}
_FLOAT_ONLY = (st.ExpOp, st.Exp2Op, st.LogOp, st.Log2Op, st.Log1pOp, st.Expm1Op, st.SqrtOp,
               st.RsqrtOp, st.SinOp, st.CosOp, st.TanOp, st.TanhOp, st.SigmoidOp, st.ErfOp,
               st.IsInfOp)


def acc_ctype(kind: str, dt: DType) -> str:
    """The C type a reduction of ``kind`` over values of ``dt`` accumulates in (torch's
    accumulate types: float for the half types, int64 for integer sums and products)."""
    if kind == "any":
        return "int"
    if kind in ("sum", "prod") and not dt.is_float:
        return "int64_t"
    return ctype(dt) if dt.is_float or kind not in ("argmax", "argmin") else "int64_t"


def identity_literal(kind: str, acc: str) -> str:
    if kind in ("sum", "any"):
        return f"({acc})0"
    if kind == "prod":
        return f"({acc})1"
    big = {"float": "INFINITY", "double": "(double)INFINITY", "int64_t": "INT64_MAX",
           "int": "INT32_MAX", "int32_t": "INT32_MAX", "int16_t": "INT16_MAX",
           "int8_t": "INT8_MAX", "uint8_t": "UINT8_MAX", "bool": "true"}[acc]
    small = {"float": "(-INFINITY)", "double": "(-(double)INFINITY)", "int64_t": "INT64_MIN",
             "int": "INT32_MIN", "int32_t": "INT32_MIN", "int16_t": "INT16_MIN",
             "int8_t": "INT8_MIN", "uint8_t": "0", "bool": "false"}[acc]
    return f"({acc}){small}" if kind in ("max", "argmax") else f"({acc}){big}"


class CudaEmitter(Emitter):
    """``codegen.cpp.emit.Emitter`` emitting CUDA's functions (see the module docstring)."""

    def _op_value(self, v: Value, idx: list[str]) -> str:
        op = v.owner
        t = v.type
        ct = ctype(t.dtype)
        if isinstance(op, tuple(UNARY_CU)):
            if isinstance(op, INT_IDENTITY) and not t.dtype.is_float:
                return self.value(op.operand(0), idx)
            x = self.value(op.operand(0), idx)
            if isinstance(op, _FLOAT_ONLY) and not op.operand(0).type.dtype.is_float:
                x = f"(float)({x})"  # torch computes these in the default float type
            return self.temp(ct, UNARY_CU[type(op)](x, ct))
        if isinstance(op, tuple(BINARY_CU)):
            a, b = (self.value(o, idx) for o in op.operands)
            if isinstance(op, st.PowOp | st.Atan2Op) and not t.dtype.is_float:
                return self.temp(ct, f"({ct})" + BINARY_CU[type(op)].format(
                    a=f"(double)({a})", b=f"(double)({b})"))
            return self.temp(ct, BINARY_CU[type(op)].format(a=a, b=b))
        return super()._op_value(v, idx)

    def load_expr(self, name: str, raw: str, dt: DType) -> str:
        """A raw element of buffer ``name`` as its computed value (half bits widened)."""
        if name in self.stored:
            return f"{'st_h2f' if self.stored[name] is DType.f16 else 'st_bf2f'}({raw})"
        return raw

    def linear(self, v: Value, idx: list[str]) -> str:
        return linearize(idx, dims(v))
