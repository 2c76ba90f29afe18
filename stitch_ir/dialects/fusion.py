"""The ``fusion`` dialect: ``fusion.group`` outlines a set of ops that become one kernel.

A group's region has one block whose arguments stand for the group's operands (same types, same
order) and which ends in ``fusion.yield`` of the values the group returns. Its ``kind`` names
the fusion kind (``loop``, ``input``, ``stitch``, ...); ``schedule`` and other attributes are open
so that planning passes can annotate dominant ops, thread mappings and stitch schemes.
"""

from __future__ import annotations

from collections.abc import Sequence

from stitch_ir.core import Block, Operation, Region, register_op
from stitch_ir.types import TensorType


@register_op
class GroupOp(Operation):
    name = "fusion.group"
    num_results = None
    num_regions = 1
    required_attrs = ("kind",)
    open_attrs = True

    @staticmethod
    def create(operands, result_types: Sequence[TensorType], kind: str, **attrs) -> GroupOp:
        body = Block([v.type for v in operands])
        return GroupOp(list(operands), list(result_types), {"kind": kind, **attrs},
                       [Region([body])])

    @property
    def body(self) -> Block:
        return self.regions[0].block

    @property
    def kind(self) -> str:
        return self.attributes["kind"]

    def verify_(self) -> None:
        if len(self.regions[0].blocks) != 1:
            raise self.error("region must have exactly one block")
        body = self.body
        if [a.type for a in body.args] != [v.type for v in self.operands]:
            raise self.error("block argument types must equal the operand types")
        term = body.terminator
        if term is None or term.name != "fusion.yield":
            raise self.error("body must end in 'fusion.yield'")
        if [v.type for v in term.operands] != [r.type for r in self.results]:
            raise self.error("'fusion.yield' operand types must equal the group's result types")
        # Isolated from above: the body only sees its block arguments and its own values.
        inside = {id(a) for a in body.args}
        for op in body.ops:
            for i, v in enumerate(op.operands):
                if id(v) not in inside:
                    raise op.error(f"operand #{i} is defined outside its 'fusion.group'")
            inside.update(id(r) for r in op.results)


@register_op
class YieldOp(Operation):
    name = "fusion.yield"
    num_results = 0

    def verify_(self) -> None:
        owner = self.parent.parent.parent if self.parent and self.parent.parent else None
        if not isinstance(owner, GroupOp):
            raise self.error("must be directly inside 'fusion.group'")
        if self.parent.terminator is not self:
            raise self.error("must be the last op of its block")
