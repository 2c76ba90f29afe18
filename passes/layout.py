"""``layout-channels-last``: run 2-d convolutions on channels-last activations.

oneDNN's convolutions are up to 1.8x faster on NHWC than on NCHW here (8x64x32x32, 3x3:
2.7 ms against 4.9 ms, one thread), and Inductor's layout optimisation runs conv nets that way.
In stitch the layout is a rewrite of the graph, not a runtime conversion:

    y = conv(x, w)   ->   xp = permute(x, [0, 2, 3, 1])          (fusible: the producer's kernel
                          yp = conv{channels_last}(xp, w)         writes NHWC directly)
                          y  = permute(yp, [0, 3, 1, 2])          (fusible: consumers read NHWC
                                                                   through an index map)

Between two convolutions, ``permute(permute(yp))`` folds away (``canonicalize``), so a conv net
keeps its activations NHWC; the element-wise, normalisation and pooling kernels around the
convolutions read and write NHWC buffers, and the layout ops cost no pass of their own.

Measured (torch.compile, 2 threads, median of 7 alternating pairs of calls, 2026-11-30, after
transposing kernels stage their tiles): off -> on, inductor for scale: rffs_net 23.4 -> 19.4 ms
(15.2), charformer 24.9 -> 21.7 ms (16.3), attention_round 13.7 -> 13.9 ms, rcrn 17.5 -> 19.0
ms, rzcr 4.7 -> 5.3 ms, visual_lexical 0.62 -> 0.73 ms, torchvision-layout resnet18 (b1, 224)
16.4 -> 18.4 ms (15.5), its width-16 variant (b8, 32) 1.84 -> 2.10 ms. It wins on the two
conv-heaviest workloads and loses elsewhere, and the planner does not weigh a layout yet (the
next step: cost both layouts per convolution chain and keep the cheaper). So
``compile_program`` runs it only when asked (``channels_last=True``), and the torch.compile
backend measures instead: by default (``channels_last="auto"``) it compiles a conv graph both
ways and keeps the one whose first calls ran faster (``runtime.backend._LayoutTrial``).

Transposed convolutions too: oneDNN's are slower still on NCHW here (charformer's 1x1
ConvTranspose 2x32x64x64 -> 16: 0.77 ms NCHW against 0.054 ms NHWC; a 2x2/s2 one over 2x64x32x32:
1.11 against 0.26 ms).

1-d convolutions too (point-cloud nets run their shared MLPs as Conv1d): the runtime runs an
[N, L, C] buffer as a 2-d channels-last convolution of height 1, all views (2x64x1024 -> 64,
k=1: 0.109 ms NCL against 0.065 ms; torch's 1-d path on NLC memory is slower, 0.147 ms).

Training too: a backward graph's ``convolution_backward`` calls (``st.torch_call``) take
channels-last output gradients and inputs and answer a channels-last input gradient
(``operand_perms`` / ``result_perms``); the forward's saved activations reach the backward
channels-last (``permute_arguments``, and ``runtime.backend`` returning them as views), so a
training step keeps one layout end to end. Mixing layouts was oneDNN's slowest case (rzcr's
first 3x3 backward: 2.0 ms NCHW against 0.3 ms channels-last).

Input: any module. Output: the same function; every 3-d and 4-d ``st.convolution`` (plain or
transposed) has ``channels_last``, every 1-d and 2-d ``convolution_backward`` call permuted
operands. Run ``canonicalize`` after.
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.pass_manager import Pass, PassContext, register_pass
from passes.rewrite import blocks_of, defining_op
from stitch_ir.core import BlockArgument, FuncOp, Module
from stitch_ir.dialects import st


def _replace(op, new: list) -> None:
    """Insert ``new`` before ``op``, the last one's result replacing ``op``'s, and erase ``op``."""
    for n in new:
        op.parent.insert_before(op, n)
    op.result.replace_all_uses_with(new[-1].result)
    op.erase()


@register_pass
@dataclass(frozen=True)
class ChannelsLastPass(Pass):
    name = "layout-channels-last"

    def run(self, module: Module, ctx: PassContext) -> None:
        done = 0
        for block in list(blocks_of(module)):
            for op in list(block.ops):
                if not isinstance(op, st.ConvolutionOp) or op.attr("channels_last", False) or \
                        op.result.type.rank not in (3, 4):
                    continue
                to_last, to_first = st.channels_last_perms(op.result.type.rank)
                x, y = op.operand(0), op.result
                xp = st.PermuteOp([x], [x.type.with_shape(tuple(x.type.shape[i] for i in to_last))],
                                  {"perm": to_last}, loc=op.loc)
                out = y.type.with_shape(tuple(y.type.shape[i] for i in to_last))
                conv = st.ConvolutionOp([xp.result, *op.operands[1:]], [out],
                                        {**op.attributes, "channels_last": True}, loc=op.loc)
                back = st.PermuteOp([conv.result], [y.type], {"perm": to_first}, loc=op.loc)
                _replace(op, [xp, conv, back])
                done += 1
            for op in list(block.ops):
                if _convolution_backward(op) is not None:
                    _channels_last_backward(op)
                    done += 1
        ctx.bump("layout-channels-last.convolutions", done)


CONVOLUTION_BACKWARD = "aten.convolution_backward.default"


def _convolution_backward(op) -> tuple[int, int] | None:
    """For a 1-d or 2-d ``convolution_backward`` call not yet channels-last: the operand
    numbers of its output gradient and its input; None for anything else."""
    if not isinstance(op, st.TorchCallOp) or op.attributes["target"] != CONVOLUTION_BACKWARD \
            or op.attr("operand_perms"):
        return None
    g, x, w = (op.arg_operand(k) for k in range(3))
    if g is None or x is None or w is None:
        return None
    tg, tx = op.operand(g).type, op.operand(x).type
    if tg.rank not in (3, 4) or tx.rank != tg.rank or not tg.is_static or not tx.is_static:
        return None
    return g, x


def _channels_last_backward(op) -> None:
    """``convolution_backward`` on channels-last buffers: the output gradient and the input are
    permuted to [N, H, W, C] (the producers' kernels write them so, or the permutes fold into
    the forward's channels-last activations), and the input gradient comes back
    channels-last, permuted to [N, C, H, W] for its users (``sink-permutes`` moves that
    permute down the backward's element-wise chain). oneDNN's backward on NCHW runs its
    slowest path next to channels-last forwards (rzcr, 2x3x128x128 -> 8, 3x3: 2.0 ms NCHW
    against 0.3 ms channels-last)."""
    g, x = _convolution_backward(op)
    to_last = st.channels_last_perms(op.operand(g).type.rank)[0]
    new, operands, perms = [], list(op.operands), [()] * len(op.operands)
    for k in (g, x):
        v = operands[k]
        new.append(st.PermuteOp([v], [v.type.with_shape(tuple(v.type.shape[i] for i in to_last))],
                                {"perm": to_last}, loc=op.loc))
        operands[k], perms[k] = new[-1].result, to_last
    _permute_results(op, {0: to_last}, operands, perms, new)  # the input gradient


def _permute_results(op: st.TorchCallOp, by_position: dict[int, tuple[int, ...]],
                     operands: list | None = None, operand_perms: list | None = None,
                     new: list | None = None) -> None:
    """Replace torch call ``op`` by one whose results at the output positions of
    ``by_position`` are held permuted (``result_perms``: the memory order torch answers in),
    each followed by the permute back to the logical order for its users; ``new`` ops (the
    operands' permutes) go before it."""
    new = list(new or [])
    operands = list(operands or op.operands)
    positions = op.attr("outputs") or tuple(range(len(op.results)))
    types, rperms = [], []
    for pos, r in zip(positions, op.results):
        p = by_position.get(pos, ())
        types.append(r.type.with_shape(tuple(r.type.shape[i] for i in p)) if p else r.type)
        rperms.append(p)
    attrs = {**op.attributes, "result_perms": rperms}
    if operand_perms is not None:
        attrs["operand_perms"] = operand_perms
    call = st.TorchCallOp(operands, types, attrs, loc=op.loc)
    new.append(call)
    for r, nr, p in zip(op.results, call.results, rperms):
        if p:
            back = st.PermuteOp([nr], [r.type], {"perm": st.inverse_perm(p)}, loc=op.loc)
            new.append(back)
            r.replace_all_uses_with(back.result)
        else:
            r.replace_all_uses_with(nr)
    for n in new:
        op.parent.insert_before(op, n)
    op.erase()


FLASH = "aten._scaled_dot_product_flash_attention_for_cpu.default"
FLASH_BACKWARD = "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"
HEADS_INSIDE = (0, 2, 1, 3)  # [B, H, S, D] <-> [B, S, H, D]


@register_pass
@dataclass(frozen=True)
class AttentionLayoutsPass(Pass):
    """``attention-layouts``: cpu flash attention's results in the memory order torch answers.

    Its backward returns the q, k and v gradients [B, H, S, D] with [B, S, H, D] strides (heads
    inside each token, as the projections that made q, k and v hold them), and its forward
    the output so when q came so. A kernel reads contiguous buffers, so each such result was
    copied before the kernel that merges the heads back and sums a bias gradient read it (six
    copies per step in a two-layer BERT's backward). Held [B, S, H, D] (``result_perms``), the
    permute back to [B, H, S, D] folds with the merge's permute (``canonicalize``): the kernel
    reads the buffer as it is, and the matmuls a view of it. Were torch to answer another
    order, the runtime copies, as before.

    Input: any module. Output: the same function; run ``canonicalize`` after."""

    name = "attention-layouts"

    def run(self, module: Module, ctx: PassContext) -> None:
        done = 0
        for block in list(blocks_of(module)):
            for op in list(block.ops):
                if not isinstance(op, st.TorchCallOp) or op.attr("result_perms") or \
                        op.attributes["target"] not in (FLASH, FLASH_BACKWARD):
                    continue
                if op.attributes["target"] == FLASH_BACKWARD:
                    by_position = {k: HEADS_INSIDE for k in range(3)}
                else:  # the output follows q's memory order
                    k = op.arg_operand(0)
                    q = defining_op(op.operand(k)) if k is not None else None
                    if not (isinstance(q, st.PermuteOp) and
                            tuple(q.attributes["perm"]) == HEADS_INSIDE):
                        continue
                    by_position = {0: HEADS_INSIDE}
                positions = op.attr("outputs") or tuple(range(len(op.results)))
                by_position = {p: by_position[p] for p, r in zip(positions, op.results)
                               if p in by_position and r.type.rank == 4}
                if not by_position:
                    continue
                _permute_results(op, by_position)
                done += 1
        ctx.bump("attention-layouts.calls", done)


@register_pass
@dataclass(frozen=True)
class PooledConvToLinearPass(Pass):
    """``pooled-conv-linear``: a 1x1 convolution over a 1x1 map is a matrix product.

    Squeeze-excitation and CBAM blocks run small MLPs on pooled [N, C, 1, 1] tensors as 1x1
    convolutions; oneDNN spends 50-60 us setting each up (charformer has 20 per call), where
    ``linear`` on the [N, C] rows takes 2-4 us:

        y = conv(x, w, b)   ->   y = reshape(linear(reshape(x, [N, C]), reshape(w, [O, C]), b),
                                             y's shape)

    Only where the input's and the result's spatial sizes are all 1, with one group and no
    transposition: stride does not matter then, and of a k x k kernel over a padded 1x1 map
    one tap meets the input (resnet18-tiny's last 3x3 convolutions on 1x1 maps: 72 us each),
    so the weight is sliced to it. Larger 1x1 convolutions stay
    convolutions: oneDNN's NHWC kernels beat ``linear`` on most of charformer's (2x128x64x64 ->
    16: 0.12 against 0.19 ms).

    Input: any module. Output: the same function with such convolutions as ``st.linear``
    between reshapes; the results agree to rounding (a different summation order)."""

    name = "pooled-conv-linear"

    def run(self, module: Module, ctx: PassContext) -> None:
        done = 0
        for block in list(blocks_of(module)):
            for op in list(block.ops):
                taps = _pooled_taps(op)
                if taps is None:
                    continue
                x, w = op.operand(0), op.operand(1)
                n, o, c = x.type.shape[0], w.type.shape[0], w.type.shape[1]
                rows = st.ReshapeOp([x], [x.type.with_shape((n, c))], {"shape": (n, c)}, loc=op.loc)
                new = [rows]
                tap = w
                for i, t in enumerate(taps):  # the one weight tap that meets the input
                    if w.type.shape[2 + i] != 1:
                        shape = list(tap.type.shape)
                        shape[2 + i] = 1
                        new.append(st.SliceOp([tap], [tap.type.with_shape(tuple(shape))],
                                              {"dim": 2 + i, "start": t, "end": t + 1,
                                               "step": 1}, loc=op.loc))
                        tap = new[-1].result
                mat = st.ReshapeOp([tap], [w.type.with_shape((o, c))], {"shape": (o, c)},
                                   loc=op.loc)
                lin = st.LinearOp([rows.result, mat.result, *op.operands[2:]],
                                  [x.type.with_shape((n, o))], {}, loc=op.loc)
                y = op.result
                back = st.ReshapeOp([lin.result], [y.type], {"shape": y.type.shape}, loc=op.loc)
                _replace(op, [*new, mat, lin, back])
                done += 1
        ctx.bump("pooled-conv-linear.convolutions", done)


def _pooled_taps(op) -> tuple[int, ...] | None:
    """For a convolution over a 1x1 map that answers a 1x1 map: the kernel position, per
    spatial dim, that lands on the input (the others read padding); None for any other
    convolution (or one whose every tap reads padding: then it is its bias)."""
    if not isinstance(op, st.ConvolutionOp):
        return None
    a, x, w, y = op.attributes, op.operand(0).type, op.operand(1).type, op.result.type
    if a["transposed"] or int(a["groups"]) != 1 or x.rank < 3 or not x.is_static or \
            not w.is_static or a.get("channels_last"):
        return None
    if any(d != 1 for d in (*x.shape[2:], *y.shape[2:])):
        return None
    taps = []
    for k, p, d in zip(w.shape[2:], a["padding"], a["dilation"]):
        if p % d or p // d >= k:
            return None
        taps.append(p // d)
    return tuple(taps)


@register_pass
@dataclass(frozen=True)
class SinkPermutesPass(Pass):
    """``sink-permutes``: move a layout change down past the element-wise ops and keep-dim
    reductions that read it, so the values between two channels-last convolutions stay
    channels-last.

    ``layout-channels-last`` leaves ``permute(y_nhwc, to NCHW)`` after each convolution; the
    batch norms, activations, residual adds and channel norms after it compute on NCHW values,
    and what a kernel materialises between them is an NCHW buffer -- which the next layer then
    reads transposed (rcrn's upsample + norm + cat kernel read its NCHW input a cache line per
    element, 1.1 ms). Sinking:

        e(permute(a, p), permute(b, p), broadcast(s))  ->  permute(e(a, b, broadcast(s')), p)
        reduce(permute(a, p), dims, keepdim=True)      ->  permute(reduce(a, p[dims]), p)
        cat(permute(a, p), permute(b, p), d)           ->  permute(cat(a, b, p[d]), p)
        slice / pad / index_select(permute(a, p))      ->  permute(the same along a's dims, p)
        reshape(permute(a, p))                         ->  permute(reshape(a), p')
        reduce(permute(a, p), dims)                    ->  permute(reduce(a, p[dims]), p')

    where ``s'`` is the small broadcast source permuted back (a [1, C, 1, 1] parameter becomes
    [1, 1, 1, C]); splat constants take the permuted shape; a reshape moves only when the dims
    it merges or splits are adjacent, in order, in ``a`` too (H and W of an NHWC ``a``: a U-Net's
    nearest upsampling is a reshape, an index_select and a reshape, then a cat with the skip
    connection and a pad). A permute stops at anything else (another reshape, a gather of
    another kind, a library call, a graph output) -- exactly where it stood before when
    nothing could be sunk -- and two that meet (NCHW back to NHWC before the next convolution)
    fold in ``canonicalize``. Values are unchanged; only which layout a buffer holds moves.
    Random ops are not moved (their streams follow the row-major position). Only the permutes
    after channels-last convolutions move (and those sunk from them): an attention's transposes
    stay where the program put them.

    Input: any module (run after ``layout-channels-last``). Output: the same function. Run
    ``canonicalize,cse,dce`` after."""

    name = "sink-permutes"

    def run(self, module: Module, ctx: PassContext) -> None:
        sunk = 0
        for block in list(blocks_of(module)):
            # the layout changes after channels-last convolutions and of permuted arguments
            # (``permute_arguments``), then those sunk from them
            sunk += sink_from([op for op in block.ops if isinstance(op, st.PermuteOp) and
                               _from_channels_last(op)])
        ctx.bump("sink-permutes.sunk", sunk)


def sink_from(work: list) -> int:
    """Sink the permutes ``work`` down their users, and those sunk from them; how many moved."""
    sunk = 0
    while work:
        perm_op = work.pop()
        if perm_op.parent is None:
            continue
        for user in list(dict.fromkeys(perm_op.result.users)):
            new = _sink_through(user, tuple(perm_op.attributes["perm"]))
            if new is not None:
                work.append(new)
                sunk += 1
    return sunk


def permute_arguments(func, perms: dict[int, tuple[int, ...]]) -> None:
    """Arguments that arrive in another memory order: argument ``k`` becomes the caller's
    tensor permuted by ``perms[k]`` -- a channels-last [N, C, H, W] tensor as the contiguous
    [N, H, W, C] it is in memory -- and its uses read ``permute(arg, inverse)``, which kernels
    take as an index map and ``sink-permutes`` moves down. The calling convention is recorded
    in the function's ``arg_perms`` (one permutation per argument, empty for none): callers
    still pass the logical tensors, and whoever runs the function (the interpreter, the
    runtime) applies the permutations first -- as views, free when the memory order is the one
    assumed and copied otherwise, so a guess changes speed, never values.

    A training graph's backward gets the forward's saved activations this way: the forward
    returns channels-last activations as views and reports their strides (see
    ``runtime.backend``), and without this the backward's kernels copied each one back."""
    if not perms:
        return
    conv = [tuple(p) for p in func.attr("arg_perms", ())] or [()] * len(func.args)
    body = func.body
    first = body.ops[0]
    for k, p in sorted(perms.items()):
        a = func.args[k]
        if conv[k] or sorted(p) != list(range(a.type.rank)):
            raise ValueError(f"argument {k}: cannot permute {a.type} by {p}")
        uses = list(a.uses)
        logical = a.type
        a.type = logical.with_shape(tuple(logical.shape[i] for i in p))
        back = st.PermuteOp([a], [logical], {"perm": st.inverse_perm(tuple(p))}, loc=f"arg {k}")
        body.insert_before(first, back)
        for op, i in uses:
            op.set_operand(i, back.result)
        conv[k] = tuple(p)
    func.set_attrs(arg_perms=conv)


def _from_channels_last(op: st.PermuteOp) -> bool:
    """Whether ``op`` turns a channels-last value back into the logical order: the result of
    a channels-last convolution, or an argument that arrives permuted."""
    src = op.operand(0)
    if isinstance(src, BlockArgument):
        func = src.block.parent_op
        perms = func.attr("arg_perms", ()) if isinstance(func, FuncOp) else ()
        return src.index < len(perms) and bool(perms[src.index])
    conv = defining_op(src)
    if isinstance(conv, st.TorchCallOp) and conv.attr("result_perms"):
        return bool(conv.attr("result_perms")[src.index])
    return isinstance(conv, st.ConvolutionOp) and conv.attr("channels_last", False)


def _sink_through(e, p: tuple[int, ...]):
    """Rewrite ``e`` (a user of a ``permute(., p)``) to compute on the unpermuted values and
    permute its result; the new result permute, or None where ``e`` does not qualify."""
    if isinstance(e, st.RandOp) or len(e.results) != 1 or e.parent is None:
        return None
    q = st.inverse_perm(p)
    out = e.result.type
    if not out.is_static:
        return None
    if isinstance(e, st.ReshapeOp):
        return _sink_through_reshape(e, p)
    if isinstance(e, st.ReduceOp) and not e.keepdim and not isinstance(e, st.ArgReduceOp):
        return _sink_through_reduce(e, p)
    if out.rank != len(p):
        return None
    type_q = out.with_shape(tuple(out.shape[i] for i in q))
    src = defining_op(e.operand(0)) if e.operands else None
    first = src.operand(0) if isinstance(src, st.PermuteOp) and \
        tuple(src.attributes["perm"]) == p else None
    if isinstance(e, st.SliceOp | st.PadOp | st.IndexSelectOp) and first is not None:
        # the same rows or padding of the unpermuted value, along its own dims
        a = dict(e.attributes)
        if isinstance(e, st.PadOp):
            a["low"] = tuple(e.attributes["low"][q[j]] for j in range(len(p)))
            a["high"] = tuple(e.attributes["high"][q[j]] for j in range(len(p)))
        else:
            a["dim"] = p[e.attributes["dim"]]
        new = [type(e)([first, *e.operands[1:]], [type_q], a, loc=e.loc)]
    elif isinstance(e, st.BroadcastOp) and first is not None and e.operand(0).type.rank == out.rank:
        # the same unit dims stretched, along the unpermuted value's own dims (a nearest
        # upsampling's [.., H, 1, W, 1] -> [.., H, kh, W, kw])
        new = [st.BroadcastOp([first], [type_q], {"shape": tuple(type_q.shape)}, loc=e.loc)]
    elif isinstance(e, st.CatOp):
        parts = []
        for o in e.operands:
            op = defining_op(o)
            if not (isinstance(op, st.PermuteOp) and tuple(op.attributes["perm"]) == p):
                return None
            parts.append(op.operand(0))
        new = [st.CatOp(parts, [type_q], {"dim": p[e.attributes["dim"]]}, loc=e.loc)]
    elif isinstance(e, st.ReduceOp) and e.keepdim:
        src = defining_op(e.operand(0))
        if not (isinstance(src, st.PermuteOp) and tuple(src.attributes["perm"]) == p):
            return None
        new = [type(e)([src.operand(0)], [type_q],
                       {**e.attributes, "dims": tuple(sorted(p[d] for d in e.dims))}, loc=e.loc)]
    elif e.kind == st.ELEMENTWISE and e.operands and \
            all(o.type.shape == out.shape for o in e.operands):
        built = [_unpermuted(o, p, q, e) for o in e.operands]
        if any(b is None for b in built):
            return None  # nothing was inserted yet
        new = [op for ops, _ in built for op in ops]
        new.append(type(e)([v for _, v in built], [type_q], dict(e.attributes), loc=e.loc))
    else:
        return None
    new.append(st.PermuteOp([new[-1].result], [out], {"perm": p}, loc=e.loc))
    _replace(e, new)
    return new[-1]


def _sink_through_reshape(e: st.ReshapeOp, p: tuple[int, ...]):
    """``reshape(permute(a, p))`` as ``permute(reshape(a), p')`` where the reshape only merges
    or splits dims that are adjacent, in order, in ``a`` too (rcrn's [N, C, H, W] ->
    [N, C, H * W] before an upsampling gather, over an NHWC ``a``); None otherwise."""
    src = defining_op(e.operand(0))
    if not (isinstance(src, st.PermuteOp) and tuple(src.attributes["perm"]) == p):
        return None
    s_in, s_out = tuple(e.operand(0).type.shape), tuple(e.result.type.shape)
    blocks = _reshape_blocks(s_in, s_out)
    if blocks is None:
        return None
    # unit dims have no extent: only the other dims of a block need to be adjacent, in order,
    # among ``a``'s other dims; a block of unit dims goes anywhere
    a_shape = src.operand(0).type.shape
    rank_of = {d: i for i, d in enumerate(d for d in range(len(a_shape)) if a_shape[d] != 1)}
    spans = []
    for ins, outs in blocks:
        ranks = [rank_of[p[k]] for k in ins if s_in[k] != 1]
        if ranks != list(range(ranks[0], ranks[0] + len(ranks)) if ranks else []):
            return None  # the merged dims are not adjacent in memory order
        spans.append((ranks[0] if ranks else -1, outs))
    shape_a, perm, at = [], [0] * len(s_out), {}
    for _, outs in sorted(spans, key=lambda b: b[0]):
        for o in outs:
            at[o] = len(shape_a)
            shape_a.append(s_out[o])
    for o in range(len(s_out)):
        perm[o] = at[o]
    a = src.operand(0)
    r = st.ReshapeOp([a], [a.type.with_shape(tuple(shape_a))], {"shape": tuple(shape_a)},
                     loc=e.loc)
    new = [r, st.PermuteOp([r.result], [e.result.type], {"perm": tuple(perm)}, loc=e.loc)]
    _replace(e, new)
    return new[-1]


def _sink_through_reduce(e: st.ReduceOp, p: tuple[int, ...]):
    """``reduce(permute(a, p), dims)`` without keepdim as ``permute(reduce(a, p[dims]), p')``,
    ``p'`` the order of the dims kept (a channel attention's mean over H and W of an NHWC
    ``a``, a batch norm's statistics over N, H and W: both read ``a`` along its memory)."""
    src = defining_op(e.operand(0))
    if not (isinstance(src, st.PermuteOp) and tuple(src.attributes["perm"]) == p):
        return None
    dims_a = {p[d] for d in e.dims}
    kept_a = [d for d in range(len(p)) if d not in dims_a]
    at = {d: i for i, d in enumerate(kept_a)}
    perm = tuple(at[p[k]] for k in range(len(p)) if k not in e.dims)
    a = src.operand(0)
    r = type(e)([a], [e.result.type.with_shape(tuple(a.type.shape[d] for d in kept_a))],
                {**e.attributes, "dims": tuple(sorted(dims_a))}, loc=e.loc)
    new = [r, st.PermuteOp([r.result], [e.result.type], {"perm": perm}, loc=e.loc)]
    _replace(e, new)
    return new[-1]


def _reshape_blocks(s_in, s_out):
    """The reshape ``s_in -> s_out`` as blocks of adjacent dims with equal products, left to
    right: ``[(in dims, out dims)]`` (unit dims join the block they follow, or the first);
    None for an empty tensor."""
    if 0 in s_in or 0 in s_out:
        return None
    blocks, i, j = [], 0, 0
    while i < len(s_in) and j < len(s_out):
        ins, outs = [i], [j]
        pa, pb = s_in[i], s_out[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ins.append(i)
                pa *= s_in[i]
                i += 1
            else:
                outs.append(j)
                pb *= s_out[j]
                j += 1
        while i < len(s_in) and s_in[i] == 1 and (j == len(s_out) or s_out[j] != 1):
            ins.append(i)
            i += 1
        while j < len(s_out) and s_out[j] == 1 and (i == len(s_in) or s_in[i] != 1):
            outs.append(j)
            j += 1
        blocks.append((ins, outs))
    if i < len(s_in) or j < len(s_out) or not blocks:
        return None
    return blocks


def _unpermuted(o, p, q, e):
    """``o`` (an operand of ``e``) in the unpermuted layout, as (ops to insert, value): nothing
    new for a ``permute(v, p)``; a permuted splat constant, or a broadcast of the small source
    permuted back; None for anything else."""
    op = defining_op(o)
    if isinstance(op, st.PermuteOp) and tuple(op.attributes["perm"]) == p:
        return [], op.operand(0)
    shape_q = tuple(o.type.shape[i] for i in q)
    if isinstance(op, st.ConstantOp) and op.is_splat:
        c = st.ConstantOp.splat(op.attributes["value"], o.type.with_shape(shape_q))
        return [c], c.result
    if isinstance(op, st.BroadcastOp):
        y = op.operand(0)
        if not y.type.is_static:
            return None
        ops = []
        full = (1,) * (len(p) - y.type.rank) + tuple(y.type.shape)
        if y.type.rank != len(p):
            ops.append(st.ReshapeOp([y], [y.type.with_shape(full)], {"shape": full}, loc=e.loc))
            y = ops[-1].result
        yq = tuple(full[i] for i in q)
        ops.append(st.PermuteOp([y], [y.type.with_shape(yq)], {"perm": q}, loc=e.loc))
        ops.append(st.BroadcastOp([ops[-1].result], [o.type.with_shape(shape_q)],
                                  {"shape": shape_q}, loc=e.loc))
        return ops, ops[-1].result
    return None
