"""Per-call overhead of a compiled graph: what a steady-state call costs beyond its kernels.

    python -m bench.overhead [--threads 2] [--calls 2000] [--out bench/results/overhead.md]

Two graphs of tiny tensors (8x8 float32): ``one_kernel`` (``relu(x * 2 + 1)``: one fused kernel)
and ``thirty_layers`` (30 x (mm, then tanh(layer-norm-like)): ~30 kernels and 30 mm library calls).
For each, per call, contenders alternating:

- eager; inductor (``torch.compile``); ``aot_eager`` (dynamo + AOTAutograd running the aten graph
  eagerly: the wrapper cost every AOT backend pays, next to eager's);
- stitch through ``torch.compile`` (what a user pays); the ``CompiledGraph`` called directly
  (the same inputs AOTAutograd hands it): the difference is the dynamo + AOTAutograd wrapper;
- stitch's kernels alone: each kernel's ctypes call on prepacked arguments, and an empty
  ``extern "C"`` function of the same arity through the same ctypes path (the launch floor).

Then the graph's call is replayed step by step (the steps a call runs: the static ones ran when
its call state was made) with a timer around each step: the time by step kind. A cProfile of calls
through ``torch.compile`` lists the functions the wrapper spends its time in.

``profile_steps`` (used by ``bench.clients --profile``) times a real compiled call by step kind.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch


# -- stitch's time by step kind inside real calls -------------------------------------------------
def profile_steps(graphs, call, calls: int | None = None, budget_s: float = 0.3,
                  top: int = 10) -> dict:
    """Runs ``call()`` with a timer around every step of ``graphs`` and around each
    ``CompiledGraph.__call__`` (``calls`` times, or as often as fills ``budget_s``). Returns ms per
    call, as medians over the calls (a loaded machine preempts a call now and then; the median is
    the typical call): total, outside the graphs (dynamo, AOTAutograd, autograd, the caller's own
    ops), the graphs' own Python (the step loop, argument checks: graph time minus its steps),
    each step kind (the sum of its steps' medians), and the ``top`` slowest steps with their input
    shapes (``!`` marks a non-contiguous input)."""
    from runtime.graph import CompiledGraph

    per_step: dict[str, list[float]] = defaultdict(list)
    kinds: dict[str, str] = {}
    shapes: dict[str, str] = {}
    in_graph = [0.0]
    saved = []
    for gi, g in enumerate(graphs):
        for k, s in enumerate(g.steps):
            saved.append((s, s.run))
            key = f"g{gi}.{k} {s.kind} {s.name}"
            kinds[key] = s.kind

            def timed(env, cs, s=s, run=s.run, key=key):
                if key not in shapes:
                    shapes[key] = " ".join(
                        "x".join(map(str, env[i].shape)) + ("" if env[i].is_contiguous() else "!")
                        for i in s.reads if isinstance(env[i], torch.Tensor))
                t = time.perf_counter()
                run(env, cs)
                per_step[key].append(time.perf_counter() - t)
            s.run = timed
        g.refresh_steps()
    original = CompiledGraph.__call__

    last_args: dict[int, tuple] = {}

    def graph_call(self, *a):
        last_args[id(self)] = a
        t = time.perf_counter()
        try:
            return original(self, *a)
        finally:
            in_graph[0] += time.perf_counter() - t

    CompiledGraph.__call__ = graph_call
    totals, inside = [], []
    try:
        t = time.perf_counter()
        call()
        if calls is None:
            calls = max(5, min(2000, int(budget_s / max(time.perf_counter() - t, 1e-6))))
        per_step.clear()
        for _ in range(calls):
            in_graph[0] = 0.0
            t0 = time.perf_counter()
            call()
            totals.append(time.perf_counter() - t0)
            inside.append(in_graph[0])
    finally:
        CompiledGraph.__call__ = original
        for s, run in saved:
            s.run = run
        for g in graphs:
            g.refresh_steps()

    def med(xs):
        return sorted(xs)[len(xs) // 2] * 1e3 if xs else 0.0

    # a step that runs n times per call (a graph called n times) counts n times
    step_ms = {k: med(v) * max(1, round(len(v) / calls)) for k, v in per_step.items()}
    by_kind: Counter = Counter()
    for k, ms in step_ms.items():
        by_kind[kinds[k]] += ms
    slowest = sorted(step_ms.items(), key=lambda kv: -kv[1])[:top]
    return {"calls": calls, "call_ms": med(totals), "outside_graphs_ms": med(totals) - med(inside),
            "graph_python_ms": med(inside) - sum(step_ms.values()),
            "inputs": sum(len(a) for a in last_args.values()),
            "by_kind_ms": dict(by_kind), "top_steps_ms": [(n, ms, shapes.get(n, "")) for n, ms in slowest]}


# -- the two graphs -------------------------------------------------------------------------------
def one_kernel(x):
    return (x * 2 + 1).relu()


def thirty_layers(x, w):
    for i in range(w.shape[0]):
        y = x @ w[i]
        y = (y - y.mean(-1, keepdim=True)) * 0.5
        x = torch.tanh(y)
    return x


def graphs_to_measure(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return {"one_kernel": (one_kernel, (torch.randn(n, n, generator=g),)),
            "thirty_layers": (thirty_layers, (torch.randn(n, n, generator=g),
                                              torch.randn(30, n, n, generator=g) / n ** 0.5))}


def _stats(us: list[float]) -> dict[str, float]:
    s = sorted(us)
    return {"p50": s[len(s) // 2], "p90": s[int(0.9 * (len(s) - 1))], "mean": sum(s) / len(s)}


def per_call(fns: dict, calls: int, rounds: int) -> dict[str, dict[str, float]]:
    """Every call timed alone (us), contenders alternating in ``rounds`` rounds of ``calls``
    calls: the median is the typical call, the mean adds the rare stalls (a parallel region
    waiting for a descheduled thread, page faults)."""
    for f in fns.values():
        for _ in range(20):
            f()
    samples = defaultdict(list)
    tick = time.perf_counter_ns
    for _ in range(rounds):
        for k, f in fns.items():
            out = samples[k]
            for _ in range(calls):
                t = tick()
                f()
                out.append((tick() - t) / 1e3)
    return {k: _stats(v) for k, v in samples.items()}


@contextlib.contextmanager
def capture_args():
    """Records each stitch graph and the arguments AOTAutograd passes it on its last call."""
    from runtime import backend

    seen: list = []
    original = backend.compile_fx

    def compile_fx(gm, options, *args, **kwargs):
        run = original(gm, options, *args, **kwargs)
        entry = {"graph": run.stitch_graph, "args": None}
        seen.append(entry)

        def spy(*args):
            entry["args"] = args
            return run(*args)

        spy.stitch_graph = run.stitch_graph
        return spy

    backend.compile_fx = compile_fx
    try:
        yield seen
    finally:
        backend.compile_fx = original


def _env(g, args):
    """(env, call state): the value list a ``CompiledGraph`` call runs its steps on, as
    ``CompiledGraph.__call__`` builds it (the state's static environment plus the inputs)."""
    cs = g.new_call_state()
    env = cs.env.copy()
    for i, t in zip(g.prog.user_inputs, args):
        env[i] = t
    return env, cs


def replay(g, args, calls: int) -> dict:
    """The call's steps run one by one with a timer around each: us per call by step kind
    (median over calls of each call's sum, and mean; the timer's own cost subtracted). Kernel
    steps are split into their Python (argument array, outputs) and the kernel call itself."""
    tick = time.perf_counter
    n_kind = Counter(s.kind for s in g.call_steps)
    rows: list[Counter] = []
    for rep in range(calls + 5):
        row: Counter = Counter()
        env, cs = _env(g, args)
        for s in g.call_steps:
            t = tick()
            s.run(env, cs)
            row[s.kind] += tick() - t
        if rep >= 5:
            rows.append(row)
    t = tick()
    for _ in range(1000):
        tick()
    timer = (tick() - t) / 1000
    out = {}
    for key in rows[0]:
        n = n_kind[key]
        st = _stats([(r[key] - n * timer) * 1e6 for r in rows])
        out[key] = {"p50": st["p50"], "mean": st["mean"]}
    return {"us": out, "steps": dict(n_kind), "static_steps": len(g.static_steps),
            "timer_us": timer * 1e6}


def kernels_alone(g, args, calls: int, threads: int) -> dict[str, dict[str, float]]:
    """Per call (us): every kernel's ctypes call on prepacked arguments, at ``threads`` threads and
    at 1; and an empty ``extern "C"`` function through the same ctypes path as often (the floor)."""
    from runtime.build import load_kernel

    env, cs = _env(g, args)
    launches = []
    for k, s in enumerate(g.steps):
        if s in g.call_steps:
            s.run(env, cs)
        if s.kind == "kernel":
            kern = s.kernel
            ptrs = [env[i].contiguous().data_ptr() for i in s.reads] + \
                [env[w].data_ptr() for w in s.writes]
            launches.append((kern, kern.pack(*ptrs, *cs.scratch[k])))
    noop = load_kernel('extern "C" int stitch_noop(void* const* args) { return args == 0; }',
                       "stitch_noop")
    empty = [(noop, packed) for _, packed in launches]

    def run(ls):
        tick = time.perf_counter_ns
        us = []
        for _ in range(calls):
            t = tick()
            for kern, packed in ls:
                kern.call_packed(packed)
            us.append((tick() - t) / 1e3)
        return _stats(us)

    out = {}
    for n in (threads, 1):
        torch.set_num_threads(n)
        run(launches)
        out[f"kernels alone, {n} thr"] = run(launches)
    torch.set_num_threads(threads)
    out["empty ctypes calls"] = run(empty)
    return out


def cprofile_top(f, calls: int, n: int = 18) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        f()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(n)
    text = buf.getvalue()
    keep = text[text.find("ncalls"):] if "ncalls" in text else text
    return "\n".join(line.replace("/work/main/.venv/lib/python3.11/site-packages/", "")[:150]
                     for line in keep.splitlines() if line.strip())


def measure(name: str, fn, inputs, calls: int, rounds: int, threads: int) -> tuple[dict, str]:
    torch._dynamo.reset()
    ind = torch.compile(fn, backend="inductor")
    aot = torch.compile(fn, backend="aot_eager")
    with capture_args() as seen:
        sti = torch.compile(fn, backend="stitch")
        with torch.no_grad():
            sti(*inputs)
    (entry,) = seen
    g, args = entry["graph"], entry["args"]

    def call(f):
        def run():
            with torch.no_grad():
                return f(*inputs)
        return run

    direct = lambda: g(*args)  # noqa: E731
    fns = {"eager": call(fn), "inductor": call(ind), "aot_eager": call(aot), "stitch": call(sti),
           "stitch CompiledGraph direct": direct}
    us = per_call(fns, calls, rounds)
    us.update(kernels_alone(g, args, calls * 2, threads))
    rp = replay(g, args, calls * 2)
    prof = cprofile_top(call(sti), calls)
    return {"graph": name, "us": us, "replay": rp,
            "steps": dict(Counter(s.kind for s in g.steps))}, prof


def report(rows: list[dict], profiles: dict[str, str], threads: int, calls: int) -> str:
    import os

    lines = ["# Per-call overhead of stitch's compiled graphs",
             "",
             f"`python -m bench.overhead --threads {threads} --calls {calls}` — "
             f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {threads} thread(s), "
             f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} (a shared 2-core VM: "
             "absolute numbers are noisy, ratios within one run hold better).",
             "", "Microseconds per call, float32 8x8 inputs, under no_grad, every call timed alone, "
             "contenders alternating: median (the typical call) / mean (with the rare stalls).", ""]
    keys = list(rows[0]["us"])
    lines.append("| graph | steps | " + " | ".join(keys) + " |")
    lines.append("|---|---|" + "---|" * len(keys))
    for r in rows:
        steps = " ".join(f"{v} {k}" for k, v in r["steps"].items())
        lines.append(f"| {r['graph']} | {steps} | " + " | ".join(
            f"{r['us'][k]['p50']:.1f} / {r['us'][k]['mean']:.0f}" for k in keys) + " |")
    lines += ["", "Derived from the medians (us per call):", "",
              "| graph | dynamo+AOT wrapper around stitch (torch.compile - direct) | the same for "
              "aot_eager (aot_eager - eager) | graph Python beyond the kernels (direct - kernels alone) "
              "| ctypes floor (empty calls) | in the kernels (alone - empty) | parallel-region cost "
              "(kernels at N thr - at 1 thr) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        u = {k: v["p50"] for k, v in r["us"].items()}
        alone = u[f"kernels alone, {threads} thr"]
        lines.append(f"| {r['graph']} | {u['stitch'] - u['stitch CompiledGraph direct']:.1f} | "
                     f"{u['aot_eager'] - u['eager']:.1f} | "
                     f"{u['stitch CompiledGraph direct'] - alone:.1f} | {u['empty ctypes calls']:.1f} | "
                     f"{alone - u['empty ctypes calls']:.1f} | {alone - u['kernels alone, 1 thr']:.1f} |")
    lines += ["", "Replay of the direct call, a timer around each step and each part of a kernel "
              "step (us per call, median / mean over calls, the timer's cost subtracted):", ""]
    for r in rows:
        rp = r["replay"]
        cells = ", ".join(f"{k} {v['p50']:.1f} / {v['mean']:.1f}" for k, v in rp["us"].items())
        lines.append(f"- **{r['graph']}** ({rp['steps']}): {cells}.")
    for name, text in profiles.items():
        lines += ["", f"### cProfile, {name} through torch.compile(backend=\"stitch\"), by own time",
                  "", "```", text, "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--out", default="bench/results/overhead.md")
    args = ap.parse_args(argv)
    sections = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        rows, profiles = [], {}
        for name, (fn, inputs) in graphs_to_measure(args.size).items():
            row, prof = measure(name, fn, inputs, args.calls, args.rounds, threads)
            rows.append(row)
            profiles[name] = prof
            print(threads, name, {k: round(v["p50"], 1) for k, v in row["us"].items()}, flush=True)
        sections.append(report(rows, profiles if threads == 1 else {}, threads, args.calls))
    text = "\n".join(sections)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
