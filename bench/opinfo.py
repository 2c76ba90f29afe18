"""PyTorch's OpInfo database as a test suite for the stitch backend.

    python -m bench.opinfo --dtype float32 [--ops abs,var] [--samples 2] [--timeout 120] [--jobs 1]

Every op of ``torch.testing._internal.common_methods_invocations.op_db`` that supports the dtype
on cpu is run on its first ``--samples`` sample inputs, once eagerly and once through
``torch.compile(..., backend="stitch", fullgraph=True)``, each sample in a fresh dynamo state
(``torch._dynamo.reset()``), the way Inductor's ``test/inductor/test_torchinductor_opinfo.py``
runs it. Each sample is recorded as

- ``pass``: same output structure, shapes, dtypes and values (stride-insensitive; exact for
  integer and bool results, per-dtype tolerances for floats, see ``TOLERANCES``), and the
  inputs mutated the same way;
- ``wrong``: any difference, with the largest error (a shape [1] result where eager gives a
  rank-0 tensor is wrong);
- ``error``: the compiled function raised (type and first line), timed out or killed its worker;
- ``skip``: not comparable (random output, undefined values, eager itself raised, or dynamo
  cannot capture the op in one graph), with the reason.

Each sample also records what ran outside stitch's kernels: the change of
``runtime.backend.FALLBACKS`` (``aten.*`` = an ``st.torch_call``; ``interpreter: ...`` = a group
the C++ generator could not compile; ``graph: ...`` = a graph stitch could not compile at all,
which then ran as torch: a pass that is really eager's) and why.

Ops run in spawned worker processes, one op at a time per worker, so a crash or hang of one op
is recorded and the sweep goes on with a fresh worker. Results go to
``bench/results/opinfo_<dtype>.json`` and a markdown table ``opinfo_<dtype>.md`` beside it (with
``--ops``, to ``out/opinfo/`` unless ``--update`` merges them into the committed files).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import warnings
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (atol, rtol) by the dtype of each output tensor: torch.testing.assert_close's float32 and
# float64 defaults; half precision as Inductor's low-precision checks (a few ulps).
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

_RANDOM = "random output: eager and compiled draw different numbers"
_UNDEFINED = "uninitialised memory: values are undefined (shape and dtype are still compared)"
# Ops skipped outright, by op key (name[.variant]), with the reason.
SKIP_OPS: dict[str, str] = {
    **{k: _RANDOM for k in (
        "bernoulli", "cauchy", "exponential", "geometric", "log_normal", "normal",
        "normal.in_place", "normal.number_mean", "uniform", "multinomial", "rand_like",
        "randn_like", "randint_like", "randn", "randint", "nn.functional.dropout",
        "nn.functional.dropout2d", "nn.functional.dropout3d", "nn.functional.alpha_dropout",
        "nn.functional.feature_alpha_dropout.with_train", "nn.functional.rrelu",
        "nn.functional.fractional_max_pool2d", "nn.functional.fractional_max_pool3d",
        "svd_lowrank", "pca_lowrank")},
    **{k: "jiterator ops are CUDA-only (their cpu sample inputs call a CUDA kernel generator)"
       for k in ("jiterator_unary", "jiterator_binary", "jiterator_4inputs_with_extra_args",
                 "jiterator_binary_return_by_ref", "jiterator_2inputs_2outputs")},
}
# Ops whose result values are undefined: only shapes and dtypes are compared.
VALUES_UNDEFINED = {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided",
                    "empty_permuted", "resize_", "resize_as_"}

# Ops whose eager float result is itself ill-conditioned, so a different but equally valid
# evaluation order moves it by more than the tolerance. For these a sample also passes when
# the compiled result is no further from a float64 reference than eager is (twice eager's
# error plus atol: the criterion of torch's test_decomp), as Inductor compares such ops
# against a higher-precision reference. Each entry says why the op is ill-conditioned. (No
# float32 sample needs one; the float16 mismatches of addr, cross and avg_pool2d came from
# stitch rounding where eager does not, or the reverse, and were fixed in the importer.)
_HALF_ACCUMULATION = ("eager accumulates in the storage dtype on cpu (one float16 / bfloat16 "
                      "rounding per added term), stitch in wider precision, rounding once: in "
                      "half precision eager is the less accurate of the two")
REFERENCE_F64: dict[str, str] = {
    "_unsafe_masked_index_put_accumulate": _HALF_ACCUMULATION,  # repeated indices accumulate
    "nn.functional.adaptive_avg_pool3d": _HALF_ACCUMULATION,  # window sums
    # dynamo, before any backend sees the graph, rewrites addcdiv(x, a, b, value=v) as
    # add(x, mul(div(a, b), v)): stitch rounds each of those ops exactly as eager runs them
    # (bit for bit), eager's addcdiv rounds once
    # eager's half exp(-x * y) overflows to inf for -x * y > 11.1; stitch (torch's decomposition)
    # computes in float: finite, the float64 value
    "nn.functional.soft_margin_loss": "eager computes exp(-x*y) in half precision, which "
                                      "overflows to inf where the loss is finite",
    # instance_norm runs batch norm over the reshaped input; eager's half kernel rounds its
    # statistics in a way stitch does not reproduce: stitch computes them and the normalisation
    # in float, rounding once (closer to float64 than eager on the sweep's samples)
    "nn.functional.instance_norm": "eager's half batch-norm kernel rounds its statistics; stitch "
                                   "computes in float and rounds once",
    "addcdiv": "dynamo rewrites addcdiv(value=v) into div, mul, add before the backend; in half "
               "precision each rounds (as eager's own div, mul, add do), eager's fused kernel once",
}


# ----------------------------------------------------------------------------------------------
# One sample


@dataclass
class SampleResult:
    index: int
    status: str  # pass | wrong | error | skip
    detail: str = ""
    max_err: float | None = None
    fallbacks: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> {count, why}
    notes: list[str] = field(default_factory=list)
    graphs: int = 0  # graphs dynamo handed to the backend
    seconds: float = 0.0
    shapes: str = ""


def op_key(op) -> str:
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def _call_through(op, *args, **kwargs):
    """Stands in for OpInfo's ``wrapper_set_seed``, whose rng-state context dynamo will not
    trace; the ops it wraps that draw random numbers are skipped (SKIP_OPS) anyway."""
    return op(*args, **kwargs)


def op_table() -> dict[str, Any]:
    from torch.testing._internal import common_methods_invocations as cmi

    cmi.wrapper_set_seed = _call_through  # as Inductor's OpInfo test does
    return {op_key(op): op for op in cmi.op_db}


def select_ops(dtype: torch.dtype, names: list[str] | None = None) -> list[str]:
    """The op keys of op_db supporting ``dtype`` on cpu (``names`` must all be known)."""
    table = op_table()
    if names:
        unknown = [n for n in names if n not in table]
        if unknown:
            raise SystemExit(f"unknown op(s): {', '.join(unknown)} (op keys are name[.variant], "
                             "e.g. round.decimals_3)")
        return [n for n in names if dtype in table[n].supported_dtypes("cpu")]
    return [k for k, op in table.items() if dtype in op.supported_dtypes("cpu")]


def samples_of(op, dtype: torch.dtype, n: int) -> list:
    """The first ``n`` sample inputs, generated under a seed fixed by the op's key (so a sample
    is the same whichever order ops run in)."""
    torch.manual_seed(zlib.crc32(op_key(op).encode()))
    return list(itertools.islice(op.sample_inputs("cpu", dtype, requires_grad=False), n))


def clone_preserving_strides(x: Any) -> Any:
    """A copy of every tensor in ``x`` with the same sizes, strides and storage offset (expanded
    and overlapping layouts included), so both runs see the same memory layout."""
    if not isinstance(x, torch.Tensor) or x.layout != torch.strided:
        return x
    if x.numel() == 0:
        return x.clone()
    extent = 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride()))
    base = torch.as_strided(x, (extent,), (1,)).clone()
    return torch.as_strided(base, x.shape, x.stride())


def _upcast(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return x.to(torch.float64)
    return x


def _as_float64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.to(torch.float64)


def compare(expected: Any, actual: Any, values: bool = True) -> tuple[bool, float | None, str]:
    """(equal, largest error, what differs) of two op results of any structure."""
    e_leaves, e_spec = tree_flatten(expected)
    a_leaves, a_spec = tree_flatten(actual)
    if len(e_leaves) != len(a_leaves):
        return False, None, f"{len(a_leaves)} outputs, expected {len(e_leaves)}"
    worst = 0.0
    for k, (e, a) in enumerate(zip(e_leaves, a_leaves)):
        where = f"output {k}: " if len(e_leaves) > 1 else ""
        if isinstance(e, torch.Tensor) != isinstance(a, torch.Tensor):
            return False, None, f"{where}{type(a).__name__}, expected {type(e).__name__}"
        if not isinstance(e, torch.Tensor):
            if isinstance(e, float) and isinstance(a, float):
                if not (math.isclose(e, a, rel_tol=1.3e-6, abs_tol=1e-5)
                        or (math.isnan(e) and math.isnan(a))):
                    return False, abs(e - a), f"{where}{a!r}, expected {e!r}"
            elif type(e) is not type(a) or e != a:
                return False, None, f"{where}{a!r}, expected {e!r}"
            continue
        if tuple(a.shape) != tuple(e.shape):
            return False, None, f"{where}shape {list(a.shape)}, expected {list(e.shape)}"
        if a.dtype != e.dtype:
            return False, None, f"{where}dtype {a.dtype}, expected {e.dtype}"
        if not values or e.numel() == 0:
            continue
        if not (e.is_floating_point() or e.is_complex()):
            if not torch.equal(a.detach().to_dense() if a.layout != torch.strided else a,
                               e.detach().to_dense() if e.layout != torch.strided else e):
                bad = (a != e).sum().item()
                return False, None, f"{where}{bad} of {e.numel()} elements differ (exact dtype)"
            continue
        ok, err, why = _close(_as_float64(e), _as_float64(a), e.dtype)
        worst = max(worst, err)
        if not ok:
            return False, err, f"{where}{why}"
    return True, worst, ""


def _close(e: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float, str]:
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    nan_e, nan_a = e.isnan(), a.isnan()
    if not torch.equal(nan_e, nan_a):
        return False, math.inf, f"NaN at {int((nan_e != nan_a).sum())} position(s) differs"
    inf_e, inf_a = e.isinf(), a.isinf()
    if not torch.equal(inf_e, inf_a) or not torch.equal(e[inf_e], a[inf_a]):
        return False, math.inf, "infinities differ"
    fin = ~(nan_e | inf_e)
    diff = (a[fin] - e[fin]).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    bad = diff > atol + rtol * e[fin].abs()
    if bool(bad.any()):
        return False, err, (f"max abs error {err:.3g} ({int(bad.sum())} of {e.numel()} elements "
                            f"beyond atol {atol:g} + rtol {rtol:g})")
    return True, err, ""


def _max_error(ref: Any, got: Any) -> float:
    """Largest absolute difference over the outputs (NaNs and shape mismatches left out)."""
    r_leaves, _ = tree_flatten(ref)
    g_leaves, _ = tree_flatten(got)
    worst = 0.0
    for r, g in zip(r_leaves, g_leaves):
        if isinstance(r, torch.Tensor) and isinstance(g, torch.Tensor) and r.shape == g.shape:
            d = (_as_float64(r) - _as_float64(g)).abs()
            d = d[~d.isnan()]
            worst = max(worst, float(d.max()) if d.numel() else 0.0)
    return worst


def _shapes(x: Any) -> str:
    leaves, _ = tree_flatten(x)
    return ", ".join(f"{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                     for t in leaves[:6])


def _first_line(e: BaseException) -> str:
    """``Type: first line`` (two lines when the first only introduces the second)."""
    text = [t.strip() for t in str(e).strip().splitlines() if t.strip()]
    line = " ".join(text[:2]) if len(text) > 1 and text[0].endswith(":") else (text or [""])[0]
    return f"{type(e).__name__}: {line[:200]}"


def _fails_without_stitch(fn, inputs, kwargs) -> str | None:
    """The error ``torch.compile`` raises with the ``aot_eager`` backend (dynamo + AOTAutograd,
    no stitch), or None when that runs: tells torch's own limits from stitch's errors."""
    import torch._dynamo

    torch._dynamo.reset()
    args, kw = tree_map(clone_preserving_strides, (inputs, kwargs))
    try:
        torch.compile(fn, backend="aot_eager", fullgraph=True)(*args, **kw)
    except Exception as e:  # noqa: BLE001
        return _first_line(e)
    finally:
        torch._dynamo.reset()
    return None


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _fallback_why(key: str, messages: list[str]) -> str:
    """Why ``key`` of FALLBACKS ran outside stitch's kernels."""
    from stitch_ir.importer import HANDLERS

    if key.startswith("interpreter: "):
        return "the C++ generator cannot compile this group; the numpy interpreter runs it"
    if key.startswith("graph: "):
        unfused = [m for m in messages if "runs through torch unfused" in m]
        return ("stitch could not compile the graph; torch ran it: "
                + (unfused[0].split("unfused: ", 1)[-1][:200] if unfused else key))
    target = _resolve(key)
    if target is not None and target in HANDLERS:
        return "the importer's handler declined this variant (st.torch_call)"
    return "no st lowering (st.torch_call)"


def _resolve(key: str):
    parts = key.split(".")
    try:
        obj: Any = torch.ops
        for p in parts:
            obj = getattr(obj, p)
        return obj
    except (AttributeError, RuntimeError):
        return None


def _skip_reason(key: str, sample) -> str | None:
    if key in SKIP_OPS:
        return SKIP_OPS[key]
    if float(sample.kwargs.get("dropout_p", 0.0) or 0.0) > 0:
        return _RANDOM + " (dropout_p > 0)"
    # multi_head_attention_forward(query, key, value, embed_dim, num_heads, in_proj_weight,
    # in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p, ...): dropout_p is positional
    if key == "nn.functional.multi_head_attention_forward" and len(sample.args) > 9 and \
            sample.kwargs.get("training", True) and float(sample.args[9] or 0.0) > 0:
        return _RANDOM + " (training with dropout_p > 0)"
    return None


def run_sample(op, sample, index: int = 0, backend: str = "stitch") -> SampleResult:
    """Run one sample eagerly and compiled (fresh dynamo state) and compare."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from runtime import backend as stitch_backend

    key = op_key(op)
    t0 = time.perf_counter()
    reason = _skip_reason(key, sample)
    if reason:
        return SampleResult(index, "skip", reason)
    func = op.get_op()

    def fn(*args, **kwargs):
        return func(*args, **kwargs)

    inputs = (sample.input, *sample.args)
    eager_in = tree_map(clone_preserving_strides, (inputs, sample.kwargs))
    compiled_in = tree_map(clone_preserving_strides, (inputs, sample.kwargs))
    try:
        torch.manual_seed(0)
        expected = fn(*eager_in[0], **eager_in[1])
    except Exception as e:  # noqa: BLE001 - a sample eager itself rejects is not a test
        return SampleResult(index, "skip", f"eager raised {_first_line(e)}")

    torch._dynamo.reset()
    counters.clear()
    before = stitch_backend.FALLBACKS.copy()
    capture = _LogCapture()
    log = logging.getLogger("stitch")
    log.addHandler(capture)
    result = SampleResult(index, "pass", shapes=_shapes(expected))
    try:
        compiled = torch.compile(fn, backend=backend, fullgraph=True)
        torch.manual_seed(0)
        actual = compiled(*compiled_in[0], **compiled_in[1])
    except torch._dynamo.exc.Unsupported as e:
        result.status, result.detail = "skip", f"dynamo cannot capture it: {_first_line(e)}"
    except Exception as e:  # noqa: BLE001 - any failure of the compiled function is recorded
        result.status, result.detail = "error", _first_line(e)
        torch_error = _fails_without_stitch(fn, inputs, sample.kwargs)
        if torch_error is not None:
            result.status = "skip"
            result.detail = f"torch.compile fails without stitch too (aot_eager): {torch_error}"
    else:
        values = key not in VALUES_UNDEFINED
        ok, err, why = compare(expected, actual, values)
        if ok:
            ok, _, why = compare(eager_in, compiled_in, values)
            why = f"inputs mutated differently: {why}" if not ok else ""
        result.max_err = err
        if not ok and err is not None and key in REFERENCE_F64:
            ok, why = _arbitrate(fn, inputs, sample.kwargs, expected, actual, why)
        if not ok:
            result.status, result.detail = "wrong", why
        elif not values:
            result.notes.append("values not compared (undefined)")
    finally:
        log.removeHandler(capture)
        torch._dynamo.reset()
    result.graphs = int(counters["stats"]["unique_graphs"])
    diff = stitch_backend.FALLBACKS - before
    result.fallbacks = {k: {"count": n, "why": _fallback_why(k, capture.messages)}
                        for k, n in sorted(diff.items())}
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _arbitrate(fn, inputs, kwargs, expected, actual, why: str) -> tuple[bool, str]:
    """Against a float64 reference: pass when compiled is at most twice as far from it as eager
    (plus atol)."""
    try:
        ref = fn(*tree_map(_upcast, tree_map(clone_preserving_strides, inputs)),
                 **tree_map(_upcast, kwargs))
    except Exception as e:  # noqa: BLE001
        return False, f"{why}; no float64 reference ({_first_line(e)})"
    eager_err, got_err = _max_error(ref, expected), _max_error(ref, actual)
    atol = max(TOLERANCES.get(t.dtype, (0, 0))[0] for t in tree_flatten(expected)[0]
               if isinstance(t, torch.Tensor)) if tree_flatten(expected)[0] else 0.0
    if got_err <= 2 * eager_err + atol:
        return True, ""
    return False, f"{why}; vs float64: compiled {got_err:.3g}, eager {eager_err:.3g}"


def run_op(key: str, dtype: torch.dtype, n: int, table: dict | None = None):
    """Yield the SampleResult of each of the op's first ``n`` samples."""
    op = (table or op_table())[key]
    try:
        samples = samples_of(op, dtype, n)
    except Exception as e:  # noqa: BLE001
        yield SampleResult(0, "error", f"sample inputs failed: {_first_line(e)}")
        return
    if not samples:
        yield SampleResult(0, "skip", "op has no sample inputs for this dtype")
    for i, s in enumerate(samples):
        yield run_sample(op, s, i)


# ----------------------------------------------------------------------------------------------
# Worker processes: one op at a time; a crash or a hang costs only that op.


def _worker(conn, dtype_name: str, n: int) -> None:
    warnings.simplefilter("ignore")
    logging.getLogger("stitch").addHandler(logging.NullHandler())  # no lastResort noise
    table = op_table()
    dtype = DTYPES[dtype_name]
    conn.send(("ready",))
    while True:
        try:
            key = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if key is None:
            return
        op = table[key]
        try:
            samples = samples_of(op, dtype, n)
        except Exception as e:  # noqa: BLE001
            conn.send(("result", asdict(SampleResult(0, "error",
                                                     f"sample inputs failed: {_first_line(e)}"))))
            conn.send(("done",))
            continue
        conn.send(("count", len(samples)))
        if not samples:
            conn.send(("result", asdict(SampleResult(0, "skip", "no sample inputs"))))
        for i, s in enumerate(samples):
            conn.send(("start", i))
            conn.send(("result", asdict(run_sample(op, s, i))))
        conn.send(("done",))


@dataclass
class _Slot:
    proc: Any = None
    conn: Any = None
    key: str | None = None
    started: float = 0.0
    count: int | None = None
    current: int = 0
    results: list = field(default_factory=list)
    ops_run: int = 0  # by this worker process (recycled every RECYCLE ops)


class WorkerPool:
    """``jobs`` spawned workers; ``run(keys)`` yields (key, [sample dicts], seconds) per op.
    A worker is replaced after RECYCLE ops, so caches (dynamo's, loaded kernel libraries) of a
    long sweep do not pile up in one process."""

    RECYCLE = 100

    def __init__(self, dtype_name: str, n: int, jobs: int, timeout: float):
        self.ctx = mp.get_context("spawn")
        self.dtype_name, self.n, self.timeout = dtype_name, n, timeout
        self.slots = [_Slot() for _ in range(max(1, jobs))]

    def _start(self, slot: _Slot, tries: int = 3) -> None:
        for _ in range(tries):
            parent, child = self.ctx.Pipe()
            slot.proc = self.ctx.Process(target=_worker, args=(child, self.dtype_name, self.n),
                                         daemon=True)
            slot.proc.start()
            child.close()
            slot.conn = parent
            with contextlib.suppress(EOFError, OSError):
                if parent.poll(300) and parent.recv()[0] == "ready":
                    return
            self._kill(slot)
        raise RuntimeError(f"no opinfo worker started in {tries} tries (each dies or takes over "
                           "300 s to import torch and op_db)")

    def _kill(self, slot: _Slot) -> None:
        if slot.proc is not None and slot.proc.is_alive():
            slot.proc.kill()
        if slot.proc is not None:
            slot.proc.join(10)
        slot.proc = slot.conn = None
        slot.ops_run = 0

    def _stop(self, slot: _Slot) -> None:
        """Ask an idle worker to exit, then make sure it has."""
        if slot.conn is not None:
            with contextlib.suppress(OSError):
                slot.conn.send(None)
            slot.proc.join(30)
        self._kill(slot)

    def _abandon(self, slot: _Slot, why: str) -> tuple:
        """The op in ``slot`` failed as a whole (crash, hang): record and restart later."""
        results = slot.results
        results.append(asdict(SampleResult(slot.current, "error", why)))
        total = slot.count if slot.count is not None else self.n
        for i in range(slot.current + 1, total):
            results.append(asdict(SampleResult(i, "skip", "not run: an earlier sample of this "
                                               "op killed its worker")))
        self._kill(slot)
        return self._finish(slot)

    def _finish(self, slot: _Slot) -> tuple:
        out = (slot.key, slot.results, round(time.perf_counter() - slot.started, 2))
        slot.key, slot.results, slot.count, slot.current = None, [], None, 0
        slot.ops_run += 1
        if slot.proc is not None and slot.ops_run >= self.RECYCLE:
            self._stop(slot)
        return out

    def run(self, keys: list[str]):
        todo = list(keys)
        try:
            while todo or any(s.key for s in self.slots):
                for slot in self.slots:
                    if slot.key is None and todo:
                        if slot.proc is None or not slot.proc.is_alive():
                            self._start(slot)
                        slot.key, slot.started = todo.pop(0), time.perf_counter()
                        slot.conn.send(slot.key)
                busy = [s for s in self.slots if s.key]
                ready = wait([s.conn for s in busy], timeout=1.0)
                for slot in busy:
                    if slot.conn in ready:
                        try:
                            msg = slot.conn.recv()
                        except (EOFError, OSError):
                            slot.proc.join(5)
                            code = slot.proc.exitcode
                            what = (f"signal {-code}" if code is not None and code < 0
                                    else f"exit code {code}")
                            yield self._abandon(slot, f"WorkerDied: the worker process died "
                                                      f"({what}) running this sample")
                            continue
                        if msg[0] == "count":
                            slot.count = msg[1]
                        elif msg[0] == "start":
                            slot.current = msg[1]
                        elif msg[0] == "result":
                            slot.results.append(msg[1])
                        elif msg[0] == "done":
                            yield self._finish(slot)
                    elif time.perf_counter() - slot.started > self.timeout:
                        yield self._abandon(slot, f"Timeout: the op ran over {self.timeout:g} s "
                                                  "(worker killed)")
        finally:
            for slot in self.slots:
                if slot.key is None:
                    self._stop(slot)
                else:
                    self._kill(slot)


# ----------------------------------------------------------------------------------------------
# Reports


def summarize(data: dict) -> dict:
    ops = data["ops"]
    status = Counter(s["status"] for rec in ops.values() for s in rec["samples"])
    fb_samples = Counter()
    with_fallback = graph_fallback = interp = 0
    for rec in ops.values():
        for s in rec["samples"]:
            fb = s.get("fallbacks") or {}
            if fb and s["status"] != "skip":
                with_fallback += 1
                graph_fallback += any(k.startswith("graph:") for k in fb)
                interp += any(k.startswith("interpreter:") for k in fb)
            for k in {_fallback_kind(k, v.get("why", "")) for k, v in fb.items()}:
                fb_samples[k] += 1
    errors = Counter(s["detail"].split(":", 1)[0] for rec in ops.values()
                     for s in rec["samples"] if s["status"] == "error")
    op_status = Counter(_op_status(rec) for rec in ops.values())
    return {"ops": len(ops), "samples": sum(status.values()), "status": dict(status),
            "op_status": dict(op_status), "samples_with_fallback": with_fallback,
            "samples_with_graph_fallback": graph_fallback, "samples_with_interpreter": interp,
            "top_fallbacks": fb_samples.most_common(20), "error_types": errors.most_common(12)}


def _fallback_kind(key: str, why: str) -> str:
    """A FALLBACKS key by cause: an interpreter group without its kind and size, a whole-graph
    fallback by what stopped the import (node names left out)."""
    m = re.fullmatch(r"interpreter: \w+ group of \d+ ops \((.*)\)", key)
    if m:
        return f"interpreter: {m.group(1)}"
    if key.startswith("graph: ") and "torch ran it: " in why:
        return "graph: " + re.sub(r"node '[^']*' ", "", why.split("torch ran it: ", 1)[1])
    return key


def _op_status(rec: dict) -> str:
    seen = {s["status"] for s in rec["samples"]}
    for st in ("wrong", "error", "pass"):
        if st in seen:
            return st
    return "skip"


def _commits(data: dict) -> str:
    """The commit(s) the ops ran at (``--update`` re-runs some ops at a later one)."""
    c = Counter(rec.get("commit", data.get("commit", "?")) for rec in data["ops"].values())
    if len(c) <= 1:
        return f"commit {next(iter(c), data.get('commit', '?'))}"
    (main, _), *rest = c.most_common()
    return f"commit {main} (" + ", ".join(f"{n} op(s) re-run at {k}" for k, n in rest) + ")"


def _cell(text: str, width: int = 110) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def render_markdown(data: dict) -> str:
    s = summarize(data)
    st = s["status"]
    lines = [
        f"# OpInfo sweep: stitch vs eager, {data['dtype']}",
        "",
        f"`python -m bench.opinfo --dtype {data['dtype']} --samples {data['samples_per_op']} "
        f"--timeout {data['timeout']:g}` — torch {data['torch']}, {_commits(data)}, "
        f"{data.get('date', '')}, {data.get('seconds', 0) / 60:.0f} min. Each sample runs "
        "eagerly and through `torch.compile(backend=\"stitch\", fullgraph=True)` in a fresh "
        "dynamo state; see `bench/opinfo.py` for tolerances and skips.",
        "",
        "| | ops | samples | pass | wrong | error | skip |",
        "|---|---|---|---|---|---|---|",
        f"| samples | {s['ops']} | {s['samples']} | {st.get('pass', 0)} | {st.get('wrong', 0)} | "
        f"{st.get('error', 0)} | {st.get('skip', 0)} |",
        f"| ops (worst sample) | {s['ops']} | | {s['op_status'].get('pass', 0)} | "
        f"{s['op_status'].get('wrong', 0)} | {s['op_status'].get('error', 0)} | "
        f"{s['op_status'].get('skip', 0)} |",
        "",
        f"- samples run (not skipped) with a torch fallback: **{s['samples_with_fallback']}** "
        f"(of {s['samples'] - st.get('skip', 0)}); with a group in the numpy interpreter: "
        f"{s['samples_with_interpreter']}; whose whole graph stitch could not compile (so a "
        f"pass there is eager's): {s['samples_with_graph_fallback']}",
        "- top fallbacks (samples): " + (", ".join(f"`{_cell(k, 70)}` {n}"
                                                   for k, n in s["top_fallbacks"]) or "none"),
        "- errors by type: " + (", ".join(f"{k} {n}" for k, n in s["error_types"]) or "none"),
        "",
        "| op | samples | pass | wrong | error | skip | fallbacks | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(data["ops"]):
        rec = data["ops"][key]
        c = Counter(x["status"] for x in rec["samples"])
        fb = Counter()
        for x in rec["samples"]:
            for k, v in (x.get("fallbacks") or {}).items():
                fb[k] += v["count"]
        fbs = ", ".join(f"{_cell(k, 60)} ×{n}" for k, n in fb.most_common())
        reason = next((x["detail"] for st_ in ("wrong", "error", "skip") for x in rec["samples"]
                       if x["status"] == st_ and x["detail"]), "")
        lines.append(f"| `{key}` | {len(rec['samples'])} | {c['pass']} | {c['wrong']} | "
                     f"{c['error']} | {c['skip']} | {_cell(fbs, 160)} | {_cell(reason)} |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    """The commit the code under test comes from (``STITCH_COMMIT`` when run from an export)."""
    import subprocess

    if os.environ.get("STITCH_COMMIT"):
        return os.environ["STITCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.opinfo", description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--ops", help="comma-separated op keys (name[.variant]); default: all")
    p.add_argument("--samples", type=int, default=2, help="samples per op (first N)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per op")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--update", action="store_true",
                   help="merge into the existing results file: re-run the named --ops, or, "
                        "without --ops, only the ops it lacks (resume a sweep)")
    p.add_argument("--out", help="output path without suffix (default bench/results/"
                                 "opinfo_<dtype>, or out/opinfo/opinfo_<dtype> with --ops)")
    a = p.parse_args(argv)
    if a.samples < 1 or a.jobs < 1 or a.timeout <= 0:
        p.error("--samples and --jobs must be >= 1 and --timeout > 0")
    names = [x.strip() for x in a.ops.split(",") if x.strip()] if a.ops else None
    root = Path(__file__).resolve().parent.parent
    default = (root / "bench" / "results" if names is None or a.update
               else root / "out" / "opinfo") / f"opinfo_{a.dtype}"
    out = Path(a.out) if a.out else default
    keys = select_ops(DTYPES[a.dtype], names)
    data = {"dtype": a.dtype, "torch": torch.__version__, "samples_per_op": a.samples,
            "timeout": a.timeout, "ops": {}}
    json_path = out.with_suffix(".json")
    if a.update and json_path.exists():
        data = json.loads(json_path.read_text())
        if names is None:
            keys = [k for k in keys if k not in data["ops"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    data.update(commit=_commit(), date=time.strftime("%Y-%m-%d"))
    t0 = time.perf_counter()
    spent = float(data.get("seconds", 0.0)) if a.update else 0.0
    print(f"opinfo: {len(keys)} op(s), {a.dtype}, {a.samples} sample(s) each -> {json_path}",
          file=sys.stderr)
    # SIGTERM unwinds like Ctrl-C, so the pool's finally stops the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pool = WorkerPool(a.dtype, a.samples, a.jobs, a.timeout)
    for k, (key, results, secs) in enumerate(pool.run(keys), 1):
        data["ops"][key] = {"samples": results, "seconds": secs, "commit": data["commit"]}
        c = Counter(r["status"] for r in results)
        print(f"[{k}/{len(keys)}] {key}: " + ", ".join(f"{n} {s}" for s, n in sorted(c.items()))
              + f" ({secs:.1f} s)", file=sys.stderr, flush=True)
        data["seconds"] = round(spent + time.perf_counter() - t0, 1)
        json_path.write_text(json.dumps(data, indent=1, sort_keys=True))
    data["seconds"] = round(spent + time.perf_counter() - t0, 1)
    json_path.write_text(json.dumps(data, indent=1, sort_keys=True))
    out.with_suffix(".md").write_text(render_markdown(data))
    s = summarize(data)
    print(f"opinfo {a.dtype}: {s['ops']} ops, {s['samples']} samples: {s['status']}; "
          f"{s['samples_with_fallback']} with a torch fallback -> {out.with_suffix('.md')}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
