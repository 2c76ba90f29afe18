"""What the A/B benchmarks of one code generation choice share (``bench.split_runs``,
``bench.cat_tiles``): stitch compiled with and without the choice (the functions that make it
replaced while compiling), checked bit for bit against eager and timed alternating beside eager
and inductor, one markdown row per case."""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch


def stitch_compiled(fn: Callable, args: tuple, patches: list[tuple[object, str, object]] = ()):
    """``fn`` compiled by stitch for ``args`` with each ``(owner, name, value)`` of ``patches``
    in place while compiling (the choice switched off); a function returning the one output."""
    from cost_model import cpu_spec
    from runtime.graph import compile_program
    from stitch_ir.importer import import_model

    class Fn(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    kept = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        g = compile_program(import_model(Fn().eval(), args), device_spec=cpu_spec(measure=False))
    finally:
        for owner, name, value in kept:
            setattr(owner, name, value)
    return lambda *a: g(*a)[0]


def main(argv, *, prog: str, doc: str, title: str, cases: dict, off: Callable, on: Callable,
         labels: tuple[str, str, str, str]) -> None:
    """The command line of an A/B benchmark ``prog``: each of ``cases`` (name -> (fn, args))
    under eager, inductor, ``off(fn, args)`` and ``on(fn, args)``; ``labels``: the short and
    long names of the off and on variants, for the table."""
    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    off_s, off_l, on_s, on_l = labels
    lines = [f"`python -m {prog} --threads {a.threads} --rounds {a.rounds}` — "
             f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {a.threads} "
             "thread(s); us per call, median of the rounds (each 20 calls), contenders "
             "alternating.", "",
             f"| case | eager | inductor | stitch, {off_l} | stitch, {on_l} "
             f"| {on_s} / {off_s} | stitch ({on_s}) / inductor |", "|---|---|---|---|---|---|---|"]
    for name, (fn, args) in cases.items():
        torch.manual_seed(0)
        with torch.no_grad():
            want = fn(*args)
            run = {"eager": fn, "inductor": torch.compile(fn, backend="inductor"),
                   "off": off(fn, args), "on": on(fn, args)}
            for label, f in run.items():
                if not torch.equal(f(*args), want):
                    raise SystemExit(f"{name}: {label} differs from eager")
            times = {k: [] for k in run}
            for _ in range(a.rounds):
                for k, f in run.items():
                    t = time.perf_counter()
                    for _ in range(20):
                        f(*args)
                    times[k].append((time.perf_counter() - t) / 20 * 1e6)
        m = {k: statistics.median(v) for k, v in times.items()}
        lines.append(f"| {name} | {m['eager']:.1f} | {m['inductor']:.1f} | {m['off']:.1f} "
                     f"| {m['on']:.1f} | {m['off'] / m['on']:.2f}x "
                     f"| {m['inductor'] / m['on']:.2f}x |")
        print(lines[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# {title}\n\n" + "\n".join(lines) + "\n")
