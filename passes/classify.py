"""Op classification for planning and reports.

Every op belongs to one class: element-wise, broadcast, reduce, layout, gather/scatter,
library (compute-intensive: mm, conv), torch-call, or constant. The first five are the
*memory-intensive* classes that stitch fuses. ``classify`` is a pure function of the op;
``summarize`` counts a module's ops by class.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from passes.pass_manager import Pass, PassContext, register_pass
from stitch_ir.core import Module, Operation
from stitch_ir.dialects import st

ELEMENTWISE, BROADCAST, REDUCE, LAYOUT = "element-wise", "broadcast", "reduce", "layout"
GATHER_SCATTER, LIBRARY, TORCH_CALL, CONSTANT = "gather/scatter", "library", "torch-call", "constant"
CLASSES = (ELEMENTWISE, BROADCAST, REDUCE, LAYOUT, GATHER_SCATTER, LIBRARY, TORCH_CALL, CONSTANT)
MEMORY_INTENSIVE = (ELEMENTWISE, BROADCAST, REDUCE, LAYOUT, GATHER_SCATTER)

_BY_KIND = {
    st.ELEMENTWISE: ELEMENTWISE, st.BROADCAST: BROADCAST, st.REDUCE: REDUCE, st.LAYOUT: LAYOUT,
    st.GATHER: GATHER_SCATTER, st.SCATTER: GATHER_SCATTER, st.LIBRARY: LIBRARY,
    st.TORCH: TORCH_CALL, st.CONSTANT: CONSTANT,
}


def classify(op: Operation) -> str | None:
    """The op's class, or None for structural ops (func.return, fusion.group, yields)."""
    return _BY_KIND.get(getattr(op, "kind", ""))


def is_memory_intensive(op: Operation) -> bool:
    return classify(op) in MEMORY_INTENSIVE


@dataclass
class OpSummary:
    counts: Counter
    torch_call_targets: Counter

    @property
    def memory_intensive(self) -> int:
        return sum(self.counts[c] for c in MEMORY_INTENSIVE)

    def format(self) -> str:
        width = max(len(c) for c in CLASSES)
        lines = [f"  {c:<{width}}  {self.counts[c]:6d}" for c in CLASSES]
        lines.append(f"  {'memory-intensive':<{width}}  {self.memory_intensive:6d}")
        if self.torch_call_targets:
            shown = ", ".join(f"{t} x{n}" for t, n in self.torch_call_targets.most_common())
            lines.append(f"  torch-call targets: {shown}")
        return "\n".join(lines)


def summarize(module: Module) -> OpSummary:
    counts: Counter = Counter({c: 0 for c in CLASSES})
    targets: Counter = Counter()
    for op in module.walk():
        c = classify(op)
        if c is not None:
            counts[c] += 1
        if isinstance(op, st.TorchCallOp):
            targets[op.attributes["target"]] += 1
    return OpSummary(counts, targets)


@register_pass
@dataclass(frozen=True)
class ClassifyPass(Pass):
    """Records the op-class summary in ``ctx.results['classify']``; changes nothing."""

    name = "classify"

    def run(self, module: Module, ctx: PassContext) -> None:
        ctx.results["classify"] = summarize(module)
