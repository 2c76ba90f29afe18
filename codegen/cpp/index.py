"""Flat indices of row-major buffers as C++ expressions: ``linearize`` (a multi-index to a flat
index) and ``delinearize`` (back), written so that a loop over merged dims reads through one
contiguous index, not a ``/`` and ``%`` per dim that keeps it from vectorising."""

from __future__ import annotations

import math


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
    out = []
    stride = 1
    outer = next((k for k, n in enumerate(shape) if n != 1), None)
    for k in range(len(shape) - 1, -1, -1):
        n = shape[k]
        if n == 1:
            out.append("0")
        elif k == outer:
            out.append(f"({lin}) / {stride}" if stride != 1 else f"({lin})")
        else:
            out.append(f"(({lin}) / {stride}) % {n}" if stride != 1 else f"({lin}) % {n}")
        stride = stride * n
    out.reverse()
    return out
