"""The cpu pattern set, side by side: eager, torch.compile (inductor) and stitch, in one run.

    .venv/bin/python -m bench.patterns [--threads 1,2] [--repeat 15] [--only layernorm,gnn]
                                       [--small] [--no-inductor]

Patterns (float32): layernorm 8192x1024; softmax(x*0.125) 8192x1024; bias + GELU(erf)
8192x2048; bias + residual + layernorm 8192x1024; GNN gather -> add -> relu -> index_add with
200k nodes, 1M edges, 64 features (the edge index is an input).

Two measurements per pattern, contenders alternating (A B C A B C ...), median and half-range:
(a) called as a user calls it, outputs allocated per call (eager, inductor, stitch);
(b) stitch's kernel alone, writing into a preallocated output.
The floor is the pattern's minimum bytes (inputs read once, outputs written once) over the
bandwidth of a copy of the same total size measured in the same run.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F


def _ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def patterns(small: bool = False, scale: int | None = None):
    s = scale or (8 if small else 1)  # --small: shapes / 8 (quick check); scale: rows / scale
    R, H, F2 = 8192 // s, 1024, 2048
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    nodes, edges, feat = 200_000 // s, 1_000_000 // s, 64
    src = torch.randint(0, nodes, (edges,), generator=g)
    dst = torch.randint(0, nodes, (edges,), generator=g)
    return {
        "layernorm": (lambda x, w, b: _ln(x, w, b), [rnd(R, H), rnd(H), rnd(H)]),
        "softmax": (lambda x: torch.softmax(x * 0.125, -1), [rnd(R, H)]),
        "bias_gelu": (lambda x, b: F.gelu(x + b), [rnd(R, F2), rnd(F2)]),
        "bias_residual_layernorm": (lambda y, b, res, w, beta: _ln(y + b + res, w, beta),
                                    [rnd(R, H), rnd(H), rnd(R, H), rnd(H), rnd(H)]),
        "gnn": (lambda x, e, s_, d: torch.zeros_like(x).index_add(0, d, F.relu(x[s_] + e)),
                [rnd(nodes, feat), rnd(edges, feat), src, dst]),
    }


class Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def min_bytes(name, inputs, outputs) -> int:
    n = sum(t.numel() * t.element_size() for t in outputs)
    if name == "gnn":  # x is gathered: every row read at least once (or per edge, if fewer)
        x, e, s_, d = inputs
        rows = min(x.shape[0], s_.numel())
        return n + rows * x.shape[1] * 4 + e.numel() * 4 + s_.numel() * 8 + d.numel() * 8
    return n + sum(t.numel() * t.element_size() for t in inputs)


def copy_floor(nbytes: int, repeat: int) -> float:
    """Seconds to move ``nbytes`` (half read, half written) by a tensor copy of that total."""
    n = max(nbytes // 2 // 4, 1)
    a, b = torch.randn(n), torch.empty(n)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        b.copy_(a)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def timeit(fns: dict, repeat: int) -> dict[str, tuple[float, float]]:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
        f()
    for _ in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    out = {}
    for k, ts in times.items():
        ts.sort()
        out[k] = (ts[len(ts) // 2], (ts[-1] - ts[0]) / 2)
    return out


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    from cost_model import get_device
    from runtime.graph import compile_program
    from stitch_ir.importer import import_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--only", default="")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--no-inductor", action="store_true")
    args = ap.parse_args(argv)
    pats = patterns(args.small)
    if args.only:
        pats = {k: v for k, v in pats.items() if k in args.only.split(",")}
    device = get_device("cpu")
    compiled = {}
    for name, (fn, inputs) in pats.items():
        model = Wrap(fn).eval()
        t0 = time.perf_counter()
        g = compile_program(import_model(model, tuple(inputs)), device_spec=device)
        # compile the pattern's own function: one code object per pattern, no recompile limit
        ind = None if args.no_inductor else torch.compile(fn, backend="inductor")
        if ind is not None:
            with torch.no_grad():
                ind(*inputs)
        with torch.no_grad():
            want = fn(*inputs)
            got = g(*inputs)[0]
        err = (got - want).abs().max().item()
        compiled[name] = (model, g, ind, err, time.perf_counter() - t0)
        print(f"# {name}: {g.kernels} stitch kernel(s), max abs error vs eager {err:.1e}, "
              f"compile {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        print(f"\n## {threads} thread(s); ms median +- half range; (a) outputs allocated per "
              f"call, (b) kernel only into a preallocated output", flush=True)
        print(f"{'pattern':<24} {'eager':>14} {'inductor':>14} {'stitch (a)':>14} "
              f"{'stitch (b)':>14} {'floor':>7} {'(a)/ind':>7} {'(a)/eag':>7} {'(b)%fl':>7}")
        for name, (fn, inputs) in pats.items():
            model, g, ind, err, _ = compiled[name]
            (kstep,) = [s for s in g.steps if s.kind == "kernel"] or [None]
            with torch.no_grad():
                g(*inputs)
            # (b): run only the kernel step into a preallocated output (its arena / buffer)
            cs = g.new_call_state()
            env = cs.env.copy()
            for i, t in zip(g.prog.user_inputs, inputs):
                env[i] = t
            for s in g.call_steps:
                if s.kind in ("constant", "view"):
                    s.run(env, cs)
            fns = {"eager": lambda fn=fn, inputs=inputs: fn(*inputs),
                   "stitch": lambda g=g, inputs=inputs: g(*inputs)}
            if ind is not None:
                fns["inductor"] = lambda ind=ind, inputs=inputs: ind(*inputs)
            if kstep is not None:
                kstep.run(env, cs)  # allocates its outputs once
                fixed = [env[w] for w in kstep.writes]

                def kernel_only(kstep=kstep, env=env, fixed=fixed, g=g, cs=cs):
                    ins = [env[i] for i in kstep.reads]
                    kstep_ptrs = [t.data_ptr() for t in ins + fixed]
                    kstep.kernel(*kstep_ptrs, *cs.scratch[g.steps.index(kstep)])

                fns["kernel"] = kernel_only
            with torch.no_grad():
                t = timeit(fns, args.repeat)
                want = fn(*inputs)
            floor = copy_floor(min_bytes(name, inputs, [want]), args.repeat)
            e, i, a = t["eager"][0], t.get("inductor", (float("nan"),))[0], t["stitch"][0]
            b = t.get("kernel", (float("nan"), 0))[0]

            def cell(k, t=t):
                m, sp = t.get(k, (float("nan"), 0))
                return f"{m * 1e3:7.2f}+-{sp * 1e3:5.2f}"

            print(f"{name:<24} {cell('eager'):>14} {cell('inductor'):>14} {cell('stitch'):>14} "
                  f"{cell('kernel'):>14} {floor * 1e3:7.2f} {i / a:7.2f} {e / a:7.2f} "
                  f"{100 * floor / b:6.0f}%", flush=True)
            rows.append((threads, name, e, i, a, b, floor))
        # geometric mean of inductor / stitch over the set
        import math

        sel = [r for r in rows if r[0] == threads and not math.isnan(r[3])]
        if sel:
            gm = math.exp(sum(math.log(r[3] / r[4]) for r in sel) / len(sel))
            print(f"geometric mean inductor / stitch (a): {gm:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
