"""Passes over the stitch IR. Importing this package registers every pass by name."""

from passes import (  # noqa: F401
    canonicalize,
    classify,
    fusion_apply,
    fusion_plan,
    layout,
    layout_assign,
    sink_broadcasts,
    split_variance,
    stitch_schedule,
)
from passes.pass_manager import Pass, PassContext, PassManager, parse_pipeline, register_pass


def pipeline(planner: str = "stitch", time_limit: float | None = None, channels_last: bool = False,
             cost_model: str | None = None, **schedule: str) -> str:
    """The compile pipeline every entry point runs (``stitchc``, ``compile_program``, the
    ``torch.compile`` backend, the GPU graph): canonicalise, turn 1x1 convolutions over 1x1 maps
    into ``linear`` (``pooled-conv-linear``), hold cpu flash attention's results in the memory
    order torch answers in (``attention-layouts``), split variances that keep the innermost dim
    into two column reductions (``split-column-variance``), optionally run convolutions channels-last
    (``layout-channels-last``, then ``sink-permutes`` and ``layout-assign``), plan
    (``cost_model``: analytic | learned | auto, the planner's default), apply, schedule
    (``schedule``: options of ``stitch-schedule``, e.g. ``gpu_codegen``)."""
    plan = f"planner={planner}" + (f" time_limit={time_limit}" if time_limit is not None else "")
    plan += f" cost_model={cost_model}" if cost_model else ""
    opts = " ".join(f"{k}={v}" for k, v in schedule.items())
    return ",".join(["canonicalize,cse,dce,pooled-conv-linear,attention-layouts,"
                     "split-column-variance,canonicalize,cse",
                     *(["layout-channels-last,sink-permutes,canonicalize,layout-assign,"
                        "canonicalize,cse,dce"] if channels_last else []),
                     "sink-broadcasts", f"fusion-plan{{{plan}}}", "fusion-apply",
                     f"stitch-schedule{{{opts}}}" if opts else "stitch-schedule"])


__all__ = ["Pass", "PassContext", "PassManager", "parse_pipeline", "pipeline", "register_pass"]
