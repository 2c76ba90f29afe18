"""``st`` op cases for ``test_ops_vs_torch``: gather / scatter, library ops (mm, bmm, addmm,
linear, convolution) and ``st.torch_call``; each registers a property in ``ops_oracle.CASES``."""

from __future__ import annotations

import json

import torch
from hypothesis import assume
from ops_oracle import (  # beside this file: pytest puts its folder on sys.path
    BF16,
    F16,
    F32,
    F64,
    FROM_TORCH,
    I1,
    I32,
    I64,
    Draw,
    case,
    check,
    run_graph,
    run_one,
    tensor_args,
    to_torch,
)

from stitch_ir.dialects import st
from stitch_ir.types import DType, TensorType

# ----------------------------------------------------------------------------------------------
# Gather / scatter

GATHER_DTYPES = (F32, F16, F64, I64, I32, I1)
SCATTER_DTYPES = (F32, F16, F64, I64)
# torch accumulates half scatters in half, one rounding per update; the oracle rounds once
SCATTER_TOL = {F16: (1e-2, 1e-2)}


@case("st.index_select")
def _index_select(d: Draw, name: str):
    dt = d.pick(GATHER_DTYPES, "dtype")
    shape = d.shape(1, 4, max_numel=512)
    dim = d.int(0, len(shape) - 1, "dim")
    idx = d.index((d.pick((0, 1, 3, 7, 13), "n"),), shape[dim])
    x = d.array(shape, dt)
    outs, types = run_one(st.IndexSelectOp, [x, idx], dim=dim, types=[dt, DType.from_numpy(idx.dtype)])
    check(outs, types, torch.index_select(to_torch(x, dt), dim, torch.from_numpy(idx)))


@case("st.embedding")
def _embedding(d: Draw, name: str):
    dt = d.pick((F32, F16, BF16, F64, I64), "dtype")
    v, e = d.pick((1, 3, 7, 13), "vocab"), d.pick((1, 2, 5, 8), "dim")
    w = d.array((v, e), dt)
    idx = d.index(d.shape(0, 3, max_numel=64), v)
    outs, types = run_one(st.EmbeddingOp, [w, idx], [dt, DType.from_numpy(idx.dtype)])
    check(outs, types, torch.nn.functional.embedding(torch.from_numpy(idx), to_torch(w, dt)))


def _index_shape(d: Draw, x_shape: tuple, dim: int) -> tuple:
    """An index shape for gather / scatter: <= x along every dim but ``dim`` (any size there)."""
    return tuple(d.pick((1, 2, 3, 5), "n") if i == dim else d.int(1, s) if s else 0
                 for i, s in enumerate(x_shape))


@case("st.gather")
def _gather(d: Draw, name: str):
    dt = d.pick(GATHER_DTYPES, "dtype")
    shape = d.shape(0, 4, max_numel=256)
    dim = d.int(0, max(len(shape) - 1, 0), "dim")
    size = shape[dim] if shape else 1
    idx = d.index(_index_shape(d, shape, dim) if shape else (), size, I64)
    x = d.array(shape, dt)
    outs, types = run_one(st.GatherOp, [x, idx], [dt, I64], dim=dim)
    check(outs, types, torch.gather(to_torch(x, dt), dim, torch.from_numpy(idx)))


@case("st.index_add")
def _index_add(d: Draw, name: str):
    dt = d.pick(SCATTER_DTYPES, "dtype")
    shape = d.shape(1, 4, max_numel=256)
    dim = d.int(0, len(shape) - 1, "dim")
    n = d.pick((0, 1, 3, 7, 13), "n")
    idx = d.index((n,), shape[dim])
    src_shape = tuple(n if i == dim else s for i, s in enumerate(shape))
    special = d.specials()
    x, src = d.array(shape, dt, special=special), d.array(src_shape, dt, special=special)
    alpha = d.pick([None, 1, 2, -1] + ([2.5, -0.5] if dt.is_float else []), "alpha")
    outs, types = run_one(st.IndexAddOp, [x, idx, src], [dt, DType.from_numpy(idx.dtype), dt],
                          dim=dim, alpha=alpha)
    exp = torch.index_add(to_torch(x, dt), dim, torch.from_numpy(idx), to_torch(src, dt),
                          alpha=1 if alpha is None else alpha)
    check(outs, types, exp, tol=SCATTER_TOL.get(dt))


def _scatter_operands(d: Draw, dt: DType, dist="normal"):
    shape = d.shape(0, 4, max_numel=256)
    dim = d.int(0, max(len(shape) - 1, 0), "dim")
    size = shape[dim] if shape else 1
    ishape = _index_shape(d, shape, dim) if shape else ()
    sshape = tuple(n + d.pick((0, 0, 1, 2), "extra") for n in ishape)  # src may be larger
    idx = d.index(ishape, size, I64)
    lo, hi = (-3, 3) if dist == "near1" else (-20, 20)
    special = d.specials()
    return (dim, d.array(shape, dt, dist, special, lo=lo, hi=hi), idx,
            d.array(sshape, dt, dist, special, lo=lo, hi=hi))


@case("st.scatter_add")
def _scatter_add(d: Draw, name: str):
    dt = d.pick(SCATTER_DTYPES, "dtype")
    dim, x, idx, src = _scatter_operands(d, dt)
    outs, types = run_one(st.ScatterAddOp, [x, idx, src], [dt, I64, dt], dim=dim)
    exp = torch.scatter_add(to_torch(x, dt), dim, torch.from_numpy(idx), to_torch(src, dt))
    check(outs, types, exp, tol=SCATTER_TOL.get(dt))


@case("st.scatter_reduce")
def _scatter_reduce(d: Draw, name: str):
    dt = d.pick(SCATTER_DTYPES, "dtype")
    reduce = d.pick(st.SCATTER_REDUCTIONS, "reduce")
    include_self = d.bool("include_self")
    dim, x, idx, src = _scatter_operands(d, dt, "near1" if reduce == "prod" else "normal")
    outs, types = run_one(st.ScatterReduceOp, [x, idx, src], [dt, I64, dt], dim=dim,
                          reduce=reduce, include_self=include_self)
    exp = torch.scatter_reduce(to_torch(x, dt), dim, torch.from_numpy(idx), to_torch(src, dt),
                               reduce, include_self=include_self)
    check(outs, types, exp, tol=SCATTER_TOL.get(dt))


# ----------------------------------------------------------------------------------------------
# Library ops

LIB_TOL = {F32: (1e-4, 1e-4), F16: (5e-3, 5e-3), F64: (1e-7, 1e-7)}
MM_SIZES = (1, 2, 3, 5, 7, 13)


@case("st.mm")
def _mm(d: Draw, name: str):
    dt = d.pick((F32, F16, F64, I64), "dtype")
    m, k, n = (d.pick(MM_SIZES) for _ in range(3))
    a, b = d.array((m, k), dt, lo=-5, hi=5), d.array((k, n), dt, lo=-5, hi=5)
    outs, types = run_one(st.MatmulOp, [a, b], [dt, dt])
    check(outs, types, torch.mm(to_torch(a, dt), to_torch(b, dt)), tol=LIB_TOL.get(dt))


@case("st.bmm")
def _bmm(d: Draw, name: str):
    dt = d.pick((F32, F16, F64, I64), "dtype")
    bs, m, k, n = (d.pick(MM_SIZES) for _ in range(4))
    a, b = d.array((bs, m, k), dt, lo=-5, hi=5), d.array((bs, k, n), dt, lo=-5, hi=5)
    outs, types = run_one(st.BatchMatmulOp, [a, b], [dt, dt])
    check(outs, types, torch.bmm(to_torch(a, dt), to_torch(b, dt)), tol=LIB_TOL.get(dt))


@case("st.addmm")
def _addmm(d: Draw, name: str):
    dt = d.pick((F32, F16, F64), "dtype")
    m, k, n = (d.pick(MM_SIZES) for _ in range(3))
    bias_shape = d.pick([(m, n), (n,), (1, n), (m, 1), (), (1, 1)], "bias shape")
    alpha, beta = d.pick([None, 1.0, 0.5, -2.0], "alpha"), d.pick([None, 1.0, 0.0, 0.5], "beta")
    a, b = d.array((m, k), dt), d.array((k, n), dt)
    # torch ignores the bias when beta == 0, NaN and inf included
    bias = d.array(bias_shape, dt, special=0.3 if beta == 0 else 0.0)
    outs, types = run_one(st.AddmmOp, [bias, a, b], [dt] * 3, alpha=alpha, beta=beta)
    exp = torch.addmm(to_torch(bias, dt), to_torch(a, dt), to_torch(b, dt),
                      beta=1.0 if beta is None else beta, alpha=1.0 if alpha is None else alpha)
    check(outs, types, exp, tol=LIB_TOL.get(dt))


@case("st.linear")
def _linear(d: Draw, name: str):
    dt = d.pick((F32, F16, F64), "dtype")
    lead = d.shape(0, 2, max_numel=64)
    k, n = d.pick(MM_SIZES, "k"), d.pick(MM_SIZES, "n")
    x, w = d.array(lead + (k,), dt), d.array((n, k), dt)
    args = [x, w] + ([d.array((n,), dt)] if d.bool("bias?") else [])
    outs, types = run_one(st.LinearOp, args, [dt] * len(args))
    exp = torch.nn.functional.linear(*tensor_args(args, [dt] * len(args)))
    check(outs, types, exp, tol=LIB_TOL.get(dt))


@case("st.convolution")
def _convolution(d: Draw, name: str):
    dt = d.pick((F32, F32, F64, F16), "dtype")
    nd = d.int(1, 3, "nd")
    transposed = d.bool("transposed")
    groups = d.int(1, 3, "groups")
    cin, cout = groups * d.int(1, 2, "cin/g"), groups * d.int(1, 2, "cout/g")
    ks = [d.int(1, 3, "k") for _ in range(nd)]
    stride = [d.int(1, 3, "stride") for _ in range(nd)]
    dil = [d.int(1, 2, "dilation") for _ in range(nd)]
    pad = [d.int(0, 2, "padding") for _ in range(nd)]
    # output_padding must be smaller than stride or dilation (torch's rule)
    opad = [d.int(0, max(s, dl) - 1, "output_padding") if transposed else 0
            for s, dl in zip(stride, dil)]
    spatial = [d.int(1, 7 if nd < 3 else 4, "size") for _ in range(nd)]
    for i in range(nd):
        if transposed:
            out = (spatial[i] - 1) * stride[i] - 2 * pad[i] + dil[i] * (ks[i] - 1) + opad[i] + 1
        else:
            out = (spatial[i] + 2 * pad[i] - dil[i] * (ks[i] - 1) - 1) // stride[i] + 1
        assume(out >= 1)
    batch = d.int(1, 2, "batch")
    x = d.array((batch, cin, *spatial), dt)
    wshape = (cin, cout // groups, *ks) if transposed else (cout, cin // groups, *ks)
    w = d.array(wshape, dt)
    args = [x, w] + ([d.array((cout,), dt)] if d.bool("bias?") else [])
    attrs = dict(stride=tuple(stride), padding=tuple(pad), dilation=tuple(dil),
                 transposed=transposed, output_padding=tuple(opad), groups=groups)
    outs, types = run_one(st.ConvolutionOp, args, [dt] * len(args), **attrs)
    ta = tensor_args(args, [dt] * len(args))
    exp = torch.ops.aten.convolution(ta[0], ta[1], ta[2] if len(ta) == 3 else None, stride, pad,
                                     dil, transposed, opad, groups)
    tol = {F16: (1e-2, 1e-2)}.get(dt, LIB_TOL.get(dt))
    check(outs, types, exp, tol=tol)


# ----------------------------------------------------------------------------------------------
# torch_call


def _torch_call_specs(d: Draw):
    """(target, args JSON, operand arrays, operand dtypes) for one drawn torch_call."""
    dt = d.pick((F32, F16, BF16, F64), "dtype")
    shape = d.shape(0, 3, max_numel=256)
    dim = d.int(0, max(len(shape) - 1, 0), "dim")
    x = d.floats(shape, dt, "normal")
    op0 = {"operand": 0}
    targets = ["sort", "cumsum", "add", "full", "clone", "to_copy", "logical_xor"]
    if shape:
        targets += ["topk", "max.dim", "split", "flip"]
    which = d.pick(targets, "target")
    if which == "sort":
        return "aten.sort.default", {"args": [op0, dim, d.bool("descending")]}, [x], [dt]
    if which == "topk":
        k = d.int(1, shape[dim], "k")
        return ("aten.topk.default", {"args": [op0, k, dim],
                                      "kwargs": {"largest": d.bool("largest"), "sorted": True}},
                [x], [dt])
    if which == "cumsum":
        return ("aten.cumsum.default", {"args": [op0, dim], "kwargs": {"dtype": {"dtype":
                                                                                 "float64"}}},
                [x], [dt])
    if which == "max.dim":
        return "aten.max.dim", {"args": [op0, dim, d.bool("keepdim")]}, [x], [dt]
    if which == "split":
        return "aten.split.Tensor", {"args": [op0, d.int(1, 3, "split"), dim]}, [x], [dt]
    if which == "flip":
        return "aten.flip.default", {"args": [op0, {"tuple": [dim]}]}, [x], [dt]
    if which == "add":
        y = d.floats(shape, dt, "normal")
        return ("aten.add.Tensor", {"args": [op0, {"operand": 1}], "kwargs": {"alpha": 2}},
                [x, y], [dt, dt])
    if which == "full":
        return ("aten.full.default", {"args": [list(shape), 1.5], "kwargs": {
            "dtype": {"dtype": "float16"}, "layout": {"layout": "strided"},
            "device": {"device": "cpu"}, "pin_memory": False}}, [], [])
    if which == "clone":
        return ("aten.clone.default", {"args": [op0], "kwargs": {
            "memory_format": {"memory_format": "contiguous_format"}}}, [x], [dt])
    if which == "to_copy":
        return ("aten._to_copy.default", {"args": [op0], "kwargs": {
            "dtype": {"dtype": d.pick(["bfloat16", "float32", "int64"], "to")}}}, [x], [dt])
    b1, b2 = d.array(shape, I1), d.array(shape, I1)
    return ("aten.logical_xor.default", {"args": [op0, {"operand": 1}]}, [b1, b2], [I1, I1])


def _decode(spec, tensors):
    def dec(v):
        if isinstance(v, list):
            return [dec(a) for a in v]
        if isinstance(v, dict):
            if "operand" in v:
                return tensors[v["operand"]]
            if "tuple" in v:
                return tuple(dec(a) for a in v["tuple"])
            (key, val), = v.items()
            return torch.device(val) if key == "device" else getattr(torch, val)
        return v

    return dec(spec.get("args", [])), {k: dec(v) for k, v in spec.get("kwargs", {}).items()}


@case("st.torch_call")
def _torch_call(d: Draw, name: str):
    target, spec, arrays, dts = _torch_call_specs(d)
    tensors = tensor_args(arrays, dts)
    pos, kw = _decode(spec, tensors)
    fn = torch.ops
    for part in target.split("."):
        fn = getattr(fn, part)
    exp = fn(*pos, **kw)
    exp = [t for t in (exp if isinstance(exp, tuple | list) else [exp])]
    rtypes = [TensorType(tuple(t.shape), FROM_TORCH[t.dtype]) for t in exp]
    in_types = [TensorType(a.shape, t) for a, t in zip(arrays, dts)]
    attrs = {"target": target, "args": json.dumps(spec)}
    outs, types = run_graph(in_types, arrays, lambda b, args: b.insert(
        st.TorchCallOp(list(args), rtypes, attrs)).results)
    check(outs, types, exp)
