"""Passes over the stitch IR. Importing this package registers every pass by name."""

from passes import (  # noqa: F401
    canonicalize,
    classify,
    fusion_apply,
    fusion_plan,
    sink_broadcasts,
    stitch_schedule,
)
from passes.pass_manager import Pass, PassContext, PassManager, parse_pipeline, register_pass

__all__ = ["Pass", "PassContext", "PassManager", "parse_pipeline", "register_pass"]
