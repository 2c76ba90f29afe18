"""The pass manager: pipelines from strings, the verifier after every pass, timing and dumps.

A pipeline string is a comma-separated list of pass names, each optionally followed by options
in braces: ``"canonicalize,cse,fusion-plan{planner=greedy},fusion-apply"``. A pass is a frozen
dataclass whose fields are its options (``Pass.name`` is its kebab-case name); ``run(module,
ctx)`` mutates the module in place and may leave results for later passes in ``ctx``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, TextIO

from stitch_ir.core import Module
from stitch_ir.printer import print_module
from stitch_ir.verifier import verify

PASS_REGISTRY: dict[str, type[Pass]] = {}


class PipelineError(ValueError):
    pass


@dataclass
class PassContext:
    """Explicit state shared along a pipeline (targets, plans, statistics); no globals."""

    target: str = "cpu"
    results: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    # The cost model's spec of the target; resolved (and for the cpu measured once and
    # cached) on first use. Tests pass a fixed spec for deterministic plans.
    device_spec: Any = None

    def device(self) -> Any:
        if self.device_spec is None:
            from cost_model import get_device

            self.device_spec = get_device(self.target)
        return self.device_spec

    def bump(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = ""

    def run(self, module: Module, ctx: PassContext) -> None:
        raise NotImplementedError


def register_pass(cls: type[Pass]) -> type[Pass]:
    if cls.name in PASS_REGISTRY:
        raise ValueError(f"pass {cls.name} registered twice")
    PASS_REGISTRY[cls.name] = cls
    return cls


_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(\{([^}]*)\})?\s*(,|$)")


def _coerce(cls: type[Pass], key: str, text: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        known = ", ".join(fields) or "none"
        raise PipelineError(f"pass '{cls.name}' has no option '{key}' (options: {known})")
    default = fields[key].default
    if isinstance(default, bool):
        if text not in ("true", "false"):
            raise PipelineError(f"option '{key}' of '{cls.name}' must be true or false")
        return text == "true"
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise PipelineError(f"option '{key}' of '{cls.name}' needs a number, got {text!r}") from None
    return text


def parse_pipeline(text: str) -> list[Pass]:
    """``"a,b{k=v k2=v2}"`` -> pass instances; unknown names and options are errors."""
    import passes  # noqa: F401 - registers every pass

    out: list[Pass] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if m is None:
            raise PipelineError(f"cannot parse pipeline at column {pos + 1}: {text[pos:]!r}")
        name, opts = m.group(1), m.group(3)
        cls = PASS_REGISTRY.get(name)
        if cls is None:
            raise PipelineError(f"unknown pass '{name}' (known: {', '.join(sorted(PASS_REGISTRY))})")
        kwargs = {}
        for item in (opts or "").split():
            if "=" not in item:
                raise PipelineError(f"option {item!r} of '{name}' must be key=value")
            k, v = item.split("=", 1)
            kwargs[k] = _coerce(cls, k, v)
        out.append(cls(**kwargs))
        pos = m.end()
    return out


@dataclass
class PassManager:
    passes: list[Pass]
    verify_each: bool = True
    print_ir_after_all: bool = False
    time_passes: bool = False
    out: TextIO = sys.stderr
    timings: list[tuple[str, float]] = field(default_factory=list)

    @staticmethod
    def parse(pipeline: str, **kwargs: Any) -> PassManager:
        return PassManager(parse_pipeline(pipeline), **kwargs)

    def run(self, module: Module, ctx: PassContext | None = None) -> PassContext:
        ctx = ctx or PassContext()
        if self.verify_each:
            verify(module)
        for p in self.passes:
            t0 = time.perf_counter()
            p.run(module, ctx)
            self.timings.append((p.name, time.perf_counter() - t0))
            if self.verify_each:
                try:
                    verify(module)
                except Exception as e:
                    raise type(e)(f"after pass '{p.name}': {e}") from e
            if self.print_ir_after_all:
                print(f"// -----// IR Dump After {p.name} //----- //", file=self.out)
                print(print_module(module), file=self.out)
        if self.time_passes:
            self.report_timings()
        return ctx

    def report_timings(self) -> None:
        total = sum(t for _, t in self.timings) or 1e-12
        print("===-------------------------------------------===", file=self.out)
        print("  Pass execution timing report", file=self.out)
        print(f"  Total: {total * 1e3:.2f} ms", file=self.out)
        for name, t in self.timings:
            print(f"  {t * 1e3:9.2f} ms ({100 * t / total:5.1f}%)  {name}", file=self.out)
