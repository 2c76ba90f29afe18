"""aten ops with no ``st`` counterpart, lowered exactly into existing ``st`` ops.

Found by the OpInfo sweep (``python -m bench.opinfo``): each of these used to run as an
``st.torch_call``. Every rule is exact (the same values as eager, not an approximation) or
declines (returns ``imp.torch_call(n)``):

- strided views (``as_strided`` on an input whose elements are contiguous, ``unfold``,
  ``diagonal``) are one ``st.index_select`` of the flattened input, with an index built from
  ``st.iota`` per dim (offset + sum of i_d * stride_d);
- strided scatters (``slice_scatter``, ``diagonal_scatter``, ``as_strided_scatter`` without
  overlap) are a ``st.cat`` of slices (a unit-step slice) or ``st.where`` over a mask and a
  gather of the source, both index tables computed at import time (shapes are static);
- ``scatter`` / ``index_put`` / ``put`` without accumulation: each target position takes the
  element with the largest row-major position in the index among those written to it (an
  ``st.scatter_reduce`` 'amax' of an iota, then a gather): the last write wins, as in torch's
  serial cpu loop (torch calls repeated indices undefined; its parallel loop may differ);
- ``index_reduce`` is ``st.scatter_reduce`` with the index broadcast along the other dims;
- pooling in general lives in ``importer_pooling`` (built on ``strided_gather``);
- ``embedding_bag`` (output only): each index position's bag from comparisons with the bag
  starts, then an ``st.index_add`` (sum, mean) or ``st.scatter_reduce`` (max) into the bags;
- dropout, ``rand`` / ``rand_like`` and ``bernoulli`` draw from ``st.rand`` (Philox, seeded per
  call), and ``fake_quantize_per_tensor_affine_cachemask`` is its quantise-dequantise in eager's
  own arithmetic;
- ``copy``, the ``*_copy`` variants of views, ``view_of``, ``empty_permuted`` / ``*_strided``
  (undefined values: zeros), ``fmax`` / ``fmin`` (NaN-ignoring max / min as selects), integer
  ``fmod`` (``a - trunc(a / b) * b``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from stitch_ir.core import DenseAttr, Value
from stitch_ir.dialects import st
from stitch_ir.importer import GraphImporter, handles
from stitch_ir.importer_ops import _packet, _slice_bounds, bind
from stitch_ir.types import DType, TensorType, normalize_dim

aten = torch.ops.aten
prims = torch.ops.prims

# Index tables of import-time scatters are dense constants: keep them small.
MAX_TABLE = 1 << 22
_HALF = (DType.f16, DType.bf16)


def _static(*shapes) -> bool:
    return all(isinstance(d, int) for s in shapes for d in s)


def _contiguous_strides(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


def _dense(imp: GraphImporter, arr: np.ndarray, dt: DType) -> Value:
    return imp.b.insert(st.ConstantOp.dense(DenseAttr.from_array(arr, dt))).result


def strided_gather(imp: GraphImporter, x: Value, shape, strides, offset: int) -> Value:
    """``out[i] = flat(x)[offset + sum_d i_d * strides[d]]`` over x's row-major elements."""
    shape, rank = tuple(shape), len(shape)
    out_t = TensorType(shape, x.type.dtype)
    count = math.prod(shape)
    if count == 0:
        return imp.constant(0, out_t)
    flat = imp.reshape(x, (x.type.numel(),))
    if strides == _contiguous_strides(shape):  # a contiguous run: slice and reshape
        if offset == 0 and count == x.type.numel():
            return imp.reshape(x, shape)
        run = imp.create(st.SliceOp, flat, dim=0, start=offset, end=offset + count, step=1)
        return imp.reshape(run, shape)
    idx_t = TensorType(shape, DType.i64)
    idx = imp.constant(offset, idx_t)
    for d, (size, stride) in enumerate(zip(shape, strides)):
        if size == 1 or stride == 0:
            continue
        iota = imp.create(st.IotaOp, start=0, step=int(stride), size=size, dtype=DType.i64)
        term = imp.broadcast(imp.reshape(iota, (1,) * d + (size,) + (1,) * (rank - d - 1)), shape)
        idx = imp.create(st.AddOp, idx, term)
    picked = imp.create(st.IndexSelectOp, flat, imp.reshape(idx, (count,)), dim=0)
    return imp.reshape(picked, shape)


def _positions(shape, strides, offset: int) -> np.ndarray:
    """The flat positions a strided view reads, in the view's row-major order."""
    pos = np.full(tuple(shape), offset, dtype=np.int64)
    for d, (size, stride) in enumerate(zip(shape, strides)):
        view = [1] * len(shape)
        view[d] = size
        pos = pos + (np.arange(size, dtype=np.int64) * stride).reshape(view)
    return pos.reshape(-1)


def strided_scatter(imp: GraphImporter, n, x: Value, src: Value, shape, strides, offset: int):
    """x with the strided view (shape, strides, offset) of its row-major elements replaced by
    src: ``where(mask, gather(src), x)`` with both tables computed here; declines (torch
    call) when the view overlaps itself (torch leaves that write order undefined)."""
    numel = x.type.numel()
    pos = _positions(shape, strides, offset)
    if numel > MAX_TABLE or (pos.size and (pos.min() < 0 or pos.max() >= numel)):
        return imp.torch_call(n)
    if pos.size == 0:
        return x
    if np.unique(pos).size != pos.size:
        return imp.torch_call(n)
    mask = np.zeros(numel, dtype=bool)
    mask[pos] = True
    which = np.zeros(numel, dtype=np.int64)
    which[pos] = np.arange(pos.size, dtype=np.int64)
    flat_src = imp.reshape(imp.cast(src, x.type.dtype), (pos.size,))
    picked = imp.create(st.IndexSelectOp, flat_src, _dense(imp, which, DType.i64), dim=0)
    out = imp.create(st.WhereOp, _dense(imp, mask, DType.i1), picked,
                     imp.reshape(x, (numel,)))
    return imp.reshape(out, x.type.shape)


def _input_contiguous(n) -> tuple[bool, int]:
    """(the op's input is row-major contiguous per its FX metadata, its storage offset)."""
    val = n.args[0].meta.get("val") if hasattr(n.args[0], "meta") else None
    if not isinstance(val, torch.Tensor):
        return False, 0
    try:
        return bool(val.is_contiguous()), int(val.storage_offset())
    except (RuntimeError, TypeError):  # symbolic strides
        return False, 0


# ----------------------------------------------------------------------------------------------
# Strided views


@handles(aten.as_strided, aten.as_strided_copy)
def as_strided(imp, n):
    """``as_strided`` addresses the input's storage; when the input's elements are that storage
    in row-major order (contiguous per the graph's metadata) and the view stays inside them,
    it is a gather of the flattened input."""
    a = bind(n)
    x = imp.value(a["self"])
    out = imp.out_type()
    ok, base = _input_contiguous(n)
    size, stride = list(a["size"]), list(a["stride"])
    start = a.get("storage_offset")
    offset = (base if start is None else start) - base
    if not ok or not _static(out.shape, size, stride) or not isinstance(offset, int):
        return imp.torch_call(n)
    last = offset + sum((s - 1) * t for s, t in zip(size, stride) if s > 0)
    if math.prod(size) and (offset < 0 or last >= x.type.numel() or min(stride, default=0) < 0):
        return imp.torch_call(n)
    return strided_gather(imp, x, out.shape, tuple(stride), offset)


@handles(aten.as_strided_scatter)
def as_strided_scatter(imp, n):
    a = bind(n)
    x, src = imp.value(a["self"]), imp.value(a["src"])
    ok, base = _input_contiguous(n)
    start = a.get("storage_offset")
    offset = (base if start is None else start) - base
    if not ok or not _static(x.type.shape, a["size"], a["stride"]):
        return imp.torch_call(n)
    return strided_scatter(imp, n, x, src, list(a["size"]), list(a["stride"]), offset)


@handles(aten.unfold, aten.unfold_copy)
def unfold(imp, n):
    """``x.unfold(dim, size, step)``: windows along dim as a new last dim (a strided view)."""
    x = imp.value(n.args[0])
    out = imp.out_type()
    if not _static(x.type.shape, out.shape):
        return imp.torch_call(n)
    if x.type.rank == 0:  # a scalar's one window of size 1 (or none)
        return strided_gather(imp, x, out.shape, (1,) * out.rank, 0)
    dim = normalize_dim(n.args[1], x.type.rank)
    step = int(n.args[3])
    xs = _contiguous_strides(x.type.shape)
    strides = tuple(s * step if d == dim else s for d, s in enumerate(xs)) + (xs[dim],)
    return strided_gather(imp, x, out.shape, strides, 0)


def _diagonal_view(x_shape, offset: int, d1: int, d2: int):
    xs = _contiguous_strides(x_shape)
    start = offset * xs[d2] if offset >= 0 else -offset * xs[d1]
    rest = [d for d in range(len(x_shape)) if d not in (d1, d2)]
    return tuple(xs[d] for d in rest) + (xs[d1] + xs[d2],), start


@handles(aten.diagonal, aten.diagonal_copy)
def diagonal(imp, n):
    a = bind(n)
    x = imp.value(a["input"] if "input" in a else a["self"])
    out = imp.out_type()
    if x.type.rank < 2 or not _static(x.type.shape, out.shape):
        return imp.torch_call(n)
    d1, d2 = (normalize_dim(a[k], x.type.rank) for k in ("dim1", "dim2"))
    strides, start = _diagonal_view(x.type.shape, int(a["offset"]), d1, d2)
    return strided_gather(imp, x, out.shape, strides, start)


@handles(aten.diagonal_scatter)
def diagonal_scatter(imp, n):
    a = bind(n)
    x, src = imp.value(a["self"]), imp.value(a["src"])
    if x.type.rank < 2 or not _static(x.type.shape, src.type.shape):
        return imp.torch_call(n)
    d1, d2 = (normalize_dim(a[k], x.type.rank) for k in ("dim1", "dim2"))
    strides, start = _diagonal_view(x.type.shape, int(a["offset"]), d1, d2)
    return strided_scatter(imp, n, x, src, src.type.shape, strides, start)


@handles(aten.slice_scatter)
def slice_scatter(imp, n):
    a = bind(n)
    x, src = imp.value(a["self"]), imp.value(a["src"])
    if not _static(x.type.shape) or x.type.rank == 0:
        return imp.torch_call(n)
    dim = normalize_dim(a.get("dim") or 0, x.type.rank)
    size = x.type.shape[dim]
    start, end, step = _slice_bounds(a.get("start"), a.get("end"), a.get("step"), size)
    src = imp.cast(src, x.type.dtype)
    if end <= start:
        return x
    if step == 1:  # [x[:start], src, x[end:]] along dim
        parts = []
        if start > 0:
            parts.append(imp.create(st.SliceOp, x, dim=dim, start=0, end=start, step=1))
        parts.append(src)
        if end < size:
            parts.append(imp.create(st.SliceOp, x, dim=dim, start=end, end=size, step=1))
        return parts[0] if len(parts) == 1 else imp.create(st.CatOp, *parts, dim=dim)
    hit = np.zeros(size, dtype=bool)
    hit[start:end:step] = True
    which = np.zeros(size, dtype=np.int64)
    which[start:end:step] = np.arange(hit.sum(), dtype=np.int64)
    picked = imp.create(st.IndexSelectOp, src, _dense(imp, which, DType.i64), dim=dim)
    view = (1,) * dim + (size,) + (1,) * (x.type.rank - dim - 1)
    mask = imp.broadcast(imp.reshape(_dense(imp, hit, DType.i1), view), x.type.shape)
    return imp.create(st.WhereOp, mask, picked, x)


# ----------------------------------------------------------------------------------------------
# Scatters that overwrite


def _overwrite(imp, x: Value, idx: Value, src: Value, dim: int) -> Value:
    """scatter without reduction along dim (``src`` has ``idx``'s shape): where indices repeat,
    the last write in the index's row-major order wins, as in torch's serial cpu loop. Each
    target position takes the largest id (row-major position in idx) of the elements written
    to it (``st.scatter_reduce`` 'amax' over an iota, -1 where none is), then that element."""
    shape = x.type.shape
    count = idx.type.numel()
    if count == 0:
        return x
    ids = imp.reshape(imp.create(st.IotaOp, start=0, step=1, size=count, dtype=DType.i64),
                      idx.type.shape)
    none = imp.constant(-1, TensorType(shape, DType.i64))
    last = imp.create(st.ScatterReduceOp, none, idx, ids, dim=dim, reduce="amax",
                      include_self=True)
    hit = imp.create(st.GeOp, last, imp.constant(0, last.type))
    which = imp.create(st.MaximumOp, last, imp.constant(0, last.type))
    picked = imp.create(st.IndexSelectOp, imp.reshape(src, (count,)),
                        imp.reshape(which, (math.prod(shape),)), dim=0)
    return imp.create(st.WhereOp, hit, imp.reshape(picked, shape), x)


@handles(aten.scatter)
def scatter(imp, n):
    a = bind(n)
    x, idx = imp.value(a["self"]), imp.value(a["index"])
    out = imp.out_type()
    if x.type.rank != idx.type.rank or not _static(x.type.shape, idx.type.shape):
        return imp.torch_call(n)
    dim = normalize_dim(a["dim"], max(x.type.rank, 1))
    if x.type.rank == 0 or idx.type.numel() == 0:
        return imp.torch_call(n) if x.type.rank == 0 else x
    ishape = idx.type.shape
    if a.get("src") is not None:
        src = imp.cast(imp.value(a["src"]), out.dtype)
        if src.type.rank != x.type.rank:
            return imp.torch_call(n)
        for d, k in enumerate(ishape):  # only src[:idx.shape] is read
            if src.type.shape[d] != k:
                src = imp.create(st.SliceOp, src, dim=d, start=0, end=k, step=1)
    else:
        src = imp.constant(a["value"], TensorType(ishape, out.dtype))
    reduce = a.get("reduce")
    if reduce is None:
        return _overwrite(imp, x, idx, src, dim)
    red = {"add": "sum", "multiply": "prod"}.get(reduce)
    if red is None or x.type.dtype.is_bool:
        return imp.torch_call(n)
    return imp.create(st.ScatterReduceOp, x, idx, src, dim=dim, reduce=red, include_self=True)


def _linear_index(imp, shape, dims: list[int], idx: list[Value]) -> Value:
    """Index tensors on the adjacent ``dims`` (negatives wrapped per dim) as one index into those
    dims merged, broadcast together."""
    bshape = tuple(torch.broadcast_shapes(*[tuple(i.type.shape) for i in idx]))
    flat = None
    for d, i in zip(dims, idx):
        i = imp.broadcast(imp.cast(i, DType.i64), bshape)
        size = imp.constant(shape[d], i.type)
        i = imp.create(st.WhereOp, imp.create(st.LtOp, i, imp.constant(0, i.type)),
                       imp.create(st.AddOp, i, size), i)
        flat = i if flat is None else imp.create(st.AddOp, imp.create(st.MulOp, flat, size), i)
    return flat


@handles(aten.index_put)
def index_put(imp, n):
    """``x[(None,) * d + (i0, i1, ...)] = v`` with integer indices on adjacent dims: the dims
    merged and the indices linearised, then an index_add (accumulate) or an overwriting scatter
    along the merged dim."""
    args = bind(n)
    x = imp.value(args["self"])
    indices = list(args["indices"])
    live = [d for d, i in enumerate(indices) if i is not None]
    if not live or live != list(range(live[0], live[-1] + 1)) or not _static(x.type.shape) \
            or x.type.rank == 0:
        return imp.torch_call(n)
    idx = [imp.value(indices[d]) for d in live]
    if any(not i.type.dtype.is_int for i in idx) or not _static(*(i.type.shape for i in idx)):
        return imp.torch_call(n)  # boolean masks select a data-dependent number of elements
    d, last = live[0], live[-1]
    shape = x.type.shape
    merged = math.prod(shape[d:last + 1])
    if len(live) == 1 and idx[0].type.rank == 1:
        flat_idx = idx[0]
    else:
        flat_idx = _linear_index(imp, shape, live, idx)
    count = flat_idx.type.numel()
    indexed = shape[:d] + tuple(flat_idx.type.shape) + shape[last + 1:]
    v = imp.value(args["values"])
    if v.type.rank > len(indexed):
        return imp.torch_call(n)
    v = imp.reshape(imp.broadcast(imp.cast(v, x.type.dtype), indexed),
                    shape[:d] + (count,) + shape[last + 1:])
    flat_idx = imp.reshape(flat_idx, (count,))
    xm = imp.reshape(x, shape[:d] + (merged,) + shape[last + 1:])
    if args.get("accumulate"):
        if x.type.dtype.is_bool:
            return imp.torch_call(n)
        r = imp.create(st.IndexAddOp, xm, flat_idx, v, dim=d)
    else:
        view = (1,) * d + (count,) + (1,) * (xm.type.rank - d - 1)
        r = _overwrite(imp, xm, imp.broadcast(imp.reshape(flat_idx, view), v.type.shape), v, d)
    return imp.reshape(r, shape)


@handles(aten.index_reduce)
def index_reduce(imp, n):
    a = bind(n)
    x, idx, src = (imp.value(a[k]) for k in ("self", "index", "source"))
    if idx.type.rank != 1 or not _static(x.type.shape, src.type.shape):
        return imp.torch_call(n)
    if x.type.rank == 0:  # a scalar is one element along dim 0; so is a scalar source
        k = idx.type.shape[0]
        r = imp.create(st.ScatterReduceOp, imp.reshape(x, (1,)), idx,
                       imp.reshape(imp.cast(src, x.type.dtype), (k,)), dim=0,
                       reduce=a["reduce"], include_self=bool(a.get("include_self", True)))
        return imp.reshape(r, ())
    dim = normalize_dim(a["dim"], x.type.rank)
    view = (1,) * dim + (idx.type.shape[0],) + (1,) * (x.type.rank - dim - 1)
    full = imp.broadcast(imp.reshape(idx, view), src.type.shape)
    return imp.create(st.ScatterReduceOp, x, full, imp.cast(src, x.type.dtype), dim=dim,
                      reduce=a["reduce"], include_self=bool(a.get("include_self", True)))


# ----------------------------------------------------------------------------------------------
# Copies, views of copies, creation, element-wise


@handles(aten.copy)
def copy(imp, n):
    """Functional ``self.copy_(src)``: src cast to self's dtype, broadcast to its shape."""
    out = imp.out_type()
    src = imp.value(n.args[1])
    if out.dtype.is_bool and not src.type.dtype.is_bool:
        src = imp.create(st.NeOp, src, imp.constant(0, src.type))
    return imp.broadcast(imp.cast(src, out.dtype), out.shape)


@handles(prims.view_of)
def view_of(imp, n):
    return imp.value(n.args[0])


@handles(aten.permute_copy)
def permute_copy(imp, n):
    x = imp.value(n.args[0])
    perm = tuple(normalize_dim(d, x.type.rank) for d in n.args[1])
    return x if perm == tuple(range(x.type.rank)) else imp.create(st.PermuteOp, x, perm=perm)


@handles(aten.narrow_copy)
def narrow_copy(imp, n):
    x = imp.value(n.args[0])
    dim = normalize_dim(n.args[1], x.type.rank)
    start = n.args[2] + x.type.shape[dim] if n.args[2] < 0 else n.args[2]
    if n.args[3] == x.type.shape[dim]:
        return x
    return imp.create(st.SliceOp, x, dim=dim, start=start, end=start + n.args[3], step=1)


@handles(aten.unbind_copy)
def unbind_copy(imp, n):
    x = imp.value(n.args[0])
    dim = normalize_dim(bind(n).get("dim") or 0, x.type.rank)
    return [imp.reshape(imp.create(st.SliceOp, x, dim=dim, start=k, end=k + 1, step=1),
                        imp.out_type(k).shape) for k in range(x.type.shape[dim])]


@handles(aten.empty_permuted, aten.empty_strided, aten.new_empty_strided)
def empty(imp, n):
    return imp.constant(0, imp.out_type())  # undefined values; zero is one valid choice


@handles(aten.fmax, aten.fmin)
def fmax_fmin(imp, n):
    """Max / min that ignore a NaN operand: ``where(isnan(a), b, where(isnan(b), a, max))``."""
    out = imp.out_type()
    a, b = (imp.operand(v, out.dtype, out.shape) for v in n.args[:2])
    m = imp.create(st.MaximumOp if _packet(n) is aten.fmax else st.MinimumOp, a, b)
    if not out.dtype.is_float:
        return m
    m = imp.create(st.WhereOp, imp.create(st.IsNanOp, b), a, m)
    return imp.create(st.WhereOp, imp.create(st.IsNanOp, a), b, m)


@handles(aten.fmod)
def fmod(imp, n):
    """Integer fmod by a non-zero constant is exact as ``a - trunc(a / b) * b`` (``st.div``
    truncates integers; e.g. ``roll``'s index arithmetic). Float fmod has no exact st form, and
    a tensor divisor could be zero (torch raises), so those stay torch calls."""
    out = imp.out_type()
    b = n.args[1]
    if not out.dtype.is_int or isinstance(b, torch.fx.Node) or not isinstance(b, int) or b == 0:
        return imp.torch_call(n)
    a, b = (imp.operand(v, out.dtype, out.shape) for v in n.args[:2])
    q = imp.create(st.DivOp, a, b)
    return imp.create(st.SubOp, a, imp.create(st.MulOp, q, b))


@handles(aten.put)
def put(imp, n):
    """``x.put(index, source, accumulate)``: index_put on the flattened input."""
    a = bind(n)
    x, idx, src = (imp.value(a[k]) for k in ("self", "index", "source"))
    if not _static(x.type.shape, idx.type.shape) or not idx.type.dtype.is_int or \
            x.type.dtype.is_bool:
        return imp.torch_call(n)
    numel, k = x.type.numel(), idx.type.numel()
    flat, flat_idx = imp.reshape(x, (numel,)), imp.reshape(idx, (k,))
    vals = imp.reshape(imp.cast(src, x.type.dtype), (k,))
    if a.get("accumulate"):
        r = imp.create(st.IndexAddOp, flat, flat_idx, vals, dim=0)
    else:
        r = _overwrite(imp, flat, flat_idx, vals, 0)
    return imp.reshape(r, x.type.shape)


@handles(aten.take)
def take(imp, n):
    """``x.take(index)``: an index_select of the flattened input (negative indices wrap)."""
    x, idx = imp.value(n.args[0]), imp.value(n.args[1])
    out = imp.out_type()
    if not _static(x.type.shape, idx.type.shape) or idx.type.numel() == 0:
        return imp.torch_call(n)
    flat = imp.reshape(x, (x.type.numel(),))
    picked = imp.create(st.IndexSelectOp, flat, imp.reshape(idx, (idx.type.numel(),)), dim=0)
    return imp.reshape(picked, out.shape)


@handles(aten.angle)
def angle(imp, n):
    """The angle of a real number: pi below zero, else 0; NaN stays NaN."""
    out = imp.out_type()
    x = imp.value(n.args[0])
    if not out.dtype.is_float or x.type.dtype != out.dtype:
        return imp.torch_call(n)
    below = imp.create(st.LtOp, x, imp.constant(0, x.type))
    r = imp.create(st.WhereOp, below, imp.constant(math.pi, out), imp.constant(0, out))
    return imp.create(st.WhereOp, imp.create(st.IsNanOp, x), x, r)


@handles(aten._embedding_bag_forward_only, aten._embedding_bag)
def embedding_bag(imp, n):
    """Bags of embedding rows (sum or mean; max without a padding index), when only the output
    is used: each index position's bag is the number of bag starts at or before it, minus one,
    and the rows go to their bag with an index_add (mean: divided by the bag's row count, an
    empty bag giving 0). Positions holding padding_idx, and with include_last_offset those past
    the last offset, add nothing."""
    import operator

    a = bind(n)
    w, idx, offsets = (imp.value(a[k]) for k in ("weight", "indices", "offsets"))
    mode, pad = int(a.get("mode") or 0), int(a.get("padding_idx", -1))
    psw = a.get("per_sample_weights")
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in n.users) or \
            w.type.rank != 2 or idx.type.rank != 1 or offsets.type.rank != 1 or \
            not _static(w.type.shape, idx.type.shape, offsets.type.shape) or \
            not w.type.dtype.is_float or (mode == 2 and pad >= 0) or \
            (psw is not None and mode != 0):
        return imp.torch_call(n)
    out_t = imp.out_type(0)
    bags, width = out_t.shape
    count = idx.type.shape[0]
    starts = offsets
    if a.get("include_last_offset"):
        starts = imp.create(st.SliceOp, offsets, dim=0, start=0, end=bags, step=1)
    if count == 0 or bags == 0 or starts.type.shape[0] != bags:
        return imp.torch_call(n)
    i64 = TensorType((bags, count), DType.i64)
    pos = imp.broadcast(imp.reshape(imp.create(st.IotaOp, start=0, step=1, size=count,
                                               dtype=DType.i64), (1, count)), i64.shape)
    begun = imp.create(st.LeOp, imp.broadcast(imp.reshape(imp.cast(starts, DType.i64),
                                                          (bags, 1)), i64.shape), pos)
    bag = imp.create(st.SumOp, imp.cast(begun, DType.i64), dims=(0,), keepdim=False)
    bag = imp.create(st.SubOp, bag, imp.constant(1, bag.type))
    valid = None
    if pad >= 0:
        valid = imp.create(st.NeOp, idx, imp.constant(pad, idx.type))
    if a.get("include_last_offset"):
        end = imp.create(st.SliceOp, offsets, dim=0, start=bags, end=bags + 1, step=1)
        at = imp.create(st.IotaOp, start=0, step=1, size=count, dtype=DType.i64)
        inside = imp.create(st.LtOp, at, imp.broadcast(imp.cast(end, DType.i64), (count,)))
        valid = inside if valid is None else imp.create(st.LogicalAndOp, valid, inside)
    rows = imp.create(st.EmbeddingOp, w, idx)
    # sum / mean of half rows: eager weighs and sums in float (a mean divides the rounded sum)
    cdt = DType.f32 if mode != 2 and w.type.dtype in _HALF else w.type.dtype
    rows = imp.cast(rows, cdt)
    if psw is not None:
        rows = imp.create(st.MulOp, rows, imp.broadcast(
            imp.reshape(imp.cast(imp.value(psw), cdt), (count, 1)), rows.type.shape))
    zeros = imp.constant(0, TensorType(out_t.shape, cdt))
    if mode == 2:
        full = imp.broadcast(imp.reshape(bag, (count, 1)), rows.type.shape)
        if valid is not None:  # past the last offset: send to a scratch bag, dropped after
            full = imp.create(st.WhereOp, imp.broadcast(imp.reshape(valid, (count, 1)),
                                                        rows.type.shape),
                              full, imp.constant(bags, full.type))
            wide = imp.constant(0, TensorType((bags + 1, width), w.type.dtype))
            r = imp.create(st.ScatterReduceOp, wide, full, rows, dim=0, reduce="amax",
                           include_self=False)
            return [imp.create(st.SliceOp, r, dim=0, start=0, end=bags, step=1), None, None, None]
        return [imp.create(st.ScatterReduceOp, zeros, full, rows, dim=0, reduce="amax",
                           include_self=False), None, None, None]
    if valid is not None:
        rows = imp.create(st.WhereOp, imp.broadcast(imp.reshape(valid, (count, 1)),
                                                    rows.type.shape),
                          rows, imp.constant(0, rows.type))
    total = imp.create(st.IndexAddOp, zeros, bag, rows, dim=0)
    if mode == 0:
        return [imp.cast(total, out_t.dtype), None, None, None]
    ones = imp.constant(1, TensorType((count,), cdt))
    if valid is not None:
        ones = imp.create(st.WhereOp, valid, ones, imp.constant(0, ones.type))
    size = imp.create(st.IndexAddOp, imp.constant(0, TensorType((bags,), cdt)), bag,
                      ones, dim=0)
    size = imp.create(st.MaximumOp, size, imp.constant(1, size.type))
    if cdt is not out_t.dtype:  # eager rounds the bag's float sum, then divides it in float
        total = imp.cast(imp.cast(total, out_t.dtype), cdt)
    mean = imp.create(st.DivOp, total, imp.broadcast(imp.reshape(size, (bags, 1)),
                                                     total.type.shape))
    return [imp.cast(mean, out_t.dtype), None, None, None]


# ----------------------------------------------------------------------------------------------
# Composites whose rounding in half precision is eager's, not the decomposition's. Eager's cpu
# kernels compute some composites in float and round once (addcdiv, addcmul), others round
# every step in the storage dtype (cross, addr); torch's decompositions do the opposite in
# places, which moved float16 results by 2+ ulp (the OpInfo sweep). In float32 each rule is the
# same expression as eager's kernel, in its order of operations.


@handles(aten.addcdiv, aten.addcmul)
def addcdiv_addcmul(imp: GraphImporter, n):
    """``self + (value * tensor1) / tensor2`` (``* tensor2``): in float for half inputs, rounded
    once, as eager's cpu kernel (whose addcmul is one fused multiply-add: stitch's product is
    rounded to float first, at most 1 ulp of float from eager)."""
    a = bind(n)
    out = imp.out_type()
    if out.dtype.is_bool:
        return imp.torch_call(n)
    cdt = DType.f32 if out.dtype in _HALF else out.dtype
    x, t1, t2 = (imp.operand(a[k], cdt, out.shape) for k in ("self", "tensor1", "tensor2"))
    value = a.get("value", 1)
    p = t1 if value == 1 else imp.create(st.MulOp, imp.constant(value, TensorType(out.shape, cdt)),
                                         t1)
    q = imp.create(st.DivOp if _packet(n) is aten.addcdiv else st.MulOp, p, t2)
    return imp.cast(imp.create(st.AddOp, x, q), out.dtype)


@handles(aten.linalg_cross)
def linalg_cross(imp: GraphImporter, n):
    """``a[i+1] * b[i+2] - a[i+2] * b[i+1]`` along ``dim``, each step in the result dtype (eager
    rounds every product and the difference in half precision)."""
    a = bind(n)
    out = imp.out_type()
    dim = normalize_dim(a.get("dim", -1), out.rank)
    x, y = (imp.operand(a[k], out.dtype, out.shape) for k in ("self", "other"))

    def rolled(v: Value, shift: int) -> Value:
        idx = _dense(imp, (np.arange(3) + shift) % 3, DType.i64)
        return imp.create(st.IndexSelectOp, v, idx, dim=dim, wrap=False)

    return imp.create(st.SubOp, imp.create(st.MulOp, rolled(x, 1), rolled(y, 2)),
                      imp.create(st.MulOp, rolled(x, 2), rolled(y, 1)))


@handles(aten.addr)
def addr(imp: GraphImporter, n):
    """``beta * self + (alpha * vec1) (x) vec2``, each step in the result dtype as eager's cpu
    kernel; ``beta == 0`` ignores ``self`` (its NaN and inf do not propagate)."""
    a = bind(n)
    out = imp.out_type()
    if out.dtype.is_bool or out.rank != 2:
        return imp.torch_call(n)
    beta, alpha = a.get("beta", 1), a.get("alpha", 1)
    v1 = imp.cast(imp.value(a["vec1"]), out.dtype)
    if alpha != 1:
        v1 = imp.create(st.MulOp, v1, imp.constant(alpha, v1.type))
    col = imp.broadcast(imp.reshape(v1, (out.shape[0], 1)), out.shape)
    row = imp.broadcast(imp.reshape(imp.cast(imp.value(a["vec2"]), out.dtype), (1, out.shape[1])),
                        out.shape)
    outer = imp.create(st.MulOp, col, row)
    if beta == 0:
        return outer
    x = imp.operand(a["self"], out.dtype, out.shape)
    if beta != 1:
        x = imp.create(st.MulOp, x, imp.constant(beta, out))
    return imp.create(st.AddOp, x, outer)


# ----------------------------------------------------------------------------------------------
# Random numbers: st.rand (Philox, seeded per call from torch's generator; see st.RandOp). The
# streams are not eager's (no compiler reproduces those); the distributions are.


@handles(aten.native_dropout)
def native_dropout(imp, n):
    """(x * keep / (1 - p), keep) with keep = rand < 1 - p, as eager's bernoulli(1 - p) mask."""
    a = bind(n)
    out, mask_t = imp.out_type(0), imp.out_type(1)
    x = imp.value(a["input"])
    p, train = float(a["p"]), a["train"]
    if not train or p == 0:
        return [x, imp.constant(True, mask_t)]
    if p >= 1:
        return [imp.constant(0.0, out), imp.constant(False, mask_t)]
    keep = imp.create(st.LtOp, imp.rand(out.shape), imp.constant(1.0 - p, TensorType(out.shape,
                                                                                      DType.f32)))
    kept = imp.create(st.MulOp, x, imp.cast(keep, out.dtype))
    return [imp.create(st.MulOp, kept, imp.constant(1.0 / (1.0 - p), out)), keep]


@handles(aten.rand_like, aten.rand)
def rand(imp, n):
    out = imp.out_type()
    if not out.dtype.is_float:
        raise imp.fail(f"rand of {out.dtype}")
    return imp.cast(imp.rand(out.shape), out.dtype)


@handles(aten.bernoulli.p, aten.bernoulli.default)
def bernoulli(imp, n):
    """1 where rand < p (p a number, or the input tensor of probabilities), else 0."""
    a = bind(n)
    out = imp.out_type()
    u = imp.rand(out.shape)
    p = imp.operand(a["p"] if "p" in a and a["p"] is not None else a["self"], DType.f32, out.shape)
    return imp.cast(imp.create(st.LtOp, u, p), out.dtype)


@handles(aten.fake_quantize_per_tensor_affine_cachemask)
def fake_quantize_cachemask(imp, n):
    """Quantise and dequantise as eager's cpu kernel computes it (its bits): q = (int64)(zp +
    nearbyint(x * (1.0f / scale))), out = (clamp(q, lo, hi) - zp) * scale, mask = lo <= q <= hi,
    scale in float. So a QAT model's fake-quant fuses with its neighbours."""
    a = bind(n)
    out, mask_t = imp.out_type(0), imp.out_type(1)
    if out.dtype is not DType.f32:
        raise imp.fail(f"fake_quantize of {out.dtype}")
    f32, i64 = TensorType(out.shape, DType.f32), TensorType(out.shape, DType.i64)
    scale = float(np.float32(a["scale"]))
    inv = float(np.float32(1.0) / np.float32(scale))
    zp, lo, hi = int(a["zero_point"]), int(a["quant_min"]), int(a["quant_max"])
    x = imp.value(a["self"])
    t = imp.create(st.RoundOp, imp.create(st.MulOp, x, imp.constant(inv, f32)))
    q = imp.cast(imp.create(st.AddOp, t, imp.constant(float(zp), f32)), DType.i64)
    c = imp.create(st.ClampOp, q, imp.constant(lo, i64), imp.constant(hi, i64))
    deq = imp.create(st.MulOp, imp.cast(imp.create(st.SubOp, c, imp.constant(zp, i64)), DType.f32),
                     imp.constant(scale, f32))
    inside = imp.create(st.LogicalAndOp, imp.create(st.GeOp, q, imp.constant(lo, i64)),
                        imp.create(st.LeOp, q, imp.constant(hi, i64)))
    return [deq, imp.cast(inside, mask_t.dtype)]
