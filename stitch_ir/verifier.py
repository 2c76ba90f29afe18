"""The verifier: structural and per-op checks over a whole module.

Checks, in order, for every op: its name is registered; operand / result / region counts match
the op's declaration; required attributes are present and no unknown ones (unless the op is
open); each operand is defined before use in an enclosing scope (SSA dominance for our
single-block regions); result types equal the op's inferred types; then the op's own
``verify_``. Errors are ``VerifyError`` messages naming the op, the problem and its location.
"""

from __future__ import annotations

from stitch_ir import dialects  # noqa: F401 - registers ops
from stitch_ir.core import OP_REGISTRY, Block, FuncOp, Module, Operation, VerifyError


def verify_op_shape(op: Operation) -> None:
    cls = type(op)
    if OP_REGISTRY.get(op.name) is not cls:
        raise op.error("is not a registered op")
    if cls.num_operands is not None and len(op.operands) != cls.num_operands:
        raise op.error(f"expects {cls.num_operands} operands, got {len(op.operands)}")
    if cls.num_results is not None and len(op.results) != cls.num_results:
        raise op.error(f"expects {cls.num_results} results, got {len(op.results)}")
    if len(op.regions) != cls.num_regions:
        raise op.error(f"expects {cls.num_regions} regions, got {len(op.regions)}")
    for key in cls.required_attrs:
        if key not in op.attributes:
            raise op.error(f"requires attribute '{key}'")
    if not cls.open_attrs:
        known = set(cls.required_attrs) | set(cls.optional_attrs)
        for key in op.attributes:
            if key not in known:
                raise op.error(f"has unknown attribute '{key}'")


def _verify_block(block: Block, visible: set[int]) -> None:
    defined = set(visible) | {id(a) for a in block.args}
    for op in block.ops:
        if op.parent is not block:
            raise op.error("has a stale parent link")
        for i, v in enumerate(op.operands):
            if id(v) not in defined:
                raise op.error(f"operand #{i} ({v.type}) is used before it is defined or "
                               "outside its scope")
        verify_op_shape(op)
        for r in op.regions:
            for b in r.blocks:
                _verify_block(b, defined)
        op.verify_types()
        op.verify_()
        defined.update(id(r) for r in op.results)


def verify_func(f: FuncOp) -> None:
    verify_op_shape(f)
    f.verify_()
    _verify_block(f.body, set())


def verify(m: Module) -> None:
    """Raise ``VerifyError`` on the first problem found."""
    names = set()
    for f in m.funcs:
        if f.sym_name in names:
            raise VerifyError(f"function @{f.sym_name} defined twice")
        names.add(f.sym_name)
        verify_func(f)
