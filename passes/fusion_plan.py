"""``fusion-plan``: decide which memory-intensive ops fuse into which kernels.

Input: a verified module (canonicalised). Output: the module unchanged, and the decision as
data in ``ctx.results["plan"]`` (a ``FusionPlan`` per function, keyed by name): groups, costs,
solver status and gap, and a reason for every edge left unfused. ``fusion-apply`` applies it.

Options: ``planner`` (none | greedy | stitch), ``time_limit`` seconds for the solver,
``beam`` / ``max_size`` for candidate growth.
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.fusion.plan import PLANNERS, make_plan
from passes.pass_manager import Pass, PassContext, register_pass
from stitch_ir.core import Module


@register_pass
@dataclass(frozen=True)
class FusionPlanPass(Pass):
    name = "fusion-plan"
    planner: str = "stitch"
    time_limit: float = 10.0
    beam: int = 4
    max_size: int = 40

    def run(self, module: Module, ctx: PassContext) -> None:
        if self.planner not in PLANNERS:
            raise ValueError(f"fusion-plan: unknown planner {self.planner!r} "
                             f"(one of {', '.join(PLANNERS)})")
        device = ctx.device()
        plans = ctx.results.setdefault("plan", {})
        for f in module.funcs:
            plans[f.sym_name] = make_plan(f, self.planner, device, time_limit=self.time_limit,
                                          beam=self.beam, max_size=self.max_size)
