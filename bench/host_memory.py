"""One model a process, as users run them: eager, inductor and stitch each alone in a fresh
process, with glibc's malloc as it starts and as ``runtime.host_memory`` settles it.

    python -m bench.host_memory [--cases 'wl.charformer/f32/train,wl.bert/f32/*'] [--rounds 2]
                                [--threads 2] [--seconds 2] [--out bench/results/host_memory]

``bench.clients`` runs every contender in one process, where whichever ran first has already
left malloc's thresholds high for the rest; a process that runs only one model starts from
glibc's defaults, and its large buffers can fault their pages in on every call. Here each
(case, contender, malloc) runs in its own process: ``default`` is glibc as it starts (stitch
with ``STITCH_MALLOC=default``), ``settled`` calls ``settle_malloc`` first (what compiling a
stitch graph does). Rounds alternate the processes. Each process checks nothing (``bench.clients``
checks correctness); it warms up with three calls, then times calls for ``--seconds`` and
counts the minor page faults they take (``getrusage``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

CONTENDERS = ("eager", "inductor", "stitch")
MODES = ("default", "settled")
DEFAULT_CASES = ("wl.charformer/f32/train,wl.charformer/f32/infer,wl.bert/f32/train,"
                 "wl.rzcr/f32/train,wl.rffs_net/f32/infer,resnet18/b8/f32/infer,gpt2/b8/f32/infer")


def child(case_name: str, kind: str, mode: str, threads: int, seconds: float) -> dict:
    """Time one contender of one case in this process (``--child``)."""
    import resource

    from runtime.host_memory import settle_malloc

    if mode == "settled":
        settle_malloc()
    import torch

    from bench.client_cases import all_cases
    from bench.clients import Contender

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    case = next(c for c in all_cases() if c.name == case_name)
    model, inputs, loss = case.make()
    c = Contender(case, kind, model, inputs, loss)
    c.compile()
    for _ in range(3):
        c()
    times, f0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 10:
        t = time.perf_counter()
        c()
        times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    q = statistics.quantiles(times, n=4)
    return {"case": case_name, "contender": kind, "malloc": mode, "calls": len(times),
            "median_ms": statistics.median(times) * 1e3, "iqr_ms": (q[2] - q[0]) * 1e3,
            "faults_per_call": faults / len(times)}


def run(case: str, kind: str, mode: str, args) -> dict:
    env = dict(os.environ)
    if mode == "default":
        env["STITCH_MALLOC"] = "default"
    cmd = [sys.executable, "-m", "bench.host_memory", "--child", case, kind, mode,
           "--threads", str(args.threads), "--seconds", str(args.seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        return {"case": case, "contender": kind, "malloc": mode,
                "error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def table(results: list[dict], cases: list[str]) -> list[str]:
    def cell(case, kind, mode):
        rs = [r for r in results if r["case"] == case and r["contender"] == kind
              and r["malloc"] == mode and "median_ms" in r]
        if not rs:
            return "FAIL"
        ms = " / ".join(f"{r['median_ms']:.3g}" for r in rs)
        faults = max(r["faults_per_call"] for r in rs)
        return f"{ms} ({faults:.0f})"

    head = [f"{k} {m}" for m in MODES for k in CONTENDERS]
    lines = ["| case | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for case in cases:
        lines.append(f"| {case} | " + " | ".join(cell(case, k, m) for m in MODES
                                                  for k in CONTENDERS) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated case names")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0, help="timed calls fill this long")
    ap.add_argument("--out", default="bench/results/host_memory")
    ap.add_argument("--child", nargs=3, metavar=("CASE", "CONTENDER", "MALLOC"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.threads, args.seconds)), flush=True)
        return 0
    cases = [c for c in args.cases.split(",") if c]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, t0 = [], time.perf_counter()
    for rnd in range(args.rounds):
        for case in cases:
            for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
                for kind in CONTENDERS:
                    r = run(case, kind, mode, args)
                    r["round"] = rnd
                    results.append(r)
                    print(json.dumps(r), flush=True)
    cmd = "python -m bench.host_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    md = ["# One model a process: glibc's malloc as it starts, and settled", "",
          f"`{cmd}` — {time.strftime('%Y-%m-%d %H:%M')}, {args.threads} thread(s), "
          f"{args.rounds} round(s), wall {time.perf_counter() - t0:.0f} s.", "",
          "Each cell: the median ms per call (inference) or training step of each round's "
          "process, then in parentheses the most minor page faults per call of any round. "
          "`default`: glibc's malloc as a process starts (stitch with `STITCH_MALLOC=default`); "
          "`settled`: `runtime.host_memory.settle_malloc()` first, which compiling a stitch "
          "graph does.", ""] + table(results, cases)
    (out / "host_memory.md").write_text("\n".join(md) + "\n")
    (out / "host_memory.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
