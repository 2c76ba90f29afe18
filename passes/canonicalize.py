"""``canonicalize``: constant folding and removal of no-op layout ops, to a fixpoint.

Input: any verified module. Output: the same function with fewer ops. Every rewrite below keeps
values bit-identical (no ``x + 0 -> x``: it would turn -0.0 into -0.0 instead of 0.0).
Also home of ``cse`` and ``dce``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes.pass_manager import Pass, PassContext, register_pass
from passes.rewrite import Rewriter, apply_patterns, blocks_of, defining_op
from stitch_ir.core import DenseAttr, Module, Operation, Value
from stitch_ir.dialects import st
from stitch_ir.interpreter import evaluate_op

# Fold a computation on constants only while its operands and result stay this small,
# so folding never bloats the module with large dense constants.
FOLD_MAX_ELEMENTS = 1024


def _const(v: Value) -> st.ConstantOp | None:
    op = defining_op(v)
    return op if isinstance(op, st.ConstantOp) else None


def _splat(v: Value):
    c = _const(v)
    return c.attributes["value"] if c is not None and c.is_splat else None


def _make_const(rw: Rewriter, arr: np.ndarray, op: Operation) -> Value:
    t = op.result.type
    flat = arr.reshape(-1)
    if flat.size and (flat == flat[0]).all() and not np.isnan(flat[0]).any():
        scalar = flat[0].item()
        if t.dtype.is_float:
            scalar = float(scalar)
        return rw.insert(st.ConstantOp.splat(scalar, t)).result
    return rw.insert(st.ConstantOp.dense(DenseAttr.from_array(arr, t.dtype))).result


def same_type_noop(op, rw):
    """reshape / broadcast / cast to the type it already has; identity permute; full slice."""
    if isinstance(op, st.ReshapeOp | st.BroadcastOp | st.CastOp):
        if op.operand(0).type == op.result.type:
            return op.operand(0)
    if isinstance(op, st.PermuteOp) and tuple(op.attributes["perm"]) == tuple(
            range(op.result.type.rank)):
        return op.operand(0)
    if isinstance(op, st.SliceOp):
        a = op.attributes
        if a["start"] == 0 and a["step"] == 1 and a["end"] == op.operand(0).type.shape[a["dim"]]:
            return op.operand(0)
    return None


def compose_layout(op, rw):
    """reshape(reshape x) -> reshape x; broadcast(broadcast x) -> broadcast x;
    permute(permute x) -> permute x."""
    if not isinstance(op, st.ReshapeOp | st.BroadcastOp | st.PermuteOp):
        return None
    inner = defining_op(op.operand(0))
    if isinstance(op, st.ReshapeOp) and isinstance(inner, st.ReshapeOp):
        return rw.create(st.ReshapeOp, inner.operand(0), shape=op.attributes["shape"])
    if isinstance(op, st.BroadcastOp) and isinstance(inner, st.BroadcastOp):
        return rw.create(st.BroadcastOp, inner.operand(0), shape=op.attributes["shape"])
    if isinstance(op, st.PermuteOp) and isinstance(inner, st.PermuteOp):
        p, q = op.attributes["perm"], inner.attributes["perm"]
        return rw.create(st.PermuteOp, inner.operand(0), perm=tuple(q[i] for i in p))
    return None


def fold_splat(op, rw):
    """Element-wise and layout ops on splat constants are splat constants."""
    if not op.operands or any(_splat(v) is None for v in op.operands):
        return None
    if isinstance(op, st.BroadcastOp | st.ReshapeOp | st.PermuteOp | st.SliceOp):
        val = _splat(op.operand(0))
    elif getattr(op, "kind", "") == st.ELEMENTWISE:
        ones = [np.full((1,) * v.type.rank, _splat(v), dtype=v.type.dtype.to_numpy())
                for v in op.operands]
        val = evaluate_op(op, ones)[0].reshape(-1)[0].item()
    else:
        return None
    t = op.result.type
    val = float(val) if t.dtype.is_float else (bool(val) if t.dtype.is_bool else int(val))
    return rw.insert(st.ConstantOp.splat(val, t)).result


def fold_small(op, rw):
    """Evaluate ops whose operands are all (small) constants."""
    if not op.operands or op.regions or getattr(op, "kind", "") in (st.TORCH, st.CONSTANT):
        return None
    producers = [defining_op(v) for v in op.operands]
    if any(p is None or getattr(p, "kind", "") != st.CONSTANT for p in producers):
        return None
    if not op.result.type.is_static or op.result.type.numel() > FOLD_MAX_ELEMENTS:
        return None
    if any(v.type.numel() > FOLD_MAX_ELEMENTS for v in op.operands):
        return None
    vals = [evaluate_op(p, [])[0] for p in producers]
    return _make_const(rw, evaluate_op(op, vals)[0], op)


PATTERNS = [same_type_noop, compose_layout, fold_splat, fold_small]


@register_pass
@dataclass(frozen=True)
class CanonicalizePass(Pass):
    name = "canonicalize"
    max_rounds: int = 20

    def run(self, module: Module, ctx: PassContext) -> None:
        ctx.bump("canonicalize.rewrites", apply_patterns(module, PATTERNS, self.max_rounds))
        DCEPass().run(module, ctx)


@register_pass
@dataclass(frozen=True)
class CSEPass(Pass):
    """Common-subexpression elimination within each block (ops without regions or side
    effects; ``st.torch_call`` is left alone since it may draw random numbers)."""

    name = "cse"

    def run(self, module: Module, ctx: PassContext) -> None:
        removed = 0
        for block in list(blocks_of(module)):
            seen: dict[tuple, Operation] = {}
            for op in list(block.ops):
                if op.regions or not op.results or isinstance(op, st.TorchCallOp):
                    continue
                key = (op.name, tuple(id(v) for v in op.operands),
                       tuple(sorted(op.attributes.items(), key=lambda kv: kv[0])),
                       tuple(r.type for r in op.results))
                try:
                    hash(key)
                except TypeError:
                    continue
                prev = seen.get(key)
                if prev is None:
                    seen[key] = op
                    continue
                for r, pr in zip(op.results, prev.results):
                    r.replace_all_uses_with(pr)
                op.erase()
                removed += 1
        ctx.bump("cse.removed", removed)


@register_pass
@dataclass(frozen=True)
class DCEPass(Pass):
    """Dead-code elimination: erase ops none of whose results are used."""

    name = "dce"

    def run(self, module: Module, ctx: PassContext) -> None:
        removed = masked = 0
        for block in list(blocks_of(module)):
            for op in reversed(list(block.ops)):
                if op.results and all(not r.uses for r in op.results):
                    op.erase()
                    removed += 1
                elif isinstance(op, st.TorchCallOp) and _mask_unread_outputs(op):
                    masked += 1
        ctx.bump("dce.removed", removed)
        ctx.bump("dce.masked-outputs", masked)


def _mask_unread_outputs(op: st.TorchCallOp) -> bool:
    """An aten op with an ``output_mask`` (``convolution_backward``, the norms' backwards)
    computes only the outputs something reads: AOTAutograd's partitioner drops an unused
    gradient's node but leaves the mask as traced (the first convolution's input gradient,
    which nothing needs: 0.5 of rzcr's 0.65 ms for that call). The op is replaced by one with
    the mask bit cleared and without the result. True if anything changed."""
    import json

    from stitch_ir.interpreter import resolve_torch_op

    positions = op.attr("outputs")
    if positions is None or all(r.uses for r in op.results):
        return False
    try:
        schema = resolve_torch_op(op.attributes["target"])._schema
    except Exception:  # noqa: BLE001 - not a resolvable aten op: leave it
        return False
    names = [a.name for a in schema.arguments]
    if "output_mask" not in names:
        return False
    k = names.index("output_mask")
    spec = json.loads(op.attributes["args"])
    args = spec.get("args", [])
    if k < len(args):
        mask = args[k]
    elif "output_mask" in spec.get("kwargs", {}):
        mask = spec["kwargs"]["output_mask"]
    else:
        return False
    if not isinstance(mask, list) or not all(isinstance(b, bool) for b in mask):
        return False
    dead = {p for p, r in zip(positions, op.results) if not r.uses and p < len(mask)}
    if not dead:
        return False
    mask[:] = [b and i not in dead for i, b in enumerate(mask)]
    keep = [r for p, r in zip(positions, op.results) if p not in dead]
    new = st.TorchCallOp(list(op.operands), [r.type for r in keep],
                         {**op.attributes, "args": json.dumps(spec),
                          "outputs": [p for p in positions if p not in dead]}, loc=op.loc)
    op.parent.insert_before(op, new)
    for r, nr in zip(keep, new.results):
        r.replace_all_uses_with(nr)
    op.erase()
    return True
