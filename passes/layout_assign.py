"""``layout-assign``: choose, for the element-wise values around channels-last convolutions,
the memory order that moves the fewest bytes across layouts -- an exact minimum cut.

``sink-permutes`` moves a layout change down an element-wise chain only while every operand of
the next op is channels-last (or a splat, or a small broadcast). Where an op mixes a
channels-last operand with one computed in the logical [N, C, H, W] order, the sinking stops
and the op computes NCHW, reading its channels-last operand transposed; so does everything
after it. Training graphs mix this way all the time: a backward's gradient sums meet values
computed from pooled statistics or from NCHW arguments (charformer's CBAM backward kernels
read NHWC buffers and wrote NCHW ones through 32x32 tile transposes at 8-13 GB/s, about a
quarter of the step's kernel time).

With two orders to choose from -- the logical one, or permuted by ``p`` (channels-last, as
the convolutions hold it) -- choosing an order per value is a binary labelling whose costs
are unary (an operand that is held permuted, a user that wants one order) and pairwise (a
producer and a consumer that disagree): the minimum-cost labelling is a minimum s-t cut
(Kolmogorov and Zabih's construction; exact, and a few hundred nodes cut in milliseconds).
Every cost is the bytes of the value read or written across layouts:

- an operand ``permute(a, p)`` (``a`` held channels-last): free if the op computes permuted,
  one transposed read of it if not;
- an operand computed in the logical order by an op outside the choice (a graph argument, a
  library call's result, a reshape): free if the op computes logically, one transposed read if
  permuted;
- a producer and a consumer both chosen here: one transposed read where they disagree;
- splat constants and small broadcasts follow either order for free;
- users: a ``permute(., inverse(p))`` (an operand of the next channels-last convolution)
  folds when the value is held permuted and transposes otherwise; reductions take either order
  (``sink-permutes`` turns their dims); a result the function returns where any memory order
  will do (``layout_free_results``) is a view either way; anything else (a library call, a
  reshape, the function's return) wants the logical order.

An op whose choice is tied keeps the logical order. The chosen ops are rewritten as
``sink-permutes`` rewrites them -- the op on the permuted operands, then ``permute(., p)`` back
for its users -- with one more operand form: a logical-order value becomes ``permute(v,
inverse(p))``, a transposed read in the consuming kernel. Then ``sink-permutes`` runs again
from the new permutes (reductions, reshapes and cats after them) and ``canonicalize`` folds
the pairs that meet. Values are unchanged; only which order each buffer holds.

Input: any module, after ``layout-channels-last,sink-permutes,canonicalize``. Output: the same
function. Run ``canonicalize,cse,dce`` after.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from passes.layout import _unpermuted, sink_from
from passes.pass_manager import Pass, PassContext, register_pass
from passes.rewrite import blocks_of, defining_op
from stitch_ir.core import FuncOp, Module, ReturnOp
from stitch_ir.dialects import st

#: a tie keeps the logical order: flipping must save more than this many bytes per op
TIE_BYTES = 1e-3


def _flexible(op, rank: int) -> bool:
    """Whether ``op`` may compute in either order: a one-result element-wise op of ``rank``
    whose operands all have its shape (splats and broadcasts included)."""
    if not (isinstance(op, st.StOp) and op.kind == st.ELEMENTWISE) or isinstance(op, st.RandOp):
        return False
    if len(op.results) != 1 or not op.operands:
        return False
    out = op.result.type
    return out.rank == rank and out.is_static and \
        all(o.type.shape == out.shape for o in op.operands)


def _free_operand(o) -> bool:
    """A splat constant or a broadcast of a small source: either order costs nothing."""
    d = defining_op(o)
    if isinstance(d, st.ConstantOp) and d.is_splat:
        return True
    return isinstance(d, st.BroadcastOp) and d.operand(0).type.is_static and \
        d.operand(0).type.nbytes() * 8 <= o.type.nbytes()


def choose(block, p: tuple[int, ...], layout_free: frozenset[int] = frozenset()) -> set:
    """The ops of ``block`` (of ``p``'s rank) that should compute permuted by ``p``: the
    minimum cut described in the module docstring."""
    q = st.inverse_perm(p)
    rank = len(p)
    ops = [op for op in block.ops if _flexible(op, rank)]
    flex = set(ops)
    keep_cost = {op: 0.0 for op in ops}  # paid when the op keeps the logical order
    flip_cost = {op: TIE_BYTES for op in ops}  # paid when it computes permuted
    pair = {}
    for op in ops:
        for o in dict.fromkeys(op.operands):
            b = o.type.nbytes()
            d = defining_op(o)
            if d in flex:
                key = (d, op)
                pair[key] = pair.get(key, 0) + b
            elif isinstance(d, st.PermuteOp) and tuple(d.attributes["perm"]) == p:
                keep_cost[op] += b
            elif not _free_operand(o):
                flip_cost[op] += b
        b = op.result.type.nbytes()
        for user in dict.fromkeys(op.result.users):
            if user in flex:
                continue  # counted from the user's side
            if isinstance(user, st.PermuteOp):
                if tuple(user.attributes["perm"]) == q:
                    keep_cost[op] += b
                else:
                    flip_cost[op] += b
            elif isinstance(user, st.ReduceOp) and not isinstance(user, st.ArgReduceOp):
                continue
            elif isinstance(user, ReturnOp) and all(
                    k in layout_free for k, v in enumerate(user.operands) if v is op.result):
                continue
            else:
                flip_cost[op] += b
    if not any(keep_cost.values()):
        return set()  # nothing here is held permuted: every op keeps its order
    g = nx.DiGraph()
    S, T = "permuted", "logical"
    for op in ops:
        g.add_edge(S, op, capacity=keep_cost[op])
        g.add_edge(op, T, capacity=flip_cost[op])
    for (u, v), b in pair.items():
        for a, c in ((u, v), (v, u)):
            cap = g.edges[a, c]["capacity"] + b if g.has_edge(a, c) else b
            g.add_edge(a, c, capacity=cap)
    _, (source_side, _) = nx.minimum_cut(g, S, T)
    return {op for op in source_side if op != S}


def _flip(e, p: tuple[int, ...]):
    """Rewrite element-wise ``e`` to compute permuted by ``p``: operands held permuted are read
    as they are, splats and broadcasts permuted, anything else through ``permute(., q)``;
    ``permute(., p)`` back for the users. The new permute."""
    q = st.inverse_perm(p)
    new, args = [], []
    for o in e.operands:
        built = _unpermuted(o, p, q, e)
        if built is None:  # a value in the logical order: read it transposed
            shape_q = tuple(o.type.shape[i] for i in q)
            t = st.PermuteOp([o], [o.type.with_shape(shape_q)], {"perm": q}, loc=e.loc)
            built = ([t], t.result)
        new += built[0]
        args.append(built[1])
    out = e.result.type
    new.append(type(e)(args, [out.with_shape(tuple(out.shape[i] for i in q))],
                       dict(e.attributes), loc=e.loc))
    new.append(st.PermuteOp([new[-1].result], [out], {"perm": p}, loc=e.loc))
    for n in new:
        e.parent.insert_before(e, n)
    e.result.replace_all_uses_with(new[-1].result)
    e.erase()
    return new[-1]


@register_pass
@dataclass(frozen=True)
class LayoutAssignPass(Pass):
    name = "layout-assign"

    def run(self, module: Module, ctx: PassContext) -> None:
        flipped = 0
        for block in list(blocks_of(module)):
            func = block.parent_op
            free = frozenset(func.attr("layout_free_results", ()) or ()) \
                if isinstance(func, FuncOp) else frozenset()
            for rank in (3, 4):
                p = st.channels_last_perms(rank)[1]
                chosen = choose(block, p, free)
                if not chosen:
                    continue
                made = [_flip(op, p) for op in list(block.ops) if op in chosen]
                flipped += len(made)
                sink_from(made)
        ctx.bump("layout-assign.flipped", flipped)
