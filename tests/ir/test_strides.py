"""stitch_ir.strides: the strides of view ops, checked against torch's own views."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from stitch_ir.core import Builder, FuncOp
from stitch_ir.dialects import st
from stitch_ir.strides import contiguous_strides, view_op_strides, view_strides
from stitch_ir.types import TensorType


def _splits(draw, n: int) -> list[int]:
    """A random factorisation of n into dims (size-1 dims included)."""
    dims = []
    while n > 1:
        f = draw(hs.sampled_from([d for d in range(2, n + 1) if n % d == 0]))
        dims.append(f)
        n //= f
    k = draw(hs.integers(0, 2))
    for _ in range(k):
        dims.insert(draw(hs.integers(0, len(dims))), 1)
    return dims or [1]


@settings(max_examples=150, deadline=None)
@given(hs.data())
def test_view_strides_agree_with_torch(data):
    """Over random shapes (odd and size-1 dims), a permute, an optional step slice and a
    reshape: view_strides gives torch's strides exactly where ``view`` succeeds, and None where
    torch raises (it would copy)."""
    n = data.draw(hs.sampled_from([1, 6, 12, 24, 30, 64, 105]))
    shape = _splits(data.draw, n)
    perm = data.draw(hs.permutations(range(len(shape))))
    x = torch.empty(shape).permute(perm)
    strides = tuple(contiguous_strides(shape)[p] for p in perm)
    assert strides == x.stride()
    new = _splits(data.draw, n)
    try:
        want = x.view(new).stride()
    except RuntimeError:
        want = None
    got = view_strides(x.shape, strides, new)
    assert got == want, (shape, perm, new)


def test_view_op_strides_follow_each_view_op():
    """permute, slice (with a step), broadcast and reshape ops of the IR, against torch."""
    arg = TensorType((2, 128, 4, 64), "f32")
    f = FuncOp.create("f", [arg])
    x = f.body.args[0]
    b = Builder(f.body)
    p = b.create(st.PermuteOp, x, perm=[0, 2, 3, 1]).owner
    r = b.create(st.ReshapeOp, p.result, shape=[8, 64, 128]).owner
    q = b.create(st.PermuteOp, x, perm=[0, 2, 1, 3]).owner
    r2 = b.create(st.ReshapeOp, q.result, shape=[8, 128, 64]).owner
    s = b.create(st.SliceOp, x, dim=1, start=0, end=128, step=3).owner
    one = b.create(st.ReshapeOp, x, shape=[2, 128, 1, 256]).owner
    bc = b.create(st.BroadcastOp, one.result, shape=[3, 2, 128, 5, 256]).owner
    t = torch.empty(2, 128, 4, 64)
    c = contiguous_strides(arg.shape)
    pc = view_op_strides(p, c)
    assert pc == t.permute(0, 2, 3, 1).stride()
    assert view_op_strides(r, pc) is None  # the transposed head split: torch copies it
    assert view_op_strides(r2, view_op_strides(q, c)) is None  # so does the plain one
    assert view_op_strides(s, c) == t[:, ::3].stride()
    oc = view_op_strides(one, c)
    assert oc == t.view(2, 128, 1, 256).stride()
    assert view_op_strides(bc, oc) == t.view(2, 128, 1, 256).expand(3, 2, 128, 5, 256).stride()
