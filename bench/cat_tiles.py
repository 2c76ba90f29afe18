"""A/B of staged cats on the cpu (``codegen.cpp.layout.cat_segments``): a cat along the innermost
dim whose parts start at multiples of the tile, one part transposed, compiled with each tile
reading its one part (the transposed part along the tile's columns, a plain part along its rows)
and without (the kernel before: a root cat not staged, a staged one loading every part of the
cat for each element and selecting), timed alternating in one process beside eager and inductor.

    python -m bench.cat_tiles [--threads 2] [--rounds 30] [--out bench/results/...]

Each variant is checked bit for bit against eager before it is timed; the figure is the median
over ``--rounds`` samples of 20 calls each.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def _cases():
    def head_merge(z):
        b, h, p, d = z.shape
        return z.permute(0, 2, 1, 3).reshape(b, p, h * d)

    return {
        "cat(x^T, head merge) [32,64,256] + [32,2,256,16] -> [32,256,96]": (
            lambda x, z: torch.cat([x.transpose(1, 2), head_merge(z)], 2) + 0,
            (torch.randn(32, 64, 256), torch.randn(32, 2, 256, 16))),
        "cat(x^T, y) * 2 [16,64,512] + [16,512,64] -> [16,512,128]": (
            lambda x, y: torch.cat([x.transpose(1, 2), y], 2) * 2,
            (torch.randn(16, 64, 512), torch.randn(16, 512, 64))),
        "cat(y, x^T) * 2 [16,512,64] + [16,64,512] -> [16,512,128]": (
            lambda y, x: torch.cat([y, x.transpose(1, 2)], 2) * 2,
            (torch.randn(16, 512, 64), torch.randn(16, 64, 512))),
        "cat(x1^T, x2^T) [16,32,512] x 2 -> [16,512,64]": (
            lambda x1, x2: torch.cat([x1.transpose(1, 2), x2.transpose(1, 2)], 2) + 0,
            (torch.randn(16, 32, 512), torch.randn(16, 32, 512))),
    }


def _stitch(fn, args, tiles: bool):
    import codegen.cpp.layout as layout
    import codegen.cpp.staged as staged
    from cost_model import cpu_spec
    from runtime.graph import compile_program
    from stitch_ir.importer import import_model

    class Fn(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    keep = staged.cat_segments, layout._staged_cat
    if not tiles:
        staged.cat_segments = lambda *a, **k: None
        layout._staged_cat = lambda *a, **k: False
    try:
        g = compile_program(import_model(Fn().eval(), args), device_spec=cpu_spec(measure=False))
    finally:
        staged.cat_segments, layout._staged_cat = keep
    return lambda *a: g(*a)[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    lines = [f"`python -m bench.cat_tiles --threads {a.threads} --rounds {a.rounds}` — "
             f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {a.threads} "
             "thread(s); us per call, median of the rounds (each 20 calls), contenders "
             "alternating.", "",
             "| case | eager | inductor | stitch, before | stitch, a part per tile "
             "| tiles / before | stitch (tiles) / inductor |", "|---|---|---|---|---|---|---|"]
    for name, (fn, args) in _cases().items():
        torch.manual_seed(0)
        with torch.no_grad():
            want = fn(*args)
            run = {"eager": fn, "inductor": torch.compile(fn, backend="inductor"),
                   "before": _stitch(fn, args, tiles=False), "tiles": _stitch(fn, args, True)}
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
        lines.append(f"| {name} | {m['eager']:.1f} | {m['inductor']:.1f} | {m['before']:.1f} "
                     f"| {m['tiles']:.1f} | {m['before'] / m['tiles']:.2f}x "
                     f"| {m['inductor'] / m['tiles']:.2f}x |")
        print(lines[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# Staged cats: a part per tile\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
