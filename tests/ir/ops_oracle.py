"""The oracle behind ``test_ops_vs_torch``: builds a small module around one ``st`` op, runs it
with the numpy reference interpreter and compares every result with torch (dtype, shape, values
with NaN positions equal, tolerances per dtype), and draws the shapes and values (``Draw``).

``CASES`` maps each ``st`` op name to its hypothesis property; ``case(name)`` registers one. The
cases live in ``test_ops_vs_torch`` (element-wise, reductions, layout, creation) and
``ops_cases_index_library`` (gather / scatter, library ops, ``st.torch_call``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import hypothesis.strategies as hs
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stitch_ir.core import (  # noqa: E402
    OP_REGISTRY,
    Builder,
    FuncOp,
    Module,
    ReturnOp,
)
from stitch_ir.dialects import st  # noqa: E402
from stitch_ir.interpreter import run  # noqa: E402
from stitch_ir.types import DType, TensorType  # noqa: E402
from stitch_ir.verifier import verify  # noqa: E402

torch.set_num_threads(1)


EXAMPLES = int(os.environ.get("STITCH_OPS_EXAMPLES", "30"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])

F32, F16, BF16, F64 = DType.f32, DType.f16, DType.bf16, DType.f64
I64, I32, I16, I8, U8, I1 = DType.i64, DType.i32, DType.i16, DType.i8, DType.u8, DType.i1

FLOATS = (F32, F16, BF16, F64)
INTS = (I64, I32, I16, I8, U8)
POOLS = {
    "float": FLOATS,
    "int": INTS,
    "bool": (I1,),
    "number": FLOATS + INTS,
    "intbool": INTS + (I1,),
    "any": FLOATS + INTS + (I1,),
}
TORCH = {
    F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16, F64: torch.float64,
    I64: torch.int64, I32: torch.int32, I16: torch.int16, I8: torch.int8,
    U8: torch.uint8, I1: torch.bool,
}
FROM_TORCH = {v: k for k, v in TORCH.items()}
# (rtol, atol) per result dtype; integers and booleans compare exactly.
TOL = {F64: (1e-7, 1e-7), F32: (1e-5, 1e-5), F16: (1e-3, 1e-3), BF16: (1.6e-2, 1e-2)}

SIZES = (1, 3, 7, 13, 2, 5)
SPECIALS = np.array([np.nan, np.nan, np.nan, np.inf, -np.inf, np.inf, -np.inf, 0.0, -0.0, 0.5,
                     -0.5, 1.5, 2.5, -2.5, 1.0, -1.0])


# ----------------------------------------------------------------------------------------------
# Building, running, comparing


def run_graph(in_types: list[TensorType], inputs: list[np.ndarray],
              build: Callable) -> tuple[list[np.ndarray], list[TensorType]]:
    """Build ``forward(in_types)`` whose body ``build(builder, args)`` makes, verify and run it.

    Checks that every output has its result type's numpy dtype and shape.
    """
    f = FuncOp.create("forward", in_types)
    b = Builder(f.body)
    outs = build(b, f.args)
    outs = list(outs) if isinstance(outs, list | tuple) else [outs]
    b.insert(ReturnOp(outs))
    m = Module([f])
    verify(m)
    res = run(m, inputs)
    assert len(res) == len(outs)
    for r, v in zip(res, outs):
        assert isinstance(r, np.ndarray), f"interpreter gave {type(r).__name__} for {v.type}"
        assert r.dtype == v.type.dtype.to_numpy(), f"interpreter gave {r.dtype} for {v.type}"
        assert r.shape == tuple(v.type.shape), f"interpreter gave shape {r.shape} for {v.type}"
    return res, [v.type for v in outs]


def run_one(cls, inputs: list[np.ndarray], types: list[DType] | None = None, **attrs):
    """One op on function arguments (types default to the arrays' dtypes)."""
    types = types or [DType.from_numpy(a.dtype) for a in inputs]
    in_types = [TensorType(a.shape, t) for a, t in zip(inputs, types)]
    return run_graph(in_types, inputs, lambda b, args: b.create(cls, *args, **attrs))


def to_torch(a: np.ndarray, dt: DType) -> torch.Tensor:
    t = torch.from_numpy(np.array(a, copy=True))
    return t.to(torch.bfloat16) if dt is BF16 else t


def check(outs: list[np.ndarray], types: list[TensorType], expected, tol=None,
          atol_scale: float = 1.0) -> None:
    """Interpreter results equal torch's: result types are torch's dtypes and shapes."""
    expected = list(expected) if isinstance(expected, list | tuple) else [expected]
    assert len(outs) == len(expected)
    for i, (o, t, e) in enumerate(zip(outs, types, expected)):
        assert e.dtype == TORCH[t.dtype], f"result #{i}: inferred {t}, torch gives {e.dtype}"
        assert tuple(t.shape) == tuple(e.shape), \
            f"result #{i}: inferred {t}, torch gives shape {list(e.shape)}"
        rtol, atol = tol if tol is not None else TOL.get(t.dtype, (0.0, 0.0))
        if not t.dtype.is_float:
            rtol = atol = 0.0
        torch.testing.assert_close(to_torch(o, t.dtype), e, rtol=rtol, atol=atol * atol_scale,
                                   equal_nan=True, msg=lambda m, i=i: f"result #{i}: {m}")


# ----------------------------------------------------------------------------------------------
# Drawing shapes and values


class Draw:
    """Structure from hypothesis (so examples shrink), values from a seeded numpy generator."""

    def __init__(self, data):
        self.data = data
        self.rng = np.random.default_rng(data.draw(hs.integers(0, 2**32 - 1), label="seed"))

    def __call__(self, strategy, label=None):
        return self.data.draw(strategy, label=label)

    def int(self, lo: int, hi: int, label=None) -> int:
        return self(hs.integers(lo, hi), label)

    def bool(self, label=None) -> bool:
        return self(hs.booleans(), label)

    def pick(self, seq, label=None):
        return self(hs.sampled_from(list(seq)), label)

    def dtype(self, pool: str) -> DType:
        return self.pick(POOLS[pool], "dtype")

    def shape(self, min_rank=0, max_rank=4, max_numel=1024, sizes=SIZES, empty=False) -> tuple:
        """A shape; with ``empty``, one dim is 0 in about one example in ten."""
        rank = self.int(min_rank, max_rank)
        shape, n = [], 1
        for _ in range(rank):
            d = self.pick([s for s in sizes if n * max(s, 1) <= max_numel] or [1])
            shape.append(d)
            n *= max(d, 1)
        if empty and shape and self.rng.random() < 0.1:
            shape[self.rng.integers(0, rank)] = 0
        return tuple(shape)

    def source_shape(self, out: tuple) -> tuple:
        """A shape that numpy-broadcasts to ``out`` (leading dims dropped, some dims 1)."""
        if not self.bool("broadcast?"):
            return out
        k = self.int(0, len(out))
        return tuple(1 if self.rng.random() < 0.4 else d for d in out[k:])

    def specials(self) -> float:
        """Probability of a special value per element in this example (none in about half)."""
        return float(self.rng.choice([0.0, 0.0, 0.1, 0.3]))

    def floats(self, shape, dt, dist="normal", special=0.0) -> np.ndarray:
        r = self.rng
        if dist == "normal":
            x = r.standard_normal(shape) * 2
        elif dist == "pos":
            x = np.exp(r.standard_normal(shape) * 1.5)
        elif dist == "gtm1":
            x = r.uniform(-0.99, 4.0, shape)
        elif dist == "halves":
            x = r.integers(-12, 13, shape) / 2 + np.where(r.random(shape) < 0.3,
                                                            r.uniform(-0.2, 0.2, shape), 0)
        elif dist == "near1":
            x = r.uniform(0.8, 1.25, shape) * r.choice([-1.0, 1.0], shape)
        elif dist == "ties":
            x = r.integers(-3, 4, shape) / 2
        elif dist == "wide":
            x = r.standard_normal(shape) * 10.0 ** r.integers(-6, 6, shape)
        elif dist == "huge":  # past every float type's range (and finite values near it)
            x = r.standard_normal(shape) * 10.0 ** r.integers(-40, 300, shape)
        else:
            raise ValueError(dist)
        x = np.asarray(x, np.float64)
        if special:
            mask = np.array(r.random(shape) < special)
            if mask.size:
                mask.flat[r.integers(0, mask.size)] = True  # at least one
            x = np.where(mask, r.choice(SPECIALS, shape), x)
        return as_dtype(x, dt)

    def ints(self, shape, dt, lo=-20, hi=20, nonzero=False) -> np.ndarray:
        if dt is U8:
            lo, hi = max(lo, 0), max(hi, 1)
        x = self.rng.integers(lo, hi + 1, shape)
        if nonzero:
            x = np.where(x == 0, 1, x)
        return np.asarray(x).astype(dt.to_numpy())

    def array(self, shape, dt, dist="normal", special=0.0, lo=-20, hi=20,
              nonzero=False) -> np.ndarray:
        if dt.is_float:
            return self.floats(shape, dt, dist, special)
        if dt.is_bool:
            return np.asarray(self.rng.random(shape) < 0.5)
        return self.ints(shape, dt, lo, hi, nonzero)

    def index(self, shape, size, dt=None) -> np.ndarray:
        """In-range indices (with duplicates) of an index dtype (i64 or i32)."""
        dt = dt or self.pick([I64, I32], "index dtype")
        return np.asarray(self.rng.integers(0, size, shape)).astype(dt.to_numpy())


def as_dtype(x: np.ndarray, dt: DType) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        if dt is BF16:  # bf16 values travel as float32 arrays holding bf16-representable values
            return torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16).float().numpy()
        return np.asarray(x).astype(dt.to_numpy())


def property_test(fn, name: str):
    """A hypothesis property over ``Draw``: ``fn(draw)``."""

    @SETTINGS
    @given(data=hs.data())
    def prop(data):
        fn(Draw(data))

    prop.__name__ = prop.__qualname__ = f"prop[{name}]"
    return prop


CASES: dict[str, Callable[[], None]] = {}


def case(*names: str):
    def deco(fn):
        for n in names:
            CASES[n] = property_test(lambda d, n=n: fn(d, n), n)
        return fn

    return deco


def tensor_args(arrays, dts):
    return [to_torch(a, t) for a, t in zip(arrays, dts)]


def build_broadcast(out_shape):
    """A body builder applying ``op`` to arguments broadcast (via st.broadcast) to out_shape."""

    def make(cls, **attrs):
        def body(b, args):
            vals = [a if tuple(a.type.shape) == tuple(out_shape) else
                    b.create(st.BroadcastOp, a, shape=out_shape) for a in args]
            return b.create(cls, *vals, **attrs)

        return body

    return make


def elementwise(d: Draw, name: str, arrays, dts, ref, out_shape, tol=None, **attrs):
    in_types = [TensorType(a.shape, t) for a, t in zip(arrays, dts)]
    outs, types = run_graph(in_types, arrays, build_broadcast(out_shape)(OP_REGISTRY[name], **attrs))
    exp = ref(*tensor_args(arrays, dts))
    exp = torch.broadcast_to(exp, out_shape)
    check(outs, types, exp, tol=tol)
