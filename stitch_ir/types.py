"""Types of the stitch IR: element types and tensor types with possibly symbolic shapes.

Invariants:
- Every type is frozen and hashable, so types can be compared, used as dict keys and shared.
- A dimension is either a non-negative ``int`` or a ``Sym`` (a named symbolic size such as a
  batch size). Symbols print as ``?name`` and names never contain ``x``, so ``tensor<?s0x8xf32>``
  splits unambiguously on ``x``.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field

import numpy as np


class DType(enum.Enum):
    """Element types. The value is the textual spelling used in the IR."""

    f64 = "f64"
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    i64 = "i64"
    i32 = "i32"
    i16 = "i16"
    i8 = "i8"
    u8 = "u8"
    i1 = "i1"

    @property
    def is_float(self) -> bool:
        return self in (DType.f64, DType.f32, DType.f16, DType.bf16)

    @property
    def is_int(self) -> bool:
        return self in (DType.i64, DType.i32, DType.i16, DType.i8, DType.u8)

    @property
    def is_bool(self) -> bool:
        return self is DType.i1

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    def to_numpy(self) -> np.dtype:
        if self is DType.bf16:
            # numpy has no bfloat16: the interpreter computes bf16 in float32 and rounds
            # results through torch where exactness matters (see interpreter._round_bf16).
            return np.dtype(np.float32)
        return np.dtype(_TO_NUMPY[self])

    @staticmethod
    def from_numpy(dt: np.dtype) -> DType:
        dt = np.dtype(dt)
        for k, v in _TO_NUMPY.items():
            if np.dtype(v) == dt:
                return k
        raise TypeError(f"no stitch dtype for numpy dtype {dt}")

    def __str__(self) -> str:
        return self.value


_ITEMSIZE = {
    DType.f64: 8, DType.f32: 4, DType.f16: 2, DType.bf16: 2, DType.i64: 8, DType.i32: 4,
    DType.i16: 2, DType.i8: 1, DType.u8: 1, DType.i1: 1,
}
_TO_NUMPY = {
    DType.f64: np.float64, DType.f32: np.float32, DType.f16: np.float16, DType.i64: np.int64,
    DType.i32: np.int32, DType.i16: np.int16, DType.i8: np.int8, DType.u8: np.uint8,
    DType.i1: np.bool_,
}

SYM_NAME = re.compile(r"[A-Za-wyz_][A-Za-wyz0-9_]*")


@dataclass(frozen=True, init=False)
class Sym:
    """A symbolic dimension, e.g. a batch size or a sequence length that changes between calls:
    a monomial ``coef * s0 * s1 ...`` (a reshape merging a symbolic batch with a static dim gives
    ``?128*s0``; attention scores over a symbolic length have ``?s1*s1`` elements).

    ``hints`` are the symbols' sizes in the traced example (not part of the type's identity):
    the cost model plans with them; the code generators never bake them into a kernel. In an
    f-string a size is code: the C expression the cpu kernels read it as (their loop bounds and
    index maps are f-strings of sizes); str() is the IR's spelling."""

    factors: tuple[str, ...]  # symbol names, sorted; a repeated name is a power
    coef: int
    hints: tuple[int, ...] = field(compare=False, hash=False)

    def __init__(self, name: str | tuple[str, ...], coef: int = 1, hint: int | tuple = 0):
        factors = (name,) if isinstance(name, str) else tuple(name)
        hints = hint if isinstance(hint, tuple) else (hint,) * len(factors)
        order = sorted(range(len(factors)), key=lambda k: factors[k])
        object.__setattr__(self, "factors", tuple(factors[k] for k in order))
        object.__setattr__(self, "coef", coef)
        object.__setattr__(self, "hints", tuple(hints[k] for k in order))
        for f in self.factors:
            if not SYM_NAME.fullmatch(f):
                raise ValueError(f"invalid symbol name {f!r} (letters, digits, _; no 'x')")
        if coef < 1 or not self.factors:
            raise ValueError(f"a symbolic size needs a symbol and a coefficient >= 1: {coef}")

    @property
    def name(self) -> str:
        """The symbol of a size that is one symbol times a number (raises otherwise)."""
        if len(self.factors) != 1:
            raise TypeError(f"{self} is a product of symbols")
        return self.factors[0]

    @property
    def hint(self) -> int:
        return self.hints[0] if len(self.hints) == 1 else 0

    def __str__(self) -> str:
        return "?" + "*".join(([str(self.coef)] if self.coef != 1 else []) + list(self.factors))

    def __repr__(self) -> str:
        return f"Sym({str(self)[1:]})"

    @property
    def size_hint(self) -> int:
        """The size at the hints (the traced example)."""
        return self.coef * math.prod(self.hints)

    def __mul__(self, k):
        if isinstance(k, Sym):
            return Sym(self.factors + k.factors, self.coef * k.coef, self.hints + k.hints)
        if isinstance(k, int) and not isinstance(k, bool):
            return 0 if k == 0 else Sym(self.factors, self.coef * k, self.hints)
        raise TypeError(f"symbolic size {self} times {k!r}")

    __rmul__ = __mul__

    def __floordiv__(self, k):
        if isinstance(k, int) and k > 0 and self.coef % k == 0:
            return Sym(self.factors, self.coef // k, self.hints)
        if isinstance(k, Sym) and self.coef % k.coef == 0:
            rest = list(self.factors)
            hints = list(self.hints)
            for f in k.factors:
                if f not in rest:
                    break
                j = rest.index(f)
                del rest[j], hints[j]
            else:
                c = self.coef // k.coef
                return Sym(tuple(rest), c, tuple(hints)) if rest else c
        raise TypeError(f"symbolic size {self} divided by {k!r}")

    def value(self, binding: dict[str, int]) -> int:
        """The size when the symbols have the values of ``binding``."""
        return self.coef * math.prod(binding[f] for f in self.factors)

    def __format__(self, spec: str) -> str:
        if spec:
            raise ValueError(f"format spec {spec!r} for a symbolic size")
        terms = ([str(self.coef)] if self.coef != 1 else []) + [f"S_{f}" for f in self.factors]
        return terms[0] if len(terms) == 1 else "(" + " * ".join(terms) + ")"


Dim = int | Sym


@dataclass(frozen=True)
class TensorType:
    """A ranked tensor type: ``tensor<2x?s0x8xf32>``; rank 0 prints as ``tensor<f32>``."""

    shape: tuple[Dim, ...]
    dtype: DType

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        for d in self.shape:
            if isinstance(d, bool) or not isinstance(d, int | Sym):
                raise TypeError(f"bad dimension {d!r} in tensor type")
            if isinstance(d, int) and d < 0:
                raise ValueError(f"negative dimension {d} in tensor type")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int:
        """Number of elements; for a symbolic shape, at its symbols' hints (the cost model plans
        with these); raises when a symbol has no hint."""
        n = 1
        for d in self.shape:
            if isinstance(d, Sym):
                if not d.hint:
                    raise ValueError(f"numel of symbolic type {self} (no size hint)")
                d = d.size_hint
            n *= d
        return n

    def concrete(self, binding: dict[str, int]) -> tuple[int, ...]:
        """The shape when the symbols have the values of ``binding``."""
        return tuple(d.value(binding) if isinstance(d, Sym) else d for d in self.shape)

    @property
    def symbols(self) -> set[str]:
        return {f for d in self.shape if isinstance(d, Sym) for f in d.factors}

    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    def with_shape(self, shape: tuple[Dim, ...]) -> TensorType:
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: DType) -> TensorType:
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        dims = "".join(str(d) + "x" for d in self.shape)
        return f"tensor<{dims}{self.dtype}>"


@dataclass(frozen=True)
class FunctionType:
    inputs: tuple[TensorType, ...]
    outputs: tuple[TensorType, ...]

    def __str__(self) -> str:
        ins = ", ".join(map(str, self.inputs))
        outs = ", ".join(map(str, self.outputs))
        return f"({ins}) -> ({outs})"


def broadcast_shapes(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """Numpy-style broadcast of shapes (right-aligned; 1 stretches). Raises ValueError."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        dim: Dim = 1
        for s in shapes:
            j = i - (rank - len(s))
            if j < 0:
                continue
            d = s[j]
            if d == 1:
                continue
            if dim == 1:
                dim = d
            elif dim != d:
                raise ValueError(f"shapes {shapes} do not broadcast (dim {i}: {dim} vs {d})")
        out.append(dim)
    return tuple(out)


def normalize_dim(dim: int, rank: int) -> int:
    """Wrap a possibly negative axis into [0, rank); raises ValueError when out of range."""
    if not -max(rank, 1) <= dim < max(rank, 1):
        raise ValueError(f"dimension {dim} out of range for rank {rank}")
    return dim % max(rank, 1)
