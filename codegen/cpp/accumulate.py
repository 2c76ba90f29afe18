"""What the two cpu kernel strategies (``codegen.cpp.rows``, ``codegen.cpp.phases``) share: the
op classes they treat alike and the accumulator code of a reduction (its C type, initial value,
update, combination of two partials and final value)."""

from __future__ import annotations

import math

from codegen.cpp.scalars import ctype, literal
from stitch_ir.core import Value
from stitch_ir.dialects import st
from stitch_ir.types import Sym

SCATTERS = (st.IndexAddOp, st.ScatterAddOp, st.ScatterReduceOp)
LAYOUT_OPS = (st.ReshapeOp, st.PermuteOp, st.BroadcastOp, st.SliceOp, st.PadOp, st.CatOp)


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


def acc_declaration(r: st.ReduceOp, mode: str, acc: str, c_type: str) -> tuple[list[str], list[str]]:
    """The statements declaring accumulator ``acc`` of ``r`` (in C type ``c_type``) and the
    ``reduction(...)`` clauses of the simd loop that updates it (a max / min also keeps an int
    NaN flag: an int flag vectorises, a bool does not)."""
    init, clause = _acc_init(r, mode)
    lines, clauses = [f"{c_type} {acc} = {init};"], [f"reduction({clause}:{acc})"]
    if isinstance(r, st.MaxOp | st.MinOp):
        lines.append(f"int {acc}_nan = 0;")
        clauses.append(f"reduction(|:{acc}_nan)")
    return lines, clauses


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

