"""The numpy reference interpreter: the oracle every fusion plan and kernel is checked against.

``run(module, inputs)`` evaluates a function op by op on numpy arrays. Semantics follow torch:
float16 / bfloat16 element-wise math is computed in float32 and rounded to the result type
(torch's "opmath"); float reductions and scatter accumulations are computed in float64 and
rounded once, so the oracle is at least as accurate as what it checks. ``fusion.group`` runs its
region. Library ops (mm, convolution) are computed in numpy too; only ``st.torch_call``
delegates to torch, by name lookup under ``torch.ops``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stitch_ir import dialects  # noqa: F401 - registers ops
from stitch_ir.core import DenseAttr, FuncOp, IRError, Module, Operation, Value
from stitch_ir.dialects import st
from stitch_ir.types import DType, Sym, TensorType

Impl = Callable[[Operation, list[np.ndarray]], list[np.ndarray]]
IMPLS: dict[str, Impl] = {}


class InterpreterError(IRError):
    pass


def impl(*names: str):
    def deco(fn: Impl) -> Impl:
        for n in names:
            IMPLS[n] = fn
        return fn

    return deco


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 precision (nearest even), kept in float32."""
    u = np.array(x, dtype=np.float32, order="C").view(np.uint32)  # keeps rank 0
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    out = rounded.view(np.float32)
    return np.where(np.isnan(x), x, out).astype(np.float32)


def to_type(x: np.ndarray, t: TensorType) -> np.ndarray:
    """Convert a computed array to the result type's numpy dtype, rounding bf16."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.asarray(x).astype(t.dtype.to_numpy(), copy=False)
    if t.dtype is DType.bf16:
        out = round_bf16(out)
    return out


def _opmath(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype == np.float16 else x


# ----------------------------------------------------------------------------------------------
# Element-wise

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))


def _int_div(a, b):
    if np.any(b == 0):
        raise InterpreterError("integer division by zero")
    q = np.floor_divide(a, b)
    return np.where((np.remainder(a, b) != 0) & ((a < 0) ^ (b < 0)), q + 1, q)


def _sign(x):
    return np.where(np.isnan(x), 0, np.sign(x))  # torch.sign(nan) is 0; np.sign(nan) is nan


def _int_pow(a, b):
    """torch's integer pow: for b < 0 it is 1 / a**-b truncated, i.e. 1 or -1 for a = 1 or -1,
    else 0 (0 ** -n included); np.power raises on negative integer exponents."""
    neg = b < 0
    r = np.power(a, np.where(neg, 0, b).astype(b.dtype))
    return np.where(neg, np.where(a == 1, 1, np.where(a == -1, np.where(b % 2 == 0, 1, -1), 0)), r)


UNARY: dict[str, Callable] = {
    "st.neg": np.negative, "st.abs": np.abs, "st.exp": np.exp, "st.exp2": np.exp2,
    "st.log": np.log, "st.log2": np.log2, "st.log1p": np.log1p, "st.expm1": np.expm1,
    "st.sqrt": np.sqrt, "st.rsqrt": lambda x: 1 / np.sqrt(x), "st.sin": np.sin,
    "st.cos": np.cos, "st.tan": np.tan, "st.tanh": np.tanh, "st.sigmoid": _sigmoid,
    "st.erf": lambda x: _erf(x.astype(np.float64)), "st.relu": lambda x: np.maximum(x, 0),
    "st.reciprocal": lambda x: 1 / x, "st.floor": np.floor, "st.ceil": np.ceil,
    "st.round": np.round, "st.trunc": np.trunc, "st.sign": _sign,
    "st.logical_not": np.logical_not, "st.bitwise_not": np.invert,
    "st.isnan": np.isnan, "st.isinf": np.isinf,
}
BINARY: dict[str, Callable] = {
    "st.add": np.add, "st.sub": np.subtract, "st.mul": np.multiply, "st.pow": np.power,
    "st.maximum": np.maximum, "st.minimum": np.minimum, "st.remainder": np.remainder,
    "st.floor_div": np.floor_divide, "st.atan2": np.arctan2,
    "st.bitwise_and": np.bitwise_and, "st.bitwise_or": np.bitwise_or,
    "st.bitwise_xor": np.bitwise_xor, "st.logical_and": np.logical_and,
    "st.logical_or": np.logical_or, "st.eq": np.equal, "st.ne": np.not_equal,
    "st.lt": np.less, "st.le": np.less_equal, "st.gt": np.greater, "st.ge": np.greater_equal,
}


@impl(*UNARY)
def _unary(op, args):
    x = args[0]
    if op.name in ("st.floor", "st.ceil", "st.round", "st.trunc") and x.dtype.kind in "iu":
        return [x.copy()]
    with np.errstate(all="ignore"):
        return [to_type(UNARY[op.name](_opmath(x)), op.result.type)]


@impl(*BINARY, "st.div")
def _binary(op, args):
    a, b = (_opmath(x) for x in args)
    if op.name == "st.div":
        fn = _int_div if a.dtype.kind in "iu" else np.divide
    elif op.name == "st.pow" and a.dtype.kind in "iu":
        fn = _int_pow
    elif op.name in ("st.remainder", "st.floor_div") and a.dtype.kind in "iu" and np.any(b == 0):
        raise InterpreterError(f"integer division by zero in '{op.name}'{op.where()}")
    else:
        fn = BINARY[op.name]
    with np.errstate(all="ignore"):
        return [to_type(fn(a, b), op.result.type)]


@impl("st.where")
def _where(op, args):
    return [to_type(np.where(*args), op.result.type)]


@impl("st.clamp")
def _clamp(op, args):
    x, lo, hi = (_opmath(a) for a in args)
    # torch.clamp propagates NaN from x; np.minimum / np.maximum do too.
    return [to_type(np.minimum(np.maximum(x, lo), hi), op.result.type)]


@impl("st.cast")
def _cast(op, args):
    x = args[0]
    dt: DType = op.attributes["dtype"]
    if dt.is_int and x.dtype.kind == "f":
        x = np.trunc(x)  # torch truncates toward zero when casting float to int
    if dt.is_bool:
        return [np.asarray(x != 0)]  # an array even at rank 0
    return [to_type(x, op.result.type)]


# ----------------------------------------------------------------------------------------------
# Reductions


def _acc(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) if x.dtype.kind == "f" else x


@impl("st.sum", "st.mean", "st.max", "st.min", "st.prod", "st.any", "st.var")
def _reduce(op, args):
    x = args[0]
    dims, keep = tuple(op.attributes["dims"]), bool(op.attributes["keepdim"])
    if any(x.shape[d] == 0 for d in dims) and op.name in ("st.max", "st.min"):
        raise InterpreterError(f"'{op.name}' of an empty dimension{op.where()}")
    with np.errstate(all="ignore"):
        if op.name == "st.sum":
            r = np.sum(_acc(x).astype(np.int64) if x.dtype.kind in "biu" else _acc(x), axis=dims,
                       keepdims=keep)
        elif op.name == "st.mean":
            r = np.mean(_acc(x), axis=dims, keepdims=keep)
        elif op.name == "st.max":
            r = np.max(x, axis=dims, keepdims=keep)
        elif op.name == "st.min":
            r = np.min(x, axis=dims, keepdims=keep)
        elif op.name == "st.prod":
            r = np.prod(_acc(x), axis=dims, keepdims=keep)
        elif op.name == "st.any":
            r = np.any(x, axis=dims, keepdims=keep)
        else:
            r = np.var(_acc(x), axis=dims, keepdims=keep, ddof=op.attr("correction", 1))
    return [to_type(r, op.result.type)]


@impl("st.argmax", "st.argmin")
def _arg_reduce(op, args):
    x = args[0]
    (d,) = op.attributes["dims"]
    fn = np.argmax if op.name == "st.argmax" else np.argmin
    r = fn(x, axis=d)
    if op.attributes["keepdim"]:
        r = np.expand_dims(r, d)
    return [np.asarray(r, dtype=np.int64)]  # an array even at rank 0 (np.argmax gives a scalar)


# ----------------------------------------------------------------------------------------------
# Broadcast, layout, creation


@impl("st.broadcast")
def _broadcast(op, args):
    return [np.broadcast_to(args[0], op.result.type.shape if op.result.type.is_static
                            else _shape_of(op, args)).copy()]


def _shape_of(op, args):
    raise InterpreterError(f"'{op.name}' with a symbolic target shape{op.where()}")


@impl("st.reshape")
def _reshape(op, args):
    shape = tuple(op.attributes["shape"])
    if any(isinstance(d, Sym) for d in shape):
        return _shape_of(op, args)
    return [args[0].reshape(shape)]


@impl("st.permute")
def _permute(op, args):
    return [np.transpose(args[0], op.attributes["perm"]).copy()]  # copy(): C order, keeps rank 0


@impl("st.slice")
def _slice(op, args):
    a = op.attributes
    idx = [slice(None)] * args[0].ndim
    idx[a["dim"]] = slice(a["start"], a["end"], a["step"])
    return [args[0][tuple(idx)].copy()]


@impl("st.cat")
def _cat(op, args):
    return [np.concatenate(args, axis=op.attributes["dim"])]


@impl("st.pad")
def _pad(op, args):
    x = args[0]
    if x.ndim == 0:  # nothing to pad; np.pad rejects an empty pad width
        return [to_type(x.copy(), op.result.type)]
    low, high = op.attributes["low"], op.attributes["high"]
    crop = tuple(slice(max(-lo, 0), x.shape[i] - max(-hi, 0)) for i, (lo, hi) in
                 enumerate(zip(low, high)))
    x = x[crop]
    widths = [(max(lo, 0), max(hi, 0)) for lo, hi in zip(low, high)]
    return [to_type(np.pad(x, widths, constant_values=op.attributes["value"]), op.result.type)]


@impl("st.constant")
def _constant(op, args):
    v = op.attributes["value"]
    t = op.result.type
    if isinstance(v, DenseAttr):
        return [v.to_array()]
    return [to_type(np.full(t.shape, v, dtype=np.float64 if isinstance(v, float) else
                            (np.bool_ if isinstance(v, bool) else np.int64)), t)]


@impl("st.iota")
def _iota(op, args):
    a = op.attributes
    r = a["start"] + a["step"] * np.arange(a["size"], dtype=np.float64 if
                                           isinstance(a["start"] + a["step"], float) else np.int64)
    return [to_type(r, op.result.type)]


PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
U32 = np.uint64(0xFFFFFFFF)


def philox_uniform(seed: int, counters: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of (key = seed, counter = (c, 0, 0, 0)), first word, as a float in [0, 1)
    the way Triton's ``tl.rand`` converts it (the cpu kernels' ``st_rand`` computes the same)."""
    c0 = counters.astype(np.uint64) & U32
    c1 = np.zeros_like(c0)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    seed &= (1 << 64) - 1
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    a, b = np.uint64(PHILOX_ROUND[0]), np.uint64(PHILOX_ROUND[1])
    for _ in range(10):
        p0, p2 = a * c0, b * c2  # 32 x 32 -> 64 bits: exact in uint64
        c0, c1, c2, c3 = ((p2 >> np.uint64(32)) ^ c1 ^ k0) & U32, p2 & U32, \
            ((p0 >> np.uint64(32)) ^ c3 ^ k1) & U32, p0 & U32
        k0 = (k0 + np.uint64(PHILOX_KEY[0])) & U32
        k1 = (k1 + np.uint64(PHILOX_KEY[1])) & U32
    x = c0.astype(np.uint32).view(np.int32).astype(np.int64)
    x = np.where(x < 0, -x - 1, x)
    return (x.astype(np.float32) * np.float32(4.6566127342e-10)).astype(np.float32)


@impl("st.seed")
def _seed(op, args):
    import torch  # the same generator the runtime draws from: manual_seed reproduces it

    return [np.asarray(int(torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64)))]


@impl("st.rand")
def _rand(op, args):
    seed = int(np.asarray(args[0]).reshape(-1)[0]) if args[0].size else 0
    shape = op.result.type.shape
    n = int(np.prod(shape)) if shape else 1
    counters = np.uint64(op.attributes["offset"]) + np.arange(n, dtype=np.uint64)
    return [philox_uniform(seed, counters).reshape(shape)]


# ----------------------------------------------------------------------------------------------
# Gather / scatter


def _check_bounds(op, idx: np.ndarray, size: int) -> np.ndarray:
    """In-range indices; negative ones count from the end where the op says ``wrap`` (Python
    indexing, ``x[idx]``) and are out of range where it does not (index_select, gather,
    embedding, index_add, scatter: eager raises on them)."""
    lo = -size if op.attr("wrap", True) else 0
    if idx.size and (idx.min() < lo or idx.max() >= size):
        raise InterpreterError(f"index out of range for size {size} in '{op.name}'{op.where()}")
    return np.where(idx < 0, idx + size, idx)


@impl("st.index_select")
def _index_select(op, args):
    x, idx = args
    d = op.attributes["dim"]
    return [np.take(x, _check_bounds(op, idx, x.shape[d]), axis=d)]


@impl("st.embedding")
def _embedding(op, args):
    w, idx = args
    return [w[_check_bounds(op, idx, w.shape[0])]]


def _scatter_coords(op, x, idx, dim):
    """Full coordinates into x for every element of idx (torch gather/scatter semantics)."""
    if x.ndim == 0:  # torch treats a scalar as one element along dim 0 (index 0 or -1)
        _check_bounds(op, idx, 1)
        return ()
    idx = _check_bounds(op, idx, x.shape[dim])
    for d in range(idx.ndim):
        if d != dim and idx.shape[d] > x.shape[d]:
            raise InterpreterError(f"index dim {d} larger than input in '{op.name}'{op.where()}")
    grids = list(np.indices(idx.shape, sparse=True))
    grids[dim] = idx
    return tuple(grids)


@impl("st.gather")
def _gather(op, args):
    x, idx = args
    return [np.asarray(x[_scatter_coords(op, x, idx, op.attributes["dim"])])]


@impl("st.index_add")
def _index_add(op, args):
    x, idx, src = args
    d = op.attributes["dim"]
    out = _acc(x).copy()
    where = (slice(None),) * d + (_check_bounds(op, idx, x.shape[d]),)
    np.add.at(out, where, _acc(src) * op.attr("alpha", 1))
    return [to_type(out, op.result.type)]


@impl("st.scatter_add")
def _scatter_add(op, args):
    x, idx, src = args
    coords = _scatter_coords(op, x, idx, op.attributes["dim"])
    out = _acc(x).copy()
    np.add.at(out, coords, _acc(src)[tuple(slice(0, n) for n in idx.shape)])
    return [to_type(out, op.result.type)]


@impl("st.scatter_reduce")
def _scatter_reduce(op, args):
    x, idx, src = args
    a = op.attributes
    coords = _scatter_coords(op, x, idx, a["dim"])
    vals = _acc(src)[tuple(slice(0, n) for n in idx.shape)]
    out = _acc(x).copy()
    touched = np.zeros(x.shape, dtype=bool)
    touched[coords] = True
    red = a["reduce"]
    if not a["include_self"]:
        init = {"sum": 0, "mean": 0, "prod": 1, "amax": -np.inf, "amin": np.inf}[red]
        if out.dtype.kind in "iu" and red in ("amax", "amin"):
            info = np.iinfo(out.dtype)
            init = info.min if red == "amax" else info.max
        out[touched] = init
    if red in ("sum", "mean"):
        np.add.at(out, coords, vals)
    elif red == "prod":
        np.multiply.at(out, coords, vals)
    elif red == "amax":
        np.maximum.at(out, coords, vals)
    else:
        np.minimum.at(out, coords, vals)
    if red == "mean":
        count = np.zeros(x.shape, dtype=np.int64)
        np.add.at(count, coords, 1)
        count = count + (1 if a["include_self"] else 0)
        count = np.maximum(count, 1)
        out = out // count if out.dtype.kind in "iu" else out / count
    return [to_type(out, op.result.type)]


# ----------------------------------------------------------------------------------------------
# Library ops


def _mm_in(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype == np.float16 else x


@impl("st.mm", "st.bmm")
def _mm(op, args):
    return [to_type(np.matmul(*(_mm_in(a) for a in args)), op.result.type)]


@impl("st.addmm")
def _addmm(op, args):
    bias, a, b = (_mm_in(x) for x in args)
    r = op.attr("alpha", 1) * np.matmul(a, b)
    if op.attr("beta", 1) != 0:  # torch ignores the bias (NaN and inf too) when beta == 0
        r = op.attr("beta", 1) * bias + r
    return [to_type(r, op.result.type)]


@impl("st.linear")
def _linear(op, args):
    x, w = _mm_in(args[0]), _mm_in(args[1])
    r = np.matmul(x, w.T)
    if len(args) == 3:
        r = r + _mm_in(args[2])
    return [to_type(r, op.result.type)]


def _conv(x, w, stride, padding, dilation, groups):
    """Direct N-d convolution (cross-correlation) via sliding windows; w is [Co, Ci/g, *k]."""
    nd = x.ndim - 2
    x = np.pad(x, [(0, 0), (0, 0)] + [(p, p) if p >= 0 else (0, 0) for p in padding])
    for i, p in enumerate(padding):
        if p < 0:  # negative padding crops
            sl = [slice(None)] * x.ndim
            sl[2 + i] = slice(-p, x.shape[2 + i] + p)
            x = x[tuple(sl)]
    ks = w.shape[2:]
    span = [dilation[i] * (ks[i] - 1) + 1 for i in range(nd)]
    win = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))
    sel = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride) + tuple(
        slice(None, None, d) for d in dilation)
    win = win[sel]  # [N, C, *out, *k]
    n, c = x.shape[:2]
    co = w.shape[0]
    cg, og = c // groups, co // groups
    outs = []
    letters = "pqrstuvw"[:nd]  # spatial axes; must not reuse n, c or o
    spec = f"nc{letters.upper()}{letters},oc{letters}->no{letters.upper()}"
    for g in range(groups):
        outs.append(np.einsum(spec, win[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og],
                              optimize=True))
    return np.concatenate(outs, axis=1)


@impl("st.convolution")
def _convolution(op, args):
    a = op.attributes
    x, w = _mm_in(args[0]).astype(np.float64), _mm_in(args[1]).astype(np.float64)
    last = bool(a.get("channels_last"))
    if last:  # [N, *spatial, C] in and out
        x = np.moveaxis(x, -1, 1)
    stride, pad, dil = list(a["stride"]), list(a["padding"]), list(a["dilation"])
    groups, nd = a["groups"], x.ndim - 2
    if a["transposed"]:
        # A transposed convolution is a stride-1 convolution of the zero-stuffed input with the
        # flipped, in/out-swapped weight, padded by dilation * (k - 1) - padding.
        n, c = x.shape[:2]
        stuffed = np.zeros((n, c, *[(s - 1) * st + 1 for s, st in zip(x.shape[2:], stride)]))
        stuffed[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)] = x
        ks = w.shape[2:]
        cg = w.shape[0] // groups
        wt = np.concatenate([
            np.swapaxes(w[g * cg:(g + 1) * cg], 0, 1) for g in range(groups)
        ], axis=0)[(slice(None), slice(None)) + (slice(None, None, -1),) * nd]
        lo = [dil[i] * (ks[i] - 1) - pad[i] for i in range(nd)]
        opad = list(a["output_padding"])
        stuffed = np.pad(stuffed, [(0, 0), (0, 0)] + [(0, opad[i]) for i in range(nd)])
        r = _conv(stuffed, wt, [1] * nd, [0] * nd, dil, groups) if all(v == 0 for v in lo) else \
            _conv_asym(stuffed, wt, lo, opad, dil, groups)
    else:
        r = _conv(x, w, stride, pad, dil, groups)
    if len(args) == 3:
        r = r + args[2].astype(np.float64).reshape((1, -1) + (1,) * nd)
    if last:
        r = np.moveaxis(r, 1, -1)
    return [to_type(np.ascontiguousarray(r), op.result.type)]


def _conv_asym(x, w, lo, opad, dil, groups):
    """Stride-1 conv of x (already padded by opad at the end) with low/high padding ``lo``."""
    nd = x.ndim - 2
    widths = [(0, 0), (0, 0)] + [(max(p, 0), max(p, 0)) for p in lo]
    x = np.pad(x, widths)
    for i, p in enumerate(lo):
        if p < 0:
            sl = [slice(None)] * x.ndim
            sl[2 + i] = slice(-p, x.shape[2 + i] + p)
            x = x[tuple(sl)]
    return _conv(x, w, [1] * nd, [0] * nd, dil, groups)


# ----------------------------------------------------------------------------------------------
# torch.ops calls and fusion groups


def decode_torch_args(spec: str, operands: list) -> tuple[list, dict]:
    """Decode an ``st.torch_call`` argument spec, substituting operands; returns (args, kwargs)."""
    return torch_args_decoder(spec)(operands)


def torch_args_decoder(spec: str) -> Callable[[list], tuple[list, dict]]:
    """``decode_torch_args`` with the spec parsed once: a function of the operands. The runtime
    calls one per torch step per call (decoding the JSON each time cost 28 us per call)."""
    d = json.loads(spec)
    kwargs = [(k, _arg_builder(v)) for k, v in d.get("kwargs", {}).items()]
    top = d.get("args", [])
    if all(not _has_operand(v) or (isinstance(v, dict) and "operand" in v) for v in top) and \
            not any(_has_operand(v) for v in d.get("kwargs", {}).values()):
        # the common case (a convolution_backward): operands only as top-level arguments, so
        # a call copies a template and fills in the operand slots
        template = [None if isinstance(v, dict) and "operand" in v else _arg_builder(v)(())
                    for v in top]
        slots = [(k, v["operand"]) for k, v in enumerate(top)
                 if isinstance(v, dict) and "operand" in v]
        consts = {k: b(()) for k, b in kwargs}

        def decode(operands: list) -> tuple[list, dict]:
            a = list(template)
            for k, i in slots:
                a[k] = operands[i]
            return a, dict(consts)

        return decode
    args = _arg_builder(top)

    def decode(operands: list) -> tuple[list, dict]:
        return args(operands), {k: b(operands) for k, b in kwargs}

    return decode


def _has_operand(v) -> bool:
    if isinstance(v, list):
        return any(_has_operand(x) for x in v)
    if isinstance(v, dict):
        return "operand" in v or _has_operand(v.get("tuple", []))
    return False


def _arg_builder(v) -> Callable[[list], Any]:
    """A function of the operands giving argument ``v`` decoded; constant parts decoded once
    (a constant list is a fresh copy per call; a template's lists are shared: torch ops do not
    change their arguments)."""
    import torch

    if isinstance(v, list):
        if not _has_operand(v):
            c = [_arg_builder(x)(()) for x in v]
            return lambda ops: list(c)
        parts = [_arg_builder(x) for x in v]
        return lambda ops: [p(ops) for p in parts]
    if isinstance(v, dict):
        if "operand" in v:
            i = v["operand"]
            return lambda ops: ops[i]
        if "tuple" in v:
            parts = [_arg_builder(x) for x in v["tuple"]]
            return lambda ops: tuple(p(ops) for p in parts)
        if "dtype" in v:
            c = getattr(torch, v["dtype"])
        elif "device" in v:
            c = torch.device(v["device"])
        elif "layout" in v:
            c = getattr(torch, v["layout"])
        elif "memory_format" in v:
            c = getattr(torch, v["memory_format"])
        else:
            raise InterpreterError(f"bad torch_call argument {v!r}")
        return lambda ops: c
    return lambda ops: v


def resolve_torch_op(target: str):
    """``aten.sort.default`` -> ``torch.ops.aten.sort.default`` by attribute lookup only."""
    import torch

    obj = torch.ops
    for part in target.split("."):
        if not part.isidentifier():
            raise InterpreterError(f"bad torch op target {target!r}")
        obj = getattr(obj, part, None)
        if obj is None:
            raise InterpreterError(f"torch has no op {target!r}")
    return obj


def torch_call_results(op, out) -> list:
    """The tensors of a torch op's return value that the ``st.torch_call`` op's results stand
    for (by tuple position when the op records them)."""
    import torch

    if not isinstance(out, tuple | list):
        return [out]
    positions = op.attr("outputs")
    if positions is not None:
        return [out[k] for k in positions]
    return [t for t in out if isinstance(t, torch.Tensor)]


@impl("st.torch_call")
def _torch_call(op, args):
    import torch

    fn = resolve_torch_op(op.attributes["target"])
    tensors = [torch.from_numpy(np.array(a, order="C")) for a in args]  # keeps rank 0
    for k, p in enumerate(op.attr("operand_perms") or ()):
        if p:  # the op's argument, permuted back (a strided view, as the runtime passes it)
            tensors[k] = tensors[k].permute(st.inverse_perm(p))
    pos, kw = decode_torch_args(op.attributes["args"], tensors)
    out = fn(*pos, **kw)
    flat = torch_call_results(op, out)
    for k, p in enumerate(op.attr("result_perms") or ()):
        if p and k < len(flat):
            flat[k] = flat[k].permute(p)
    if len(flat) != len(op.results):
        raise InterpreterError(f"'{op.attributes['target']}' returned {len(flat)} tensors, the op "
                               f"declares {len(op.results)}{op.where()}")
    return [to_type(t.detach().contiguous().numpy() if t.dtype != torch.bfloat16 else
                    t.float().numpy(), r.type) for t, r in zip(flat, op.results)]


@impl("fusion.group")
def _group(op, args):
    return run_block(op.body, args)


def run_block(block, args: Sequence[np.ndarray]) -> list[np.ndarray]:
    env: dict[int, np.ndarray] = {id(a): v for a, v in zip(block.args, args)}
    for op in block.ops:
        if op.name in ("func.return", "fusion.yield"):
            return [env[id(v)] for v in op.operands]
        fn = IMPLS.get(op.name)
        if fn is None:
            raise InterpreterError(f"no interpreter implementation for '{op.name}'")
        ins = [env[id(v)] for v in op.operands]
        outs = fn(op, ins)
        for r, val in zip(op.results, outs):
            env[id(r)] = val
    raise InterpreterError("block has no terminator")


def check_inputs(f: FuncOp, inputs: Sequence[np.ndarray]) -> None:
    if len(inputs) != len(f.args):
        raise InterpreterError(f"@{f.sym_name} takes {len(f.args)} inputs, got {len(inputs)}")
    names = f.attr("arg_names")
    syms: dict[str, int] = {}
    for i, (a, x) in enumerate(zip(f.args, inputs)):
        label = f"input #{i}" + (f" ({names[i]})" if names else "")
        if x.dtype != a.type.dtype.to_numpy():
            raise InterpreterError(f"{label} has dtype {x.dtype}, expected {a.type.dtype}")
        if len(x.shape) != a.type.rank:
            raise InterpreterError(f"{label} has shape {list(x.shape)}, expected {a.type}")
        for d, n in zip(a.type.shape, x.shape):
            if isinstance(d, Sym):
                if syms.setdefault(d.name, n) != n:
                    raise InterpreterError(f"{label}: symbol {d} is {syms[d.name]} elsewhere, {n}"
                                           " here")
            elif d != n:
                raise InterpreterError(f"{label} has shape {list(x.shape)}, expected {a.type}")


def run(module: Module | FuncOp, inputs: Sequence[np.ndarray], func: str | None = None
        ) -> list[np.ndarray]:
    """Run a function on numpy inputs and return its outputs."""
    f = module if isinstance(module, FuncOp) else module.func(func)
    inputs = [np.asarray(x) for x in inputs]
    # arguments that arrive permuted (``arg_perms``, see passes.layout.permute_arguments): the
    # caller passes the logical tensors
    for k, p in enumerate(f.attr("arg_perms", ())):
        if p and k < len(inputs):
            inputs[k] = np.ascontiguousarray(np.transpose(inputs[k], p))
    check_inputs(f, inputs)
    return run_block(f.body, inputs)


def evaluate_op(op: Operation, args: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Evaluate one op on concrete arguments (used by constant folding)."""
    return IMPLS[op.name](op, list(args))


__all__ = ["InterpreterError", "Value", "evaluate_op", "run", "run_block"]
