"""Types of the stitch IR: element types and tensor types with possibly symbolic shapes.

Invariants:
- Every type is frozen and hashable, so types can be compared, used as dict keys and shared.
- A dimension is either a non-negative ``int`` or a ``Sym`` (a named symbolic size such as a
  batch size). Symbols print as ``?name`` and names never contain ``x``, so ``tensor<?s0x8xf32>``
  splits unambiguously on ``x``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Sym:
    """A symbolic dimension, e.g. a batch size that changes between calls."""

    name: str

    def __post_init__(self) -> None:
        if not SYM_NAME.fullmatch(self.name):
            raise ValueError(f"invalid symbol name {self.name!r} (letters, digits, _; no 'x')")

    def __str__(self) -> str:
        return f"?{self.name}"


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
        """Number of elements; raises for a symbolic shape."""
        n = 1
        for d in self.shape:
            if not isinstance(d, int):
                raise ValueError(f"numel of symbolic type {self}")
            n *= d
        return n

    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    def with_shape(self, shape: tuple[Dim, ...]) -> TensorType:
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: DType) -> TensorType:
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        dims = "".join(f"{d}x" for d in self.shape)
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
