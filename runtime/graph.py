"""``CompiledGraph``: a planned, fused ``st`` function as a callable on torch tensors (cpu target).

The function body becomes a list of steps, built once:

- a ``fusion.group`` runs its generated C++ kernel (built and cached by ``runtime.build``);
- library ops (mm, bmm, addmm, linear, convolution) run through torch's own kernels, writing
  into planned buffers where torch has an ``out=`` form;
- layout ops left outside kernels (reshape / permute glue around library calls) are torch views
  (``runtime.views``: which groups run so, and the view functions);
- ``st.torch_call`` runs the named aten op; constants are materialised once;
- anything the cpp code generator cannot compile runs through the numpy reference interpreter,
  counted in ``fallbacks`` and reported once.

Buffers: every intermediate's lifetime (from the step that writes it to the last step that
reads it or any view of it) is known at build time, so intermediates and kernel scratch get
static offsets in one arena (first fit over lifetimes: storage is reused within a call), and the
arena lives across calls: a steady-state call allocates nothing but the outputs it hands back,
as eager does (a fresh large allocation costs milliseconds of page faults on these machines).

Concurrency: a graph may be called from several threads at once (serving code does). Everything
a call writes — the arena, its typed views and scratch pointers, the outputs it may reuse — is
a ``CallState``; a call takes a free one from the graph's pool (or makes one) and gives it back
when it returns. One caller at a time reuses one state forever (no allocation in steady state);
N concurrent callers hold N states, so no two calls ever share a byte they write.

Per-call cost: what does not change from call to call is done once per call state. Constants,
arena views and every view or constant step whose operands are such values ("static" slots) are
computed when the state is made; a call copies that environment, binds its inputs and runs the
remaining steps. A kernel step keeps its argument array per state with the static pointers (arena
buffers, scratch, constants) filled in and patches only the pointers that change per call. A
static view step makes each result in one torch call from the geometry its chain of views gave
once (``runtime.views.ViewMemos``); outputs come from torch's parser-free allocator.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from codegen.cpp.kernel import KernelSource, render_group
from codegen.cpp.scalars import ERRORS, HALF_PRECISION, Unsupported
from runtime.build import load_built
from runtime.convolution import (
    _contiguous,
    permuted_call_run,
    takes_strided,
    torch_call_fn,
)
from runtime.host_memory import settle_malloc
from runtime.library import library_run
from runtime.views import VIEW_OPS, ViewMemos, reshape_base, runs_as_views, view, view_fn, view_group_run
from stitch_ir.core import BlockArgument, FuncOp, OpResult, Value
from stitch_ir.dialects import fusion, st
from stitch_ir.importer import ImportedProgram, dtype_to_torch
from stitch_ir.interpreter import IMPLS, torch_args_decoder, torch_call_results
from stitch_ir.types import Sym

log = logging.getLogger("stitch.runtime")

# Library ops run with torch's ``out=`` into a planned buffer; the others (linear, convolution)
# return a tensor torch allocated, so their results get no arena storage.
OUT_LIBRARY_OPS = ("st.mm", "st.bmm", "st.addmm")

ALIGN = 64


def first_fit(intervals: list[tuple[int, int, int]]) -> tuple[list[int], int]:
    """Offsets for (start, end, bytes) lifetimes so that overlapping lifetimes never share
    bytes; returns (offsets, arena size). Greedy first fit, largest buffers first."""
    order = sorted(range(len(intervals)), key=lambda k: (-intervals[k][2], intervals[k][0]))
    placed: list[tuple[int, int, int, int]] = []  # start, end, offset, size
    offsets = [0] * len(intervals)
    total = 0
    for k in order:
        start, end, size = intervals[k]
        size = (size + ALIGN - 1) // ALIGN * ALIGN
        busy = sorted((o, o + sz) for s0, e0, o, sz in placed if not (e0 < start or end < s0))
        off = 0
        for lo, hi in busy:
            if off + size <= lo:
                break
            off = max(off, hi)
        offsets[k] = off
        placed.append((start, end, off, size))
        total = max(total, off + size)
    return offsets, total


def _typed(storage: torch.Tensor, v: Value, binding: dict | None = None) -> torch.Tensor:
    shape = list(v.type.concrete(binding or {}))
    dt = dtype_to_torch(v.type.dtype)
    n = int(np.prod(shape)) if shape else 1
    return storage[: n * v.type.dtype.itemsize].view(dt).view(shape)


def _size(n, binding: dict) -> int:
    """Bytes of a lifetime: a value (its type's bytes) or a scratch size (int or Sym)."""
    if isinstance(n, Value):
        return max(1, int(np.prod(n.type.concrete(binding)) or 1)) * n.type.dtype.itemsize
    return n.value(binding) if isinstance(n, Sym) else n


@dataclass
class CallState:
    """What one call in flight owns (see the module docstring)."""

    arena: torch.Tensor
    views: dict[int, torch.Tensor]  # slot -> typed view of the arena
    scratch: dict[int, list[int]]  # step -> scratch buffer addresses
    # The storages of large outputs handed to the caller, by slot (``CompiledGraph._output``),
    # reused when the caller has dropped every tensor on them.
    handed_out: dict[int, torch.UntypedStorage] = field(default_factory=dict)
    # output slot -> (shape, strides, dtype, bytes) at this state's sizes
    out_meta: dict[int, tuple] = field(default_factory=dict)
    env: list = field(default_factory=list)  # the static slots' tensors; a call copies it
    args: dict[int, list[int]] = field(default_factory=dict)  # step -> kernel argument array
    # step -> (parameters, views), or False where its inputs were no parameters
    view_memo: dict[int, tuple | bool] = field(default_factory=dict)
    # step -> (weight, its version, its channels-last copy) of a channels-last convolution
    weight_memo: dict[int, tuple] = field(default_factory=dict)
    binding: dict[str, int] = field(default_factory=dict)  # the symbolic sizes of its calls
    syms: dict[int, torch.Tensor] = field(default_factory=dict)  # kernel step -> its sizes


@dataclass
class Step:
    name: str
    run: Callable[[list, CallState], None]
    kind: str  # kernel | library | view | constant | torch | interpreter
    reads: list[int] = field(default_factory=list)  # value slots
    writes: list[int] = field(default_factory=list)
    source: KernelSource | None = None
    kernel: object = None  # the loaded kernel of a kernel step
    view_of: list[int] | None = None  # a view step: the read slot each write is a view of


class CompiledGraph(ViewMemos):
    """Call with the model's user inputs (torch tensors); returns a list of output tensors."""

    def __init__(self, prog: ImportedProgram, func: FuncOp | None = None,
                 half_precision: str | None = None):
        self.prog = prog
        # which float16 / bfloat16 values the kernels round (codegen.cpp.scalars.HALF_PRECISION):
        # float32 between loads and stores (the default), or every op's result (eager's bits)
        self.half_precision = half_precision or os.environ.get("STITCH_HALF_PRECISION", "float32")
        if self.half_precision not in HALF_PRECISION:
            raise ValueError(f"half_precision {self.half_precision!r} (STITCH_HALF_PRECISION?): "
                             f"expected one of {', '.join(HALF_PRECISION)}")
        self.func = func or prog.module.func()
        # call states not in use (see CallState), by the symbolic sizes they were made for
        self._free_states: dict[tuple, list[CallState]] = {}
        self._states_lock = threading.Lock()
        self._n_states = 0
        # check each call's inputs against the compiled types (shape, dtype); the backend clears
        # it for static graphs, whose inputs dynamo's guards have checked before the call
        self.check_inputs = True
        self.slots: dict[int, int] = {}
        self.steps: list[Step] = []
        self.fallbacks: list[str] = []
        self.build_seconds = 0.0
        t0 = time.perf_counter()
        for a in self.func.args:
            self._slot(a)
        # symbolic sizes (a dynamic batch): the names, and the sizes the graph was traced with
        values = list(self.func.args) + [r for op in self.func.body.ops for r in op.results]
        hints = {f: h for v in values for d in v.type.shape if isinstance(d, Sym)
                 for f, h in zip(d.factors, d.hints)}
        self.symbols = sorted(hints)
        self.hint_binding = {n: max(h, 1) for n, h in hints.items()}
        self.sources = self._build_all()
        for op in self.func.body.ops[:-1]:
            self.steps.append(self._step(op))
        self.steps += self._final_steps()
        self.outputs = [self._slot(v) for v in self.func.return_op.operands]
        self._drop_dead_views()
        self._escaping: frozenset[int] | None = None
        self._shared: frozenset[int] | None = None
        self._plan_lifetimes()
        self.consts = {i: self._place(t.detach().contiguous()) for i, t in prog.constants.items()}
        self._arg_types = [(i, self.func.args[i].type) for i in prog.user_inputs]
        # arguments that arrive permuted (passes.layout.permute_arguments): input position and
        # permutation, applied as views on entry
        perms = self.func.attr("arg_perms", ())
        self._entry_perms = [(pos, perms[i]) for pos, i in enumerate(prog.user_inputs)
                             if i < len(perms) and perms[i]]
        self._input_types = [
            (i, torch.Size([d if isinstance(d, int) else -1 for d in t.shape]),
             dtype_to_torch(t.dtype)) for i, t in self._arg_types]
        self._find_static()
        settle_malloc()  # buffers freed by one call serve the next without faulting in again
        self.build_seconds = time.perf_counter() - t0
        if self.fallbacks:
            log.warning("stitch: %d group(s) run through the reference interpreter: %s",
                        len(self.fallbacks), "; ".join(self.fallbacks))

    # -- building ------------------------------------------------------------------------------
    def _final_steps(self) -> list[Step]:
        """Steps a target runs after the function's ops (none on the cpu)."""
        return []

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        """A constant where the kernels read it (the cpu: as it is)."""
        return t

    def _slot(self, v: Value) -> int:
        if id(v) not in self.slots:
            self.slots[id(v)] = len(self.slots)
        return self.slots[id(v)]

    @property
    def kernels(self) -> int:
        return sum(1 for s in self.steps if s.kind == "kernel")

    def _build_all(self) -> dict[int, KernelSource | Unsupported]:
        """Render every kernel, then compile them as one translation unit per core."""
        from codegen.cpp.kernel import PRELUDE
        from runtime.build import build_kernels

        sources: dict[int, KernelSource | Unsupported] = {}
        for op in self.func.body.ops[:-1]:
            if isinstance(op, fusion.GroupOp) and op.kind != "view" and not _all_empty(op) \
                    and not runs_as_views(self.func, op):
                try:  # named by kind and content: equal groups anywhere share one kernel
                    sources[id(op)] = render_group(op, op.kind, self.half_precision)
                except Unsupported as e:
                    sources[id(op)] = e
        todo = [(s.symbol, s.body) for s in sources.values() if isinstance(s, KernelSource)]
        self.libraries = build_kernels(todo, PRELUDE)
        return sources

    def _step(self, op) -> Step:
        reads = [self._slot(v) for v in op.operands]
        writes = [self._slot(r) for r in op.results]
        if isinstance(op, fusion.GroupOp) and _all_empty(op):
            types = list(op.results)

            def run(env, cs, writes=writes, types=types):  # zero elements: nothing to compute
                for w, v in zip(writes, types):
                    self._alloc(cs, env, w, v)

            return Step("empty", run, "empty", reads, writes)
        if isinstance(op, fusion.GroupOp) and op.kind != "view" and id(op) not in self.sources:
            return self._view_group(op, reads, writes)  # no kernel built: it runs as views
        if isinstance(op, fusion.GroupOp) and op.kind != "view":
            src = self.sources[id(op)]
            if isinstance(src, Unsupported):
                self.fallbacks.append(f"{op.kind} group of {len(op.body.ops) - 1} ops ({src})")
                return self._interpreted(op, reads, writes)
            kern = load_built(self.libraries[src.symbol], src.symbol)
            reads = [self._slot(reshape_base(v)) for v in op.operands]
            return Step(src.symbol, self._kernel_run(kern, len(self.steps), reads, writes,
                                                     list(op.results)),
                        "kernel", reads, writes, src, kern)
        if isinstance(op, fusion.GroupOp):  # a view group: reshapes only
            return self._view_group(op, reads, writes)
        if isinstance(op, st.PermuteOp):  # the common view (channels-last values), lean
            def run(env, cs, r=reads[0], w=writes[0], p=tuple(op.attributes["perm"])):
                env[w] = env[r].permute(p)
            if op.result.type.is_static:
                run = self._memo_geometry(run, reads, writes)
            return Step(op.name, self._memo_views(run, reads, writes), "view", reads, writes)
        if isinstance(op, VIEW_OPS):
            fn = view_fn(op)
            if fn is not None:
                def run(env, cs, fn=fn, r=reads[0], w=writes[0]):
                    env[w] = fn(env[r])
                run = self._memo_geometry(run, reads, writes)
            else:  # symbolic sizes: from the call's binding
                def run(env, cs, op=op, reads=reads, writes=writes):
                    env[writes[0]] = view(op, [env[i] for i in reads], cs.binding)
            return Step(op.name, self._memo_views(run, reads, writes), "view", reads, writes)
        if isinstance(op, st.IotaOp) and not op.result.type.is_static:
            a, dt = op.attributes, dtype_to_torch(op.result.type.dtype)

            def run(env, cs, writes=writes, a=a, dt=dt):  # an arange of symbolic length
                n = a["size"].value(cs.binding)
                env[writes[0]] = (a["start"] + a["step"] * torch.arange(n, dtype=torch.float64
                                  if isinstance(a["start"] + a["step"], float) else torch.int64)
                                  ).to(dt)
            return Step(op.name, run, "constant", reads, writes)
        if isinstance(op, st.ConstantOp) and op.is_splat and not op.result.type.is_static:
            dt, fill = dtype_to_torch(op.result.type.dtype), op.attributes["value"]

            def run(env, cs, writes=writes, dt=dt, fill=fill):  # a splat of symbolic shape
                env[writes[0]] = torch.full(op.result.type.concrete(cs.binding), fill, dtype=dt)
            return Step(op.name, run, "constant", reads, writes)
        if isinstance(op, st.ConstantOp | st.IotaOp):
            value = _from_numpy(IMPLS[op.name](op, [])[0], op.result)  # bf16 too
            def run(env, cs, value=value, writes=writes):
                env[writes[0]] = value
            return Step(op.name, run, "constant", reads, writes)
        if isinstance(op, st.SeedOp):  # a fresh seed per call, from torch's default generator
            def run(env, cs, writes=writes):
                env[writes[0]] = torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64)
            return Step(op.name, run, "seed", reads, writes)
        if isinstance(op, st.LibraryOp):
            return Step(op.name, self._library(op, reads, writes), "library", reads, writes)
        if isinstance(op, st.TorchCallOp) and (op.attr("operand_perms") or
                                               op.attr("result_perms")):
            fn = torch_call_fn(op)
            return Step(op.attributes["target"], permuted_call_run(
                op, fn, reads, writes, len(self.steps), set(self.prog.user_inputs)),
                "torch", reads, writes)
        if isinstance(op, st.TorchCallOp):
            fn = torch_call_fn(op)
            spec = op.attributes["args"]
            keep = takes_strided(op.attributes["target"])
            decode = torch_args_decoder(spec)

            def run(env, cs, fn=fn, decode=decode, reads=reads, writes=writes, op=op, keep=keep):
                ops = [env[i] for i in reads] if keep else \
                    [_contiguous(env[i]) if isinstance(env[i], torch.Tensor) else env[i]
                     for i in reads]
                a, kw = decode(ops)
                for w, t in zip(writes, torch_call_results(op, fn(*a, **kw))):
                    env[w] = t
            return Step(op.attributes["target"], run, "torch", reads, writes)
        self.fallbacks.append(f"'{op.name}' outside any fusion group")
        return self._interpreted(op, reads, writes)

    def _drop_dead_views(self) -> None:
        """View steps nothing reads any more (a kernel reads a reshape's base instead, see
        ``_reshape_base``) are dropped: a torch view costs a few microseconds per call."""
        needed = set(self.outputs)
        for k in range(len(self.steps) - 1, -1, -1):
            s = self.steps[k]
            if s.kind == "view" and not any(w in needed for w in s.writes):
                # steps know their index (argument arrays, scratch): a dead one stays, inert
                self.steps[k] = Step(s.name, _nothing, "dead")
                continue
            needed.update(s.reads)

    def _view_group(self, op, reads: list[int], writes: list[int]) -> Step:
        """A group of layout ops run as torch views of its operands (no kernel)."""
        run, view_of = view_group_run(op, reads, writes)
        if all(r.type.is_static for r in op.results):
            run = self._memo_geometry(run, reads, writes)
        return Step("view", self._memo_views(run, reads, writes), "view", reads, writes,
                    view_of=view_of)

    def _kernel_run(self, kern, k: int, reads: list[int], writes: list[int], types: list):
        """The run function of kernel step ``k``: its argument array (inputs, outputs, scratch, a
        native ``void*`` array) lives in the call state with the static pointers filled in; a
        call patches the rest in place and passes the array as it is (no packing per call)."""
        fn = kern._fn
        dyn_reads: list[tuple[int, int]] = []  # (position, slot), found per state
        dyn_writes: list[tuple[int, int, Value]] = []
        plan: list = []  # [dyn_reads, dyn_writes] once known (the same for every state)

        def template(cs: CallState):
            args, dr, dw = [], [], []
            for pos, slot in enumerate(reads):
                t = cs.env[slot]
                if slot in self.static_slots and t is not None and t.is_contiguous():
                    args.append(t.data_ptr())
                else:
                    args.append(0)
                    dr.append((pos, slot))
            for pos, (slot, v) in enumerate(zip(writes, types), len(reads)):
                t = cs.views.get(slot)
                if t is not None:
                    args.append(t.data_ptr())
                else:
                    args.append(0)
                    dw.append((pos, slot, v))
            if not plan:
                plan.extend([dr, dw])
                dyn_reads.extend(dr)
                dyn_writes.extend(dw)
            args += cs.scratch[k]
            cs.args[k] = arr = (ctypes.c_void_p * max(1, len(args)))(*args)
            return arr

        output = self._output

        def run(env, cs):
            arr = cs.args.get(k)
            if arr is None:
                arr = template(cs)
            keep = None  # contiguous copies of strided operands, alive until the call returns
            for pos, slot in dyn_reads:
                t = env[slot]
                if not t.is_contiguous():
                    t = t.contiguous()
                    keep = (keep or []) + [t]
                arr[pos] = t.data_ptr()
            for pos, slot, v in dyn_writes:  # outputs (other writes are arena views: static)
                t = env[slot] = output(cs, slot, v)
                arr[pos] = t.data_ptr()
            rc = fn(arr)
            del keep
            if rc:
                what = "; ".join(m for bit, m in ERRORS.items() if rc & bit) or f"error {rc}"
                raise RuntimeError(f"stitch kernel {kern.symbol} ({kern.source_path}): {what}")

        return run

    def _interpreted(self, op, reads, writes) -> Step:
        if self.symbols:  # the interpreter's ops read their sizes from the types
            raise Unsupported(f"'{op.name}' would run in the interpreter, which needs static "
                              "shapes (the graph has symbolic sizes)")

        def run(env, cs, op=op, reads=reads, writes=writes):
            args = [_to_numpy(env[i]) for i in reads]
            outs = IMPLS[op.name](op, args)
            for w, o, r in zip(writes, outs, op.results):
                env[w] = _from_numpy(o, r)
        return Step(op.name, run, "interpreter", reads, writes)

    def _library(self, op, reads, writes) -> Callable:
        res = op.result
        w = writes[0]

        def out(env, cs):
            o = cs.views.get(w)  # an arena buffer (the steady state), or a fresh output
            if o is None:
                return self._alloc(cs, env, w, res)
            env[w] = o
            return o

        return library_run(op, reads, writes, out, len(self.steps),
                           weight_is_input=reads[1] in set(self.prog.user_inputs))

    # -- buffers -------------------------------------------------------------------------------
    def _plan_lifetimes(self) -> None:
        """Static arena offsets for every intermediate written by a kernel or library step
        (outputs, and anything an output is a view of, are allocated fresh per call)."""
        root: dict[int, int] = {}
        owners: dict[int, tuple[int, Value]] = {}  # slot -> (writing step, value)
        by_slot = {self.slots[k]: k for k in self.slots}
        values = {id(v): v for op in self.func.body.ops for v in op.results}
        for k, s in enumerate(self.steps):
            for w in s.writes:
                root[w] = w
            if s.kind == "view":
                for w, r in zip(s.writes, s.view_of or [s.reads[0]] * len(s.writes)):
                    root[w] = root.get(r, r)
            elif s.kind == "kernel" or (s.kind == "library" and s.name in OUT_LIBRARY_OPS):
                for w in s.writes:
                    owners[w] = (k, values[by_slot[w]])
        last: dict[int, int] = {}
        for k, s in enumerate(self.steps):
            for r in s.reads:
                last[root.get(r, r)] = k
        fresh = {root.get(o, o) for o in self.outputs}
        self.fresh = fresh
        intervals, keys = [], []
        for slot, (k, v) in owners.items():
            if slot in fresh:
                continue
            intervals.append((k, last.get(slot, k), v))  # bytes: per binding (symbolic sizes)
            keys.append(("slot", slot, v))
        for k, s in enumerate(self.steps):
            for j, n in enumerate(s.source.scratch if s.source else []):
                intervals.append((k, k, n))
                keys.append(("scratch", k, j))
        self._lifetimes = list(zip(keys, intervals))
        self._layouts: dict[tuple, tuple[list, int]] = {}
        self.layout, self.arena_bytes = self._layout(self.hint_binding)
        self.static_slots: frozenset[int] = frozenset()
        self.static_steps: list[Step] = []
        self.call_steps: list[Step] = list(self.steps)

    def _layout(self, binding: dict[str, int]) -> tuple[list, int]:
        """Arena offsets (first fit over the lifetimes) for the sizes of ``binding``: one layout
        per distinct set of symbolic sizes, made when a call first brings it (no rebuild)."""
        key = tuple(binding[n] for n in self.symbols)
        got = self._layouts.get(key)
        if got is None:
            sized = [(a, b, _size(n, binding)) for _, (a, b, n) in self._lifetimes]
            offsets, total = first_fit(sized)
            got = self._layouts[key] = ([(k, off, iv) for (k, _), off, iv in
                                         zip(self._lifetimes, offsets, sized)], total)
        return got

    def bind(self, user_inputs) -> dict[str, int]:
        """The symbolic sizes of a call, read off its inputs (checked: every input's static
        dims, and one value per symbol); raises ValueError naming the input that does not fit."""
        binding: dict[str, int] = {}
        for late in (False, True):  # sizes of one symbol first; then products of symbols
            for (i, t_type), t in zip(self._arg_types, user_inputs):
                ok = len(t.shape) == t_type.rank and t.dtype == dtype_to_torch(t_type.dtype)
                for d, n in zip(t_type.shape, t.shape) if ok else ():
                    if not isinstance(d, Sym):
                        ok = ok and (late or d == n)
                    elif len(d.factors) == 1 and not late:
                        f = d.factors[0]
                        ok = ok and not n % d.coef and binding.setdefault(f, n // d.coef) == \
                            n // d.coef
                    elif len(d.factors) > 1 and late:
                        ok = ok and all(f in binding for f in d.factors) and d.value(binding) == n
                if not ok:
                    raise ValueError(f"input {self.prog.arg_names[i]} has shape "
                                     f"{list(t.shape)} {t.dtype}, the graph was compiled for "
                                     f"{t_type}")
        missing = [n for n in self.symbols if n not in binding]
        if missing:
            raise ValueError(f"the inputs do not fix the sizes {missing}")
        return binding

    def _find_static(self) -> None:
        """Static slots (see the module docstring): constants, arena buffers, and what constant
        and view steps make of them -- unless a "view" copies (a reshape of a permuted tensor
        is a copy; its data changes every call). Found by running the steps on a first state,
        which then serves the first call."""
        static = set(self.prog.constants) | {key[1] for key, _, _ in self.layout
                                             if key[0] == "slot"}
        cs = self.new_call_state()
        for s in self.steps:
            if s.kind == "constant" or (s.kind == "view" and all(r in static for r in s.reads)):
                s.run(cs.env, cs)
                base = {cs.env[r].untyped_storage().data_ptr() for r in s.reads}
                if s.kind == "constant" or all(
                        cs.env[w].untyped_storage().data_ptr() in base for w in s.writes):
                    static.update(s.writes)
                    self.static_steps.append(s)
        self.static_slots = frozenset(static)
        self.call_steps = [s for s in self.steps if s not in self.static_steps and
                           s.kind != "dead"]
        self.refresh_steps()
        self._free_states.setdefault(tuple(cs.binding[n] for n in self.symbols), []).append(cs)
        self._n_states = 1

    def refresh_steps(self) -> None:
        """Re-read the call steps' run functions (the hot loop holds them in a tuple): for
        whoever wraps ``Step.run``, a profiler (``bench.overhead``)."""
        self._call_runs = tuple(s.run for s in self.call_steps)

    def new_call_state(self, binding: dict[str, int] | None = None) -> CallState:
        """A fresh arena with its typed views and scratch pointers (one per concurrent call),
        for the symbolic sizes of ``binding`` (the hints by default)."""
        binding = dict(self.hint_binding if binding is None else binding)
        layout, total = self._layout(binding)
        arena = torch.empty(max(total, ALIGN), dtype=torch.uint8)
        cs = CallState(arena, {}, {k: [] for k in range(len(self.steps))}, binding=binding)
        for key, off, (_, _, n) in layout:
            if key[0] == "slot":
                cs.views[key[1]] = _typed(arena[off:off + n], key[2], binding)
            else:
                cs.scratch[key[1]].append(arena.data_ptr() + off)
        for k, s in enumerate(self.steps):  # each kernel's symbolic sizes, in its own order
            if s.source is not None and s.source.symbols:
                t = torch.tensor([binding[n] for n in s.source.symbols], dtype=torch.int64)
                cs.syms[k] = t
                cs.scratch[k].append(t.data_ptr())
        return self._fill_env(cs)

    def _fill_env(self, cs: CallState) -> CallState:
        """The state's static environment: constants, arena views, static steps' results."""
        cs.env = [None] * len(self.slots)
        for i, t in self.consts.items():
            cs.env[i] = t
        for slot, t in cs.views.items():
            cs.env[slot] = t
        for s in self.static_steps:
            s.run(cs.env, cs)
        return cs

    @property
    def call_states(self) -> int:
        """How many call states exist (the most calls that were ever in flight at once)."""
        return self._n_states

    def _alloc(self, cs: CallState, env, slot: int, v: Value) -> torch.Tensor:
        t = cs.views.get(slot)
        if t is None:
            t = self._output(cs, slot, v)
        env[slot] = t
        return t

    def _output(self, cs: CallState, slot: int, v: Value) -> torch.Tensor:
        """A graph output's tensor, fresh (``_empty_strided_cpu``: a fraction of a microsecond,
        less than any reuse check), except that a large output (``REUSE_MIN_BYTES``) gets last
        call's storage back when the caller holds nothing on it any more (fresh pages of a large
        buffer fault in). The graph never holds the tensors it hands out: AccumulateGrad takes
        a weight gradient as it is only while no one else references it (otherwise it copies
        each; charformer's training step spent ~4 ms so)."""
        meta = cs.out_meta.get(slot)
        if meta is None:
            shape = tuple(v.type.concrete(cs.binding))
            dt = dtype_to_torch(v.type.dtype)
            meta = cs.out_meta[slot] = (shape, _contiguous_strides(shape), dt,
                                        int(np.prod(shape)) * v.type.dtype.itemsize)
        shape, strides, dt, nbytes = meta
        if nbytes < REUSE_MIN_BYTES or _use_count is None:
            return _empty_strided(shape, strides, dt)
        held = cs.handed_out.get(slot)
        if held is not None and _use_count(held._cdata) <= 1:  # only ``held`` references it
            return torch.empty(0, dtype=dt).set_(held, 0, shape)
        t = _empty_strided(shape, strides, dt)
        cs.handed_out[slot] = t.untyped_storage()
        return t

    # -- calling -------------------------------------------------------------------------------
    def __call__(self, *user_inputs: torch.Tensor) -> list[torch.Tensor]:
        if len(user_inputs) != len(self.prog.user_inputs):
            raise TypeError(f"expected {len(self.prog.user_inputs)} inputs, got "
                            f"{len(user_inputs)}")
        if self._entry_perms:
            user_inputs = list(user_inputs)
            for pos, p in self._entry_perms:
                t = user_inputs[pos]
                if t.dim() != len(p):
                    raise ValueError(f"input {self.prog.arg_names[self.prog.user_inputs[pos]]}"
                                     f" has shape {list(t.shape)}, the graph was compiled for "
                                     f"rank {len(p)}")
                user_inputs[pos] = t.permute(p)
        if self.symbols:
            binding = self.bind(user_inputs)
            key = tuple(binding[n] for n in self.symbols)
        elif not self.check_inputs:
            binding, key = {}, ()
        else:
            for (i, shape, dtype), t in zip(self._input_types, user_inputs):
                if t.shape != shape or t.dtype != dtype:
                    raise ValueError(f"input {self.prog.arg_names[i]} has shape "
                                     f"{list(t.shape)} {t.dtype}, the graph was compiled for "
                                     f"{self.func.args[i].type}")
            binding, key = {}, ()
        # A free call state, without a lock: list.pop and append are atomic (under the GIL, and
        # per list in free-threaded builds); a miss (none free, or taken meanwhile) makes one.
        free = self._free_states.get(key)
        try:
            cs = free.pop()  # type: ignore[union-attr]
        except (AttributeError, IndexError):
            with self._states_lock:
                cs = self.new_call_state(binding)
                self._n_states += 1
        try:
            env = cs.env.copy()
            for i, t in zip(self.prog.user_inputs, user_inputs):
                env[i] = t
            for run in self._call_runs:
                run(env, cs)
            return [env[o] for o in self.outputs]
        finally:
            if free is None:
                with self._states_lock:
                    free = self._free_states.setdefault(key, [])
            free.append(cs)


_use_count = getattr(torch._C, "_storage_Use_Count", None)
# Outputs at least this large keep their storage for the next call (reused when no tensor of
# the caller's uses it any more: fresh pages of a large buffer fault in); smaller ones are
# allocated per call.
REUSE_MIN_BYTES = 1 << 20
# torch's allocation without the Python argument parser (what inductor's generated code calls):
# 0.4 us against torch.empty's 1.1 us
_guards = getattr(getattr(torch._C, "_dynamo", None), "guards", None)
_empty_strided = getattr(_guards, "_empty_strided_cpu", None) or (
    lambda shape, strides, dtype: torch.empty_strided(shape, strides, dtype=dtype))


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, n = [], 1
    for d in reversed(shape):
        strides.append(n)
        n *= max(d, 1)
    return tuple(reversed(strides))


def _nothing(env, cs) -> None:
    """The run function of a dead step."""


def _all_empty(group) -> bool:
    """Whether every result of ``group`` has zero elements (static shapes)."""
    return all(any(d == 0 for d in r.type.shape) for r in group.results)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as the interpreter's array (numpy has no bfloat16: it computes bf16 as float32
    values that are bf16-exact)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


def _from_numpy(a: np.ndarray, v: Value) -> torch.Tensor:
    """The interpreter's array as a tensor of ``v``'s type, keeping its shape (rank 0 too)."""
    a = np.asarray(a)
    t = torch.from_numpy(a.copy() if not a.flags.c_contiguous or a.ndim == 0 else a)
    want = dtype_to_torch(v.type.dtype)
    if t.dtype != want:
        t = t.to(want)
    return t.reshape([int(d) for d in v.type.shape])


def compile_program(prog: ImportedProgram, target: str = "cpu", fusion: str = "stitch",
                    device_spec=None, channels_last: bool = False,
                    cost_model: str | None = None,
                    half_precision: str | None = None) -> CompiledGraph:
    """Plan, fuse, schedule and build ``prog`` (already imported) for ``target`` (sm_80 / sm_90:
    ``runtime.gpu_graph``). ``cost_model``: analytic | learned | auto (the planner's default);
    ``half_precision``: see ``CompiledGraph``."""
    from passes import PassContext, PassManager, pipeline

    if target != "cpu":  # Triton kernels: on a CUDA device, or under Triton's interpreter
        from runtime.gpu_graph import compile_gpu_program

        return compile_gpu_program(prog, target, fusion, device_spec)
    ctx = PassContext(target=target, device_spec=device_spec)
    PassManager.parse(pipeline(fusion, channels_last=channels_last,
                               cost_model=cost_model)).run(prog.module, ctx)
    g = CompiledGraph(prog, half_precision=half_precision)
    g.plan = ctx.results["plan"][prog.module.func().sym_name]
    return g


__all__ = ["BlockArgument", "CompiledGraph", "OpResult", "compile_program"]
