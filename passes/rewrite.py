"""A small pattern-rewrite driver: patterns are data, applied to a fixpoint.

A pattern is a function ``(op, rewriter) -> Value | None``; returning a value replaces the op's
single result with it (the op is erased once unused). Patterns only look at an op and its
operands' defining ops, so applying them walks the IR in order until nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from stitch_ir.core import Block, Builder, Module, Operation, OpResult, Value

Pattern = Callable[[Operation, "Rewriter"], Value | None]


class Rewriter:
    """Creates ops right before the op being rewritten."""

    def __init__(self, block: Block, anchor: Operation):
        self.builder = Builder(block, before=anchor)

    def insert(self, op: Operation) -> Operation:
        return self.builder.insert(op)

    def create(self, cls, *operands, **attrs) -> Value:
        return self.builder.create(cls, *operands, loc=self.builder.before.loc, **attrs)


def defining_op(v: Value) -> Operation | None:
    return v.owner if isinstance(v, OpResult) else None


def blocks_of(module: Module) -> Iterable[Block]:
    def rec(block: Block):
        yield block
        for op in block.ops:
            for r in op.regions:
                for b in r.blocks:
                    yield from rec(b)

    for f in module.funcs:
        yield from rec(f.body)


def apply_patterns(module: Module, patterns: list[Pattern], max_rounds: int = 20) -> int:
    """Apply until no pattern fires (or ``max_rounds``); returns the number of rewrites."""
    total = 0
    for _ in range(max_rounds):
        changed = 0
        for block in list(blocks_of(module)):
            for op in list(block.ops):
                if op.parent is not block or len(op.results) != 1:
                    continue
                for pat in patterns:
                    new = pat(op, Rewriter(block, op))
                    if new is not None and new is not op.result:
                        op.result.replace_all_uses_with(new)
                        op.erase()
                        changed += 1
                        break
        total += changed
        if not changed:
            break
    return total
