"""Render a ``fusion.group`` as one C++17 / OpenMP kernel.

Two strategies, chosen per group:

- ``rows`` (``codegen.cpp.rows``; FusionStitching's regional stitching, CPU form): every
  reduction is a row reduction over the same ``R`` rows of ``L`` trailing elements; one OpenMP
  loop over rows, one vectorised loop over the row per phase, reduction results in registers and
  row values in per-thread row buffers.
- ``phases`` (``codegen.cpp.phases``; global stitching, and plain loop kernels): each
  materialised value gets its own work-shared loop nest inside one parallel region; the implicit
  barrier between them is the grid barrier.

``render_group`` tries ``rows`` first and falls back to ``phases``.

Kernel ABI: ``extern "C" int <symbol>(void* const* args)`` with ``args`` = the group's operands
(in order), its results, then scratch buffers, then (when the group has symbolic sizes) an int64
array of their values; returns 0, or error bits (``codegen.cpp.emit.ERRORS``: an index out of
range, an integer division by zero).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from codegen.cpp.accumulate import LAYOUT_OPS, SCATTERS  # noqa: F401  (re-exported)
from codegen.cpp.phases import PhaseKernel
from codegen.cpp.rows import RowKernel, RowsUnfit
from codegen.cpp.scalars import STORED, Unsupported, ctype, dims, storage_ctype, symbols_of
from stitch_ir.dialects import fusion

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
    lstrip_blocks=True)
MATH_HEADER = (Path(__file__).parent / "stitch_math.h").read_text()
# What every kernel source starts with after its comment; a batch of kernels compiled as one
# translation unit shares one copy (runtime.build.build_kernels).
PRELUDE = """#include <cstdint>
#include <cmath>
#include <limits>
#include <vector>
#if STITCH_OPENMP
#include <omp.h>
#endif
""" + MATH_HEADER.replace("#pragma once\n", "")


@dataclass
class KernelSource:
    symbol: str
    source: str
    strategy: str  # rows | phases
    n_inputs: int
    n_outputs: int
    scratch: list = field(default_factory=list)  # bytes of each scratch buffer (int or Sym)
    body: str = ""  # the source without PRELUDE: what a batch of kernels concatenates
    # the symbolic sizes the kernel reads (an int64 array after the scratch pointers), by name
    symbols: list[str] = field(default_factory=list)



# 512-bit vectors (``_frame.cpp.jinja``) for a kernel with a thread team whose vector loops all
# run at least this many iterations. GCC 12 prefers 256 bits on Intel cores (znver3 tuning:
# 512 everywhere, so there the pragma changes nothing); at 16 lanes a
# float16 quantise round trip over rows of 1024 ran 1.4x faster, but a softmax-like kernel over
# rows of 32 (three horizontal reductions a row, two vector iterations) ran 1.2x slower, 64-128
# about even, 256 1.04x faster (this Xeon, 2 threads).
WIDE_MIN_TRIP = 256
_SIMD_LOOP = re.compile(r"#pragma omp simd[^\n]*\n\s*for \(int64_t (\w+) = 0; \1 < ([^;]+);[^{\n]*\{")


def _innermost_trips(source: str) -> list[int]:
    """The constant trip counts of ``source``'s innermost ``#pragma omp simd`` loops (a simd
    pragma on a loop around other loops vectorises nothing: the inner loops are the vectors)."""
    trips = []
    for m in _SIMD_LOOP.finditer(source):
        depth, k = 1, m.end()
        while depth and k < len(source):
            depth += {"{": 1, "}": -1}.get(source[k], 0)
            k += 1
        bound = m.group(2).strip()
        if "for (" not in source[m.end():k] and bound.isdigit():
            trips.append(int(bound))
    return trips


def wide_loops(source: str) -> bool:
    """Whether every innermost ``#pragma omp simd`` loop of ``source`` whose trip count is a
    constant runs at least ``WIDE_MIN_TRIP`` iterations (and there is such a loop)."""
    trips = _innermost_trips(source)
    return bool(trips) and min(trips) >= WIDE_MIN_TRIP


def render_group(group: fusion.GroupOp, name: str = "",
                 half_precision: str = "float32") -> KernelSource:
    """The C++ source of one kernel for ``group``; raises ``Unsupported`` when the cpp target
    cannot compile it (the runtime then runs the group some other way). ``half_precision``:
    which float16 / bfloat16 values are rounded to their type (``codegen.cpp.emit``'s
    ``HALF_PRECISION``)."""
    args = list(group.body.args)
    outputs = list(group.body.terminator.operands)
    for v in args + outputs:
        ctype(v.type.dtype)
    if all(0 in dims(v) for v in outputs):
        raise Unsupported("every output is empty (the runtime allocates them; nothing to run)")
    buffers = {id(a): f"in{k}" for k, a in enumerate(args)}
    out_names: dict[int, list[str]] = {}
    for k, v in enumerate(outputs):
        out_names.setdefault(id(v), []).append(f"out{k}")
    # half types are stored as their 16 bits, i1 as bytes; the kernel computes in float / bool
    stored = {f"in{k}": a.type.dtype for k, a in enumerate(args) if a.type.dtype in STORED}
    stored.update({f"out{k}": v.type.dtype for k, v in enumerate(outputs)
                   if v.type.dtype in STORED})
    ops = [op.name for op in group.body.ops[:-1]]
    context = {
        "ops": ops, "kind": group.kind, "mapping": group.attr("mapping", ""),
        "inputs": [(f"in{k}", storage_ctype(a.type.dtype), str(a.type)) for k, a in enumerate(args)],
        "outputs": [(f"out{k}", storage_ctype(v.type.dtype), str(v.type))
                    for k, v in enumerate(outputs)],
        "prelude": PRELUDE,
        # a kernel too small to feed a thread team runs on the calling thread (the schedule's
        # choice): the parallel region is serialised, no threads are woken
        "serial": group.attr("team", 0) == 1,
        "wide_vectors": False,  # decided below, from the rendered loops
    }
    symbols = symbols_of(args + [r for op in group.body.ops for r in op.results])
    context["symbols"] = symbols
    strategy = "rows"
    scratch: list = []
    try:
        if len(set(map(id, outputs))) != len(outputs):
            raise RowsUnfit("an output yielded twice")
        try:
            rk = RowKernel(group, dict(buffers), {k: v[0] for k, v in out_names.items()}, stored,
                           half_precision)
            context.update(rk.render(), gathers=rk.em_has_gather)
        except TypeError as e:  # arithmetic a symbolic size does not have
            if not symbols:  # no symbolic size: a bug in the generator, not a misfit
                raise
            raise RowsUnfit(f"symbolic sizes: {e}") from None
        template = "rows.cpp.jinja"
    except RowsUnfit:
        strategy = "phases"
        try:
            pk = PhaseKernel(group, dict(buffers), out_names, stored, half_precision)
            context.update(pk.render(len(args) + len(outputs)), gathers=pk.gathers)
        except TypeError as e:
            if not symbols:
                raise
            raise Unsupported(f"symbolic sizes: {e}") from None
        scratch = pk.scratch
        template = "phases.cpp.jinja"
    context["syms_arg"] = len(args) + len(outputs) + len(scratch)
    context["strategy"] = strategy
    body_hash = hashlib.sha256(repr((ops, str(group.attributes), strategy)).encode())
    context["symbol"] = "stitch_" + (name or "k") + "_" + body_hash.hexdigest()[:10]
    source = TEMPLATES.get_template(template).render(**context)
    if group.attr("team", 0) != 1 and wide_loops(source):
        context["wide_vectors"] = True
        source = TEMPLATES.get_template(template).render(**context)
    body = TEMPLATES.get_template(template).render(**{**context, "prelude": ""})
    symbol = context["symbol"]
    # the symbol names the source: two different kernels never share one
    final = "stitch_" + (name or "k") + "_" + hashlib.sha256(source.encode()).hexdigest()[:12]
    return KernelSource(final, source.replace(symbol, final), strategy, len(args), len(outputs),
                        scratch, body.replace(symbol, final), symbols)
