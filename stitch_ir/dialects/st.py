"""The ``st`` dialect: tensor-level ops covering the nine workloads after core-aten decomposition.

Conventions (the importer establishes them, the verifier checks them):
- Element-wise ops take operands of *identical* type (shape and dtype); broadcasting and dtype
  promotion are explicit (``st.broadcast``, ``st.cast``), so every op's memory footprint is
  visible to the planner. Comparisons return ``i1``.
- Reductions carry ``dims`` (sorted, non-negative) and ``keepdim``.
- ``st.constant`` is a splat (``value`` is a scalar; this is also ``full``) or dense
  (``value`` is a ``DenseAttr``).
- Every op class has a ``kind``: its op class for fusion planning (elementwise, broadcast,
  reduce, layout, gather, scatter, constant, library, torch).

The memory-intensive ops are defined here; the kinds, the base op and the operand checks live
in ``st_base``, the library ops and ``st.torch_call`` in ``st_library``; this module re-exports
both, so every op is ``st.<Name>``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from stitch_ir.core import DenseAttr, register_op
from stitch_ir.dialects.st_base import (  # noqa: F401 - re-exported: st.StOp, st.LIBRARY, ...
    ALL_KINDS,
    BROADCAST,
    CONSTANT,
    ELEMENTWISE,
    GATHER,
    LAYOUT,
    LIBRARY,
    REDUCE,
    SCATTER,
    TORCH,
    StOp,
    _check_dtype,
    _same_types,
)
from stitch_ir.dialects.st_library import (  # noqa: F401 - re-exported: st.ConvolutionOp, ...
    AddmmOp,
    BatchMatmulOp,
    ConvolutionOp,
    LibraryOp,
    LinearOp,
    MatmulOp,
    TorchCallOp,
)
from stitch_ir.types import DType, Sym, TensorType

# ----------------------------------------------------------------------------------------------
# Element-wise


class UnaryOp(StOp):
    kind = ELEMENTWISE
    num_operands = 1
    dtypes: ClassVar[str] = "any"

    @classmethod
    def infer_types(cls, ts, attrs):
        _check_dtype(ts[0], cls.dtypes)
        return [ts[0]]


class BinaryOp(StOp):
    kind = ELEMENTWISE
    num_operands = 2
    dtypes: ClassVar[str] = "any"

    @classmethod
    def infer_types(cls, ts, attrs):
        t = _same_types(cls.name, ts)
        _check_dtype(t, cls.dtypes)
        return [t]


class CompareOp(BinaryOp):
    @classmethod
    def infer_types(cls, ts, attrs):
        t = _same_types(cls.name, ts)
        return [t.with_dtype(DType.i1)]


class PredicateOp(UnaryOp):
    @classmethod
    def infer_types(cls, ts, attrs):
        _check_dtype(ts[0], cls.dtypes)
        return [ts[0].with_dtype(DType.i1)]


def _define(base: type[StOp], table: dict[str, tuple[str, str]]) -> None:
    """Declare one op class per entry: class name -> (op name, allowed dtypes)."""
    for cls_name, (op_name, dtypes) in table.items():
        cls = type(cls_name, (base,), {"name": op_name, "dtypes": dtypes, "__module__": __name__})
        register_op(cls)
        globals()[cls_name] = cls


_define(UnaryOp, {
    "NegOp": ("st.neg", "number"), "AbsOp": ("st.abs", "number"), "ExpOp": ("st.exp", "float"),
    "Exp2Op": ("st.exp2", "float"), "LogOp": ("st.log", "float"), "Log2Op": ("st.log2", "float"),
    "Log1pOp": ("st.log1p", "float"), "Expm1Op": ("st.expm1", "float"),
    "SqrtOp": ("st.sqrt", "float"), "RsqrtOp": ("st.rsqrt", "float"),
    "SinOp": ("st.sin", "float"), "CosOp": ("st.cos", "float"), "TanOp": ("st.tan", "float"),
    "TanhOp": ("st.tanh", "float"), "SigmoidOp": ("st.sigmoid", "float"),
    "ErfOp": ("st.erf", "float"), "ReluOp": ("st.relu", "number"),
    "ReciprocalOp": ("st.reciprocal", "float"), "FloorOp": ("st.floor", "number"),
    "CeilOp": ("st.ceil", "number"), "RoundOp": ("st.round", "number"),
    "TruncOp": ("st.trunc", "number"), "SignOp": ("st.sign", "number"),
    "LogicalNotOp": ("st.logical_not", "bool"), "BitwiseNotOp": ("st.bitwise_not", "intbool"),
})
_define(PredicateOp, {"IsNanOp": ("st.isnan", "float"), "IsInfOp": ("st.isinf", "float")})
_define(BinaryOp, {
    "AddOp": ("st.add", "number"), "SubOp": ("st.sub", "number"), "MulOp": ("st.mul", "number"),
    "DivOp": ("st.div", "number"), "PowOp": ("st.pow", "number"),
    "MaximumOp": ("st.maximum", "number"), "MinimumOp": ("st.minimum", "number"),
    "RemainderOp": ("st.remainder", "number"), "FloorDivOp": ("st.floor_div", "number"),
    "Atan2Op": ("st.atan2", "float"),
    "BitwiseAndOp": ("st.bitwise_and", "intbool"), "BitwiseOrOp": ("st.bitwise_or", "intbool"),
    "BitwiseXorOp": ("st.bitwise_xor", "intbool"),
    "LogicalAndOp": ("st.logical_and", "bool"), "LogicalOrOp": ("st.logical_or", "bool"),
})
_define(CompareOp, {
    "EqOp": ("st.eq", "any"), "NeOp": ("st.ne", "any"), "LtOp": ("st.lt", "any"),
    "LeOp": ("st.le", "any"), "GtOp": ("st.gt", "any"), "GeOp": ("st.ge", "any"),
})

# ``st.div`` on integers truncates toward zero (torch's rounding_mode="trunc"); torch's true
# division of integers is imported as casts to float followed by a float ``st.div``.


@register_op
class WhereOp(StOp):
    """``where(cond, a, b)``: cond is i1; a, b and the cond shape agree."""

    name = "st.where"
    kind = ELEMENTWISE
    num_operands = 3

    @classmethod
    def infer_types(cls, ts, attrs):
        c, a, b = ts
        if c.dtype is not DType.i1:
            raise TypeError(f"condition must be i1, got {c.dtype}")
        t = _same_types(cls.name, [a, b])
        if c.shape != t.shape:
            raise ValueError(f"condition shape {c.shape} differs from value shape {t.shape}")
        return [t]


@register_op
class ClampOp(StOp):
    """``clamp(x, lo, hi)`` = min(max(x, lo), hi); all three of one type."""

    name = "st.clamp"
    kind = ELEMENTWISE
    num_operands = 3

    @classmethod
    def infer_types(cls, ts, attrs):
        t = _same_types(cls.name, ts)
        _check_dtype(t, "number")
        return [t]


@register_op
class CastOp(StOp):
    name = "st.cast"
    kind = ELEMENTWISE
    num_operands = 1
    required_attrs = ("dtype",)

    @classmethod
    def infer_types(cls, ts, attrs):
        dt = attrs["dtype"]
        if not isinstance(dt, DType):
            raise TypeError(f"'dtype' must be an element type, got {dt!r}")
        return [ts[0].with_dtype(dt)]


# ----------------------------------------------------------------------------------------------
# Reductions


def _reduce_shape(shape: tuple, dims: tuple[int, ...], keepdim: bool) -> tuple:
    if list(dims) != sorted(set(dims)):
        raise ValueError(f"'dims' {list(dims)} must be sorted and unique")
    for d in dims:
        if not 0 <= d < len(shape):
            raise ValueError(f"reduction dim {d} out of range for rank {len(shape)}")
    if keepdim:
        return tuple(1 if i in dims else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in dims)


class ReduceOp(StOp):
    kind = REDUCE
    num_operands = 1
    required_attrs = ("dims", "keepdim")
    dtypes: ClassVar[str] = "number"

    @classmethod
    def infer_types(cls, ts, attrs):
        t = ts[0]
        _check_dtype(t, cls.dtypes)
        shape = _reduce_shape(t.shape, tuple(attrs["dims"]), bool(attrs["keepdim"]))
        return [TensorType(shape, cls.result_dtype(t.dtype))]

    @classmethod
    def result_dtype(cls, dt: DType) -> DType:
        return dt

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(self.attributes["dims"])

    @property
    def keepdim(self) -> bool:
        return bool(self.attributes["keepdim"])


@register_op
class SumOp(ReduceOp):
    name = "st.sum"
    dtypes = "any"

    @classmethod
    def result_dtype(cls, dt):
        # torch sums bool/int to int64
        return DType.i64 if (dt.is_int or dt.is_bool) else dt


@register_op
class MeanOp(ReduceOp):
    name = "st.mean"
    dtypes = "float"


@register_op
class MaxOp(ReduceOp):
    name = "st.max"
    dtypes = "any"


@register_op
class MinOp(ReduceOp):
    name = "st.min"
    dtypes = "any"


@register_op
class ProdOp(ReduceOp):
    name = "st.prod"

    @classmethod
    def result_dtype(cls, dt):
        return DType.i64 if dt.is_int else dt


@register_op
class AnyOp(ReduceOp):
    name = "st.any"
    dtypes = "any"

    @classmethod
    def result_dtype(cls, dt):
        return DType.i1


@register_op
class VarOp(ReduceOp):
    """Variance with Bessel-style ``correction`` (0 = population, 1 = sample)."""

    name = "st.var"
    dtypes = "float"
    optional_attrs = ("correction",)


class ArgReduceOp(ReduceOp):
    @classmethod
    def infer_types(cls, ts, attrs):
        if len(tuple(attrs["dims"])) != 1:
            raise ValueError(f"'dims' must name exactly one dimension, got {list(attrs['dims'])}")
        return super().infer_types(ts, attrs)

    @classmethod
    def result_dtype(cls, dt):
        return DType.i64


@register_op
class ArgMaxOp(ArgReduceOp):
    name = "st.argmax"


@register_op
class ArgMinOp(ArgReduceOp):
    name = "st.argmin"


# ----------------------------------------------------------------------------------------------
# Broadcast and layout


@register_op
class BroadcastOp(StOp):
    """Numpy ``broadcast_to``: operand dims align right; each is 1 or equals the target dim."""

    name = "st.broadcast"
    kind = BROADCAST
    num_operands = 1
    required_attrs = ("shape",)

    @classmethod
    def infer_types(cls, ts, attrs):
        shape = tuple(attrs["shape"])
        src = ts[0].shape
        if len(src) > len(shape):
            raise ValueError(f"cannot broadcast rank {len(src)} to rank {len(shape)}")
        for i, d in enumerate(src):
            tgt = shape[len(shape) - len(src) + i]
            if d != 1 and d != tgt:
                raise ValueError(f"dim {i} of size {d} cannot broadcast to {tgt}")
        return [ts[0].with_shape(shape)]


def _static_numel(shape: tuple) -> int | None:
    if any(isinstance(d, Sym) for d in shape):
        return None
    return math.prod(shape)


@register_op
class ReshapeOp(StOp):
    name = "st.reshape"
    kind = LAYOUT
    num_operands = 1
    required_attrs = ("shape",)

    @classmethod
    def infer_types(cls, ts, attrs):
        shape = tuple(attrs["shape"])
        a, b = _static_numel(ts[0].shape), _static_numel(shape)
        if a is not None and b is not None and a != b:
            raise ValueError(f"cannot reshape {a} elements to shape {list(shape)} ({b} elements)")
        return [ts[0].with_shape(shape)]


def inverse_perm(p) -> tuple[int, ...]:
    """The permutation that undoes ``p``."""
    q = [0] * len(p)
    for k, i in enumerate(p):
        q[i] = k
    return tuple(q)


def channels_last_perms(rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """[N, C, *spatial] -> [N, *spatial, C], and back."""
    return (0, *range(2, rank), 1), (0, rank - 1, *range(1, rank - 1))


@register_op
class PermuteOp(StOp):
    name = "st.permute"
    kind = LAYOUT
    num_operands = 1
    required_attrs = ("perm",)

    @classmethod
    def infer_types(cls, ts, attrs):
        perm = tuple(attrs["perm"])
        if sorted(perm) != list(range(ts[0].rank)):
            raise ValueError(f"'perm' {list(perm)} is not a permutation of rank {ts[0].rank}")
        return [ts[0].with_shape(tuple(ts[0].shape[p] for p in perm))]


@register_op
class SliceOp(StOp):
    """Elements ``start, start+step, ... < end`` along ``dim`` (0 <= start <= end <= size)."""

    name = "st.slice"
    kind = LAYOUT
    num_operands = 1
    required_attrs = ("dim", "start", "end", "step")

    @classmethod
    def infer_types(cls, ts, attrs):
        t = ts[0]
        dim, start, end, step = (int(attrs[k]) for k in ("dim", "start", "end", "step"))
        if not 0 <= dim < t.rank:
            raise ValueError(f"slice dim {dim} out of range for rank {t.rank}")
        size = t.shape[dim]
        if step < 1:
            raise ValueError(f"slice step must be >= 1, got {step}")
        if not 0 <= start <= end or (isinstance(size, int) and end > size):
            raise ValueError(f"slice [{start}:{end}] out of bounds for size {size}")
        shape = list(t.shape)
        shape[dim] = (end - start + step - 1) // step
        return [t.with_shape(tuple(shape))]


@register_op
class CatOp(StOp):
    name = "st.cat"
    kind = LAYOUT
    required_attrs = ("dim",)

    @classmethod
    def infer_types(cls, ts, attrs):
        if not ts:
            raise ValueError("needs at least one operand")
        dim = int(attrs["dim"])
        first = ts[0]
        if not 0 <= dim < first.rank:
            raise ValueError(f"cat dim {dim} out of range for rank {first.rank}")
        total: Any = 0
        for i, t in enumerate(ts):
            if t.dtype != first.dtype or t.rank != first.rank:
                raise ValueError(f"operand #{i} type {t} does not match operand #0 {first}")
            for d in range(t.rank):
                if d != dim and t.shape[d] != first.shape[d]:
                    raise ValueError(f"operand #{i} dim {d} is {t.shape[d]}, expected "
                                     f"{first.shape[d]}")
            if isinstance(total, int) and isinstance(t.shape[dim], int):
                total += t.shape[dim]
            else:
                raise ValueError("cat along a symbolic dimension is not supported")
        shape = list(first.shape)
        shape[dim] = total
        return [first.with_shape(tuple(shape))]


@register_op
class PadOp(StOp):
    """Constant padding: ``low[i]`` / ``high[i]`` elements before / after dim i (negative crops)."""

    name = "st.pad"
    kind = LAYOUT
    num_operands = 1
    required_attrs = ("low", "high", "value")

    @classmethod
    def infer_types(cls, ts, attrs):
        t = ts[0]
        low, high = tuple(attrs["low"]), tuple(attrs["high"])
        if len(low) != t.rank or len(high) != t.rank:
            raise ValueError(f"'low' and 'high' need {t.rank} entries")
        shape = []
        for d, lo, hi in zip(t.shape, low, high):
            n = d + lo + hi
            crop = max(-lo, 0) + max(-hi, 0)
            if n < 0 or (isinstance(d, int) and crop > d):
                raise ValueError(f"padding {lo},{hi} crops more than the size {d}")
            shape.append(n)
        return [t.with_shape(tuple(shape))]


# ----------------------------------------------------------------------------------------------
# Creation


@register_op
class ConstantOp(StOp):
    """A splat (``value`` a scalar: ``full``) or dense (``value`` a DenseAttr) constant."""

    name = "st.constant"
    kind = CONSTANT
    num_operands = 0
    required_attrs = ("value",)

    @staticmethod
    def splat(value: float | int | bool, type: TensorType) -> ConstantOp:
        return ConstantOp((), [type], {"value": value})

    @staticmethod
    def dense(attr: DenseAttr) -> ConstantOp:
        return ConstantOp((), [attr.type], {"value": attr})

    @property
    def is_splat(self) -> bool:
        return not isinstance(self.attributes["value"], DenseAttr)

    def verify_(self) -> None:
        v = self.attributes["value"]
        t = self.results[0].type
        if isinstance(v, DenseAttr):
            if v.type != t:
                raise self.error(f"dense value of type {v.type} does not match result type {t}")
            if len(v.data) != v.type.numel() * v.type.dtype.itemsize:
                raise self.error(f"dense value holds {len(v.data)} bytes, expected "
                                 f"{v.type.numel() * v.type.dtype.itemsize}")
        elif isinstance(v, bool | int | float):
            if t.dtype.is_bool and not isinstance(v, bool):
                raise self.error(f"i1 constant needs true/false, got {v!r}")
            if (t.dtype.is_int) and isinstance(v, float) and not math.isfinite(v):
                raise self.error(f"integer constant cannot be {v}")
        else:
            raise self.error(f"'value' must be a number, a bool or dense<...>, got {v!r}")


@register_op
class IotaOp(StOp):
    """``start + step * i`` for i in [0, size): torch.arange."""

    name = "st.iota"
    kind = CONSTANT
    num_operands = 0
    required_attrs = ("start", "step", "size", "dtype")

    @classmethod
    def infer_types(cls, ts, attrs):
        size = attrs["size"]  # an int, or a symbolic size (arange of a dynamic batch)
        return [TensorType((size if isinstance(size, Sym) else int(size),), attrs["dtype"])]


@register_op
class SeedOp(StOp):
    """A fresh random seed (rank-0 i64) each time the function runs: the runtime draws it from
    torch's default generator, so ``torch.manual_seed`` makes a compiled graph reproducible.
    Impure: never folded, fused or deduplicated (kind ``torch``: it runs as its own step)."""

    name = "st.seed"
    kind = TORCH
    num_operands = 0

    @classmethod
    def infer_types(cls, ts, attrs):
        return [TensorType((), DType.i64)]


@register_op
class RandOp(StOp):
    """Uniform floats in [0, 1): element i is Philox4x32-10 of (key = seed, counter = offset + i,
    i the row-major index), its first word as Triton's ``tl.rand`` makes a float. A pure
    function of the seed and the position, so a kernel may compute any element anywhere, and
    the cpu, Triton and interpreter streams are the same. The operand is the seed broadcast to
    the result's shape; ``offset`` keeps the graph's random ops on disjoint counters."""

    name = "st.rand"
    kind = ELEMENTWISE
    num_operands = 1
    required_attrs = ("offset",)

    @classmethod
    def infer_types(cls, ts, attrs):
        if ts[0].dtype is not DType.i64:
            raise TypeError(f"st.rand takes an i64 seed, got {ts[0].dtype}")
        return [ts[0].with_dtype(DType.f32)]


# ----------------------------------------------------------------------------------------------
# Gather / scatter


# Index ops take an optional ``wrap`` (default true): whether a negative index counts from the
# end (Python indexing, ``x[idx]``) or is out of range (index_select, gather, embedding,
# index_add and scatter raise on it in eager).


def _check_index(t: TensorType, what: str = "index") -> None:
    if not t.dtype.is_int:
        raise TypeError(f"{what} must be an integer tensor, got {t.dtype}")


@register_op
class IndexSelectOp(StOp):
    """``x.index_select(dim, idx)`` with a 1-D index."""

    name = "st.index_select"
    kind = GATHER
    num_operands = 2
    required_attrs = ("dim",)
    optional_attrs = ("wrap",)

    @classmethod
    def infer_types(cls, ts, attrs):
        x, idx = ts
        _check_index(idx)
        dim = int(attrs["dim"])
        if idx.rank != 1:
            raise ValueError(f"index must be 1-D, got rank {idx.rank}")
        if not 0 <= dim < x.rank:
            raise ValueError(f"dim {dim} out of range for rank {x.rank}")
        shape = list(x.shape)
        shape[dim] = idx.shape[0]
        return [x.with_shape(tuple(shape))]


@register_op
class EmbeddingOp(StOp):
    """Rows of a 2-D table picked by an index of any rank: ``idx.shape + table.shape[1:]``."""

    name = "st.embedding"
    kind = GATHER
    optional_attrs = ("wrap",)
    num_operands = 2

    @classmethod
    def infer_types(cls, ts, attrs):
        w, idx = ts
        _check_index(idx)
        if w.rank != 2:
            raise ValueError(f"table must be 2-D, got rank {w.rank}")
        return [w.with_shape(idx.shape + w.shape[1:])]


@register_op
class GatherOp(StOp):
    """``torch.gather(x, dim, idx)``: out[i][j] = x[idx[i][j]][j] (dim 0); out shape = idx shape."""

    name = "st.gather"
    kind = GATHER
    num_operands = 2
    required_attrs = ("dim",)
    optional_attrs = ("wrap",)

    @classmethod
    def infer_types(cls, ts, attrs):
        x, idx = ts
        _check_index(idx)
        if idx.rank != x.rank:
            raise ValueError(f"index rank {idx.rank} differs from input rank {x.rank}")
        if not 0 <= int(attrs["dim"]) < max(x.rank, 1):
            raise ValueError(f"dim {attrs['dim']} out of range for rank {x.rank}")
        return [x.with_shape(idx.shape)]


@register_op
class IndexAddOp(StOp):
    """``x.index_add(dim, idx, src, alpha)``: x[.., idx[i], ..] += alpha * src[.., i, ..]."""

    name = "st.index_add"
    kind = SCATTER
    num_operands = 3
    required_attrs = ("dim",)
    optional_attrs = ("alpha", "wrap")

    @classmethod
    def infer_types(cls, ts, attrs):
        x, idx, src = ts
        _check_index(idx)
        dim = int(attrs["dim"])
        if idx.rank != 1 or src.rank != x.rank or src.dtype != x.dtype:
            raise ValueError(f"expects 1-D index and source of input's rank and dtype; got "
                             f"{idx}, {src} for {x}")
        if not 0 <= dim < x.rank:
            raise ValueError(f"dim {dim} out of range for rank {x.rank}")
        for d in range(x.rank):
            want = idx.shape[0] if d == dim else x.shape[d]
            if src.shape[d] != want:
                raise ValueError(f"source dim {d} is {src.shape[d]}, expected {want}")
        return [x]


class ScatterBase(StOp):
    kind = SCATTER
    num_operands = 3
    required_attrs = ("dim",)
    optional_attrs = ("wrap",)

    @classmethod
    def infer_types(cls, ts, attrs):
        x, idx, src = ts
        _check_index(idx)
        if not (x.rank == idx.rank == src.rank) or src.dtype != x.dtype:
            raise ValueError(f"input, index and source need one rank and matching dtypes; got "
                             f"{x}, {idx}, {src}")
        if not 0 <= int(attrs["dim"]) < max(x.rank, 1):
            raise ValueError(f"dim {attrs['dim']} out of range for rank {x.rank}")
        return [x]


@register_op
class ScatterAddOp(ScatterBase):
    """``x.scatter_add(dim, idx, src)``."""

    name = "st.scatter_add"


SCATTER_REDUCTIONS = ("sum", "prod", "mean", "amax", "amin")


@register_op
class ScatterReduceOp(ScatterBase):
    """``x.scatter_reduce(dim, idx, src, reduce, include_self)``."""

    name = "st.scatter_reduce"
    required_attrs = ("dim", "reduce", "include_self")

    @classmethod
    def infer_types(cls, ts, attrs):
        if attrs["reduce"] not in SCATTER_REDUCTIONS:
            raise ValueError(f"'reduce' must be one of {SCATTER_REDUCTIONS}, got {attrs['reduce']!r}")
        return super().infer_types(ts, attrs)
