"""``stitchc``: the stitch compiler's command line.

    stitchc models                                   list the registered workloads
    stitchc compile --model bert --target cpu --emit ir,plan,svg -o OUT [--fusion greedy]
    stitchc opt FILE.sir -p canonicalize,cse         run passes over textual IR (FileCheck tests)

``compile`` traces the model with torch.export, imports it into ``st``, canonicalises, plans
the fusion (``--fusion none|greedy|stitch``), applies and schedules it, prints a one-screen
summary (ops by class, kernels and bytes before -> after, planner time, solver status and gap)
and writes what ``--emit`` asks for: ``module.sir``, ``plan.json``, ``plan.svg``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

TARGETS = ("cpu", "sm_80", "sm_90")
EMITS = ("ir", "plan", "svg")
CANONICAL = "canonicalize,cse,dce"


def pipeline_for(fusion: str) -> str:
    return f"{CANONICAL},fusion-plan{{planner={fusion}}},fusion-apply,stitch-schedule"


def _write_new(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cmd_models(args: argparse.Namespace) -> int:
    import models

    rows = []
    for name in models.names():
        if args.fast:
            rows.append((name, "", ""))
            continue
        w = models.get(name)
        params = sum(p.numel() for p in w.model.parameters())
        rows.append((name, f"{params:,}", w.config))
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  {'params':>11}  configuration")
    for name, params, config in rows:
        print(f"{name:<{width}}  {params:>11}  {config}")
    return 0


def compile_model(name: str, pipeline: str, target: str, print_ir_after_all: bool = False,
                  time_passes: bool = False):
    """Trace, import and run ``pipeline``; returns (ImportedProgram, PassContext, timings)."""
    import models
    from passes import PassContext, PassManager
    from stitch_ir.importer import import_model

    t0 = time.perf_counter()
    w = models.get(name)
    t1 = time.perf_counter()
    prog = import_model(w.model, w.example_inputs)
    t2 = time.perf_counter()
    pm = PassManager.parse(pipeline, print_ir_after_all=print_ir_after_all,
                           time_passes=time_passes)
    ctx = pm.run(prog.module, PassContext(target=target))
    t3 = time.perf_counter()
    return w, prog, ctx, {"build": t1 - t0, "import": t2 - t1, "passes": t3 - t2}


def cmd_compile(args: argparse.Namespace) -> int:
    from passes.classify import summarize
    from passes.fusion.render import render_svg
    from stitch_ir.printer import print_module

    emits = [e.strip() for e in args.emit.split(",") if e.strip()]
    for e in emits:
        if e not in EMITS:
            raise ValueError(f"--emit {e!r}: choose from {', '.join(EMITS)}")
    pipeline = args.pipeline or pipeline_for(args.fusion)
    w, prog, ctx, times = compile_model(args.model, pipeline, args.target,
                                        args.print_ir_after_all, args.time_passes)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    s = summarize(prog.module)
    print(f"stitchc: {args.model} ({w.paper})")
    print(f"  config   {w.config}")
    print(f"  target   {args.target}    pipeline  {pipeline}")
    print(f"  inputs   {len(prog.user_inputs)} user, {len(prog.constants)} parameters / buffers / "
          "constants")
    print(f"  time     build {times['build']:.2f}s  export+import {times['import']:.2f}s  "
          f"passes {times['passes']:.2f}s")
    print("  ops by class (fused ops counted inside their groups):")
    print(s.format())
    print(f"  torch-call ops: {s.counts['torch-call']}" + ("" if s.counts["torch-call"] else
                                                           " (the whole graph imported into st)"))
    plan = ctx.results.get("plan", {}).get("forward")
    if plan is not None:
        print(plan.summary())
    written = []
    if "ir" in emits:
        written.append(out / "module.sir")
        _write_new(written[-1], print_module(prog.module))
    if plan is None and ("plan" in emits or "svg" in emits):
        raise ValueError("--emit plan/svg needs a pipeline with fusion-plan")
    if "plan" in emits or "svg" in emits:
        written.append(out / "plan.json")
        _write_new(written[-1], plan.dumps())
    if "svg" in emits:
        written.append(out / "plan.svg")
        _write_new(written[-1], render_svg(plan, f"{args.model}"))
    for path in written:
        print(f"  wrote {path}")
    return 0


def cmd_opt(args: argparse.Namespace) -> int:
    from passes import PassManager
    from stitch_ir.parser import parse_module
    from stitch_ir.printer import print_module

    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    module = parse_module(text, "<stdin>" if args.file == "-" else args.file)
    PassManager.parse(args.pipeline or "", print_ir_after_all=args.print_ir_after_all,
                      time_passes=args.time_passes).run(module)
    sys.stdout.write(print_module(module))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stitchc", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the registered workload models")
    m.add_argument("--fast", action="store_true", help="names only, build nothing")
    m.set_defaults(fn=cmd_models)

    c = sub.add_parser("compile", help="trace a model, import it and run the pipeline")
    c.add_argument("--model", required=True)
    c.add_argument("--target", choices=TARGETS, default="cpu")
    c.add_argument("--emit", default="ir",
                   help="comma-separated: ir (module.sir), plan (plan.json), svg (plan.svg)")
    c.add_argument("-o", "--output", default="out")
    c.add_argument("--fusion", choices=("none", "greedy", "stitch"), default="stitch",
                   help="the fusion planner")
    c.add_argument("--pipeline", default="",
                   help="a pass pipeline replacing the default one built from --fusion")
    c.add_argument("--print-ir-after-all", action="store_true")
    c.add_argument("--time-passes", action="store_true")
    c.set_defaults(fn=cmd_compile)

    o = sub.add_parser("opt", help="parse textual IR, run passes, print the result")
    o.add_argument("file", help="a .sir file, or - for standard input")
    o.add_argument("-p", "--pipeline", default="")
    o.add_argument("--print-ir-after-all", action="store_true")
    o.add_argument("--time-passes", action="store_true")
    o.set_defaults(fn=cmd_opt)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from passes.pass_manager import PipelineError
    from stitch_ir.core import IRError

    try:
        return args.fn(args)
    except (IRError, PipelineError, KeyError, FileNotFoundError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"stitchc: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
