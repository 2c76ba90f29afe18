"""The cpu kernels' index maps: ``linearize`` reads a run of dims that ``delinearize`` split from
one flat index as that index (no ``/`` and ``%`` per dim in a vectorised loop), and is exact
either way."""

from __future__ import annotations

import math
import re

from hypothesis import given, settings
from hypothesis import strategies as hs

from codegen.cpp.emit import delinearize, linearize, reshape_index


def _eval(expr: str, env: dict[str, int]) -> int:
    """A C index expression whose divisions are of non-negative ints (``/`` truncates, as ``//``
    does there)."""
    assert re.fullmatch(r"[\w\s()+*/%-]*", expr), expr
    return eval(expr.replace("/", "//"), {}, dict(env))  # noqa: S307 - our own C index text


def test_a_delinearized_run_is_read_as_its_flat_index():
    assert linearize(delinearize("j", [64, 8]), [64, 8]) == "j"
    assert linearize(["i"] + delinearize("j", [64, 8]), [256, 64, 8]) == "(i)*512 + (j)"
    # the merged run between other dims, with size-1 dims inside it
    expr = linearize(["a"] + delinearize("(b*3 + c)", [4, 1, 6]) + ["d"], [2, 4, 1, 6, 5])
    assert "%" not in expr and expr == "((a)*24 + ((b*3 + c)))*5 + (d)"
    # not a delinearization of one index: left as it is
    assert linearize(["(j) / 8", "(k) % 8"], [64, 8]) == "((j) / 8)*8 + ((k) % 8)"


@settings(max_examples=40, deadline=None)
@given(hs.lists(hs.sampled_from([1, 2, 3, 5, 8]), min_size=1, max_size=5), hs.data())
def test_linearize_of_split_indices_is_exact(shape, data):
    """Any prefix, a run split from one flat index, any suffix: the same flat index as the plain
    row-major formula, at every point."""
    k = data.draw(hs.integers(0, len(shape) - 1))
    m = data.draw(hs.integers(k + 1, len(shape)))
    idx = [f"x{d}" for d in range(k)] + delinearize("f", shape[k:m]) + \
        [f"x{d}" for d in range(m, len(shape))]
    expr = linearize(idx, shape)
    for _ in range(10):
        point = [data.draw(hs.integers(0, n - 1)) for n in shape]
        flat = 0
        for d in range(k, m):
            flat = flat * shape[d] + point[d]
        env = {f"x{d}": point[d] for d in range(len(shape))} | {"f": flat}
        want = 0
        for i, n in zip(point, shape):
            want = want * n + i
        assert _eval(expr, env) == want, (expr, env)


def test_a_reshape_read_from_its_operand_buffer_is_contiguous():
    """A [B, 16, 64, 8] buffer read as [B, 4, 4, 512] (a group norm's statistics): the load
    index has no division or modulo."""
    idx = reshape_index(["i", "g", "c", "j"], [3, 4, 4, 512], [3, 16, 64, 8])
    expr = linearize(idx, [3, 16, 64, 8])
    assert "%" not in expr and "/" not in expr, expr
    for i, g, c, j in [(0, 0, 0, 0), (2, 3, 1, 511), (1, 2, 3, 77)]:
        assert _eval(expr, {"i": i, "g": g, "c": c, "j": j}) == ((i * 4 + g) * 4 + c) * 512 + j


def test_bounded_tile_variables_split_exactly():
    """A tile's ``pt * 32 + ph * 8 + pq`` split by a reshape into [8, 8]: with the loop
    variables' ranges declared (``bounded``), the quotient and remainder are affine -- no ``/`` or
    ``%`` -- and without them, or where the ranges do not allow it, the plain form stays."""
    from codegen.cpp.index import bounded

    lin = "(pt * 32 + ph * 8 + pq)"
    assert delinearize(lin, [8, 8])[1] == f"({lin}) % 8"  # nothing declared
    with bounded(pt=2, ph=4, pq=8):
        assert delinearize(lin, [8, 8]) == ["(pt * 4 + ph)", "pq"]
        assert delinearize(lin, [2, 4, 8]) == ["pt", "ph", "pq"]
        assert delinearize(lin, [16, 4]) == [f"({lin}) / 4", f"({lin}) % 4"]  # pq spans 2 rows
        assert delinearize("(i * 32 + pq)", [8, 8])[1] == "((i * 32 + pq)) % 8"  # i unbounded
        assert delinearize("(pt ? 1 : 2)", [2]) == ["((pt ? 1 : 2))"]  # not Python: as before


@settings(max_examples=60, deadline=None)
@given(hs.lists(hs.tuples(hs.integers(1, 6), hs.sampled_from([1, 2, 3, 4, 8, 16, 32])),
                min_size=1, max_size=3),
       hs.integers(0, 5), hs.lists(hs.sampled_from([1, 2, 3, 4, 8]), min_size=1, max_size=4),
       hs.data())
def test_bounded_splits_are_exact(terms, const, shape, data):
    """Whatever the declared ranges, coefficients and split: every dim's expression (simplified
    or not) gives the plain row-major division and remainder at every point in range."""
    from codegen.cpp.index import bounded

    names = [f"v{k}" for k in range(len(terms))]
    lin = " + ".join(f"{n} * {c}" for n, (_, c) in zip(names, terms)) + f" + {const}"
    total = math.prod(shape)
    if sum((b - 1) * c for b, c in terms) + const >= total:
        return  # out of the reshaped dim's range: not a case delinearize is given
    with bounded(**{n: b for n, (b, _) in zip(names, terms)}):
        parts = delinearize(f"({lin})", shape)
    for _ in range(8):
        point = {n: data.draw(hs.integers(0, b - 1)) for n, (b, _) in zip(names, terms)}
        flat = sum(point[n] * c for n, (_, c) in zip(names, terms)) + const
        want, rest = [], flat
        for n in reversed(shape):
            want.append(rest % n)
            rest //= n
        assert [_eval(p, point) for p in parts] == want[::-1], (lin, shape, parts)


@settings(max_examples=60, deadline=None)
@given(hs.lists(hs.tuples(hs.integers(1, 6), hs.sampled_from([1, 2, 4, 8, 16, 32])),
                min_size=1, max_size=3),
       hs.integers(0, 64), hs.lists(hs.sampled_from([1, 2, 3, 4, 8]), min_size=1, max_size=3),
       hs.data())
def test_bounded_splits_of_an_offset_index_are_exact(terms, offset, shape, data):
    """An index into a part of a cat, ``(tile index) - start``, read where it is in range (a
    tile inside that part): its split is the plain row-major division and remainder there."""
    from codegen.cpp.index import bounded

    names = [f"v{k}" for k in range(len(terms))]
    lin = "(" + " + ".join(f"{n} * {c}" for n, (_, c) in zip(names, terms)) + f") - {offset}"
    total = math.prod(shape)
    with bounded(**{n: b for n, (b, _) in zip(names, terms)}):
        parts = delinearize(f"({lin})", shape)
    for _ in range(8):
        point = {n: data.draw(hs.integers(0, b - 1)) for n, (b, _) in zip(names, terms)}
        flat = sum(point[n] * c for n, (_, c) in zip(names, terms)) - offset
        if not 0 <= flat < total:
            continue  # not a point the kernel reads this part at
        want, rest = [], flat
        for n in reversed(shape):
            want.append(rest % n)
            rest //= n
        assert [_eval(p, point) for p in parts] == want[::-1], (lin, shape, parts)


def test_an_offset_tile_index_splits_without_division():
    from codegen.cpp.index import bounded

    with bounded(lt=3, lh=2, lq=16):
        assert delinearize("((lt * 32 + lh * 16 + lq) - 32)", [4, 16]) == \
            ["(lt * 2 + lh + -2)", "lq"]
