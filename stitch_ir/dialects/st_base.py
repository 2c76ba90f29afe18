"""The ``st`` dialect's base: the op classes the planner sees (``kind``), the base op, and the
operand checks every op family uses. ``stitch_ir.dialects.st`` re-exports all of it."""

from __future__ import annotations

from typing import ClassVar

from stitch_ir.core import Operation
from stitch_ir.types import TensorType

# Op classes used by the planner. "gather" and "scatter" are both the gather/scatter class.
ELEMENTWISE, BROADCAST, REDUCE, LAYOUT = "elementwise", "broadcast", "reduce", "layout"
GATHER, SCATTER, CONSTANT, LIBRARY, TORCH = "gather", "scatter", "constant", "library", "torch"


class StOp(Operation):
    kind: ClassVar[str] = ""


def _same_types(op_name: str, types: list[TensorType]) -> TensorType:
    first = types[0]
    for i, t in enumerate(types[1:], 1):
        if t != first:
            raise ValueError(f"operand #{i} has type {t} but operand #0 has {first}")
    return first


def _check_dtype(t: TensorType, allowed: str, what: str = "operand") -> None:
    ok = {
        "float": t.dtype.is_float,
        "int": t.dtype.is_int,
        "bool": t.dtype.is_bool,
        "intbool": t.dtype.is_int or t.dtype.is_bool,
        "number": t.dtype.is_float or t.dtype.is_int,
        "any": True,
    }[allowed]
    if not ok:
        raise TypeError(f"{what} element type {t.dtype} is not allowed (expects {allowed})")


ALL_KINDS = (ELEMENTWISE, BROADCAST, REDUCE, LAYOUT, GATHER, SCATTER, CONSTANT, LIBRARY, TORCH)
