"""Pooling with overlapping windows, padding, dilation and ceil mode, in 2-d and 3-d, lowered
exactly into existing ``st`` ops; the non-overlapping 2-d case (windows that tile the input) is
a reshape and one reduction, at the end of this module.

The windows of an input padded with the reduction's neutral value (-inf for max, 0 for sums)
are one strided view (``importer_lowerings.strided_gather``): ``[*lead, *out, *kernel]``.

- max pooling: windows of at most ``SLICE_WINDOW`` elements are torch's cpu scan as
  element-wise ops over one strided slice per window position (``_max_chain_with_indices``: a
  position replaces the running maximum when greater or NaN; its flat input position is an
  iota plus a constant). Larger windows: ``st.max`` over the window dims, the indices each
  window's ``st.argmax`` (the first maximum), except that a window holding a NaN gives its last
  NaN (read the window backwards) and a window of only -inf its first in-bounds position (both
  as torch's cpu kernel), mapped to flat input positions by a table computed here (shapes are
  static). Its backward is an ``st.scatter_add`` of the output gradient at those indices.
- average pooling: ``st.sum`` over the window dims divided by torch's per-window divisor
  (a table: the window clipped to the padded input with count_include_pad, else to the input;
  divisor_override wins; a window with no input element is 0).
- adaptive pooling (windows of different sizes): one gather of the flattened input, extended by
  one neutral element (-inf / 0) that the slots past a shorter window's end read; then the same
  max / argmax or sum / count.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch

from stitch_ir.core import Value
from stitch_ir.dialects import st
from stitch_ir.importer import handles
from stitch_ir.importer_lowerings import (
    MAX_TABLE,
    _contiguous_strides,
    _dense,
    _static,
    strided_gather,
)
from stitch_ir.importer_ops import bind
from stitch_ir.types import DType, TensorType

aten = torch.ops.aten


def _params(v, default, nd: int) -> list[int]:
    v = list(v) if v else list(default)
    return v * nd if len(v) == 1 else v


def _padded(imp, x, nd: int, out_sp, k, s, p, d, pad_value: float):
    """(x padded by p before each spatial dim and past its end as far as the last window
    reaches, the padded spatial sizes)."""
    lead = x.type.shape[:-nd]
    sp = x.type.shape[-nd:]
    padded_sp = [max(n + pi, (o - 1) * si + (ki - 1) * di + 1)
                 for n, pi, o, si, ki, di in zip(sp, p, out_sp, s, k, d)]
    padded = imp.create(st.PadOp, x, low=(0,) * len(lead) + tuple(p),
                        high=(0,) * len(lead) + tuple(P - n - pi for P, n, pi in
                                                      zip(padded_sp, sp, p)),
                        value=pad_value)
    return padded, padded_sp


def _windows(imp, x, nd: int, out_sp, k, s, p, d, pad_value: float, reverse: bool = False):
    """The windows ``[*lead, *out_sp, *k]`` of x padded by p (and past its end as far as the
    last window reaches), read backwards within each window when ``reverse``."""
    *lead, = x.type.shape[:-nd]
    padded, padded_sp = _padded(imp, x, nd, out_sp, k, s, p, d, pad_value)
    cs = _contiguous_strides(tuple(padded_sp))
    lead_strides = tuple(t * math.prod(padded_sp) for t in _contiguous_strides(tuple(lead)))
    step = [si * c for si, c in zip(s, cs)]
    within = [di * c for di, c in zip(d, cs)]
    offset = 0
    if reverse:
        offset = sum((ki - 1) * w for ki, w in zip(k, within))
        within = [-w for w in within]
    return strided_gather(imp, padded, (*lead, *out_sp, *k),
                          (*lead_strides, *step, *within), offset)


# A window of at most this many elements is reduced as a chain of strided slices (an
# element-wise kernel: one load per window element, index maps only) instead of a gathered
# window view (an index computed and bounds-checked per element: ResNet's 3x3 max pool took
# 1.5 ms for 8x16x16x16).
SLICE_WINDOW = 64


def _window_slices(imp, x, nd: int, out_sp, k, s, p, d, pad_value: float):
    """(window offsets, the strided slice of the padded input at them) for every window
    position in row-major window order, each [*lead, *out_sp]."""
    import itertools

    lead = x.type.shape[:-nd]
    padded, _ = _padded(imp, x, nd, out_sp, k, s, p, d, pad_value)
    for offsets in itertools.product(*[range(ki) for ki in k]):
        v = padded
        for i, off in enumerate(offsets):
            start = off * d[i]
            v = imp.create(st.SliceOp, v, dim=len(lead) + i, start=start,
                           end=start + (out_sp[i] - 1) * s[i] + 1, step=s[i])
        yield offsets, v


def _window_chain(imp, x, nd: int, out_sp, k, s, p, d, pad_value: float, combine):
    """``combine`` folded over the window elements in row-major window order: one strided slice
    of the padded input per window position, [*lead, *out_sp] each."""
    acc = None
    for _, v in _window_slices(imp, x, nd, out_sp, k, s, p, d, pad_value):
        acc = v if acc is None else imp.create(combine, acc, v)
    return acc


def _max_chain_with_indices(imp, x, nd: int, out_sp, k, s, p, d, first_in: np.ndarray):
    """torch's cpu max-pool scan as element-wise ops over one strided slice per window
    position: a position replaces the running maximum when it is greater or NaN (ties keep the
    first, NaNs the last; padding, -inf, never replaces), starting from -inf at the window's
    first in-bounds position. The flat input position of a window slot is affine in the output
    position (iotas) plus the slot's constant offset: no table, no gather, no argmax."""
    lead = tuple(x.type.shape[:-nd])
    shape = (*lead, *out_sp)
    cs = _contiguous_strides(tuple(x.type.shape[-nd:]))
    base = None
    for i in range(nd):
        io = imp.create(st.IotaOp, start=-p[i] * cs[i], step=s[i] * cs[i], size=out_sp[i],
                        dtype=DType.i64)
        view = (1,) * (len(lead) + i) + (out_sp[i],) + (1,) * (nd - i - 1)
        term = imp.broadcast(imp.reshape(io, view), shape)
        base = term if base is None else imp.create(st.AddOp, base, term)
    best = imp.constant(-math.inf, TensorType(shape, x.type.dtype))
    pos = imp.broadcast(_dense(imp, first_in, DType.i64), shape)
    for offsets, v in _window_slices(imp, x, nd, out_sp, k, s, p, d, -math.inf):
        take = imp.create(st.LogicalOrOp, imp.create(st.GtOp, v, best), imp.create(st.IsNanOp, v))
        at = imp.create(st.AddOp, base, imp.constant(
            sum(o * di * c for o, di, c in zip(offsets, d, cs)), base.type))
        best = imp.create(st.WhereOp, take, v, best)
        pos = imp.create(st.WhereOp, take, at, pos)
    return best, pos


def _grid(out_sp, s, p, k, d) -> list[np.ndarray]:
    """Per spatial dim, the input coordinate of each (output position, window slot), shaped to
    broadcast over ``[*out_sp, *k]``."""
    nd = len(out_sp)
    coords = []
    for i in range(nd):
        o = np.arange(out_sp[i]).reshape([-1 if j == i else 1 for j in range(2 * nd)])
        w = np.arange(k[i]).reshape([-1 if j == nd + i else 1 for j in range(2 * nd)])
        coords.append(o * s[i] - p[i] + w * d[i])
    return coords


def _first_in_bounds(out_sp, s, p, d) -> list[np.ndarray]:
    firsts = []
    for o, si, pi, di in zip(out_sp, s, p, d):
        start = np.arange(o) * si - pi
        firsts.append(start + np.where(start < 0, -(start // di) * di, 0))
    return firsts


def max_pool_with_indices(imp, n, nd: int):
    a = bind(n)
    x = imp.value(a["self"])
    vals_t, idx_t = imp.out_type(0), imp.out_type(1)
    if x.type.rank not in (nd + 1, nd + 2) or not x.type.dtype.is_float or \
            not _static(x.type.shape):
        return imp.torch_call(n)
    k = _params(a["kernel_size"], (), nd)
    s = _params(a.get("stride"), k, nd)
    p = _params(a.get("padding"), (0,) * nd, nd)
    d = _params(a.get("dilation"), (1,) * nd, nd)
    sp, out_sp = x.type.shape[-nd:], vals_t.shape[-nd:]
    kn = math.prod(k)
    if min(*sp, *out_sp) <= 0 or math.prod(out_sp) * kn > MAX_TABLE:
        return imp.torch_call(n)
    r = x.type.rank
    lead = x.type.shape[:-nd]
    cs = _contiguous_strides(tuple(sp))
    firsts = _first_in_bounds(out_sp, s, p, d)
    first_in = sum(f.reshape([-1 if j == i else 1 for j in range(nd)]) * stride
                   for i, (f, stride) in enumerate(zip(firsts, cs)))
    first_in = np.broadcast_to(first_in, tuple(out_sp)).astype(np.int64)
    if kn <= SLICE_WINDOW:
        vals, pos = _max_chain_with_indices(imp, x, nd, out_sp, k, s, p, d, first_in)
        return [imp.cast(vals, vals_t.dtype), imp.cast(pos, idx_t.dtype)]
    flat_shape = (*lead, *out_sp, kn)
    win = _windows(imp, x, nd, out_sp, k, s, p, d, -math.inf)
    vals = imp.create(st.MaxOp, win, dims=tuple(range(r, r + nd)), keepdim=False)
    first = imp.create(st.ArgMaxOp, imp.reshape(win, flat_shape), dims=(r,), keepdim=True)
    back = _windows(imp, x, nd, out_sp, k, s, p, d, -math.inf, reverse=True)
    last = imp.create(st.ArgMaxOp, imp.reshape(back, flat_shape), dims=(r,), keepdim=True)
    last = imp.create(st.SubOp, imp.constant(kn - 1, last.type), last)
    has_nan = imp.create(st.IsNanOp, imp.reshape(vals, (*lead, *out_sp, 1)))
    slot = imp.create(st.WhereOp, has_nan, last, first)
    # window slot -> flat input position; a window of only -inf -> its first in-bounds one
    table = sum(c * stride for c, stride in zip(_grid(out_sp, s, p, k, d), cs))
    table = np.broadcast_to(table, (*out_sp, *k)).reshape(*out_sp, kn).astype(np.int64)
    pos_table = imp.broadcast(_dense(imp, table, DType.i64), flat_shape)
    pos = imp.reshape(imp.create(st.GatherOp, pos_table, slot, dim=r), idx_t.shape)
    only_neg_inf = imp.create(st.EqOp, vals, imp.constant(-math.inf, vals.type))
    pos = imp.create(st.WhereOp, only_neg_inf,
                     imp.broadcast(_dense(imp, first_in, DType.i64), idx_t.shape), pos)
    return [imp.cast(vals, vals_t.dtype), imp.cast(pos, idx_t.dtype)]


def max_pool2d_with_indices(imp, n):
    return max_pool_with_indices(imp, n, 2)


@handles(aten.max_pool3d_with_indices)
def max_pool3d_with_indices(imp, n):
    return max_pool_with_indices(imp, n, 3)


@handles(aten.max_pool2d_with_indices_backward, aten.max_pool3d_with_indices_backward)
def max_pool_backward(imp, n):
    """The gradient flows to the argmax of each window: a scatter_add of the output gradient
    into the flattened input at the forward's indices."""
    nd = 2 if n.target.overloadpacket is aten.max_pool2d_with_indices_backward else 3
    a = bind(n)
    g, x, idx = (imp.value(a[k]) for k in ("grad_output", "self", "indices"))
    if x.type.rank not in (nd + 1, nd + 2) or not _static(x.type.shape, g.type.shape):
        return imp.torch_call(n)
    lead = x.type.shape[:-nd]
    plane = imp.constant(0, TensorType((*lead, math.prod(x.type.shape[-nd:])), x.type.dtype))
    cells = math.prod(g.type.shape[-nd:])
    r = imp.create(st.ScatterAddOp, plane, imp.reshape(imp.cast(idx, DType.i64), (*lead, cells)),
                   imp.reshape(imp.cast(g, x.type.dtype), (*lead, cells)), dim=len(lead))
    return imp.reshape(r, x.type.shape)


def avg_pool(imp, n, nd: int):
    a = bind(n)
    x = imp.value(a["self"])
    out = imp.out_type()
    if x.type.rank not in (nd + 1, nd + 2) or not x.type.dtype.is_float or \
            not _static(x.type.shape):
        return imp.torch_call(n)
    k = _params(a["kernel_size"], (), nd)
    s = _params(a.get("stride"), k, nd)
    p = _params(a.get("padding"), (0,) * nd, nd)
    sp, out_sp = x.type.shape[-nd:], out.shape[-nd:]
    if min(*sp, *out_sp) <= 0:
        return imp.torch_call(n)
    r = x.type.rank
    half = x.type.dtype if x.type.dtype in (DType.f16, DType.bf16) else None
    if half:  # torch's cpu kernel sums and divides in float, rounding once
        x = imp.cast(x, DType.f32)
    if math.prod(k) <= SLICE_WINDOW:  # summed in window order in float, as torch's cpu kernel
        total = _window_chain(imp, x, nd, out_sp, k, s, p, (1,) * nd, 0.0, st.AddOp)
    else:
        win = _windows(imp, x, nd, out_sp, k, s, p, (1,) * nd, 0.0)
        total = imp.create(st.SumOp, win, dims=tuple(range(r, r + nd)), keepdim=False)
    full, inside = np.ones(tuple(out_sp)), np.ones(tuple(out_sp))
    for i, (o, si, pi, ki, size) in enumerate(zip(out_sp, s, p, k, sp)):
        lo = np.arange(o) * si - pi
        hi = np.minimum(lo + ki, size + pi)
        view = [-1 if j == i else 1 for j in range(nd)]
        full = full * (hi - lo).reshape(view)
        inside = inside * np.maximum(np.minimum(hi, size) - np.maximum(lo, 0), 0).reshape(view)
    if a.get("divisor_override"):
        div = np.full(tuple(out_sp), float(a["divisor_override"]))
    elif a.get("count_include_pad", True):
        div = full
    else:
        div = inside.copy()
    div[inside == 0] = 1.0  # an empty window's sum (0) stays 0
    table = imp.broadcast(_dense(imp, div, x.type.dtype), total.type.shape)
    mean = imp.create(st.DivOp, total, table)
    return imp.cast(mean, half) if half else mean


@handles(aten.avg_pool3d)
def avg_pool3d(imp, n):
    return avg_pool(imp, n, 3)


# ----------------------------------------------------------------------------------------------
# Adaptive pooling: window o along a dim of size I covers [floor(o*I/O), ceil((o+1)*I/O))


def _adaptive_table(sp, out_sp) -> tuple[np.ndarray, np.ndarray]:
    """(flat input position of each window slot, -1 past the window's end; its element count),
    slots ``[*out_sp, K]`` with K the largest window, in window order."""
    nd = len(sp)
    starts = [(np.arange(o) * i) // o for i, o in zip(sp, out_sp)]
    ends = [((np.arange(o) + 1) * i + o - 1) // o for i, o in zip(sp, out_sp)]
    kmax = [int((e - s).max()) for s, e in zip(starts, ends)]
    cs = _contiguous_strides(tuple(sp))
    pos = np.zeros((*out_sp, *kmax), dtype=np.int64)
    valid = np.ones((*out_sp, *kmax), dtype=bool)
    for i in range(nd):
        o_view = [-1 if j == i else 1 for j in range(2 * nd)]
        k_view = [-1 if j == nd + i else 1 for j in range(2 * nd)]
        coord = starts[i].reshape(o_view) + np.arange(kmax[i]).reshape(k_view)
        valid = valid & (coord < ends[i].reshape(o_view))
        pos = pos + coord * cs[i]
    count = valid.reshape(*out_sp, -1).sum(-1)
    return np.where(valid, pos, -1).reshape(*out_sp, -1), count


def _adaptive_windows(imp, x, nd, table: np.ndarray, neutral: float):
    """Windows ``[*lead, *out_sp, K]``; a slot past its window's end reads ``neutral``."""
    lead = x.type.shape[:-nd]
    m = math.prod(x.type.shape[-nd:])
    flat = imp.reshape(x, (*lead, m))
    pad = imp.constant(neutral, TensorType((*lead, 1), x.type.dtype))
    plane = imp.create(st.CatOp, flat, pad, dim=len(lead))
    idx = _dense(imp, np.where(table < 0, m, table).reshape(-1), DType.i64)
    picked = imp.create(st.IndexSelectOp, plane, idx, dim=len(lead))
    return imp.reshape(picked, (*lead, *table.shape))


@handles(aten.adaptive_max_pool2d, aten.adaptive_max_pool3d)
def adaptive_max_pool(imp, n):
    nd = 2 if n.target.overloadpacket is aten.adaptive_max_pool2d else 3
    x = imp.value(n.args[0])
    vals_t, idx_t = imp.out_type(0), imp.out_type(1)
    sp, out_sp = x.type.shape[-nd:], vals_t.shape[-nd:]
    if x.type.rank not in (nd + 1, nd + 2) or not x.type.dtype.is_float or \
            not _static(x.type.shape) or min(*sp, *out_sp) <= 0:
        return imp.torch_call(n)
    table, _ = _adaptive_table(sp, out_sp)
    if table.size > MAX_TABLE:
        return imp.torch_call(n)
    win = _adaptive_windows(imp, x, nd, table, -math.inf)
    r = win.type.rank - 1
    vals = imp.create(st.MaxOp, win, dims=(r,), keepdim=False)
    first = imp.create(st.ArgMaxOp, win, dims=(r,), keepdim=True)
    # the last NaN: the first one of the window read backwards (trailing -inf slots first)
    back = _adaptive_windows(imp, x, nd, table[..., ::-1].copy(), -math.inf)
    last = imp.create(st.ArgMaxOp, back, dims=(r,), keepdim=True)
    last = imp.create(st.SubOp, imp.constant(table.shape[-1] - 1, last.type), last)
    has_nan = imp.create(st.IsNanOp, imp.reshape(vals, first.type.shape))
    slot = imp.create(st.WhereOp, has_nan, last, first)
    pos_table = imp.broadcast(_dense(imp, np.maximum(table, 0), DType.i64), win.type.shape)
    pos = imp.reshape(imp.create(st.GatherOp, pos_table, slot, dim=r), idx_t.shape)
    return [imp.cast(vals, vals_t.dtype), imp.cast(pos, idx_t.dtype)]


@handles(aten.adaptive_max_pool2d_backward, aten.adaptive_max_pool3d_backward)
def adaptive_max_pool_backward(imp, n):
    a = bind(n)
    g, x, idx = (imp.value(a[k]) for k in ("grad_output", "self", "indices"))
    nd = 2 if n.target.overloadpacket is aten.adaptive_max_pool2d_backward else 3
    if x.type.rank not in (nd + 1, nd + 2) or not _static(x.type.shape, g.type.shape):
        return imp.torch_call(n)
    lead = x.type.shape[:-nd]
    plane = imp.constant(0, TensorType((*lead, math.prod(x.type.shape[-nd:])), x.type.dtype))
    cells = math.prod(g.type.shape[-nd:])
    r = imp.create(st.ScatterAddOp, plane, imp.reshape(imp.cast(idx, DType.i64), (*lead, cells)),
                   imp.reshape(imp.cast(g, x.type.dtype), (*lead, cells)), dim=len(lead))
    return imp.reshape(r, x.type.shape)


@handles(aten._adaptive_avg_pool3d)
def adaptive_avg_pool3d(imp, n):
    """(torch decomposes the 2-d one itself.) Window sums over the window sizes."""
    x = imp.value(n.args[0])
    out = imp.out_type()
    sp, out_sp = x.type.shape[-3:], out.shape[-3:]
    if x.type.rank not in (4, 5) or not x.type.dtype.is_float or not _static(x.type.shape) or \
            min(*sp, *out_sp) <= 0:
        return imp.torch_call(n)
    table, count = _adaptive_table(sp, out_sp)
    if table.size > MAX_TABLE:
        return imp.torch_call(n)
    win = _adaptive_windows(imp, x, 3, table, 0.0)
    total = imp.create(st.SumOp, win, dims=(win.type.rank - 1,), keepdim=False)
    div = imp.broadcast(_dense(imp, count.astype(np.float64), x.type.dtype), total.type.shape)
    return imp.create(st.DivOp, total, div)


# ----------------------------------------------------------------------------------------------
# 2-d pooling whose windows tile the input exactly: a reshape and one reduction


def _pool_window(imp, n, kernel, stride, padding, dilation=(1, 1), ceil_mode=False):
    """The window size when a 2-d pooling is non-overlapping and exact (kernel == stride, no
    padding, no dilation, sizes divisible), else None."""
    k = list(kernel) * (2 // len(kernel)) if kernel else None
    s = list(stride) * (2 // len(stride)) if stride else k
    p = list(padding) * (2 // len(padding)) if padding else [0, 0]
    d = list(dilation) * (2 // len(dilation)) if dilation else [1, 1]
    x = imp.value(n.args[0])
    h, w = x.type.shape[-2:]
    if k is None or k != s or any(p) or d != [1, 1] or ceil_mode or h % k[0] or w % k[1]:
        return None
    return x, k


def _exact_windows(imp, x, k) -> Value:
    """[..., H, W] -> [..., H/kh, kh, W/kw, kw] (a view)."""
    *lead, h, w = x.type.shape
    return imp.reshape(x, (*lead, h // k[0], k[0], w // k[1], k[1]))


@handles(aten.avg_pool2d)
def avg_pool2d(imp, n):
    a = bind(n)
    got = _pool_window(imp, n, a["kernel_size"], a.get("stride"), a.get("padding"),
                       ceil_mode=bool(a.get("ceil_mode")))
    if got is None or a.get("divisor_override"):  # the general form: windows and a divisor table
        return avg_pool(imp, n, 2)
    x, k = got
    dt = x.type.dtype
    if dt in (DType.f16, DType.bf16):  # torch's cpu kernel sums and divides in float
        x = imp.cast(x, DType.f32)
    win = _exact_windows(imp, x, k)
    r = win.type.rank
    return imp.cast(imp.create(st.MeanOp, win, dims=(r - 3, r - 1), keepdim=False), dt)


@handles(aten.max_pool2d_with_indices)
def max_pool2d(imp, n):
    a = bind(n)
    got = _pool_window(imp, n, a["kernel_size"], a.get("stride"), a.get("padding"),
                       a.get("dilation"), bool(a.get("ceil_mode")))
    indices_used = any(u.target is operator.getitem and u.args[1] == 1 for u in n.users)
    if got is None or indices_used:  # the general form: windows, argmax and an index table
        return max_pool2d_with_indices(imp, n)
    x, k = got
    win = _exact_windows(imp, x, k)
    r = win.type.rank
    return [imp.create(st.MaxOp, win, dims=(r - 3, r - 1), keepdim=False), None]
