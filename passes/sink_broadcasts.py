"""``sink-broadcasts``: give every ``st.broadcast`` exactly one user.

A broadcast is an index map, never worth materialising: a kernel reads its (smaller) source
and expands it on the fly. When two consumers share one broadcast, the planner would have to
either fuse them with it or let one kernel write the expanded tensor for the other to read
back. Cloning the broadcast per user removes that false choice; each clone then fuses with its
one consumer (or stays a view in front of a library call).

Likewise a permute (a channels-last value's permute back to [N, C, *spatial], an attention's
head split) that the function returns where any memory order will do (``layout_free_results``:
a training forward's saved activations) and that other ops read too: the return gets its own
clone, which the planner leaves a view of the permute's operand (``passes.fusion.graph``),
instead of a kernel writing a transposed copy for the return. A returned value that is also
permuted channels-last (the padded input of a convolution) is returned as the permute back of
that channels-last value.

And a batch of matrices transposed for a bmm (an attention's K^T, [B, H, D, S] from a
projection's [B, S, H, D] view) is read as the transposed view of the head split beside it
([B, H, S, D], which the function copies anyway, for another bmm or to return it): the bmm
takes the transpose as its BLAS flag (``passes.fusion.graph``), where the permute had made a
second, transposed copy of the same values -- in a training step's forward for the bmm, and in
its backward for both (bert-tiny: two copy kernels a layer).

Input: any module. Output: the same computation, each broadcast result used exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from passes.pass_manager import Pass, PassContext, register_pass
from passes.rewrite import blocks_of
from stitch_ir.core import Module, OpResult
from stitch_ir.dialects import st
from stitch_ir.strides import contiguous_strides, view_op_strides


@register_pass
@dataclass(frozen=True)
class SinkBroadcastsPass(Pass):
    name = "sink-broadcasts"

    def run(self, module: Module, ctx: PassContext) -> None:
        cloned = 0
        for block in list(blocks_of(module)):
            for op in list(block.ops):
                if not isinstance(op, st.BroadcastOp) or len(op.result.uses) <= 1:
                    continue
                for user, i in list(op.result.uses)[1:]:
                    clone = st.BroadcastOp([op.operand(0)], [op.result.type],
                                           dict(op.attributes), loc=op.loc)
                    user.parent.insert_before(user, clone)
                    user.set_operand(i, clone.result)
                    cloned += 1
        for f in module.funcs:
            ctx.bump("sink-broadcasts.blas-transposes", _transposes_as_blas_flags(f))
            cloned += _clone_returned_permutes(f)
        ctx.bump("sink-broadcasts.cloned", cloned)


def _transposes_as_blas_flags(func) -> int:
    """Read each batch of transposed matrices that only bmms read, ``reshape(permute(x, p))``
    with ``p`` swapping the last two dims of ``x`` or of ``permute(x, a)``, as
    ``permute(reshape(w), (0, 2, 1))`` of the untransposed ``w``: ``x``, a sibling
    ``permute(x, a)``, or a new one where ``a`` keeps ``x``'s innermost dim innermost (a head
    split: its copy moves whole rows, where the transposed copy moved single elements). The bmm
    takes the transposed view as a flag; a training forward that saves the transposed batch for
    its backward (``layout_free_results``) returns that view. Returns how many reshapes were
    rewritten."""
    body = func.body
    order = {id(op): k for k, op in enumerate(body.ops)}
    ret = func.return_op
    free = set(func.attr("layout_free_results", ()))

    def returned_free(v) -> bool:  # returned where any memory order will do (saved for backward)
        return all(k in free for k, w in enumerate(ret.operands) if w is v)

    done = 0
    for op in list(body.ops):
        if not isinstance(op, st.PermuteOp) or op.parent is not body:
            continue
        r = op.result.type.rank
        p = tuple(op.attributes["perm"])
        if r < 3 or not op.result.type.is_static or not op.result.users:
            continue
        swap = tuple(range(r - 2)) + (r - 1, r - 2)
        x = op.operand(0)
        shape = tuple(op.result.type.shape)
        batch = math.prod(shape[:-2])
        readers = list(op.result.users)
        if not all(isinstance(u, st.ReshapeOp) and tuple(u.result.type.shape) == (
                batch, *shape[-2:]) and any(isinstance(m, st.BatchMatmulOp)
                                            for m in u.result.users) and
                all(isinstance(m, st.BatchMatmulOp) or (m is ret and returned_free(u.result))
                    for m in u.result.users) for u in readers):
            continue
        a = tuple(p[s] for s in swap)  # p is permute(x, a), then the swap
        if p == swap:
            base = x
        else:  # a sibling permute(x, a), else a new one: a copy of whole rows of x
            sib = next((u for u in x.users if isinstance(u, st.PermuteOp) and u is not op
                        and u.parent is body and tuple(u.attributes["perm"]) == a), None)
            if sib is not None and order[id(sib)] > order[id(op)]:  # it reads only x: move it up
                body.ops.remove(sib)
                body.insert_before(op, sib)
                order[id(sib)] = order[id(op)]
            if sib is None and a[-1] == r - 1:
                sib = st.PermuteOp([x], [x.type.with_shape(tuple(x.type.shape[i] for i in a))],
                                   {"perm": a}, loc=op.loc)
                body.insert_before(op, sib)
                order[id(sib)] = order[id(op)]
            base = sib.result if sib is not None else None
        if base is None:
            continue
        rows = st.ReshapeOp([base], [op.result.type.with_shape((batch, shape[-1], shape[-2]))],
                            {"shape": (batch, shape[-1], shape[-2])}, loc=op.loc)
        body.insert_before(op, rows)
        flag = st.PermuteOp([rows.result], [readers[0].result.type], {"perm": (0, 2, 1)},
                            loc=op.loc)
        body.insert_before(op, flag)
        for u in readers:
            u.result.replace_all_uses_with(flag.result)
            u.erase()
            done += 1
        op.erase()
    return done


def _copied(op: st.PermuteOp) -> bool:
    """Whether a reshape of the permuted value needs it copied anyway (no strides express it: an
    attention's head split into a bmm). That copy is then the value to return: a view of the
    operand would be copied again where the backward reshapes it."""
    t = op.operand(0).type
    if not t.is_static:
        return False
    strides = view_op_strides(op, contiguous_strides(t.shape))
    return any(isinstance(u, st.ReshapeOp) and view_op_strides(u, strides) is None
               for u in op.result.users)


def _clone_returned_permutes(func) -> int:
    free = set(func.attr("layout_free_results", ()))
    ret = func.return_op
    done = 0
    for k, v in enumerate(ret.operands):
        op = v.owner if isinstance(v, OpResult) else None
        r = v.type.rank
        if k not in free or r < 3 or all(u is ret for u in v.users):
            continue
        to_last, to_first = st.channels_last_perms(r)
        if isinstance(op, st.PermuteOp) and op.parent is func.body and (
                tuple(op.attributes["perm"]) == to_first or not _copied(op)):
            src, perm = op.operand(0), tuple(op.attributes["perm"])
        else:  # a value also read channels-last (by a convolution): return that one's view
            src, perm = next((u.result for u in v.users if isinstance(u, st.PermuteOp) and
                              u.parent is func.body and tuple(u.attributes["perm"]) == to_last),
                             None), to_first
            if src is None:
                continue
        clone = st.PermuteOp([src], [v.type], {"perm": perm}, loc=v.owner.loc if op else None)
        func.body.insert_before(ret, clone)
        for j, w in enumerate(ret.operands):  # every layout-free return of it
            if w is v and j in free:
                ret.set_operand(j, clone.result)
        done += 1
    return done
