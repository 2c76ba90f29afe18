"""``stitchc``: the stitch compiler's command line.

    stitchc models                                   list the registered workloads
    stitchc compile --model bert --target cpu --emit ir,plan,svg -o OUT [--fusion greedy]
    stitchc run --model bert --target cpu            compile, run, check vs eager, time vs inductor
    stitchc opt FILE.sir -p canonicalize,cse         run passes over textual IR (FileCheck tests)
    stitchc tune --model bert|--all --target cpu     time candidate kernels into the record store
    stitchc tune --train                             train the learned cost model from the records

``compile`` traces the model with torch.export, imports it into ``st``, canonicalises, plans
the fusion (``--fusion none|greedy|stitch``), applies and schedules it, prints a one-screen
summary (ops by class, kernels and bytes before -> after, planner time, solver status and gap)
and writes what ``--emit`` asks for: ``module.sir``, ``plan.json``, ``plan.svg``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TARGETS = ("cpu", "sm_80", "sm_90")
EMITS = ("ir", "plan", "svg", "kernels")
COST_MODELS = ("analytic", "learned", "auto")
CANONICAL = "canonicalize,cse,dce"


def pipeline_for(fusion: str, gpu_codegen: str = "auto", channels_last: bool = False,
                 cost_model: str | None = None) -> str:
    from passes import pipeline

    return pipeline(fusion, channels_last=channels_last, cost_model=cost_model,
                    gpu_codegen=gpu_codegen)


def _write_new(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cmd_models(args: argparse.Namespace) -> int:
    """The registered workloads with parameter counts and their op-class mix (after import and
    canonicalisation): element-wise / broadcast / reduce / layout / gather-scatter / library /
    torch-call."""
    import models

    if args.fast:
        for name in models.names():
            print(name)
        return 0
    from passes import PassManager
    from passes.classify import summarize
    from stitch_ir.importer import import_model

    cols = ("element-wise", "broadcast", "reduce", "layout", "gather/scatter", "library",
            "torch-call")
    short = ("elem", "bcast", "reduce", "layout", "gath/sc", "library", "torch")
    print(f"{'model':<16} {'params':>10}  " + " ".join(f"{c:>7}" for c in short) + "  configuration")
    for name in models.names():
        w = models.get(name)
        params = sum(p.numel() for p in w.model.parameters())
        prog = import_model(w.model, w.example_inputs)
        PassManager.parse("canonicalize,cse,dce").run(prog.module)
        s = summarize(prog.module)
        print(f"{name:<16} {params:>10,}  " + " ".join(f"{s.counts[c]:>7}" for c in cols)
              + f"  {w.config}", flush=True)
    return 0


def compile_model(name: str, pipeline: str, target: str, print_ir_after_all: bool = False,
                  time_passes: bool = False, dynamic: str = ""):
    """Trace, import and run ``pipeline``; returns (ImportedProgram, PassContext, timings)."""
    import models
    from passes import PassContext, PassManager
    from stitch_ir.importer import import_model

    t0 = time.perf_counter()
    w = models.get(name)
    t1 = time.perf_counter()
    # --dynamic NAME: dim 0 of every input is the symbolic size NAME (a dynamic batch)
    prog = import_model(w.model, w.example_inputs, dynamic={dynamic: 0} if dynamic else None)
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
    pipeline = args.pipeline or pipeline_for(args.fusion, args.gpu_codegen,
                                             cost_model=args.cost_model)
    w, prog, ctx, times = compile_model(args.model, pipeline, args.target,
                                        args.print_ir_after_all, args.time_passes, args.dynamic)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    s = summarize(prog.module)
    print(f"stitchc: {args.model} ({w.paper})")
    print(f"  config   {w.config}")
    print(f"  target   {args.target}    pipeline  {pipeline}")
    print(f"  inputs   {len(prog.user_inputs)} user, {len(prog.constants)} parameters / buffers / "
          "constants")
    if args.dynamic:
        args_t = ", ".join(str(prog.module.func().args[i].type) for i in prog.user_inputs)
        print(f"  dynamic  {args.dynamic}: one plan and one set of kernels for every size "
              f"(planned at the traced size); inputs {args_t}")
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
    if "kernels" in emits:  # first: a kernel re-rendered after spilling notes it on its group
        _emit_kernels(prog.module, args.target, out / "kernels")
    if "ir" in emits:
        written.append(out / "module.sir")
        _write_new(written[-1], print_module(prog.module))
    if plan is None and ("plan" in emits or "svg" in emits):
        raise ValueError("--emit plan/svg needs a pipeline with fusion-plan")
    if "plan" in emits or "svg" in emits:
        written.append(out / "plan.json")
        _write_new(written[-1], _plan_json(plan, prog.module, args.target))
    if "svg" in emits:
        written.append(out / "plan.svg")
        _write_new(written[-1], render_svg(plan, f"{args.model}"))
    if "kernels" in emits:
        written.append(out / "kernels")
    for path in written:
        print(f"  wrote {path}")
    return 0


def _plan_json(plan, module, target: str) -> str:
    """The plan, plus on a GPU target how each group runs: its kernels (cut at grid barriers),
    each kernel's mapping and why, and why a kernel was re-rendered."""
    import json

    from stitch_ir.dialects import fusion

    data = plan.to_json()
    if target != "cpu":
        data["gpu_kernels"] = [
            {"group": k, "kind": op.kind, "codegen": op.attr("codegen", "triton"),
             "codegen_why": op.attr("codegen_why", ""), "cuda_stitch": op.attr("cuda_stitch", ""),
             "cuda_why": op.attr("cuda_why", ""), "kernels": [
                {"values": list(v), "mapping": m, "why": w} for v, m, w in
                zip(op.attr("kernel_values", ()), op.attr("kernel_mappings", ()),
                    op.attr("kernel_why", ()))],
             "notes": list(op.attr("kernel_notes", ()))}
            for k, op in enumerate(o for o in module.walk()
                                   if isinstance(o, fusion.GroupOp) and o.kind != "view")]
    return json.dumps(data, indent=1)


def _emit_kernels(module, target: str, out: Path) -> None:
    """Kernel sources; for a GPU target also PTX, cubin and a resource report per kernel."""
    if target == "cpu":
        from codegen.cpp.kernel import render_group
        from codegen.cpp.scalars import Unsupported
        from stitch_ir.dialects import fusion

        out.mkdir(parents=True, exist_ok=True)
        for op in module.walk():
            if isinstance(op, fusion.GroupOp) and op.kind != "view":
                try:
                    src = render_group(op, op.kind)
                except Unsupported as e:
                    print(f"  kernel: {op.kind} group not compiled: {e}")
                    continue
                _write_new(out / f"{src.symbol}.cpp", src.source)
        return
    from runtime.cuda_build import emit_cuda_kernels
    from runtime.triton_build import emit_kernels

    t0 = time.perf_counter()
    crows = emit_cuda_kernels(module, target, out)  # first: a fallback hands its group to Triton
    _print_cuda_kernels(crows, target, time.perf_counter() - t0)
    t0 = time.perf_counter()
    rows = emit_kernels(module, target, out, cuda_groups=False)
    _write_new(out / "kernels.json", json.dumps([{"codegen": "triton", **r} for r in rows] + crows,
                                                indent=1))
    built = [r for r in rows if "kernel" in r]
    spills = [r for r in built if r["spill_bytes"]]
    print(f"  kernels  {len(built)} Triton kernels for {target} in "
          f"{time.perf_counter() - t0:.1f}s: max {max([r['registers'] for r in built] or [0])} "
          f"registers, {len(spills)} spilling, max shared memory "
          f"{max([r['shared_bytes'] for r in built] or [0])} bytes")
    print(f"  {'kernel':<40} {'regs':>5} {'spill':>6} {'smem':>7} {'warps':>5} {'grid':>7}  what")
    for r in built:
        print(f"  {r['symbol'][:24] + '.' + r['kernel']:<40} {r['registers']:>5} "
              f"{r['spill_bytes']:>6} {r['shared_bytes']:>7} {r['num_warps']:>5} {r['grid']:>7}  "
              f"{r['what'][:60]}")
        if r["note"]:
            print(f"      re-rendered: {r['note']}")
    for r in rows:
        if "unsupported" in r:
            print(f"  not compiled: {r['group']} group: {r['unsupported']}")


def _print_cuda_kernels(rows: list[dict], target: str, seconds: float) -> None:
    built = [r for r in rows if "kernel" in r]
    if not rows:
        return
    glob = [r for r in built if r["cooperative"]]
    print(f"  kernels  {len(built)} CUDA C kernels for {target} (nvcc, ptxas) in {seconds:.1f}s: "
          f"{len(glob)} globally stitched (cooperative, grid.sync()), max "
          f"{max([r['registers'] for r in built] or [0])} registers, "
          f"{len([r for r in built if r['spill_bytes']])} spilling, max shared memory "
          f"{max([r['shared_bytes'] for r in built] or [0])} bytes")
    print(f"  {'kernel':<40} {'regs':>5} {'spill':>6} {'smem':>7} {'thr':>5} {'grid':>7} "
          f"{'sync':>4}  what")
    for r in built:
        print(f"  {r['symbol'][:24] + '.' + r['kernel']:<40} {r['registers']:>5} "
              f"{r['spill_bytes']:>6} {r['shared_bytes']:>7} {r['threads']:>5} {r['grid']:>7} "
              f"{r['grid_syncs']:>4}  {r['what'][:60]}")
        if r.get("note"):
            print(f"      re-rendered: {r['note']}")
    for r in rows:
        if "fallback" in r:
            print(f"  CUDA C not rendered: {r['group']} group (Triton instead): {r['fallback']}")


def _median_spread(ts: list[float]) -> tuple[float, float]:
    ts = sorted(ts)
    med = ts[len(ts) // 2]
    return med, (ts[-1] - ts[0]) / 2


def cmd_run(args: argparse.Namespace) -> int:
    """Compile for the cpu target, run, check against eager, and time eager / inductor / stitch
    side by side (alternating, median of N after warm-up)."""
    import torch

    import models
    from runtime.graph import compile_program
    from stitch_ir.importer import import_model

    gpu = args.target != "cpu"
    if gpu and not args.interpret and not torch.cuda.is_available():
        raise ValueError(f"stitchc run: target {args.target!r} needs a CUDA GPU; none here (add "
                         "--interpret to run its Triton kernels under TRITON_INTERPRET=1)")
    if args.repeat is None:
        args.repeat = 1 if args.interpret else 20
    if args.threads:
        torch.set_num_threads(args.threads)
    w = models.get(args.model)
    inputs = w.example_inputs
    where = "cpu" if not gpu else (f"{args.target} kernels on the cpu: Triton under "
                                   "TRITON_INTERPRET=1, CUDA C in the emulation (cpu tensors: "
                                   "timings are not GPU timings)" if args.interpret
                                   else f"{args.target} on {torch.cuda.get_device_name()}")
    if gpu and not args.interpret:
        w.model.cuda()
        inputs = tuple(t.cuda() for t in inputs)
    print(f"stitchc run: {args.model} on {where}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    prog = import_model(w.model, inputs)
    print(f"  [1/4] export + import            {time.perf_counter() - t0:6.2f} s", flush=True)
    t0 = time.perf_counter()
    if gpu:
        from runtime.gpu_graph import compile_gpu_program

        g = compile_gpu_program(prog, args.target, args.fusion, interpret=args.interpret,
                                gpu_codegen=args.gpu_codegen)
        launches = sum(len(s.launches) for s in [*g.triton_sources.values(),
                                                 *g.cuda_sources.values()])
    else:
        g = compile_program(prog, fusion=args.fusion, cost_model=args.cost_model)
    print(f"  [2/4] plan + codegen + build     {time.perf_counter() - t0:6.2f} s   "
          f"({g.kernels} kernels, {len(g.fallbacks)} interpreter fallbacks)", flush=True)
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(w.model(*inputs))
        got = g(*inputs)
    err = max((a - b).abs().max().item() for a, b in zip(got, want))
    scale = max(1.0, max(b.abs().max().item() for b in want))
    ok = err <= args.tol * scale
    print(f"  [3/4] check vs eager             max abs error {err:.2e} "
          f"({'ok' if ok else 'FAIL'}, tolerance {args.tol:g} x max(1, max|eager|) = "
          f"{args.tol * scale:.1e})", flush=True)
    contenders = {"eager": lambda: w.model(*inputs), "stitch": lambda: g(*inputs)}
    if gpu:  # a CUDA call returns before its kernels finish: time to completion
        contenders = {k: (lambda f=f: (f(), torch.cuda.synchronize() if not args.interpret
                                       else None)) for k, f in contenders.items()}
    if not args.no_inductor and not args.interpret:
        t0 = time.perf_counter()
        compiled = torch.compile(w.model, backend="inductor")
        with torch.no_grad():
            compiled(*inputs)
        contenders["inductor"] = lambda: compiled(*inputs)
        print(f"        inductor compile           {time.perf_counter() - t0:6.2f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    with torch.no_grad():
        for fn in contenders.values():
            fn()
        for _ in range(args.repeat):  # alternate the contenders: A B C A B C ...
            for name, fn in contenders.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    print(f"  [4/4] time (median of {args.repeat}, +- half range)")
    base, _ = _median_spread(times["eager"])
    for name, ts in times.items():
        med, spread = _median_spread(ts)
        print(f"        {name:<9} {med * 1e3:9.2f} ms +- {spread * 1e3:6.2f}   "
              f"{base / med:5.2f}x eager")
    print(f"  stitch kernels launched per call: {g.kernels} fused"
          + (f" ({launches} launches: {len(g.triton_sources)} Triton groups, "
             f"{len(g.cuda_sources)} CUDA C groups)" if gpu else "") + " + "
          f"{sum(1 for s in g.steps if s.kind == 'library')} library calls")
    return 0 if ok else 1


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


def cmd_tune(args: argparse.Namespace) -> int:
    """Time candidate kernels into the record store, or train the learned model from it."""
    from runtime import tune

    store = args.store or tune.default_store()
    if args.target != "cpu":
        raise ValueError("stitchc tune: only the cpu target can be timed here")
    if args.train:
        from runtime.tune_eval import train_command

        return train_command(store, args.threads, args.out, log=print)
    if not (args.all or args.model):
        raise ValueError("stitchc tune: name --model NAME[,NAME...] or --all (or --train)")
    names = tune.workload_names(args.all, args.model or "")
    tune.tune(names, store, threads=args.threads, variant=args.variant,
              per_model=args.per_model, samples=args.samples, batch=args.batch,
              seed=args.seed, cluster=args.cluster, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stitchc", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the registered workload models")
    m.add_argument("--fast", action="store_true", help="names only: build and import nothing")
    m.set_defaults(fn=cmd_models)

    c = sub.add_parser("compile", help="trace a model, import it and run the pipeline")
    c.add_argument("--model", required=True)
    c.add_argument("--target", choices=TARGETS, default="cpu")
    c.add_argument("--emit", default="ir",
                   help="comma-separated: ir (module.sir), plan (plan.json), svg (plan.svg), "
                        "kernels (kernels/: sources; for sm_*: PTX, cubin, kernels.json)")
    c.add_argument("-o", "--output", default="out")
    c.add_argument("--fusion", choices=("none", "greedy", "stitch"), default="stitch",
                   help="the fusion planner")
    c.add_argument("--pipeline", default="",
                   help="a pass pipeline replacing the default one built from --fusion")
    c.add_argument("--gpu-codegen", choices=("auto", "triton", "cuda"), default="auto",
                   help="sm_*: which generator each group gets (auto: Triton, CUDA C where the "
                        "schedule needs shared memory, warp shuffles or a grid barrier)")
    c.add_argument("--dynamic", default="", metavar="NAME",
                   help="compile for a symbolic size NAME in dim 0 of every input (a batch)")
    c.add_argument("--print-ir-after-all", action="store_true")
    c.add_argument("--time-passes", action="store_true")
    c.add_argument("--cost-model", choices=COST_MODELS, default=None,
                   help="what costs the planner's groups (default auto: the learned model where "
                        "one for this machine won its held-out evaluation, else analytic)")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="compile, check against eager, time vs inductor")
    r.add_argument("--model", default="bert")
    r.add_argument("--target", choices=TARGETS, default="cpu")
    r.add_argument("--fusion", choices=("none", "greedy", "stitch"), default="stitch")
    r.add_argument("--repeat", type=int, default=None, help="timed calls (default 20; 1 with --interpret)")
    r.add_argument("--threads", type=int, default=0, help="torch threads (default: all)")
    r.add_argument("--tol", type=float, default=1e-4, help="max abs error accepted vs eager")
    r.add_argument("--no-inductor", action="store_true", help="skip torch.compile (inductor)")
    r.add_argument("--interpret", action="store_true",
                   help="sm_*: run the Triton kernels under TRITON_INTERPRET=1 and the CUDA C "
                        "kernels in the cpu emulation, on cpu tensors")
    r.add_argument("--gpu-codegen", choices=("auto", "triton", "cuda"), default="auto",
                   help="sm_*: which generator each group gets")
    r.add_argument("--cost-model", choices=COST_MODELS, default=None,
                   help="what costs the planner's groups (default auto)")
    r.set_defaults(fn=cmd_run)

    t = sub.add_parser("tune", help="time candidate kernels into records; train the learned model")
    t.add_argument("--model", default="", help="workloads, comma-separated (pattern:NAME[/SCALE] "
                   "for a cpu pattern)")
    t.add_argument("--all", action="store_true", help="the nine workloads and the cpu patterns")
    t.add_argument("--target", choices=TARGETS, default="cpu")
    t.add_argument("--store", default="", help="the SQLite record store (default "
                   "$STITCH_CACHE_DIR/tune/records.sqlite)")
    t.add_argument("--threads", type=int, default=1, help="OpenMP threads kernels are timed at")
    t.add_argument("--per-model", type=int, default=160, help="sampled candidates per workload")
    t.add_argument("--samples", type=int, default=21, help="timed samples per kernel")
    t.add_argument("--batch", type=int, default=12, help="candidates per job")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--variant", default="", choices=("", "team1"),
                   help="a schedule variant: team1 = every kernel on the calling thread")
    t.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="run the jobs on a Ray cluster (ray.init address; 'local' starts one)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--train", action="store_true",
                   help="train the learned model from the store (held-out evaluation first)")
    t.add_argument("--out", default="", help="--train: the model file (default: this machine's "
                   "model under $STITCH_CACHE_DIR/learned)")
    t.set_defaults(fn=cmd_tune)

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
