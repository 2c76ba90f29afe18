"""print -> parse -> print is the identity, on hypothesis-built random modules.

The strategy builds a random straight-line function from a mix of ops (element-wise, reduce,
layout, constants with awkward floats, dense constants, torch calls with escaped JSON, nested
``fusion.group`` regions, symbolic dims) and checks that the text survives a round trip, that the
parsed module verifies, and that it computes the same outputs under the interpreter.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as hs

from stitch_ir.core import Builder, DenseAttr, FuncOp, Module, ReturnOp
from stitch_ir.dialects import fusion, st
from stitch_ir.interpreter import run
from stitch_ir.parser import parse_module
from stitch_ir.printer import print_module
from stitch_ir.types import DType, Sym, TensorType
from stitch_ir.verifier import verify

AWKWARD_FLOATS = [0.0, -0.0, 1.0, -2.5, 1e-300, 1e300, 0.1, math.inf, -math.inf, 3.0e-45,
                  1 / 3, 123456789.125]

UNARY = [st.NegOp, st.AbsOp, st.ExpOp, st.TanhOp, st.SigmoidOp, st.ErfOp, st.ReluOp]
BINARY = [st.AddOp, st.SubOp, st.MulOp, st.MaximumOp, st.MinimumOp]


@hs.composite
def modules(draw, symbolic: bool = False):
    rank = draw(hs.integers(1, 3))
    shape = tuple(draw(hs.lists(hs.sampled_from([1, 2, 3, 5]), min_size=rank, max_size=rank)))
    if symbolic:
        shape = (Sym("s0"),) + shape[1:]
    t = TensorType(shape, DType.f32)
    n_args = draw(hs.integers(1, 3))
    f = FuncOp.create(draw(hs.sampled_from(["forward", "main", "f_2"])), [t] * n_args)
    b = Builder(f.body)
    vals = list(f.args)
    for _ in range(draw(hs.integers(1, 12))):
        choice = draw(hs.sampled_from(["unary", "binary", "const", "reduce", "permute", "group",
                                       "torch", "cast", "dense"]))
        x = draw(hs.sampled_from(vals))
        if choice == "unary":
            vals.append(b.create(draw(hs.sampled_from(UNARY)), x))
        elif choice == "binary":
            y = draw(hs.sampled_from(vals))
            if y.type == x.type:
                vals.append(b.create(draw(hs.sampled_from(BINARY)), x, y))
        elif choice == "const" and x.type.is_static:
            v = draw(hs.sampled_from(AWKWARD_FLOATS))
            c = b.insert(st.ConstantOp.splat(v, x.type)).result
            vals.append(b.create(st.MulOp, x, c))
        elif choice == "dense" and x.type.is_static:
            arr = np.asarray(draw(hs.lists(hs.floats(-10, 10, width=32), min_size=x.type.numel(),
                                           max_size=x.type.numel())), np.float32)
            c = b.insert(st.ConstantOp.dense(DenseAttr.from_array(arr.reshape(x.type.shape))))
            vals.append(b.create(st.AddOp, x, c.result))
        elif choice == "reduce" and x.type.rank >= 1:
            d = draw(hs.integers(0, x.type.rank - 1))
            cls = draw(hs.sampled_from([st.SumOp, st.MaxOp, st.MeanOp]))
            r = b.create(cls, x, dims=(d,), keepdim=True)
            if x.type.is_static:
                vals.append(b.create(st.SubOp, x, b.create(st.BroadcastOp, r,
                                                           shape=x.type.shape)))
        elif choice == "permute" and x.type.rank >= 2:
            perm = tuple(draw(hs.permutations(range(x.type.rank))))
            vals.append(b.create(st.PermuteOp, x, perm=perm))
        elif choice == "cast":
            y = b.create(st.CastOp, x, dtype=draw(hs.sampled_from([DType.f16, DType.f64])))
            vals.append(b.create(st.CastOp, y, dtype=DType.f32))
        elif choice == "torch" and x.type.is_static:
            # JSON with quotes and backslashes inside a string attribute.
            call = st.TorchCallOp([x], [x.type], {
                "target": "aten.clone.default",
                "args": '{"args": [{"operand": 0}], "kwargs": {}, "note": "q\\"uote\\\\"}'})
            vals.append(b.insert(call).result)
        elif choice == "group":
            g = fusion.GroupOp.create([x], [x.type], kind=draw(hs.sampled_from(["loop", "stitch"])),
                                      schedule="warp_per_row", rows=draw(hs.integers(0, 99)))
            gb = Builder(g.body)
            inner = gb.create(st.ExpOp, g.body.args[0])
            gb.insert(fusion.YieldOp([gb.create(st.NegOp, inner)]))
            b.insert(g)
            vals.append(g.result)
    outs = draw(hs.lists(hs.sampled_from(vals), min_size=1, max_size=3))
    b.insert(ReturnOp(outs))
    return Module([f])


@settings(max_examples=60, deadline=None)
@given(modules())
def test_print_parse_print_is_identity(m):
    verify(m)
    text = print_module(m)
    parsed = parse_module(text)
    verify(parsed)
    assert print_module(parsed) == text


@settings(max_examples=25, deadline=None)
@given(modules(symbolic=True))
def test_roundtrip_with_symbolic_dims(m):
    verify(m)
    text = print_module(m)
    assert "?s0" in text
    assert print_module(parse_module(text)) == text


@settings(max_examples=25, deadline=None)
@given(modules(), hs.integers(0, 2**31 - 1))
def test_parsed_module_computes_the_same(m, seed):
    rng = np.random.default_rng(seed)
    f = m.func()
    inputs = [rng.standard_normal([int(d) for d in a.type.shape]).astype(np.float32)
              for a in f.args]
    want = run(m, inputs)
    got = run(parse_module(print_module(m)), inputs)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)


def test_float_attributes_round_trip_exactly():
    t = TensorType((2,), DType.f64)
    f = FuncOp.create("forward", [])
    b = Builder(f.body)
    outs = [b.insert(st.ConstantOp.splat(v, t)).result for v in AWKWARD_FLOATS + [math.nan]]
    b.insert(ReturnOp(outs))
    m = Module([f])
    parsed = parse_module(print_module(m))
    got = [op.attributes["value"] for op in parsed.func().body.ops[:-1]]
    for want, g in zip(AWKWARD_FLOATS, got):
        assert g == want and math.copysign(1, g) == math.copysign(1, want)
    assert math.isnan(got[-1])


def test_dense_constant_round_trips_bytes():
    arr = np.arange(6, dtype=np.int64).reshape(2, 3) - 3
    attr = DenseAttr.from_array(arr)
    f = FuncOp.create("forward", [])
    b = Builder(f.body)
    c = b.insert(st.ConstantOp.dense(attr)).result
    b.insert(ReturnOp([c]))
    text = print_module(Module([f]))
    assert 'dense<"0x' in text
    (out,) = run(parse_module(text), [])
    np.testing.assert_array_equal(out, arr)
