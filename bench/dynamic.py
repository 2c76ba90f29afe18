"""Dynamic shapes: what a new batch size costs, and what symbolic kernels cost in steady state.

    .venv/bin/python -m bench.dynamic [--sizes 1,3,8,17,64] [--threads 1] [--repeat 15]
                                      [--only new-size|steady] [--out bench/results/dynamic]

1. **A new size** (``new-size``): the bert workload and a small attention block under
   ``torch.compile(backend="stitch")``, called at each of ``--sizes`` in turn (batch for bert,
   sequence length for attention), every first call at a size timed (wall seconds: dynamo,
   AOTAutograd, planning, code generation, builds and the call), by two compilers in separate
   processes with empty caches: ``symbolic`` (the default: one graph with symbolic sizes for
   every size after dynamo's first, static one) and ``specialising`` (option
   ``dynamic=False``: a plan and kernels per shape, what stitch did before). Also counted:
   compiler runs (kernel builds) per size.
2. **Steady state** (``steady``): each cpu pattern of ``bench.patterns`` but the GNN, plus a
   column sum (weights as parameters, 1024 rows), imported twice, static and with a symbolic
   batch (``import_model(dynamic={"batch": 0})``); both compiled graphs checked against eager
   and timed side by side, alternating; the ratio symbolic / static per pattern (the issue's
   target: within 10%).

Writes ``OUT.md`` and ``OUT.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _attention():
    import torch

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
            self.ln = torch.nn.LayerNorm(64)

        def forward(self, x):
            a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 8.0, -1)
            return self.ln(a @ x + x)

    torch.manual_seed(0)
    return Attention().eval()


def new_size_child(model: str, mode: str, sizes: list[int]) -> dict:
    """In a fresh process with an empty cache: first-call seconds and kernels built per size."""
    import torch

    import models
    from runtime import build

    warnings.filterwarnings("ignore")
    if model == "bert":
        w = models.get("bert")
        m = w.model.eval()

        def inputs(n):
            return tuple(t[:1].expand(n, *t.shape[1:]).contiguous() for t in w.example_inputs)
    else:
        m = _attention()

        def inputs(n):
            return (torch.randn(2, n, 64, generator=torch.Generator().manual_seed(n)),)
    opts = {} if mode == "symbolic" else {"dynamic": False}
    compiled = torch.compile(m, backend="stitch", options=opts)
    rows = []
    with torch.no_grad():
        for n in sizes:
            xs = inputs(n)
            built = build.stats()["compiled"]
            t0 = time.perf_counter()
            got = torch.utils._pytree.tree_leaves(compiled(*xs))[0]
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            compiled(*xs)
            second = time.perf_counter() - t0
            want = torch.utils._pytree.tree_leaves(m(*xs))[0]
            err = (got - want).abs().max().item()
            rows.append({"size": n, "first_call_s": first, "second_call_s": second,
                         "kernels_built": build.stats()["compiled"] - built, "max_error": err})
    return {"model": model, "mode": mode, "rows": rows}


def new_size(sizes: list[int], threads: int) -> list[dict]:
    out = []
    for model in ("bert", "attention"):
        for mode in ("specialising", "symbolic"):
            with tempfile.TemporaryDirectory(prefix="stitch-dyn-") as cache:
                env = {**os.environ, "STITCH_CACHE_DIR": cache, "OMP_NUM_THREADS": str(threads),
                       "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"),
                       "PYTHONPATH": str(ROOT)}
                cmd = [sys.executable, "-m", "bench.dynamic", "--child", model, mode,
                       "--sizes", ",".join(map(str, sizes))]
                res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                                     check=False)
                line = [x for x in res.stdout.splitlines() if x.startswith("{")]
                if res.returncode or not line:
                    raise RuntimeError(f"{model} {mode} failed:\n{res.stderr[-3000:]}")
                r = json.loads(line[-1])
                out.append(r)
                print(f"{model:<10} {mode:<13} " + "  ".join(
                    f"{x['size']}: {x['first_call_s']:.2f}s/{x['kernels_built']}k"
                    for x in r["rows"]), flush=True)
    return out


def _pattern(name: str, rows: int):
    """(module, inputs): a cpu pattern (``bench.patterns``) with its weights as parameters, so
    that every input has the batch (rows) in dim 0."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    H, F2 = 1024, 2048

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    class M(torch.nn.Module):
        def __init__(self, fn, **params):
            super().__init__()
            self.fn = fn
            for k, v in params.items():
                self.register_parameter(k, torch.nn.Parameter(v, requires_grad=False))

        def forward(self, *xs):
            return self.fn(self, *xs)

    def ln(x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)

    table = {
        "layernorm": (lambda m, x: ln(x, m.w, m.b), dict(w=rnd(H), b=rnd(H)), [rnd(rows, H)]),
        "softmax": (lambda m, x: torch.softmax(x * 0.125, -1), {}, [rnd(rows, H)]),
        "bias_gelu": (lambda m, x: F.gelu(x + m.b), dict(b=rnd(F2)), [rnd(rows, F2)]),
        "bias_residual_layernorm": (lambda m, y, res: ln(y + m.b + res, m.w, m.beta),
                                    dict(b=rnd(H), w=rnd(H), beta=rnd(H)),
                                    [rnd(rows, H), rnd(rows, H)]),
        "column_sum": (lambda m, x: (x * m.w).sum(0), dict(w=rnd(H)), [rnd(rows, H)]),
    }
    fn, params, inputs = table[name]
    return M(fn, **params).eval(), inputs


STEADY = ("layernorm", "softmax", "bias_gelu", "bias_residual_layernorm", "column_sum")


def steady(threads: int, repeat: int, rows: int = 1024) -> list[dict]:
    import torch

    from bench.patterns import timeit
    from cost_model import get_device
    from runtime.graph import compile_program
    from stitch_ir.importer import import_model

    torch.set_num_threads(threads)
    device = get_device("cpu")
    out = []
    for name in STEADY:
        m, inputs = _pattern(name, rows)
        graphs = {kind: compile_program(import_model(m, tuple(inputs), dynamic=dyn),
                                        device_spec=device)
                  for kind, dyn in (("static", None), ("symbolic", {"batch": 0}))}
        with torch.no_grad():
            want = m(*inputs)
            errs = {k: (g(*inputs)[0] - want).abs().max().item() for k, g in graphs.items()}
            t = timeit({k: (lambda g=g, xs=inputs: g(*xs)) for k, g in graphs.items()}, repeat)
        row = {"pattern": name, "rows": rows, "static_ms": t["static"][0] * 1e3,
               "symbolic_ms": t["symbolic"][0] * 1e3,
               "static_spread_ms": t["static"][1] * 1e3,
               "symbolic_spread_ms": t["symbolic"][1] * 1e3,
               "ratio": t["symbolic"][0] / t["static"][0], "max_error": max(errs.values()),
               "symbols": graphs["symbolic"].symbols}
        out.append(row)
        print(f"{name:<26} static {row['static_ms']:8.3f} ms  symbolic {row['symbolic_ms']:8.3f}"
              f" ms  ratio {row['ratio']:.3f}  symbols {row['symbols']}", flush=True)
    return out


def report(data: dict, out: Path) -> None:
    md = ["# Dynamic shapes: a new size, and symbolic kernels in steady state", "",
          f"`python -m bench.dynamic {data['argv']}` — {data['when']}, torch {data['torch']}, "
          f"{data['threads']} thread(s), load average at start {data['load']}.", ""]
    if data.get("new_size"):
        md += ["## The first call at each new size (seconds; kernel builds)", "",
               "Each compiler in its own process with an empty cache. `specialising`: option "
               "`dynamic=False` (a plan and kernels per shape); `symbolic`: the default. "
               "Seconds of the first call at the size (dynamo, AOTAutograd, planning, code "
               "generation, builds, the call) / the same less the second call at that size "
               "(what the new size cost beyond running it); `b`: compiler runs (a run builds a "
               "batch of kernels, one translation unit per core).", "",
               "| model | compiler | " + " | ".join(
                   f"size {x['size']}" for x in data["new_size"][0]["rows"]) +
               " | sizes after the first: total cost s |",
               "|---|---|" + "---|" * (len(data["new_size"][0]["rows"]) + 1)]
        for r in data["new_size"]:
            later = sum(x["first_call_s"] - x["second_call_s"] for x in r["rows"][1:])
            md.append(f"| {r['model']} | {r['mode']} | " + " | ".join(
                f"{x['first_call_s']:.2f} / {x['first_call_s'] - x['second_call_s']:.2f} "
                f"({x['kernels_built']} b)" for x in r["rows"]) +
                f" | {later:.2f} |")
        worst = max(x["max_error"] for r in data["new_size"] for x in r["rows"])
        md += ["", f"Largest error against eager over every call: {worst:.1e}.", ""]
    if data.get("steady"):
        md += ["## Steady state: symbolic against static kernels (cpu patterns, 1024 rows)", "",
               "| pattern | static ms | symbolic ms | symbolic / static | max error |",
               "|---|---|---|---|---|"]
        for r in data["steady"]:
            md.append(f"| {r['pattern']} | {r['static_ms']:.3f} ±{r['static_spread_ms']:.3f} | "
                      f"{r['symbolic_ms']:.3f} ±{r['symbolic_spread_ms']:.3f} | "
                      f"{r['ratio']:.3f} | {r['max_error']:.1e} |")
        md.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(f"wrote {out.with_suffix('.md')}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.dynamic",
                                description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1,3,8,17,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--only", choices=("new-size", "steady"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dynamic"))
    p.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",")]
    if a.child:
        print(json.dumps(new_size_child(a.child[0], a.child[1], sizes)))
        return 0
    import torch

    data = {"argv": " ".join(argv), "when": time.strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__, "threads": a.threads,
            "load": ", ".join(f"{x:.1f}" for x in os.getloadavg())}
    if a.only in (None, "new-size"):
        data["new_size"] = new_size(sizes, a.threads)
    if a.only in (None, "steady"):
        data["steady"] = steady(a.threads, a.repeat)
    report(data, Path(a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
