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

Input: any module. Output: the same function; every 3-d and 4-d ``st.convolution`` (plain or
transposed) has ``channels_last``. Run ``canonicalize`` after.
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.pass_manager import Pass, PassContext, register_pass
from passes.rewrite import blocks_of
from stitch_ir.core import Module
from stitch_ir.dialects import st


def _perms(rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """[N, C, *spatial] -> [N, *spatial, C], and back."""
    return (0, *range(2, rank), 1), (0, rank - 1, *range(1, rank - 1))


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
                to_last, to_first = _perms(op.result.type.rank)
                x = op.operand(0)
                xp = st.PermuteOp([x], [x.type.with_shape(tuple(x.type.shape[i] for i in to_last))],
                                  {"perm": to_last}, loc=op.loc)
                block.insert_before(op, xp)
                attrs = {**op.attributes, "channels_last": True}
                y = op.result
                out = y.type.with_shape(tuple(y.type.shape[i] for i in to_last))
                conv = st.ConvolutionOp([xp.result, *op.operands[1:]], [out], attrs, loc=op.loc)
                block.insert_before(op, conv)
                back = st.PermuteOp([conv.result], [y.type], {"perm": to_first}, loc=op.loc)
                block.insert_before(op, back)
                for user, i in list(y.uses):
                    user.set_operand(i, back.result)
                op.erase()
                done += 1
        ctx.bump("layout-channels-last.convolutions", done)


@register_pass
@dataclass(frozen=True)
class PooledConvToLinearPass(Pass):
    """``pooled-conv-linear``: a 1x1 convolution over a 1x1 map is a matrix product.

    Squeeze-excitation and CBAM blocks run small MLPs on pooled [N, C, 1, 1] tensors as 1x1
    convolutions; oneDNN spends 50-60 us setting each up (charformer has 20 per call), where
    ``linear`` on the [N, C] rows takes 2-4 us:

        y = conv(x, w, b)   ->   y = reshape(linear(reshape(x, [N, C]), reshape(w, [O, C]), b),
                                             y's shape)

    Only where every spatial size of the input and the kernel is 1, with no padding, one group
    and no transposition (then stride and dilation do not matter, and a channels-last
    [N, 1, 1, C] buffer holds the same bytes as [N, C, 1, 1]). Larger 1x1 convolutions stay
    convolutions: oneDNN's NHWC kernels beat ``linear`` on most of charformer's (2x128x64x64 ->
    16: 0.12 against 0.19 ms).

    Input: any module. Output: the same function with such convolutions as ``st.linear``
    between reshapes; the results agree to rounding (a different summation order)."""

    name = "pooled-conv-linear"

    def run(self, module: Module, ctx: PassContext) -> None:
        done = 0
        for block in list(blocks_of(module)):
            for op in list(block.ops):
                if not _pooled_pointwise(op):
                    continue
                x, w = op.operand(0), op.operand(1)
                n, o, c = x.type.shape[0], w.type.shape[0], w.type.shape[1]
                rows = st.ReshapeOp([x], [x.type.with_shape((n, c))], {"shape": (n, c)}, loc=op.loc)
                mat = st.ReshapeOp([w], [w.type.with_shape((o, c))], {"shape": (o, c)}, loc=op.loc)
                lin = st.LinearOp([rows.result, mat.result, *op.operands[2:]],
                                  [x.type.with_shape((n, o))], {}, loc=op.loc)
                y = op.result
                back = st.ReshapeOp([lin.result], [y.type], {"shape": y.type.shape}, loc=op.loc)
                for new in (rows, mat, lin, back):
                    block.insert_before(op, new)
                for user, i in list(y.uses):
                    user.set_operand(i, back.result)
                op.erase()
                done += 1
        ctx.bump("pooled-conv-linear.convolutions", done)


def _pooled_pointwise(op) -> bool:
    if not isinstance(op, st.ConvolutionOp):
        return False
    a, x, w = op.attributes, op.operand(0).type, op.operand(1).type
    if a["transposed"] or int(a["groups"]) != 1 or any(a["padding"]) or x.rank < 3 or \
            not x.is_static or not w.is_static:
        return False
    spatial = x.shape[1:-1] if a.get("channels_last") else x.shape[2:]
    return all(d == 1 for d in (*spatial, *w.shape[2:]))
