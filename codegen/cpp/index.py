"""Flat indices of row-major buffers as C++ expressions: ``linearize`` (a multi-index to a flat
index) and ``delinearize`` (back), written so that a loop over merged dims reads through one
contiguous index, not a ``/`` and ``%`` per dim that keeps it from vectorising."""

from __future__ import annotations

import ast
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# Loop variables whose range the writer of a loop nest declared (name -> exclusive upper bound;
# every loop variable starts at 0): ``delinearize`` divides an index that is an affine sum of
# them exactly, instead of writing a ``/`` and ``%`` (``bounded``).
_BOUNDS: ContextVar[dict[str, int] | None] = ContextVar("stitch_index_bounds", default=None)


@contextmanager
def bounded(**names: int) -> Iterator[None]:
    """While a loop nest over ``names`` (each in [0, bound)) is written: ``delinearize`` of an
    index that is a sum of those variables times constants (a tile's ``pt * 32 + ph * 8 + pq``)
    splits it by constants exactly -- ``(pt * 32 + ph * 8 + pq) / 8`` is ``pt * 4 + ph`` and
    ``% 8`` is ``pq`` -- so a loop over ``pq`` reads contiguously, where ``(pt * 32 + pl) / 8``
    made every load of it a gather."""
    token = _BOUNDS.set({**(_BOUNDS.get() or {}), **names})
    try:
        yield
    finally:
        _BOUNDS.reset(token)


def linearize(idx: list[str], shape: list[int]) -> str:
    """The row-major flat index of ``idx`` in ``shape``. A run of dims indexed by
    ``delinearize(lin, run)`` is ``lin`` itself: a reshape's index map read back from a
    buffer of the reshape's operand (``[B, 16, 64, 8]`` read as ``[B, 4, 4, 512]``), or a loop
    over merged dims, then loads through one contiguous index, not a ``/`` and ``%`` per dim
    that keeps the loop from vectorising."""
    nz = [(i, n) for i, n in zip(idx, shape) if n != 1]
    expr = ""
    k = 0
    while k < len(nz):
        term, size, k = _delinearized_run(nz, k)
        expr = term if not expr else f"({expr})*{size} + ({term})"
    return expr or "0"


def _delinearized_run(nz: list[tuple[str, int]], k: int) -> tuple[str, int, int]:
    """(index, size, end): the longest run of ``nz`` from ``k`` that ``delinearize`` made from
    one flat index (that index, the run's size), else ``nz[k]`` alone."""
    for m in range(len(nz), k + 1, -1):
        inner, n = nz[m - 1]
        tail = f") % {n}"
        if not (inner.startswith("(") and inner.endswith(tail)):
            continue
        lin = inner[1:-len(tail)]
        sizes = [s for _, s in nz[k:m]]
        if delinearize(lin, sizes) == [i for i, _ in nz[k:m]]:
            return lin, math.prod(sizes), m
    return nz[k][0], nz[k][1], k + 1


def delinearize(lin: str, shape: list[int]) -> list[str]:
    """The multi-index of flat index ``lin`` in ``shape``, for ``lin`` in [0, prod(shape)) (every
    caller's case): the outermost dim needs no ``% n`` -- an integer modulo in an index defeats
    contiguous vector loads (GPT-2's q/k/v split read ``(i1*64 + i3) % 768``)."""
    exact = _affine(lin)
    out = []
    stride = 1
    outer = next((k for k, n in enumerate(shape) if n != 1), None)
    for k in range(len(shape) - 1, -1, -1):
        n = shape[k]
        split = _split(exact, stride, n if k != outer else None) if exact else None
        if n == 1:
            out.append("0")
        elif split is not None:
            out.append(split)
        elif k == outer:
            out.append(f"({lin}) / {stride}" if stride != 1 else f"({lin})")
        else:
            out.append(f"(({lin}) / {stride}) % {n}" if stride != 1 else f"({lin}) % {n}")
        stride = stride * n
    out.reverse()
    return out


Affine = tuple[dict[str, int], int]  # (variable -> coefficient, constant)


def _affine(expr: str) -> Affine | None:
    """``expr`` as a sum of bounded loop variables (``bounded``) times non-negative constants,
    plus a constant (negative after ``- c``: ``delinearize``'s index is never negative, so the
    floor divisions ``_split`` writes are C's); None for anything else (the caller then writes
    ``/`` and ``%``). Parsed, never evaluated."""
    bounds = _BOUNDS.get()
    if not bounds or not any(name in expr for name in bounds):
        return None
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:  # a C conditional, a cast: not affine
        return None

    def walk(node) -> Affine | None:
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            return {}, node.value
        if isinstance(node, ast.Name) and node.id in bounds:
            return {node.id: 1}, 0
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            a, b = walk(node.left), walk(node.right)
            if a is None or b is None:
                return None
            terms = dict(a[0])
            for name, c in b[0].items():
                terms[name] = terms.get(name, 0) + c
            return terms, a[1] + b[1]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            a, b = walk(node.left), walk(node.right)
            if a is None or b is None:
                return None
            if a[0] and b[0]:
                return None  # a product of two variables
            (terms, c0), k = (a, b[1]) if not b[0] else (b, a[1])
            return {name: c * k for name, c in terms.items()}, c0 * k
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub) and \
                isinstance(node.right, ast.Constant) and type(node.right.value) is int:
            a = walk(node.left)  # an offset into a part of a cat: the index stays >= 0
            return None if a is None else (a[0], a[1] - node.right.value)
        return None

    return walk(tree)


def _split(a: Affine, stride: int, n: int | None) -> str | None:
    """``(a / stride) % n`` (no ``% n`` when n is None) as an affine expression, when it is one
    exactly: the terms of ``a`` below ``stride`` never sum to ``stride`` over the variables'
    ranges, and those of the quotient that ``n`` does not divide stay below ``n``."""
    bounds = _BOUNDS.get()
    terms, c0 = a
    rest = sum(c % stride * (bounds[name] - 1) for name, c in terms.items()) + c0 % stride
    if rest >= stride:
        return None
    q = {name: c // stride for name, c in terms.items() if c // stride}
    q0 = c0 // stride
    if n is not None:
        q = {name: c for name, c in q.items() if c % n}
        q0 %= n
        if sum(c * (bounds[name] - 1) for name, c in q.items()) + q0 >= n:
            return None
    parts = [name if c == 1 else f"{name} * {c}" for name, c in q.items()]
    if q0 or not parts:
        parts.append(str(q0))
    return parts[0] if len(parts) == 1 else f"({' + '.join(parts)})"
