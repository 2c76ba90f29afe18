"""Strides through view ops: which chains of reshapes, permutes, slices and broadcasts a
runtime can make as views of one buffer, and which force a copy.

A value in memory is (shape, strides) in elements. ``view_strides`` is the rule torch's
``view`` follows (ATen's ``computeStride``): a reshape is a view when every run of dims it
merges or splits is contiguous in memory; a transposed head split, [2, 128, 4, 64] permuted to
[2, 4, 64, 128] and reshaped to [8, 64, 128], is not, and ``reshape`` copies it. Static shapes
only (symbolic sizes are taken as views).
"""

from __future__ import annotations

from collections.abc import Sequence

from stitch_ir.dialects import st


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(out))


def view_strides(shape: Sequence[int], strides: Sequence[int],
                 new_shape: Sequence[int]) -> tuple[int, ...] | None:
    """The strides of ``new_shape`` viewing (shape, strides), or None where no view exists."""
    shape, new_shape = [int(n) for n in shape], [int(n) for n in new_shape]
    if 0 in shape or not shape:
        return contiguous_strides(new_shape)
    out = [0] * len(new_shape)
    view_d = len(new_shape) - 1
    base = strides[-1]  # the stride of the current contiguous chunk's innermost dim
    tensor_numel = view_numel = 1
    for d in reversed(range(len(shape))):
        tensor_numel *= shape[d]
        # a chunk ends where the next dim out does not continue it in memory
        if d == 0 or (shape[d - 1] != 1 and strides[d - 1] != tensor_numel * base):
            while view_d >= 0 and (view_numel < tensor_numel or new_shape[view_d] == 1):
                out[view_d] = view_numel * base
                view_numel *= new_shape[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if d > 0:
                base = strides[d - 1]
                tensor_numel = view_numel = 1
    return tuple(out) if view_d == -1 else None


def view_op_strides(op, strides: Sequence[int]) -> tuple[int, ...] | None:
    """The result strides of view op ``op`` (reshape, permute, slice, broadcast) over an operand
    of ``strides``; None where the op would copy. Symbolic shapes are not simulated: the result
    is taken as contiguous (a view, as a runtime would try first)."""
    src, res = op.operand(0).type, op.result.type
    if not (src.is_static and res.is_static):
        return contiguous_strides([1] * res.rank)
    if isinstance(op, st.ReshapeOp):
        return view_strides(src.shape, strides, res.shape)
    if isinstance(op, st.PermuteOp):
        return tuple(strides[p] for p in op.attributes["perm"])
    if isinstance(op, st.SliceOp):
        d, step = op.attributes["dim"], op.attributes["step"]
        return tuple(s * step if k == d else s for k, s in enumerate(strides))
    if isinstance(op, st.BroadcastOp):  # right-aligned; stretched and new dims read stride 0
        lead = res.rank - src.rank
        return tuple(0 if k < lead or (src.shape[k - lead] == 1 and n != 1)
                     else strides[k - lead] for k, n in enumerate(res.shape))
    raise TypeError(f"not a view op: {op.name}")
