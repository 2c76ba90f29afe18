"""``fusion-plan``: decide which memory-intensive ops fuse into which kernels.

Input: a verified module (canonicalised). Output: the module unchanged, and the decision as
data in ``ctx.results["plan"]`` (a ``FusionPlan`` per function, keyed by name): groups, costs,
solver status and gap, and a reason for every edge left unfused. ``fusion-apply`` applies it.

Options: ``planner`` (none | greedy | stitch), ``time_limit`` seconds for the solver,
``beam`` / ``max_size`` for candidate growth, ``cost_model`` (analytic | learned | auto: the
learned model where one was trained for this machine and won its held-out evaluation, see
``cost_model.learned.resolve``; the plan records which model costed it and why).
"""

from __future__ import annotations

import logging
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
    cost_model: str = "auto"

    def run(self, module: Module, ctx: PassContext) -> None:
        from cost_model.learned import resolve

        if self.planner not in PLANNERS:
            raise ValueError(f"fusion-plan: unknown planner {self.planner!r} "
                             f"(one of {', '.join(PLANNERS)})")
        device = ctx.device()
        choice = resolve(self.cost_model, device)
        if self.cost_model == "learned" and choice.model is None:
            _warn_once(choice.note)
        ctx.results["cost_model"] = choice
        plans = ctx.results.setdefault("plan", {})
        for f in module.funcs:
            plans[f.sym_name] = make_plan(f, self.planner, device, time_limit=self.time_limit,
                                          beam=self.beam, max_size=self.max_size,
                                          cost_model=choice.model, cost_model_note=choice.note)


_warned: set[str] = set()


def _warn_once(note: str) -> None:
    """A learned model was asked for and none fits this machine: say so, once per process."""
    if note not in _warned:
        _warned.add(note)
        logging.getLogger("stitch").warning("stitch: %s", note)
