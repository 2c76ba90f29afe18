"""``sink-broadcasts``: give every ``st.broadcast`` exactly one user.

A broadcast is an index map, never worth materialising: a kernel reads its (smaller) source
and expands it on the fly. When two consumers share one broadcast, the planner would have to
either fuse them with it or let one kernel write the expanded tensor for the other to read
back. Cloning the broadcast per user removes that false choice; each clone then fuses with its
one consumer (or stays a view in front of a library call).

Input: any module. Output: the same computation, each broadcast result used exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.pass_manager import Pass, PassContext, register_pass
from passes.rewrite import blocks_of
from stitch_ir.core import Module
from stitch_ir.dialects import st


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
        ctx.bump("sink-broadcasts.cloned", cloned)
