"""Plan every registered workload with the three planners and print one table.

    .venv/bin/python -m bench.plan_models [--target cpu|sm_80|sm_90] [--models a,b]
                                          [--bert-base]

Columns: memory-intensive kernels, estimated bytes and estimated kernel time of each plan, the
stitch planner's time, solver status and gap. ``--bert-base`` also plans a 12-layer BERT-base
(hidden 768, sequence 128). Estimates come from the analytic cost model (fixed cpu spec unless
``--measured``), not from running kernels.
"""

from __future__ import annotations

import argparse
import time
import warnings


def plan_one(module, target: str, device) -> dict:
    from passes import PassManager
    from passes.fusion.plan import make_plan

    PassManager.parse("canonicalize,cse,dce").run(module)
    row = {}
    for planner in ("none", "greedy", "stitch"):
        plan = make_plan(module.func(), planner, device)
        row[planner] = plan
    return row


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    import models
    from cost_model import cpu_spec, get_device
    from stitch_ir.importer import import_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--models", default=",".join(models.names()))
    ap.add_argument("--bert-base", action="store_true")
    ap.add_argument("--measured", action="store_true", help="use the measured cpu spec")
    args = ap.parse_args(argv)
    device = (get_device("cpu") if args.measured else cpu_spec(measure=False)) \
        if args.target == "cpu" else get_device(args.target)
    jobs = [(name, None) for name in args.models.split(",") if name]
    if args.bert_base:
        jobs.append(("bert-base-12L", "bert"))
    print(f"target {args.target} ({device.description if hasattr(device, 'description') else ''})")
    head = (f"{'model':<16} {'MI ops':>6} | {'kernels none/greedy/stitch':>26} | "
            f"{'MB none/greedy/stitch':>24} | {'est us none/greedy/stitch':>28} | "
            f"{'plan s':>6} {'status':>8} {'gap':>6}")
    print(head)
    print("-" * len(head))
    for name, base in jobs:
        if base:
            from models.bert import BertConfig

            w = models.get(base, cfg=BertConfig(hidden=768, layers=12, heads=12, ffn=3072))
        else:
            w = models.get(name)
        prog = import_model(w.model, w.example_inputs)
        t0 = time.perf_counter()
        row = plan_one(prog.module, args.target, device)
        n, gr, s = row["none"], row["greedy"], row["stitch"]
        status = s.solver.get("status", "").split()[0] if s.solver else ""
        gap = s.solver.get("gap", float("nan"))
        print(f"{name:<16} {len(n.graph.fusible()):>6} | {n.kernels:>8} {gr.kernels:>8} "
              f"{s.kernels:>8} | {n.bytes / 1e6:>8.1f} {gr.bytes / 1e6:>7.1f} {s.bytes / 1e6:>7.1f} | "
              f"{n.seconds * 1e6:>9.0f} {gr.seconds * 1e6:>9.0f} {s.seconds * 1e6:>8.0f} | "
              f"{s.planning_seconds:>6.2f} {status:>8} {100 * gap:>5.1f}%"
              + ("" if s.seconds <= gr.seconds + 1e-12 else "  STITCH > GREEDY"))
        del t0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
