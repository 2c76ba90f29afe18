"""The learned cost model against the analytic one, on held-out data, end to end.

    .venv/bin/python -m bench.learned_plans [--store cost_model/data/cpu_records.sqlite.xz] [--only bert]
                                            [--threads 1] [--out bench/results/learned_cost_model]

1. Kernels: every record is predicted by a model trained without its workload (the other eight
   workloads and the pattern kernels; the patterns' model saw no pattern at any size), and by
   K-fold (held-out kernels). Per workload: Kendall's tau of predicted vs measured, the median
   measured / predicted ratio, the pick-best rate over candidate sets (``runtime.tune_eval``).
2. Plans: each workload (and each cpu pattern at full size) is planned twice, by the analytic
   model and by its held-out learned model; both compiled graphs are checked against eager and
   timed side by side at ``--threads`` threads (alternating, each sample at least 2 ms of
   back-to-back calls, median and fastest sample), with the planner's time for each model
   (plan cache off).

Writes ``OUT.md`` (the tables) and ``OUT.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path


def time_graphs(fns: dict, samples: int = 15, min_sample: float = 2e-3) -> dict:
    """{name: (median, fastest)} seconds per call, alternating the contenders."""
    inner = {}
    for k, f in fns.items():
        f()
        t = time.perf_counter()
        f()
        inner[k] = max(1, math.ceil(min_sample / max(time.perf_counter() - t, 1e-6)))
    ts: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for s in range(samples):
        for k in names if s % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            for _ in range(inner[k]):
                fns[k]()
            ts[k].append((time.perf_counter() - t) / inner[k])
    return {k: (sorted(v)[len(v) // 2], min(v)) for k, v in ts.items()}


def plan_and_run(name: str, model_path: str, device, threads: int, samples: int) -> dict:
    """Compile ``name`` with each cost model, check both against eager, time both."""
    import torch

    from runtime.graph import compile_program
    from runtime.tune import model_and_inputs
    from stitch_ir.importer import import_model

    model, inputs = model_and_inputs(name)
    graphs, info = {}, {}
    os.environ["STITCH_COST_MODEL"] = model_path
    os.environ["STITCH_PLAN_CACHE"] = "0"  # planning time is measured, never served
    for cm in ("analytic", "learned"):
        prog = import_model(model, inputs)
        t0 = time.perf_counter()
        g = compile_program(prog, device_spec=device, cost_model=cm)
        info[cm] = {"kernels": g.kernels, "planning_s": g.plan.planning_seconds,
                    "compile_s": time.perf_counter() - t0, "costed_by": g.plan.cost_model,
                    "groups": sorted(sorted(gi.members) for gi in g.plan.groups),
                    "estimated_us": g.plan.seconds * 1e6}
        graphs[cm] = g
    with torch.no_grad():
        want = [t for t in torch.utils._pytree.tree_leaves(model(*inputs))
                if isinstance(t, torch.Tensor)]
        for cm, g in graphs.items():
            got = g(*inputs)
            err = max(((a.float() - b.float()).abs().max().item() for a, b in zip(got, want)),
                      default=0.0)
            scale = max([1.0] + [b.float().abs().max().item() for b in want])
            info[cm]["max_error"] = err / scale
    same = info["analytic"]["groups"] == info["learned"]["groups"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            t = time_graphs({cm: (lambda g=g: g(*inputs)) for cm, g in graphs.items()}, samples)
    finally:
        torch.set_num_threads(before)
    for cm in graphs:
        info[cm]["median_s"], info[cm]["fastest_s"] = t[cm]
        del info[cm]["groups"]
    return {"workload": name, "same_plan": same, **info}


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    import models
    from cost_model import get_device
    from cost_model.learned import train
    from runtime import tune_eval as te
    from runtime.tune import PATTERNS

    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="cost_model/data/cpu_records.sqlite.xz")
    ap.add_argument("--only", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--out", default="bench/results/learned_cost_model")
    ap.add_argument("--models-dir", default=".stitch_cache/heldout_models")
    ap.add_argument("--skip-kernels", action="store_true")
    args = ap.parse_args(argv)
    device = get_device("cpu")
    records = te.load(args.store, device.fingerprint, 1)
    feats = te.refeaturize(records, device)
    report: dict = {"fingerprint": device.fingerprint, "records": len(records), "threads": args.threads}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = [f"# Learned vs analytic cost model ({device.fingerprint}, {len(records)} records, "
          f"kernels timed at 1 thread, plans run at {args.threads})", ""]
    if not args.skip_kernels:
        lowo = te.held_out_workloads(records, feats, device.fingerprint, 1, log=print)
        rows = te.rows_for(records, feats, lowo)
        kfold = te.rows_for(records, feats, te.held_out_kernels(records, feats,
                                                               device.fingerprint, 1))
        report["held_out_workloads"] = [r.__dict__ for r in rows]
        report["held_out_kernels"] = [r.__dict__ for r in kfold]
        md += ["## Held-out workloads (a model trained without the workload)", "",
               te.format_table(rows), "", "## Held-out kernels (5-fold)", "",
               te.format_table(kfold), ""]
        print(te.format_table(rows))
    names = models.names() + [f"pattern:{p}" for p in PATTERNS]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    plans = []
    Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    from runtime.tune import step_seconds

    step = step_seconds()
    for name in names:
        grp = te.group_of(name)
        path = Path(args.models_dir) / f"{grp}.json"
        if not path.exists():
            ks = [k for k, r in enumerate(records)
                  if te.trained_without(te.group_of(r.workload), grp)]
            m = train([feats[k] for k in ks], [te.measured(records[k]) for k in ks],
                      device.fingerprint, 1)
            m.step_seconds = step
            m.save(path)
        r = plan_and_run(name, str(path), device, args.threads, args.samples)
        plans.append(r)
        a, lr = r["analytic"], r["learned"]
        print(f"{name:<32} same plan {r['same_plan']!s:<5} kernels {a['kernels']:>4} / "
              f"{lr['kernels']:>4}  analytic {a['median_s'] * 1e3:8.3f} ms  learned "
              f"{lr['median_s'] * 1e3:8.3f} ms  planning {a['planning_s']:.2f} / "
              f"{lr['planning_s']:.2f} s", flush=True)
    report["plans"] = plans
    md += ["## Plans end to end (each workload planned by its held-out model)", "",
           "| workload | same plan | kernels analytic | kernels learned | analytic ms (median / "
           "fastest) | learned ms (median / fastest) | learned / analytic | planning s analytic "
           "| planning s learned | max error |", "|" + "---|" * 10]
    for r in plans:
        a, lr = r["analytic"], r["learned"]
        md.append(f"| {r['workload']} | {'yes' if r['same_plan'] else 'no'} | {a['kernels']} | "
                  f"{lr['kernels']} | {a['median_s'] * 1e3:.3f} / {a['fastest_s'] * 1e3:.3f} | "
                  f"{lr['median_s'] * 1e3:.3f} / {lr['fastest_s'] * 1e3:.3f} | "
                  f"{lr['median_s'] / a['median_s']:.3f} | {a['planning_s']:.2f} | "
                  f"{lr['planning_s']:.2f} | {max(a['max_error'], lr['max_error']):.1e} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
