"""Pooling with overlapping windows, padding, dilation and ceil mode, in 2-d and 3-d, lowered
exactly into existing ``st`` ops (the non-overlapping 2-d case stays the reshape + reduction of
``importer_ops``).

The windows of an input padded with the reduction's neutral value (-inf for max, 0 for sums)
are one strided view (``importer_lowerings.strided_gather``): ``[*lead, *out, *kernel]``.

- max pooling: ``st.max`` over the window dims; the indices are each window's ``st.argmax``
  (the first maximum, as torch's cpu kernel), except that a window holding a NaN gives its last
  NaN (read the window backwards) and a window of only -inf its first in-bounds position (both
  as torch's cpu kernel), mapped to flat input positions by a table computed here (shapes are
  static). Its backward is an ``st.scatter_add`` of the output gradient at those indices.
- average pooling: ``st.sum`` over the window dims divided by torch's per-window divisor
  (a table: the window clipped to the padded input with count_include_pad, else to the input;
  divisor_override wins; a window with no input element is 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch

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


def _windows(imp, x, nd: int, out_sp, k, s, p, d, pad_value: float, reverse: bool = False):
    """The windows ``[*lead, *out_sp, *k]`` of x padded by p (and past its end as far as the
    last window reaches), read backwards within each window when ``reverse``."""
    *lead, = x.type.shape[:-nd]
    sp = x.type.shape[-nd:]
    padded_sp = [max(n + pi, (o - 1) * si + (ki - 1) * di + 1)
                 for n, pi, o, si, ki, di in zip(sp, p, out_sp, s, k, d)]
    padded = imp.create(st.PadOp, x, low=(0,) * len(lead) + tuple(p),
                        high=(0,) * len(lead) + tuple(P - n - pi for P, n, pi in
                                                      zip(padded_sp, sp, p)),
                        value=pad_value)
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
    cs = _contiguous_strides(tuple(sp))
    table = sum(c * stride for c, stride in zip(_grid(out_sp, s, p, k, d), cs))
    table = np.broadcast_to(table, (*out_sp, *k)).reshape(*out_sp, kn).astype(np.int64)
    firsts = _first_in_bounds(out_sp, s, p, d)
    first_in = sum(f.reshape([-1 if j == i else 1 for j in range(nd)]) * stride
                   for i, (f, stride) in enumerate(zip(firsts, cs)))
    first_in = np.broadcast_to(first_in, tuple(out_sp)).astype(np.int64)
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
    return imp.create(st.DivOp, total, table)


def avg_pool2d_general(imp, n):
    return avg_pool(imp, n, 2)


@handles(aten.avg_pool3d)
def avg_pool3d(imp, n):
    return avg_pool(imp, n, 3)
