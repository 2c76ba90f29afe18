"""The client benchmark: models people run, side by side under eager, inductor and stitch.

    python -m bench.clients [--quick] [--cases a,b] [--threads 2] [--repeat N]
                            [--out bench/results/clients] [--profile] [--fresh-cache]

Cases (``bench/client_cases.py``): HF BERT, GPT-2, T5, ViT from configs; a ResNet-18-like CNN;
PyG GIN and GAT; an MLP training loop; small graphs (broadcast chain, masked fill, fake quant,
quantise / dequantise, group norm, RMSNorm, SiLU * mul); batch 1 and 8 (or small and large);
float32 and bfloat16; and the nine workloads of ``models/`` (inference call and training step).
``--quick`` runs a tiny-config subset (``QUICK`` there). ``--cases`` takes comma-separated fnmatch
patterns on the case names (``bert*``, ``*/bf16/*``, ``wl.*/train``: the workloads are named
``wl.<name>/f32/<mode>``), a bare word matching any name that starts with it.

For each case, in this order:
1. correctness: one call (inference, under no_grad) or one training step (loss, then the
   parameter gradients) of inductor and stitch against eager on the same weights and inputs.
   Error = relative L2 over all float outputs (or gradients) together; bound = max(floor of the
   dtype, 3 x eager's own change when every float parameter and input moves by one ulp of its
   dtype). Integer outputs must be equal. A case outside the bound is WRONG: it is timed but
   never counted as a win (no speed-up in the geometric means).
2. compile time: ``cold`` = the first call in this process (dynamo, AOTAutograd, planning, code
   generation, and every kernel not yet in the on-disk cache; ``--fresh-cache`` starts both
   backends' disk caches empty), ``warm`` = the first call after ``torch._dynamo.reset()``, the
   disk caches now filled. Both include one execution.
3. kernels: stitch's steps per call by kind (kernel, library, view, torch, interpreter, ...),
   summed over the graphs the case compiled (forward and backward for a training step); for
   inductor, the number of kernels it generated.
4. steady state: contenders alternate (eager, inductor, stitch, eager, ...), ``--repeat`` rounds
   of as many calls as fill ~``--sample-ms``, each call timed alone: the median call and the
   inter-quartile range (speed-ups use medians), and the mean, which adds the stalls a loaded
   machine causes (a descheduled call, a parallel region waiting for a descheduled thread).
5. ``--profile``: stitch's time per call by step kind (``bench/overhead.py``).

Errors (a bf16 case stitch cannot compile, a model dynamo cannot trace) are recorded per contender
and the run goes on. Results are written after every case: ``clients.json``, ``clients.md`` and
the charts ``clients_vs_eager.png`` / ``clients_vs_inductor.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import math
import os
import platform
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

from bench.client_cases import Case, all_cases

CONTENDERS = ("eager", "inductor", "stitch")
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3}


# -- recording what stitch compiled ---------------------------------------------------------------
@contextlib.contextmanager
def recording():
    """Collects every ``CompiledGraph`` stitch builds (and the fallbacks it counts) while active."""
    from runtime import backend

    graphs: list = []
    original = backend.compile_fx

    def compile_fx(gm, options, *args, **kwargs):
        run = original(gm, options, *args, **kwargs)
        graphs.append(run.stitch_graph)
        return run

    before = Counter(backend.FALLBACKS)
    backend.compile_fx = compile_fx
    rec = {"graphs": graphs, "fallbacks": {}}
    try:
        yield rec
    finally:
        backend.compile_fx = original
        rec["fallbacks"] = dict(Counter(backend.FALLBACKS) - before)


LAYOUT_OPS = {"st.slice", "st.permute", "st.reshape", "st.broadcast", "st.concat", "st.constant",
              "st.cast", "st.transpose", "st.expand", "st.pad"}


def kernel_ops(step) -> list[str]:
    """The st ops a kernel step was generated from (the source's second comment line)."""
    for line in step.source.source.splitlines()[:4]:
        if line.startswith("// from st ops:"):
            return [o.strip() for o in line.split(":", 1)[1].split(",")]
    return []


def step_counts(graphs) -> dict[str, int]:
    """Steps per call by kind; ``copy kernel`` counts the kernels that only move data (slices,
    permutes, casts...: a layout copy a view or the consumer's index map could have avoided)."""
    counts: Counter = Counter()
    for g in graphs:
        counts.update(s.kind for s in g.steps if s.kind != "dead")
        counts["copy kernel"] += sum(1 for s in g.steps if s.kind == "kernel" and s.source is not None
                                     and set(kernel_ops(s)) <= LAYOUT_OPS)
    return {k: v for k, v in counts.items() if v}


# -- contenders ------------------------------------------------------------------------------------
class Contender:
    """One way of running a case: eager, or a ``torch.compile`` backend. Training cases give each
    contender its own copy of the model (own gradients, own SGD updates)."""

    def __init__(self, case: Case, kind: str, model, inputs, loss):
        self.case, self.kind, self.inputs, self.loss = case, kind, inputs, loss
        self.model = copy.deepcopy(model) if case.mode == "train" else model
        self.fn = self.model
        self.opt = (torch.optim.SGD(self.model.parameters(), lr=1e-3)
                    if case.mode == "train" and case.optimizer else None)

    def compile(self, options: dict | None = None) -> None:
        if self.kind == "eager":
            self.fn = self.model
        elif self.kind == "inductor":
            self.fn = torch.compile(self.model, backend="inductor")
        else:
            self.fn = torch.compile(self.model, backend="stitch", options=options or {})

    def __call__(self):
        """One call (inference) or one training step; returns what correctness compares."""
        if self.case.mode == "infer":
            with torch.no_grad():
                return self.fn(*self.inputs)
        for p in self.model.parameters():
            p.grad = None
        loss = self.loss(self.fn(*self.inputs))
        loss.backward()
        out = [loss.detach()] + [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.opt is not None:
            self.opt.step()
        return out


def leaves(out) -> list[torch.Tensor]:
    return [t.detach() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def rel_error(got, want) -> float:
    """Relative L2 error over all float leaves; inf if shapes differ or integer leaves differ."""
    got, want = leaves(got), leaves(want)
    if len(got) != len(want):
        return math.inf
    num = den = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return math.inf
        if not b.is_floating_point():
            if not torch.equal(a, b):
                return math.inf
            continue
        a, b = a.double(), b.double()
        both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
        nan = torch.isnan(a) | torch.isnan(b)
        if bool((torch.isnan(a) != torch.isnan(b)).any()):
            return math.inf
        d = torch.where(both_inf | nan, 0.0, a - b)
        num += float(d.square().sum())
        den += float(torch.where(torch.isfinite(b), b, 0.0).square().sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def sensitivity(case: Case, model, inputs, loss, want, nudges: int = 3) -> float:
    """Eager's own relative change when every float parameter and input moves by one ulp: the
    largest of ``nudges`` random nudges. One nudge can miss a discontinuity that a different
    summation order hits: rcrn's L1 gradients (the sign of restored - clean) moved 2e-3 under
    inductor and stitch alike on one machine, where one nudge had moved them 3e-5."""
    def nudge(t, gen):
        eps = torch.finfo(t.dtype).eps
        return t * (1 + eps * torch.randn(t.shape, generator=gen).sign().to(t.dtype))

    worst = 0.0
    for seed in range(1, nudges + 1):
        m = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                if p.is_floating_point():
                    p.copy_(nudge(p, gen))
        moved = tuple(nudge(t, gen) if isinstance(t, torch.Tensor) and t.is_floating_point()
                      else t for t in inputs)
        c = Contender(case, "eager", m, moved, loss)
        c.opt = None
        worst = max(worst, rel_error(c(), want))
    return worst


# -- timing ----------------------------------------------------------------------------------------
def steady(fns: dict, repeat: int, sample_s: float) -> dict[str, dict]:
    """Alternating contenders, ``repeat`` rounds of ``k`` calls each (``k`` calls fill about
    ``sample_s``), every call timed alone. ``median_ms`` is the median call: on a loaded machine a
    call is sometimes descheduled, or its parallel region waits for a descheduled thread, for
    milliseconds; the median is the typical call, ``mean_ms`` includes those stalls."""
    ks = {}
    for name, f in fns.items():
        f()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        ks[name] = max(2, min(500, int(sample_s / max(sorted(ts)[1], 1e-7))))
    calls: dict[str, list[float]] = {n: [] for n in fns}
    samples: dict[str, list[float]] = {n: [] for n in fns}
    tick = time.perf_counter
    for _ in range(repeat):
        for name, f in fns.items():
            out = calls[name]
            t0 = tick()
            for _ in range(ks[name]):
                t = tick()
                f()
                out.append(tick() - t)
            samples[name].append((tick() - t0) / ks[name])
    res = {}
    for name, ts in calls.items():
        s = sorted(ts)
        q = lambda p, s=s: s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]  # noqa: E731
        res[name] = {"median_ms": q(0.5) * 1e3, "iqr_ms": (q(0.75) - q(0.25)) * 1e3,
                     "mean_ms": sum(s) / len(s) * 1e3, "min_ms": s[0] * 1e3, "calls": len(s),
                     "calls_per_sample": ks[name], "samples_ms": [x * 1e3 for x in samples[name]]}
    return res


def _first_call(c: Contender) -> tuple[float, object]:
    t = time.perf_counter()
    out = c()
    return time.perf_counter() - t, out


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


# -- one case --------------------------------------------------------------------------------------
def run_case(case: Case, args) -> dict:
    from runtime import build

    r: dict = {"case": case.name, "family": case.family, "mode": case.mode,
               "dtype": str(case.dtype).removeprefix("torch."), "note": case.note,
               "status": {}, "errors": {}, "compile_s": {}, "error": {}}
    torch._dynamo.reset()
    try:
        model, inputs, loss = case.make()
    except Exception as e:  # noqa: BLE001 - a case that cannot be built is reported, not fatal
        r["status"] = {k: "FAIL" for k in CONTENDERS}
        r["errors"]["build"] = _short(e)
        return r
    options = {"time_limit": args.time_limit} if args.time_limit else {}
    cs = {k: Contender(case, k, model, inputs, loss) for k in CONTENDERS}
    outs = {}
    try:
        outs["eager"] = cs["eager"]()
        bound = max(FLOOR.get(case.dtype, 1e-4),
                    3 * sensitivity(case, cs["eager"].model if case.mode == "train" else model,
                                    inputs, loss, outs["eager"]))
        if case.optimizer:  # the eager copy took one SGD step: start it again from the weights
            cs["eager"] = Contender(case, "eager", model, inputs, loss)
    except Exception as e:  # noqa: BLE001
        r["status"] = {k: "FAIL" for k in CONTENDERS}
        r["errors"]["eager"] = _short(e)
        return r
    r["bound"] = bound
    r["status"]["eager"] = "OK"
    # cold compile + correctness
    for kind in ("inductor", "stitch"):
        c = cs[kind]
        try:
            with _cold_caches(kind, args.fresh_cache), recording() as rec:
                before = (build.stats()["compiled"], _inductor_kernels())
                c.compile(options)
                dt, out = _first_call(c)
            r["compile_s"][kind] = {"cold": dt}
            if kind == "stitch":
                r["stitch_steps"] = step_counts(rec["graphs"])
                r["stitch_graphs"] = len(rec["graphs"])
                r["kernel_libraries_built"] = build.stats()["compiled"] - before[0]  # TUs, not kernels
                r["fallbacks"] = rec["fallbacks"]
            else:
                r["inductor_kernels"] = _inductor_kernels() - before[1]
            err = rel_error(out, outs["eager"])
            r["error"][kind] = err
            r["status"][kind] = "OK" if err <= bound else "WRONG"
            if kind == "stitch" and r["status"][kind] == "OK" and any(
                    f.startswith("graph:") for f in r["fallbacks"]):
                r["status"][kind] = "FALLBACK"  # a whole graph ran through torch: not stitch's
        except Exception as e:  # noqa: BLE001
            r["status"][kind] = "FAIL"
            r["errors"][kind] = _short(e)
            if args.verbose:
                traceback.print_exc()
    # warm compile: the contenders that are timed
    torch._dynamo.reset()
    graphs = []
    for kind in ("inductor", "stitch"):
        if r["status"][kind] == "FAIL":
            continue
        c = cs[kind] = Contender(case, kind, model, inputs, loss)
        try:
            with recording() as rec:
                c.compile(options)
                dt, _ = _first_call(c)
            r["compile_s"][kind]["warm"] = dt
            if kind == "stitch":
                graphs = rec["graphs"]
        except Exception as e:  # noqa: BLE001
            r["status"][kind] = "FAIL"
            r["errors"][kind] = _short(e)
    fns = {k: cs[k] for k in CONTENDERS if r["status"][k] != "FAIL"}
    if args.also_serial and "stitch" in fns:
        # the same compiled stitch graphs with one OpenMP thread: what running small kernels
        # serially (no parallel region) would give; library calls go serial too
        def serial(c=cs["stitch"], n=args.threads):
            torch.set_num_threads(1)
            try:
                return c()
            finally:
                torch.set_num_threads(n)
        fns["stitch@1thr"] = serial
    try:
        r["time"] = steady(fns, args.repeat, args.sample_ms / 1e3)
    except Exception as e:  # noqa: BLE001
        r["errors"]["timing"] = _short(e)
        return r
    if args.profile and graphs and "stitch" in fns:
        from bench.overhead import profile_steps

        r["profile"] = profile_steps(graphs, fns["stitch"])
    t = r["time"]
    if "inductor" in t:
        r["inductor_vs_eager"] = t["eager"]["median_ms"] / t["inductor"]["median_ms"]
    if "stitch" in t:
        r["stitch_vs_eager"] = t["eager"]["median_ms"] / t["stitch"]["median_ms"]
        if "inductor" in t:
            r["stitch_vs_inductor"] = t["inductor"]["median_ms"] / t["stitch"]["median_ms"]
    return r


def _inductor_kernels() -> int:
    from torch._inductor import metrics

    return metrics.generated_kernel_count


@contextlib.contextmanager
def _cold_caches(kind: str, fresh: bool):
    """With ``--fresh-cache``: stitch builds into an empty kernel cache, inductor runs with its
    caches off, for the cold compile only."""
    if not fresh:
        yield
        return
    if kind == "stitch":
        old = os.environ.get("STITCH_CACHE_DIR")
        with tempfile.TemporaryDirectory(prefix="stitch-cold-",
                                         dir=old or tempfile.gettempdir()) as tmp:
            os.environ["STITCH_CACHE_DIR"] = tmp
            try:
                yield
            finally:
                if old is None:
                    del os.environ["STITCH_CACHE_DIR"]
                else:
                    os.environ["STITCH_CACHE_DIR"] = old
        return
    import torch._inductor.config as cfg

    with cfg.patch(force_disable_caches=True):
        yield


# -- the run ---------------------------------------------------------------------------------------
def select(cases: list[Case], quick: bool, patterns: str) -> list[Case]:
    if patterns:
        pats = [p.strip() for p in patterns.split(",") if p.strip()]
        return [c for c in cases if any(fnmatch.fnmatch(c.name, p) or c.name.startswith(p)
                                        for p in pats)]
    return [c for c in cases if c.quick or not quick]


def warm_up_backends() -> None:
    """Imports and first-use costs of dynamo / inductor / stitch, so the first case's cold compile
    is not charged for them."""
    def f(x):
        return (x * 2).relu().sum(-1)

    x = torch.randn(4, 8)
    for backend in ("inductor", "stitch"):
        torch.compile(f, backend=backend)(x)
    torch._dynamo.reset()


def environment(args, argv) -> dict:
    import shlex
    import sys

    cmd = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    return {"command": f"python -m bench.clients {cmd}".strip(), "torch": torch.__version__,
            "threads": args.threads, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(), "quick": args.quick, "repeat": args.repeat,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny configs only (under 3 minutes)")
    ap.add_argument("--cases", default="", help="comma-separated fnmatch patterns on case names")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=None, help="rounds (default 7, --quick 5)")
    ap.add_argument("--sample-ms", type=float, default=None,
                    help="calls per sample fill this long (default 20, --quick 5)")
    ap.add_argument("--out", default="bench/results/clients")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stitch planner budget per graph (default: the backend's)")
    ap.add_argument("--profile", action="store_true", help="stitch's time by step kind")
    ap.add_argument("--fresh-cache", action="store_true", help="cold compiles with empty disk caches")
    ap.add_argument("--also-serial", action="store_true",
                    help="also time stitch's compiled graphs called with one thread (stitch@1thr)")
    ap.add_argument("--list", action="store_true", help="print the selected case names and exit")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.repeat = args.repeat or (5 if args.quick else 7)
    args.sample_ms = args.sample_ms or (5.0 if args.quick else 20.0)
    cases = select(all_cases(), args.quick, args.cases)
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_all(cases, args, argv)
    finally:
        torch.set_num_threads(threads_before)


def run_all(cases: list[Case], args, argv) -> int:
    from bench.client_report import write_all

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    warm_up_backends()
    results = []
    env = environment(args, argv)
    print(f"# {len(cases)} case(s), {args.threads} thread(s), repeat {args.repeat}", flush=True)
    for case in cases:
        tc = time.perf_counter()
        r = run_case(case, args)
        r["case_s"] = time.perf_counter() - tc
        results.append(r)
        print(one_line(r), flush=True)
        env["wall_s"] = time.perf_counter() - t0
        write_all(out, env, results)
    print(f"# done in {time.perf_counter() - t0:.0f} s; {out}/clients.md", flush=True)
    return 0


def one_line(r: dict) -> str:
    t = r.get("time", {})
    cells = " ".join(f"{k} {t[k]['median_ms']:8.3f}" if k in t else f"{k} {'-':>8}"
                     for k in CONTENDERS)
    st = ",".join(f"{k}={v}" for k, v in r["status"].items() if v != "OK") or "ok"
    su = r.get("stitch_vs_inductor")
    return (f"{r['case']:<34} {cells} ms  stitch/ind {su:5.2f}x  " if su else
            f"{r['case']:<34} {cells} ms  {'':17}") + f"{st}  ({r.get('case_s', 0):.0f} s)" + (
        f"  {r['errors']}" if r["errors"] else "")


if __name__ == "__main__":
    raise SystemExit(main())
