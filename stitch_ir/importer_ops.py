"""Per-op import rules: core aten (after decomposition) -> ``st``.

Each handler gets the importer and an FX node and returns the value (or list of values) that
stands for the node's result. Arguments are bound by the op's schema (``bind``), so positional
and keyword forms look the same. More rules live in ``importer_lowerings`` (ops with no ``st``
counterpart, random numbers, fake quantisation) and ``importer_pooling``; anything no rule
handles becomes ``st.torch_call``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.fx import Node

from stitch_ir.core import Value
from stitch_ir.dialects import st
from stitch_ir.importer import GraphImporter, dtype_from_torch, handles
from stitch_ir.types import DType, Sym, TensorType, normalize_dim

aten = torch.ops.aten
prims = torch.ops.prims


def bind(n: Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, arg in enumerate(n.target._schema.arguments):
        if i < len(n.args):
            out[arg.name] = n.args[i]
        elif arg.name in n.kwargs:
            out[arg.name] = n.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


# ----------------------------------------------------------------------------------------------
# Element-wise

UNARY = {
    aten.neg: st.NegOp, aten.abs: st.AbsOp, aten.exp: st.ExpOp, aten.exp2: st.Exp2Op,
    aten.log: st.LogOp, aten.log2: st.Log2Op, aten.log1p: st.Log1pOp, aten.expm1: st.Expm1Op,
    aten.sqrt: st.SqrtOp, aten.rsqrt: st.RsqrtOp, aten.sin: st.SinOp, aten.cos: st.CosOp,
    aten.tan: st.TanOp, aten.tanh: st.TanhOp, aten.sigmoid: st.SigmoidOp, aten.erf: st.ErfOp,
    aten.relu: st.ReluOp, aten.reciprocal: st.ReciprocalOp, aten.floor: st.FloorOp,
    aten.ceil: st.CeilOp, aten.round: st.RoundOp, aten.trunc: st.TruncOp, aten.sign: st.SignOp,
    aten.bitwise_not: st.BitwiseNotOp,
}
BINARY = {
    aten.mul: st.MulOp, aten.pow: st.PowOp, aten.maximum: st.MaximumOp,
    aten.minimum: st.MinimumOp, aten.remainder: st.RemainderOp,
    aten.floor_divide: st.FloorDivOp, aten.atan2: st.Atan2Op, aten.bitwise_and: st.BitwiseAndOp,
    aten.bitwise_or: st.BitwiseOrOp, aten.bitwise_xor: st.BitwiseXorOp,
}
COMPARE = {
    aten.eq: st.EqOp, aten.ne: st.NeOp, aten.lt: st.LtOp, aten.le: st.LeOp, aten.gt: st.GtOp,
    aten.ge: st.GeOp,
}
LOGICAL = {aten.logical_and: st.LogicalAndOp, aten.logical_or: st.LogicalOrOp}


def _packet(n: Node):
    return n.target.overloadpacket


@handles(*UNARY)
def unary(imp: GraphImporter, n: Node) -> Value:
    out = imp.out_type()
    x = imp.operand(n.args[0], out.dtype, out.shape)
    if out.dtype.is_bool and _packet(n) is aten.bitwise_not:
        return imp.create(st.LogicalNotOp, x)
    return imp.create(UNARY[_packet(n)], x)


@handles(aten.round.decimals)
def round_decimals(imp, n):
    """round(x, decimals=d) as eager's cpu kernel computes it, in opmath (float32 for half):
    d >= 0: nearbyint(x * 10^d) / 10^d; d < 0: nearbyint(x / 10^-d) * 10^-d, with 10^|d| computed
    in double and rounded once to opmath. Both are exact IEEE operations, so the fused kernel
    gives eager's bits (the emitter keeps a division by a constant a true division)."""
    out = imp.out_type()
    d = int(bind(n)["decimals"])
    x = imp.operand(n.args[0], out.dtype, out.shape)
    if d == 0 or not out.dtype.is_float:
        return imp.create(st.RoundOp, x) if out.dtype.is_float else x
    op_dt = DType.f32 if out.dtype in (DType.f16, DType.bf16) else out.dtype
    xo = imp.cast(x, op_dt)
    scale = imp.constant(float(10.0 ** abs(d)), TensorType(out.shape, op_dt))
    if d > 0:
        r = imp.create(st.DivOp, imp.create(st.RoundOp, imp.create(st.MulOp, xo, scale)), scale)
    else:
        r = imp.create(st.MulOp, imp.create(st.RoundOp, imp.create(st.DivOp, xo, scale)), scale)
    return imp.cast(r, out.dtype)


@handles(aten.isnan, aten.isinf)
def predicate(imp, n):
    x = imp.value(n.args[0])
    if not x.type.dtype.is_float:  # integers are never NaN / inf
        return imp.constant(False, imp.out_type())
    return imp.create(st.IsNanOp if _packet(n) is aten.isnan else st.IsInfOp, x)


@handles(aten.logical_not)
def logical_not(imp, n):
    x = imp.value(n.args[0])
    if x.type.dtype.is_bool:
        return imp.create(st.LogicalNotOp, x)
    zero = imp.constant(0, x.type)
    return imp.create(st.EqOp, x, zero)


def _to_bool(imp: GraphImporter, a: Any, shape: tuple) -> Value:
    if isinstance(a, Node) and imp.value(a).type.dtype.is_bool:
        return imp.broadcast(imp.value(a), shape)
    if not isinstance(a, Node):
        return imp.constant(bool(a), TensorType(shape, DType.i1))
    x = imp.broadcast(imp.value(a), shape)
    return imp.create(st.NeOp, x, imp.constant(0, x.type))


@handles(*LOGICAL, aten.logical_xor)
def logical(imp, n):
    out = imp.out_type()
    a, b = (_to_bool(imp, x, out.shape) for x in n.args[:2])
    if _packet(n) is aten.logical_xor:
        r = imp.create(st.NeOp, a, b)
    else:
        r = imp.create(LOGICAL[_packet(n)], a, b)
    return imp.cast(r, out.dtype)


# On bools, torch's mul / maximum / minimum / bitwise and-or are logical ops.
BOOL_BINARY = {aten.mul: st.LogicalAndOp, aten.bitwise_and: st.LogicalAndOp,
               aten.minimum: st.LogicalAndOp, aten.maximum: st.LogicalOrOp,
               aten.bitwise_or: st.LogicalOrOp}


_HALF = (DType.f16, DType.bf16)


def _opmath_operand(imp: GraphImporter, a: Any, out: TensorType) -> Value:
    """An operand of a half-precision mul / div as eager's cpu kernel reads it, in float: a
    tensor in the result dtype; a scalar (a Python number, or a 0-d tensor: torch's "cpu
    scalar") at float precision, not rounded to half first."""
    if isinstance(a, Node):
        v = imp.value(a)
        if v.type.rank > 0:
            v = imp.cast(v, out.dtype)
        return imp.broadcast(imp.cast(v, DType.f32), out.shape)
    return imp.operand(a, DType.f32, out.shape)


def _opmath(imp: GraphImporter, cls, args, out: TensorType) -> Value:
    """``cls`` of two operands computed in float and rounded once to the half ``out`` dtype."""
    a, b = (_opmath_operand(imp, x, out) for x in args)
    return imp.cast(imp.create(cls, a, b), out.dtype)


@handles(*BINARY)
def binary(imp, n):
    out = imp.out_type()
    cls = BINARY[_packet(n)]
    if out.dtype.is_bool and _packet(n) in BOOL_BINARY:
        cls = BOOL_BINARY[_packet(n)]
    if _packet(n) is aten.mul and out.dtype in _HALF:
        return _opmath(imp, st.MulOp, n.args[:2], out)
    a, b = (imp.operand(x, out.dtype, out.shape) for x in n.args[:2])
    return imp.create(cls, a, b)


@handles(aten.add, aten.sub, aten.rsub)
def add_sub(imp, n):
    out = imp.out_type()
    args = bind(n)
    a, b = args["self"], args["other"]
    alpha = args.get("alpha", 1)
    va, vb = imp.operand(a, out.dtype, out.shape), imp.operand(b, out.dtype, out.shape)
    if _packet(n) is aten.rsub:
        va, vb = vb, va
    if out.dtype.is_bool and _packet(n) is aten.add:  # bool + bool is logical or
        return imp.create(st.LogicalOrOp, va, vb)
    if alpha not in (1, None):
        vb = imp.create(st.MulOp, vb, imp.constant(alpha, out))
    return imp.create(st.SubOp if _packet(n) in (aten.sub, aten.rsub) else st.AddOp, va, vb)


@handles(aten.div)
def div(imp, n):
    out = imp.out_type()
    args = bind(n)
    mode = args.get("rounding_mode")
    a, b = args["self"], args["other"]
    if mode is None and out.dtype in _HALF:
        return _opmath(imp, st.DivOp, (a, b), out)
    if mode is None or out.dtype.is_float:
        q = imp.create(st.DivOp, imp.operand(a, out.dtype, out.shape),
                       imp.operand(b, out.dtype, out.shape))
        if mode == "trunc":
            q = imp.create(st.TruncOp, q)
        elif mode == "floor":
            q = imp.create(st.FloorOp, q)
        return q
    va, vb = imp.operand(a, out.dtype, out.shape), imp.operand(b, out.dtype, out.shape)
    return imp.create(st.DivOp if mode == "trunc" else st.FloorDivOp, va, vb)


@handles(*COMPARE)
def compare(imp, n):
    out = imp.out_type()
    dt = imp.result_dtype(*n.args[:2])
    a, b = (imp.operand(x, dt, out.shape) for x in n.args[:2])
    return imp.create(COMPARE[_packet(n)], a, b)


@handles(aten.where)
def where(imp, n):
    out = imp.out_type()
    if n.target is not aten.where.self:
        return imp.torch_call(n)
    c = _to_bool(imp, n.args[0], out.shape)
    a, b = (imp.operand(x, out.dtype, out.shape) for x in n.args[1:3])
    return imp.create(st.WhereOp, c, a, b)


def _limit(dt: DType, upper: bool) -> float | int:
    if dt.is_float:
        return math.inf if upper else -math.inf
    info = torch.iinfo(_torch_dtype(dt))
    return info.max if upper else info.min


def _torch_dtype(dt: DType) -> torch.dtype:
    from stitch_ir.importer import dtype_to_torch

    return dtype_to_torch(dt)


@handles(aten.clamp)
def clamp(imp, n):
    out = imp.out_type()
    args = bind(n)
    x = imp.operand(args["self"], out.dtype, out.shape)
    lo, hi = args.get("min"), args.get("max")
    if isinstance(lo, Node) or isinstance(hi, Node):  # clamp.Tensor: max then min
        if lo is not None:
            x = imp.create(st.MaximumOp, x, imp.operand(lo, out.dtype, out.shape))
        if hi is not None:
            x = imp.create(st.MinimumOp, x, imp.operand(hi, out.dtype, out.shape))
        return x
    lo_v = imp.constant(_limit(out.dtype, False) if lo is None else lo, out)
    hi_v = imp.constant(_limit(out.dtype, True) if hi is None else hi, out)
    return imp.create(st.ClampOp, x, lo_v, hi_v)


@handles(aten._to_copy, prims.convert_element_type, aten.to)
def to_copy(imp, n):
    out = imp.out_type()
    x = imp.value(n.args[0])
    if x.type.shape != out.shape:
        return imp.torch_call(n)
    if out.dtype.is_bool and not x.type.dtype.is_bool:
        return imp.create(st.NeOp, x, imp.constant(0, x.type))
    return imp.cast(x, out.dtype)


@handles(aten.clone, aten.alias, aten.lift_fresh_copy, aten.detach, aten.contiguous)
def identity(imp, n):
    return imp.value(n.args[0])


# ----------------------------------------------------------------------------------------------
# Reductions


def _dims(arg: Any, rank: int) -> tuple[int, ...]:
    if arg is None or (isinstance(arg, list | tuple) and len(arg) == 0):
        return tuple(range(rank))
    if isinstance(arg, int):
        arg = [arg]
    return tuple(sorted({normalize_dim(d, rank) for d in arg}))


def _reduce(imp, cls, x: Value, dims, keepdim: bool) -> Value:
    if x.type.rank == 0:
        return x if cls is not st.VarOp else imp.create(st.VarOp, x, dims=(), keepdim=keepdim)
    return imp.create(cls, x, dims=dims, keepdim=bool(keepdim))


@handles(aten.sum, aten.mean, aten.amax, aten.amin, aten.prod, aten.any)
def reduce(imp, n):
    out = imp.out_type()
    args = bind(n)
    x = imp.value(args["self"])
    cls = {aten.sum: st.SumOp, aten.mean: st.MeanOp, aten.amax: st.MaxOp, aten.amin: st.MinOp,
           aten.prod: st.ProdOp, aten.any: st.AnyOp}[_packet(n)]
    if args.get("dtype") is not None or cls is st.MeanOp:
        x = imp.cast(x, out.dtype) if out.dtype.is_float else x
    dims = _dims(args.get("dim"), x.type.rank)
    r = _reduce(imp, cls, x, dims, args.get("keepdim") or False)
    return imp.cast(r, out.dtype)


@handles(aten.max, aten.min)
def max_min(imp, n):
    args = bind(n)
    x = imp.value(args["self"])
    is_max = _packet(n) is aten.max
    if n.target in (aten.max.default, aten.min.default):
        return _reduce(imp, st.MaxOp if is_max else st.MinOp, x, _dims(None, x.type.rank), False)
    if n.target not in (aten.max.dim, aten.min.dim):
        # max.other / min.other are element-wise maximum / minimum
        out = imp.out_type()
        a, b = (imp.operand(v, out.dtype, out.shape) for v in n.args[:2])
        return imp.create(st.MaximumOp if is_max else st.MinimumOp, a, b)
    dims = _dims(args["dim"], x.type.rank)
    keep = bool(args.get("keepdim"))
    vals = _reduce(imp, st.MaxOp if is_max else st.MinOp, x, dims, keep)
    if x.type.rank == 0:  # max(dim) of a scalar: itself, at index 0
        return [vals, imp.constant(0, imp.out_type(1))]
    idx = imp.create(st.ArgMaxOp if is_max else st.ArgMinOp, x, dims=dims, keepdim=keep)
    return [vals, idx]


@handles(aten.argmax, aten.argmin)
def arg_reduce(imp, n):
    args = bind(n)
    x = imp.value(args["self"])
    cls = st.ArgMaxOp if _packet(n) is aten.argmax else st.ArgMinOp
    if x.type.rank == 0:  # a scalar's only index
        return imp.constant(0, imp.out_type())
    if args.get("dim") is None:
        flat = imp.reshape(x, (x.type.numel(),))
        r = imp.create(cls, flat, dims=(0,), keepdim=False)
        return imp.reshape(r, (1,) * x.type.rank) if args.get("keepdim") else imp.reshape(r, ())
    return imp.create(cls, x, dims=_dims(args["dim"], x.type.rank), keepdim=bool(args["keepdim"]))


def _correction(args) -> float:
    c = args.get("correction")
    if c is None:
        unbiased = args.get("unbiased")
        return 0 if unbiased is False else 1
    return c


@handles(aten.var, aten.var_mean)
def var(imp, n):
    args = bind(n)
    x = imp.value(args["self"])
    dims = _dims(args.get("dim"), x.type.rank)
    keep = bool(args.get("keepdim"))
    v = imp.create(st.VarOp, x, dims=dims, keepdim=keep, correction=_correction(args))
    if _packet(n) is aten.var_mean:
        return [v, imp.create(st.MeanOp, x, dims=dims, keepdim=keep)]
    return v


# ----------------------------------------------------------------------------------------------
# Broadcast and layout


@handles(aten.expand)
def expand(imp, n):
    return imp.broadcast(imp.value(n.args[0]), imp.out_type().shape)


@handles(aten.view, aten._unsafe_view, aten.reshape, aten.unsqueeze, aten.squeeze,
         aten.view_copy, aten.flatten, prims.squeeze, prims.broadcast_in_dim)
def view(imp, n):
    out = imp.out_type()
    x = imp.value(n.args[0])
    if n.target is prims.broadcast_in_dim.default:
        dims = list(n.args[2])
        mid = tuple(out.shape[i] if i in dims else 1 for i in range(out.rank))
        kept = tuple(d for i, d in enumerate(x.type.shape))
        if math.prod(kept) != math.prod(d for i, d in enumerate(mid) if i in dims):
            return imp.torch_call(n)
        return imp.broadcast(imp.reshape(x, mid), out.shape)
    return imp.reshape(x, out.shape)


@handles(aten.permute, aten.t, aten.transpose, aten.numpy_T)
def permute(imp, n):
    x = imp.value(n.args[0])
    r = x.type.rank
    if _packet(n) is aten.permute:
        perm = tuple(normalize_dim(d, r) for d in n.args[1])
    elif _packet(n) is aten.transpose:
        a, b = normalize_dim(n.args[1], r), normalize_dim(n.args[2], r)
        p = list(range(r))
        p[a], p[b] = p[b], p[a]
        perm = tuple(p)
    else:
        perm = tuple(reversed(range(r)))
    if perm == tuple(range(r)):
        return x
    return imp.create(st.PermuteOp, x, perm=perm)


def _slice_bounds(start, end, step, size: int) -> tuple[int, int, int]:
    start = 0 if start is None else start
    end = size if end is None else end
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    start = min(max(start, 0), size)
    end = min(max(end, start), size)
    return start, end, step or 1


@handles(aten.slice)
def slice_(imp, n):
    args = bind(n)
    x = imp.value(args["self"])
    dim = normalize_dim(args.get("dim") or 0, x.type.rank)
    size = x.type.shape[dim]
    if isinstance(size, Sym):  # a symbolic dim: only the whole of it (x[:, ...])
        start, end, step = args.get("start"), args.get("end"), args.get("step")
        if (start or 0) == 0 and (end is None or end >= 2 ** 62) and (step or 1) == 1:
            return x
        raise imp.fail(f"a slice [{start}:{end}:{step}] of symbolic size {size}")
    start, end, step = _slice_bounds(args.get("start"), args.get("end"), args.get("step"), size)
    if (start, end, step) == (0, size, 1):
        return x
    return imp.create(st.SliceOp, x, dim=dim, start=start, end=end, step=step)


@handles(aten.select)
def select(imp, n):
    x = imp.value(n.args[0])
    dim = normalize_dim(n.args[1], x.type.rank)
    size = x.type.shape[dim]
    i = n.args[2] + size if n.args[2] < 0 else n.args[2]
    s = imp.create(st.SliceOp, x, dim=dim, start=i, end=i + 1, step=1)
    return imp.reshape(s, imp.out_type().shape)


@handles(aten.split, aten.split_with_sizes, aten.unbind, aten.chunk)
def split(imp, n):
    x = imp.value(n.args[0])
    outs = n.meta["val"]
    args = bind(n)
    dim = normalize_dim(args.get("dim") or 0, x.type.rank)
    results, start = [], 0
    for k, o in enumerate(outs):
        size = int(o.shape[dim]) if _packet(n) is not aten.unbind else 1
        s = imp.create(st.SliceOp, x, dim=dim, start=start, end=start + size, step=1)
        results.append(imp.reshape(s, imp.out_type(k).shape))
        start += size
    return results


@handles(aten.cat)
def cat(imp, n):
    out = imp.out_type()
    args = bind(n)
    vals = [imp.cast(imp.value(a), out.dtype) for a in args["tensors"]]
    # torch.cat skips legacy empty 1-D tensors
    vals = [v for v in vals if not (v.type.rank == 1 and v.type.shape[0] == 0 and out.rank != 1)]
    dim = normalize_dim(args.get("dim") or 0, out.rank)
    if len(vals) == 1:
        return vals[0]
    return imp.create(st.CatOp, *vals, dim=dim)


@handles(aten.constant_pad_nd)
def pad(imp, n):
    args = bind(n)
    x = imp.value(args["self"])
    p = list(args["pad"])
    r = x.type.rank
    low, high = [0] * r, [0] * r
    for k in range(len(p) // 2):
        low[r - 1 - k], high[r - 1 - k] = p[2 * k], p[2 * k + 1]
    value = args.get("value") or 0
    value = float(value) if x.type.dtype.is_float else int(value)
    if not any(low) and not any(high):
        return x
    return imp.create(st.PadOp, x, low=tuple(low), high=tuple(high), value=value)


# ----------------------------------------------------------------------------------------------
# Creation


@handles(aten.full, aten.full_like, aten.zeros, aten.ones, aten.zeros_like, aten.ones_like,
         aten.scalar_tensor, aten.new_full, aten.new_zeros, aten.new_ones, aten.empty_like,
         aten.new_empty, aten.empty)
def full(imp, n):
    out = imp.out_type()
    p = _packet(n)
    if p in (aten.zeros, aten.zeros_like, aten.new_zeros, aten.empty_like, aten.new_empty,
             aten.empty):
        value = 0  # empty memory has no defined value; zero is one valid choice
    elif p in (aten.ones, aten.ones_like, aten.new_ones):
        value = 1
    elif p is aten.scalar_tensor:
        value = n.args[0]
    else:
        value = bind(n)["fill_value"]
    if isinstance(value, Node):
        return imp.torch_call(n)
    return imp.constant(value, out)


@handles(aten.arange)
def arange(imp, n):
    out = imp.out_type()
    args = bind(n)
    if n.target is aten.arange.default:
        start, step = 0, 1
    else:
        start, step = args.get("start", 0), args.get("step", 1) or 1
    if any(isinstance(v, Node) for v in (start, step)):
        return imp.torch_call(n)
    if out.dtype.is_float:
        start, step = float(start), float(step)
    return imp.create(st.IotaOp, start=start, step=step, size=out.shape[0], dtype=out.dtype)


# ----------------------------------------------------------------------------------------------
# Gather / scatter


@handles(aten.index_select)
def index_select(imp, n):
    x, idx = imp.value(n.args[0]), imp.value(n.args[2])
    dim = normalize_dim(n.args[1], x.type.rank)
    if x.type.rank == 0:  # a scalar is one element along dim 0
        flat = imp.create(st.IndexSelectOp, imp.reshape(x, (1,)),
                          imp.reshape(idx, (idx.type.numel(),)), dim=0, wrap=False)
        return imp.reshape(flat, imp.out_type().shape)
    if idx.type.rank == 0:
        idx = imp.reshape(idx, (1,))
        return imp.reshape(imp.create(st.IndexSelectOp, x, idx, dim=dim, wrap=False),
                           imp.out_type().shape)
    # index_select, gather, embedding, index_add and scatter raise on a negative index (only
    # Python indexing, x[idx], counts from the end): wrap=False
    return imp.create(st.IndexSelectOp, x, idx, dim=dim, wrap=False)


@handles(aten.embedding)
def embedding(imp, n):
    w, idx = imp.value(n.args[0]), imp.value(n.args[1])
    if w.type.rank != 2:
        return imp.torch_call(n)
    return imp.create(st.EmbeddingOp, w, idx, wrap=False)


@handles(aten.index)
def index(imp, n):
    """``x[idx]`` with one index tensor: an index_select (1-D index) or embedding (dim 0)."""
    x = imp.value(n.args[0])
    indices = list(n.args[1])
    live = [(d, a) for d, a in enumerate(indices) if a is not None]
    if len(live) > 1:
        return _index_adjacent(imp, n, x, live)
    if len(live) != 1:
        return imp.torch_call(n)
    d, a = live[0]
    idx = imp.value(a)
    if idx.type.dtype.is_bool:
        return imp.torch_call(n)  # boolean masks have data-dependent shapes
    if idx.type.rank == 1:
        return imp.create(st.IndexSelectOp, x, idx, dim=d)
    if d == 0:
        rows = imp.reshape(x, (x.type.shape[0], math.prod(x.type.shape[1:])))
        r = imp.create(st.EmbeddingOp, rows, idx)
        return imp.reshape(r, imp.out_type().shape)
    return imp.torch_call(n)


@handles(aten.gather)
def gather(imp, n):
    x, idx = imp.value(n.args[0]), imp.value(n.args[2])
    if x.type.rank != idx.type.rank and max(x.type.rank, idx.type.rank) <= 1:
        # torch lets a scalar stand for one element along dim 0, on either side
        r = imp.create(st.GatherOp, imp.reshape(x, (x.type.numel(),)),
                       imp.reshape(idx, (idx.type.numel(),)), dim=0, wrap=False)
        return imp.reshape(r, imp.out_type().shape)
    return imp.create(st.GatherOp, x, idx, dim=normalize_dim(n.args[1], max(x.type.rank, 1)),
                      wrap=False)


@handles(aten.index_add)
def index_add(imp, n):
    args = bind(n)
    x = imp.value(args["self"])
    out = imp.out_type()
    src = imp.cast(imp.value(args["source"]), out.dtype)
    idx = imp.value(args["index"])
    alpha = args.get("alpha", 1)
    attrs = {"alpha": alpha} if alpha not in (1, None) else {}
    attrs["wrap"] = False
    if x.type.rank == 0:  # a scalar is one element along dim 0; so is a scalar source
        r = imp.create(st.IndexAddOp, imp.reshape(x, (1,)), imp.reshape(idx, (idx.type.numel(),)),
                       imp.reshape(src, (idx.type.numel(),)), dim=0, **attrs)
        return imp.reshape(r, out.shape)
    return imp.create(st.IndexAddOp, x, idx, src, dim=normalize_dim(args["dim"], x.type.rank),
                      **attrs)


@handles(aten.scatter_add)
def scatter_add(imp, n):
    x, idx, src = imp.value(n.args[0]), imp.value(n.args[2]), imp.value(n.args[3])
    return imp.create(st.ScatterAddOp, x, idx, src, dim=normalize_dim(n.args[1], x.type.rank),
                      wrap=False)


@handles(aten.scatter_reduce)
def scatter_reduce(imp, n):
    args = bind(n)
    x, idx, src = (imp.value(args[k]) for k in ("self", "index", "src"))
    return imp.create(st.ScatterReduceOp, x, idx, src, dim=normalize_dim(args["dim"], x.type.rank),
                      reduce=args["reduce"], include_self=bool(args.get("include_self", True)),
                      wrap=False)


# ----------------------------------------------------------------------------------------------
# Library ops


@handles(aten.mm)
def mm(imp, n):
    return imp.create(st.MatmulOp, imp.value(n.args[0]), imp.value(n.args[1]))


@handles(aten.bmm)
def bmm(imp, n):
    return imp.create(st.BatchMatmulOp, imp.value(n.args[0]), imp.value(n.args[1]))


@handles(aten.addmm)
def addmm(imp, n):
    args = bind(n)
    attrs = {k: args[k] for k in ("alpha", "beta") if args.get(k) not in (1, None)}
    return imp.create(st.AddmmOp, *(imp.value(args[k]) for k in ("self", "mat1", "mat2")),
                      **attrs)


@handles(aten.linear)
def linear(imp, n):
    vals = [imp.value(a) for a in n.args[:3] if a is not None]
    return imp.create(st.LinearOp, *vals)


@handles(aten.convolution)
def convolution(imp, n):
    a = bind(n)
    vals = [imp.value(a["input"]), imp.value(a["weight"])]
    if a.get("bias") is not None:
        vals.append(imp.value(a["bias"]))
    nd = vals[0].type.rank - 2

    def expand_(v):
        v = list(v)
        return tuple(v * nd if len(v) == 1 else v)

    return imp.create(st.ConvolutionOp, *vals, stride=expand_(a["stride"]),
                      padding=expand_(a["padding"]), dilation=expand_(a["dilation"]),
                      transposed=bool(a["transposed"]),
                      output_padding=expand_(a["output_padding"]), groups=int(a["groups"]))


__all__ = ["bind", "dtype_from_torch"]


# ----------------------------------------------------------------------------------------------
# prims (some of torch's decompositions emit them directly)

PRIMS_UNARY = {
    prims.neg: st.NegOp, prims.abs: st.AbsOp, prims.exp: st.ExpOp, prims.exp2: st.Exp2Op,
    prims.log: st.LogOp, prims.log2: st.Log2Op, prims.log1p: st.Log1pOp,
    prims.expm1: st.Expm1Op, prims.sqrt: st.SqrtOp, prims.rsqrt: st.RsqrtOp,
    prims.sin: st.SinOp, prims.cos: st.CosOp, prims.tan: st.TanOp, prims.tanh: st.TanhOp,
    prims.erf: st.ErfOp, prims.reciprocal: st.ReciprocalOp, prims.floor: st.FloorOp,
    prims.ceil: st.CeilOp, prims.round: st.RoundOp, prims.trunc: st.TruncOp,
    prims.sign: st.SignOp,
}
PRIMS_BINARY = {
    prims.add: st.AddOp, prims.sub: st.SubOp, prims.mul: st.MulOp, prims.div: st.DivOp,
    prims.pow: st.PowOp, prims.maximum: st.MaximumOp, prims.minimum: st.MinimumOp,
    prims.remainder: st.RemainderOp, prims.atan2: st.Atan2Op,
    prims.bitwise_and: st.BitwiseAndOp, prims.bitwise_or: st.BitwiseOrOp,
    prims.bitwise_xor: st.BitwiseXorOp,
}
PRIMS_COMPARE = {
    prims.eq: st.EqOp, prims.ne: st.NeOp, prims.lt: st.LtOp, prims.le: st.LeOp,
    prims.gt: st.GtOp, prims.ge: st.GeOp,
}
PRIMS_REDUCE = {prims.sum: st.SumOp, prims.amax: st.MaxOp, prims.amin: st.MinOp,
                prims.prod: st.ProdOp}


@handles(*PRIMS_UNARY)
def prims_unary(imp, n):
    out = imp.out_type()
    return imp.create(PRIMS_UNARY[_packet(n)], imp.operand(n.args[0], out.dtype, out.shape))


@handles(*PRIMS_BINARY)
def prims_binary(imp, n):
    out = imp.out_type()
    a, b = (imp.operand(x, out.dtype, out.shape) for x in n.args[:2])
    cls = PRIMS_BINARY[_packet(n)]
    if out.dtype.is_bool and cls in (st.BitwiseAndOp, st.BitwiseOrOp):
        cls = st.LogicalAndOp if cls is st.BitwiseAndOp else st.LogicalOrOp
    return imp.create(cls, a, b)


@handles(*PRIMS_COMPARE)
def prims_compare(imp, n):
    out = imp.out_type()
    dt = imp.result_dtype(*n.args[:2])
    a, b = (imp.operand(x, dt, out.shape) for x in n.args[:2])
    return imp.create(PRIMS_COMPARE[_packet(n)], a, b)


@handles(prims.where)
def prims_where(imp, n):
    out = imp.out_type()
    c = _to_bool(imp, n.args[0], out.shape)
    a, b = (imp.operand(x, out.dtype, out.shape) for x in n.args[1:3])
    return imp.create(st.WhereOp, c, a, b)


@handles(*PRIMS_REDUCE, prims.var)
def prims_reduce(imp, n):
    out = imp.out_type()
    x = imp.value(n.args[0])
    dims = _dims(n.args[1], x.type.rank)
    if _packet(n) is prims.var:
        r = imp.create(st.VarOp, x, dims=dims, keepdim=False, correction=n.args[2])
    else:
        r = _reduce(imp, PRIMS_REDUCE[_packet(n)], x, dims, False)
    return imp.cast(r, out.dtype)


@handles(prims.rev, aten.flip)
def reverse(imp, n):
    """flip as index_select with a descending iota per reversed dim."""
    x = imp.value(n.args[0])
    for d in sorted({normalize_dim(d, x.type.rank) for d in n.args[1]}):
        size = x.type.shape[d]
        if size <= 1:
            continue
        idx = imp.create(st.IotaOp, start=size - 1, step=-1, size=size, dtype=DType.i64)
        x = imp.create(st.IndexSelectOp, x, idx, dim=d)
    return x


def _index_adjacent(imp, n, x: Value, live) -> Value:
    """``x[..., i0, i1, ...]`` with index tensors on adjacent dims (e.g. nearest upsampling):
    the indices broadcast together and address the merged dims, so this is one index_select
    of a linearised index over those dims merged into one."""
    dims_ = [d for d, _ in live]
    if dims_ != list(range(dims_[0], dims_[0] + len(dims_))):
        return imp.torch_call(n)
    idx = [imp.value(a) for _, a in live]
    if any(not i.type.dtype.is_int for i in idx):
        return imp.torch_call(n)
    first, last = dims_[0], dims_[-1]
    shape = list(x.type.shape)
    bshape = tuple(torch.broadcast_shapes(*[tuple(i.type.shape) for i in idx]))
    flat = None
    for d, i in zip(dims_, idx):
        i = imp.broadcast(imp.cast(i, DType.i64), bshape)
        size = shape[d]
        i = imp.create(st.WhereOp, imp.create(st.LtOp, i, imp.constant(0, i.type)),
                       imp.create(st.AddOp, i, imp.constant(size, i.type)), i)
        flat = i if flat is None else imp.create(
            st.AddOp, imp.create(st.MulOp, flat, imp.constant(size, i.type)), i)
    merged = math.prod(shape[first:last + 1])
    xm = imp.reshape(x, (*shape[:first], merged, *shape[last + 1:]))
    count = math.prod(bshape)
    picked = imp.create(st.IndexSelectOp, xm, imp.reshape(flat, (count,)), dim=first)
    return imp.reshape(picked, imp.out_type().shape)
