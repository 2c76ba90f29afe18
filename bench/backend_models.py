"""torch.compile(backend="stitch") on the workloads: correctness of forward and one training step
against eager, fallback ops, and (for bert) time per inference call and per training step,
eager vs inductor vs stitch, alternating, median of N.

    .venv/bin/python -m bench.backend_models [--models bert,molcpt] [--repeat 10] [--time bert]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def _leaves(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def check(name: str) -> str:
    import models
    from runtime import backend

    w = models.get(name)
    m = w.model
    before = dict(backend.FALLBACKS)
    compiled = torch.compile(m, backend="stitch")
    t0 = time.perf_counter()
    with torch.no_grad():
        fwd = max((a - b).abs().max().item() for a, b in
                  zip(_leaves(compiled(*w.example_inputs)), _leaves(m(*w.example_inputs))))
    m.zero_grad()
    w.loss_fn(m(*w.example_inputs), w).backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    w.loss_fn(compiled(*w.example_inputs), w).backward()
    grad = max(((p.grad - want[n]).abs().max().item() for n, p in m.named_parameters()
                if p.grad is not None and n in want), default=0.0)
    fell = {k: v - before.get(k, 0) for k, v in backend.FALLBACKS.items()
            if v != before.get(k, 0)}
    return (f"{name:<16} fwd err {fwd:.1e}  grad err {grad:.1e}  "
            f"compile+run {time.perf_counter() - t0:6.1f} s  fallbacks {fell or 'none'}")


def time_model(name: str, repeat: int) -> None:
    import models

    w = models.get(name)
    m = w.model
    contenders = {"eager": m, "inductor": torch.compile(m, backend="inductor"),
                  "stitch": torch.compile(m, backend="stitch")}

    def infer(f):
        with torch.no_grad():
            f(*w.example_inputs)

    def train(f):
        m.zero_grad()
        w.loss_fn(f(*w.example_inputs), w).backward()

    for label, step in (("inference call", infer), ("training step", train)):
        for f in contenders.values():  # warm-up (and compile)
            step(f)
            step(f)
        ts = {k: [] for k in contenders}
        for _ in range(repeat):
            for k, f in contenders.items():
                t = time.perf_counter()
                step(f)
                ts[k].append(time.perf_counter() - t)
        row = []
        for k, v in ts.items():
            v.sort()
            row.append(f"{k} {v[len(v) // 2] * 1e3:7.2f} ms +-{(v[-1] - v[0]) / 2 * 1e3:5.2f}")
        print(f"{name} {label:<15} " + "   ".join(row), flush=True)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    import models

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(models.names()))
    ap.add_argument("--time", default="bert")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args(argv)
    for name in [n for n in args.models.split(",") if n]:
        try:
            print(check(name), flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on with the next model
            print(f"{name:<16} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
    for name in [n for n in args.time.split(",") if n]:
        time_model(name, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
