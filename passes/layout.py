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

Input: any module. Output: the same function; every 4-d, non-transposed ``st.convolution`` whose
input is not a function argument of rank < 4 has ``channels_last``. Run ``canonicalize`` after.
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.pass_manager import Pass, PassContext, register_pass
from passes.rewrite import blocks_of
from stitch_ir.core import Module
from stitch_ir.dialects import st

TO_LAST = (0, 2, 3, 1)
TO_FIRST = (0, 3, 1, 2)


@register_pass
@dataclass(frozen=True)
class ChannelsLastPass(Pass):
    name = "layout-channels-last"

    def run(self, module: Module, ctx: PassContext) -> None:
        done = 0
        for block in list(blocks_of(module)):
            for op in list(block.ops):
                if not isinstance(op, st.ConvolutionOp) or op.attr("channels_last", False) or \
                        op.attributes["transposed"] or op.result.type.rank != 4:
                    continue
                x = op.operand(0)
                xp = st.PermuteOp([x], [x.type.with_shape(tuple(x.type.shape[i] for i in TO_LAST))],
                                  {"perm": TO_LAST}, loc=op.loc)
                block.insert_before(op, xp)
                attrs = {**op.attributes, "channels_last": True}
                y = op.result
                out = y.type.with_shape(tuple(y.type.shape[i] for i in TO_LAST))
                conv = st.ConvolutionOp([xp.result, *op.operands[1:]], [out], attrs, loc=op.loc)
                block.insert_before(op, conv)
                back = st.PermuteOp([conv.result], [y.type], {"perm": TO_FIRST}, loc=op.loc)
                block.insert_before(op, back)
                for user, i in list(y.uses):
                    user.set_operand(i, back.result)
                op.erase()
                done += 1
        ctx.bump("layout-channels-last.convolutions", done)
