"""A/B of hand-edited variants of generated kernels: evidence for the codegen changes proposed in
``bench/results/clients_analysis.md`` (this changes no generator; it edits rendered sources).

    python -m bench.kernel_variants [--threads 1]

1. GPT-2's ``gelu_new`` on 8x16x256: the kernel as generated (``std::pow(x, 3.0f)``) against the
   same source with ``x * x * x``.
2. GPT-2's q / k / v split of the 1x128x2304 attention projection (slices, head reshape,
   permutes, scale): the copy kernel as generated (``(i*64 + j) % 768`` in the innermost index)
   against the same source with the no-op ``% 768`` removed (``i < 12``, ``j < 64``).
3. ``masked_fill(mask, -inf).softmax(-1)`` on 2048x1024: the kernel with a 20 % random mask and
   with no mask, and variants that load the mask as ``uint8_t``, drop the NaN flag of the max,
   or fill with -1e30 instead of -inf (which of them removes the dependence on the mask).

Each kernel is called on prepacked arguments (no allocation), median of ``--calls`` calls,
variants alternating with the original in one run; each variant is checked against eager.
"""

from __future__ import annotations

import argparse
import re
import time
import warnings

import torch


def _compiled_kernel(fn, inputs):
    from bench.overhead import capture_args

    with capture_args() as seen:
        with torch.no_grad():
            torch.compile(fn, backend="stitch")(*inputs)
    g = seen[0]["graph"]
    (step,) = [s for s in g.steps if s.kind == "kernel"]
    if g.arena is None:
        g._materialise_arena()
    return step, g.scratch_views[g.steps.index(step)]


def _median_ms(kern, ptrs, calls: int) -> float:
    packed = kern.pack(*ptrs)
    for _ in range(3):
        kern.call_packed(packed)
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        kern.call_packed(packed)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def _variant(step, source: str, tag: str):
    from runtime.build import load_kernel

    assert source != step.source.source, f"variant {tag}: nothing substituted"
    return load_kernel(source, step.source.symbol, name=f"{step.source.symbol}_{tag}")


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


def qkv_split(x):
    q, k, v = x.split(768, -1)
    q = q.view(1, 128, 12, 64).permute(0, 2, 1, 3) * 0.125
    k = k.view(1, 128, 12, 64).permute(0, 2, 3, 1) * 0.125
    v = v.view(1, 128, 12, 64).permute(0, 2, 1, 3)
    return q.contiguous(), k.contiguous(), v.contiguous()


def masked_softmax(x, mask):
    return x.masked_fill(mask, float("-inf")).softmax(-1)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=21)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    x = torch.randn(8, 16, 256, generator=gen)
    step, scratch = _compiled_kernel(gelu_new, (x,))
    out = torch.empty_like(x)
    mul3 = _variant(step, step.source.source.replace("std::pow(t0, (3.0f))", "(t0 * t0 * t0)"), "mul3")
    ptrs = [x.data_ptr(), out.data_ptr(), *scratch]
    a, b = _median_ms(step.kernel, ptrs, args.calls), _median_ms(mul3, ptrs, args.calls)
    mul3(*ptrs)
    print(f"gelu_new 8x16x256: std::pow {a:.3f} ms, x*x*x {b:.3f} ms "
          f"(max error vs eager {(out - gelu_new(x)).abs().max().item():.1e})")

    x = torch.randn(1, 128, 2304, generator=gen)
    step, scratch = _compiled_kernel(qkv_split, (x,))
    outs = [torch.empty(1, 12, 128, 64), torch.empty(1, 12, 64, 128), torch.empty(1, 12, 128, 64)]
    no_mod = _variant(step, step.source.source.replace(") % 768))", ")))"), "nomod")
    ptrs = [x.data_ptr(), *[o.data_ptr() for o in outs], *scratch]
    a, b = _median_ms(step.kernel, ptrs, args.calls), _median_ms(no_mod, ptrs, args.calls)
    for o in outs:
        o.fill_(float("nan"))
    no_mod(*ptrs)
    err = max((o - w).abs().max().item() for o, w in zip(outs, qkv_split(x)))
    print(f"q/k/v split 1x128x2304: with % 768 {a:.3f} ms, without {b:.3f} ms (max error vs eager {err:.0e})")

    x = torch.randn(2048, 1024, generator=gen) * 2
    masks = {"20% mask": torch.rand(2048, 1024, generator=gen) < 0.2,
             "no mask": torch.zeros(2048, 1024, dtype=torch.bool)}
    step, scratch = _compiled_kernel(masked_softmax, (x, masks["20% mask"]))
    src = step.source.source
    out = torch.empty_like(x)
    u8 = src.replace("const bool* __restrict in0 = (const bool*)args[0];",
                     "const uint8_t* __restrict in0 = (const uint8_t*)args[0];")
    u8 = re.sub(r"const bool (t\d+) = in0", r"const uint8_t \1 = in0", u8)
    nonan = re.sub(r" acc(\d+)_(\d+)_nan \|= \(int\)\((t\d+) != \3\);", "", src)
    nonan = re.sub(r" reduction\(\|:acc\d+_\d+_nan\)", "", nonan)
    variants = {"as generated": step.kernel, "uint8 mask": _variant(step, u8, "u8"),
                "no NaN flag": _variant(step, nonan, "nonan"),
                "-1e30 fill": _variant(step, src.replace("(-INFINITY) : t", "(-1e30f) : t"), "finite")}
    for label, mask in masks.items():
        ptrs = [mask.data_ptr(), x.data_ptr(), out.data_ptr(), *scratch]
        want = masked_softmax(x, mask)
        cells = []
        for name, kern in variants.items():
            ms = _median_ms(kern, ptrs, args.calls)
            out.fill_(float("nan"))
            kern(*ptrs)
            err = (out - want).abs().max().item()  # NaN if any element was not written
            cells.append(f"{name} {ms:.2f} ms (error {err:.0e})")
        print(f"masked softmax 2048x1024, {label}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
