"""A/B of the cpu loop nests that read runs a reshape split from the vector loop's dim
(``codegen.cpp.layout.contiguous_run``): each case compiled with the split and without it (the
one vector loop whose loads divide its variable), timed alternating in one process beside eager
and inductor.

    python -m bench.split_runs [--threads 2] [--rounds 30] [--out bench/results/...]

The cases are the head merges and head-split transposes of charformer and multi-head attention:
a plain nest whose innermost dim merges two dims that are not adjacent in the buffer, and a
staged transpose whose contiguous dim a reshape split. Each variant is checked bit for bit
against eager before it is timed; the figure is the median over ``--rounds`` samples of 20
calls each.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def _cases():
    return {
        "head merge copy [2,2,4096,16] -> [2,4096,32]": (
            lambda x: x.permute(0, 2, 1, 3).reshape(2, 4096, 32) + 0,
            (torch.randn(2, 2, 4096, 16),)),
        "head merge * y [2,4,1024,16] -> [2,1024,64]": (
            lambda x, y: x.permute(0, 2, 1, 3).reshape(2, 1024, 64) * y,
            (torch.randn(2, 4, 1024, 16), torch.randn(1024, 64))),
        "staged transpose [256,8,64,8] -> [256,64,64]": (
            lambda x: x.permute(0, 1, 3, 2).reshape(256, 64, 64) + 0,
            (torch.randn(256, 8, 64, 8),)),
        "staged transpose * y [64,16,64,4] -> [64,64,64]": (
            lambda x, y: x.permute(0, 1, 3, 2).reshape(64, 64, 64) * y,
            (torch.randn(64, 16, 64, 4), torch.randn(64, 64))),
    }


def _stitch(fn, args, split: bool):
    import codegen.cpp.phases as phases
    import codegen.cpp.staged as staged
    from cost_model import cpu_spec
    from runtime.graph import compile_program
    from stitch_ir.importer import import_model

    class Fn(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    keep = phases.contiguous_run
    if not split:  # the plain nests' split and the staged copies'
        phases.contiguous_run = staged.contiguous_run = lambda *a, **k: None
    try:
        g = compile_program(import_model(Fn().eval(), args), device_spec=cpu_spec(measure=False))
    finally:
        phases.contiguous_run = staged.contiguous_run = keep
    return lambda *a: g(*a)[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    lines = [f"`python -m bench.split_runs --threads {a.threads} --rounds {a.rounds}` — "
             f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {a.threads} "
             "thread(s); us per call, median of the rounds (each 20 calls), contenders "
             "alternating.", "",
             "| case | eager | inductor | stitch, one vector loop | stitch, split at the runs "
             "| split / one loop | stitch (split) / inductor |", "|---|---|---|---|---|---|---|"]
    for name, (fn, args) in _cases().items():
        torch.manual_seed(0)
        with torch.no_grad():
            want = fn(*args)
            run = {"eager": fn, "inductor": torch.compile(fn, backend="inductor"),
                   "one loop": _stitch(fn, args, split=False), "split": _stitch(fn, args, True)}
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
        lines.append(f"| {name} | {m['eager']:.1f} | {m['inductor']:.1f} | {m['one loop']:.1f} "
                     f"| {m['split']:.1f} | {m['one loop'] / m['split']:.2f}x "
                     f"| {m['inductor'] / m['split']:.2f}x |")
        print(lines[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Loop nests split at the runs a reshape made\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
