"""One command for a machine with an NVIDIA GPU: build every GPU path, check it, time it.

    .venv/bin/python -m bench.gpu_check [--out bench/results] [--repeat 20] [--budget 270]
                                        [--only layernorm,gnn] [--no-workloads] [--no-inductor]

1. The pattern set at GPU sizes (layernorm, softmax, bias + GELU, bias + residual + layernorm,
   RMSNorm, layernorm backward, GNN message passing with atomic and owned-destination
   index_add, a column sum) and the nine workloads: each compiled for the device's target
   (sm_80 / sm_90) once per generator in ``--codegens`` (``triton``: every group Triton;
   ``cuda``: every group it can CUDA C; ``auto``: the plan's choice), run, and checked against
   eager torch on the same device. ``layernorm_backward_1k`` (1024 x 1024: its blocks fit one
   wave) is also built with ``cuda_stitch=split``: global stitching against the same group
   split at its grid barriers.
2. Each timed side by side, alternating eager / inductor / stitch (per generator), CUDA events,
   median of ``--repeat`` after warm-up; outputs allocated per call as a user calls it.
3. Bandwidth: each pattern's minimum bytes (inputs read once, outputs written once) over its
   time, in GB/s, and as a fraction of a device-to-device copy of the same size measured in
   the same run (the floor).
Writes ``gpu_check-<target>.json`` and ``.md`` under ``--out``; stops starting new cases when
``--budget`` seconds have passed (the whole run is meant to take under 5 minutes).

Without a CUDA GPU it exits at once with status 2 and says so. ``--interpret`` is a self-test of
this script on a machine without one: tiny shapes, Triton kernels under TRITON_INTERPRET=1 and
CUDA C kernels in the cpu emulation, on cpu tensors, checks only; its times are not GPU times
and are not reported as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F


def _ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _ln_backward(x, w, dy):
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    xhat = (x - mean) * rstd
    gw = dy * w
    dx = rstd * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
    return dx, (dy * xhat).sum(0), dy.sum(0)


def _gnn(x, e, s, d):
    return torch.zeros_like(x).index_add(0, d, F.relu(x[s] + e))


def patterns(tiny: bool) -> dict:
    """name -> (fn, cpu inputs, deterministic scatter)."""
    R, H, F2 = (37, 33, 65) if tiny else (8192, 1024, 2048)
    R1 = 29 if tiny else 1024
    nodes, edges, feat = (50, 300, 8) if tiny else (200_000, 1_000_000, 64)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    src = torch.randint(0, nodes, (edges,), generator=g)
    dst = torch.randint(0, nodes, (edges,), generator=g)
    gnn_in = [rnd(nodes, feat), rnd(edges, feat), src, dst]
    return {
        "layernorm": (_ln, [rnd(R, H), rnd(H), rnd(H)], False),
        "softmax": (lambda x: torch.softmax(x * 0.125, -1), [rnd(R, H)], False),
        "bias_gelu": (lambda x, b: F.gelu(x + b), [rnd(R, F2), rnd(F2)], False),
        "bias_residual_layernorm": (lambda y, b, r, w, beta: _ln(y + b + r, w, beta),
                                    [rnd(R, H), rnd(H), rnd(R, H), rnd(H), rnd(H)], False),
        "rmsnorm": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
                    [rnd(R, H), rnd(H)], False),
        "layernorm_backward": (_ln_backward, [rnd(R, H), rnd(H), rnd(R, H)], False),
        "layernorm_backward_1k": (_ln_backward, [rnd(R1, H), rnd(H), rnd(R1, H)], False),
        "gnn_atomic": (_gnn, gnn_in, False),
        "gnn_owned": (_gnn, gnn_in, True),
        "column_sum": (lambda x: x.sum(0), [rnd(R, H)], False),
    }


class Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def min_bytes(name: str, inputs, outputs) -> int:
    n = sum(t.numel() * t.element_size() for t in outputs)
    if name.startswith("gnn"):  # x is gathered: each row read at least once, or once per edge
        x, e, s, d = inputs
        rows = min(x.shape[0], s.numel())
        return n + rows * x.shape[1] * x.element_size() + e.numel() * e.element_size() + \
            (s.numel() + d.numel()) * 8
    return n + sum(t.numel() * t.element_size() for t in inputs)


def time_cuda(fns: dict, repeat: int) -> dict[str, float]:
    """Median seconds per call, contenders alternating, CUDA events around each call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
        f()
    torch.cuda.synchronize()
    for _ in range(repeat):
        for k, f in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            b.record()
            b.synchronize()
            times[k].append(a.elapsed_time(b) / 1e3)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def copy_seconds(nbytes: int, repeat: int) -> float:
    """A device-to-device copy moving ``nbytes`` in all (half read, half written)."""
    n = max(nbytes // 2 // 4, 1)
    a, b = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    return time_cuda({"copy": lambda: b.copy_(a)}, repeat)["copy"]


def max_error(got, want) -> float:
    return max(((a.double() - b.double()).abs().max().item() if a.numel() else 0.0)
               for a, b in zip(got, want))


def _check(g, model, dev_inputs) -> tuple[float, bool]:
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(model(*dev_inputs))
        got = g(*dev_inputs)
    err = max_error(got, want)
    scale = max(1.0, max(w.abs().max().item() for w in want if w.numel()))
    return err, err <= 1e-4 * scale and not g.fallbacks


def check_case(name, fn, inputs, deterministic, args, device, target, results) -> None:
    from runtime.gpu_graph import compile_gpu_program
    from stitch_ir.importer import import_model

    model = Wrap(fn) if not isinstance(fn, torch.nn.Module) else fn
    builds = [(c, c, "auto") for c in args.codegens.split(",") if c]
    if name == "layernorm_backward_1k" and "cuda" in args.codegens:
        builds.append(("cuda_split", "cuda", "split"))  # global stitching vs split
    graphs, row = {}, {"case": name, "ok": True}
    for label, codegen, stitch in builds:
        t0 = time.perf_counter()
        prog = import_model(model, tuple(inputs))  # traced on cpu tensors; run on the device
        g = compile_gpu_program(prog, target, interpret=args.interpret,
                                deterministic=deterministic, gpu_codegen=codegen,
                                cuda_stitch=stitch)
        graphs[label] = g
        row[f"{label}_build_s"] = round(time.perf_counter() - t0, 2)
        row[f"{label}_launches"] = sum(len(s.launches) for s in
                                       [*g.triton_sources.values(), *g.cuda_sources.values()])
        row[f"{label}_groups"] = f"{len(g.triton_sources)} triton / {len(g.cuda_sources)} cuda"
        row[f"{label}_cooperative"] = sum(1 for s in g.cuda_sources.values()
                                          for ln in s.launches if ln.cooperative)
    model = model.to(device)
    dev_inputs = [t.to(device) for t in inputs]
    for label, g in graphs.items():
        err, ok = _check(g, model, dev_inputs)
        row[f"{label}_max_abs_error"] = err
        row["ok"] = row["ok"] and ok
    if not args.interpret:
        fns = {"eager": lambda: model(*dev_inputs)}
        fns.update({f"stitch_{k}": (lambda g=g: g(*dev_inputs)) for k, g in graphs.items()})
        if not args.no_inductor:
            compiled = torch.compile(model)
            with torch.no_grad():
                compiled(*dev_inputs)
            fns["inductor"] = lambda: compiled(*dev_inputs)
        with torch.no_grad():
            secs = time_cuda(fns, args.repeat)
            want = torch.utils._pytree.tree_leaves(model(*dev_inputs))
        row.update({f"{k}_ms": round(v * 1e3, 4) for k, v in secs.items()})
        if name in results["floor_cases"]:
            nbytes = min_bytes(name, dev_inputs, want)
            floor = copy_seconds(nbytes, args.repeat)
            row["min_bytes"] = nbytes
            row["copy_floor_ms"] = round(floor * 1e3, 4)
            for k, v in secs.items():
                row[f"{k}_GBps"] = round(nbytes / v / 1e9, 1)
                row[f"{k}_of_floor"] = round(floor / v, 3)
    print("  " + json.dumps(row), flush=True)
    results["rows"].append(row)


def markdown(results: dict) -> str:
    lines = [f"# GPU check: {results['device']} ({results['target']})", "",
             f"{results['when']}; {results['seconds']:.0f} s; all checks "
             f"{'passed' if all(r['ok'] for r in results['rows']) else 'did NOT pass'}.", ""]
    cols = ["case", "ok", "triton_launches", "cuda_launches", "cuda_cooperative",
            "eager_ms", "inductor_ms", "stitch_triton_ms", "stitch_cuda_ms",
            "stitch_cuda_split_ms", "stitch_auto_ms", "stitch_triton_of_floor",
            "stitch_cuda_of_floor", "inductor_of_floor"]
    cols = [c for c in cols if any(c in r for r in results["rows"])]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results["rows"]:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if results["skipped"]:
        lines += ["", f"Skipped (time budget): {', '.join(results['skipped'])}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--budget", type=float, default=270.0, help="seconds before no new case starts")
    ap.add_argument("--only", default="")
    ap.add_argument("--no-workloads", action="store_true")
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--codegens", default="triton,cuda",
                    help="generators to build and time, comma-separated: triton, cuda, auto")
    ap.add_argument("--interpret", action="store_true",
                    help="self-test without a GPU: tiny shapes under TRITON_INTERPRET=1, no timing")
    args = ap.parse_args(argv)
    if not args.interpret and not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA GPU on this machine (torch.cuda.is_available() is "
              "False), so nothing was built, checked or timed. Run it where an NVIDIA GPU is, or "
              "use --interpret for a self-test of the script (checks only, no timings).",
              file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    import models
    from runtime.gpu_graph import target_of

    device = torch.device("cpu" if args.interpret else "cuda")
    target = "sm_80" if args.interpret else target_of(device)
    name = "TRITON_INTERPRET=1 on cpu (self-test, no timings)" if args.interpret else \
        torch.cuda.get_device_name(device)
    pats = patterns(tiny=args.interpret)
    only = [s for s in args.only.split(",") if s]
    results = {"device": name, "target": target, "when": time.strftime("%Y-%m-%d %H:%M"),
               "rows": [], "skipped": [], "floor_cases": set(pats)}
    t0 = time.perf_counter()
    cases = [(k, fn, ins, det) for k, (fn, ins, det) in pats.items() if not only or k in only]
    if not args.no_workloads and not args.interpret:
        for w in models.names():
            if not only or w in only:
                cases.append((w, None, None, False))
    print(f"gpu_check: {name}, target {target}, {len(cases)} cases", flush=True)
    for case, fn, ins, det in cases:
        if time.perf_counter() - t0 > args.budget:
            results["skipped"].append(case)
            continue
        if fn is None:
            w = models.get(case)
            fn, ins = w.model.eval(), list(w.example_inputs)
        try:
            check_case(case, fn, ins, det, args, device, target, results)
        except Exception as e:  # noqa: BLE001 - one broken case must not hide the others
            results["rows"].append({"case": case, "ok": False, "error": f"{type(e).__name__}: {e}"})
            print(f"  {case}: ERROR {type(e).__name__}: {e}", flush=True)
    results["seconds"] = time.perf_counter() - t0
    results["floor_cases"] = sorted(results["floor_cases"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_check-{'interpret' if args.interpret else target}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {stem}.json and {stem}.md", flush=True)
    return 0 if all(r["ok"] for r in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
