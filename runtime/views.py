"""Views in the runtime: which data-moving groups run as torch views rather than copy
kernels, the strides those views have (``stitch_ir.strides``), and the view functions a view
step calls, their sizes bound when the step is built.

Invariants: a view step never copies where a kernel could have written the value once (a
reshape no strides express makes its group a copy kernel); symbolic sizes are read from the
call's binding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from passes.fusion.graph import copies_strided
from stitch_ir.core import BlockArgument, FuncOp, Value
from stitch_ir.dialects import fusion, st
from stitch_ir.strides import contiguous_strides, view_op_strides

# a tensor on another's storage at given sizes, strides and offset increment, without view
# tracking (0.6 us, against 1.0 for as_strided); None on a torch without it
_reinterpret = getattr(getattr(getattr(torch._C, "_dynamo", None), "guards", None),
                       "_reinterpret_tensor", None)

VIEW_OPS = (st.ReshapeOp, st.PermuteOp, st.BroadcastOp, st.SliceOp)
# A layout-only group read by library calls runs as torch views from this size on: a view step
# costs 1-3 us of torch calls, a copy kernel of 16 KiB about 1 us.
VIEW_MIN_BYTES = 16 << 10


def runs_as_views(func: FuncOp, group) -> bool:
    """Whether a group that only moves data (slices, permutes, reshapes, broadcasts) is
    better run as torch views: when only library and torch calls read its results, which take
    strided operands as they are (a transposed matmul operand is a BLAS flag, not a copy),
    where a copy kernel would write the whole tensor out first. Not for graph outputs (the
    caller gets a fresh tensor, as traced) unless they are views of the graph's inputs, nor
    for values a kernel reads (kernels read contiguous buffers). A convolution is not such a
    reader unless the views only reshape: oneDNN copies a strided operand itself (or
    ``_contiguous`` does, for a channels-last one) with torch's generic copy, after torch's
    own copy for a reshape of a permute -- two passes where a copy kernel makes one
    (charformer's window-reverse permutes feeding convolutions)."""
    if not all(isinstance(o, VIEW_OPS) for o in group.body.ops[:-1]):
        return False
    if sum(r.type.nbytes() for r in group.results) < VIEW_MIN_BYTES:
        return False  # a small copy kernel costs less than making torch views per call
    returned = {id(v) for v in func.return_op.operands}
    # Views of the graph's own inputs may be returned as views: what eager returns for
    # ``w.t()``, and what a training graph saves for its backward (bert's transposed
    # weights were copied by a kernel every step, 0.2 ms each).
    of_inputs = all(isinstance(v, BlockArgument) for v in group.operands)
    ret = func.return_op

    def reshapes_only(op) -> bool:
        body = op.body.ops[:-1] if isinstance(op, fusion.GroupOp) else [op]
        return all(isinstance(o, st.ReshapeOp) for o in body)

    def library_only(v, moved: bool, strides, depth=0) -> bool:  # through views
        if (id(v) in returned and not of_inputs) or not v.users or depth > 8:
            return False
        for u in v.users:
            if u is ret:
                continue  # returned, and a view of the inputs (checked above)
            if moved and copies_strided(u):
                return False
            if isinstance(u, st.LibraryOp | st.TorchCallOp):
                continue
            view_group = isinstance(u, fusion.GroupOp) and u.kind == "view"
            if not (isinstance(u, VIEW_OPS) or view_group):
                return False
            outs = view_strides(u, strides, v)
            if outs is False:
                return False  # a reshape torch would copy: a copy kernel writes it once
            if not all(library_only(r, moved or not reshapes_only(u), m, depth + 1)
                       for r, m in zip(u.results, outs)):
                return False
        return True

    layouts = view_strides(group)
    return layouts is not False and all(
        library_only(r, not reshapes_only(group), m) for r, m in zip(group.results, layouts))



def view_group_run(op, reads: list[int], writes: list[int]):
    """The run function of a group of layout ops run as torch views of its operands (no
    kernel), and for each result the read slot it views."""
    inner = op.body
    fns = [view_fn(o) for o in inner.ops[:-1]]
    if None not in fns:  # static: a chain of precomputed view functions
        pos = {id(a): k for k, a in enumerate(inner.args)}
        chain = []
        for o, fn in zip(inner.ops[:-1], fns):
            chain.append((pos[id(o.operand(0))], fn))
            pos[id(o.result)] = len(pos)
        outs = [(w, pos[id(y)]) for w, y in zip(writes, inner.terminator.operands)]
        if len(reads) == 1 and len(chain) == 1 and outs == [(writes[0], 1)]:
            def run(env, cs, fn=fns[0], r=reads[0], w=writes[0]):  # one view: lean
                env[w] = fn(env[r])
        else:
            def run(env, cs, reads=reads, chain=chain, outs=outs):
                vals = [env[i] for i in reads]
                for k, fn in chain:
                    vals.append(fn(vals[k]))
                for w, k in outs:
                    env[w] = vals[k]
    else:  # symbolic sizes: from the call's binding
        def run(env, cs, op=op, reads=reads, writes=writes):
            vals = {id(a): env[i] for a, i in zip(inner.args, reads)}
            for o in inner.ops[:-1]:
                vals[id(o.result)] = view(o, [vals[id(x)] for x in o.operands], cs.binding)
            for w, y in zip(writes, inner.terminator.operands):
                env[w] = vals[id(y)]

    base: dict[int, int] = {id(a): i for a, i in zip(inner.args, reads)}
    for o in inner.ops[:-1]:  # each value views the operand its chain starts from
        base[id(o.result)] = base[id(o.operand(0))]
    view_of = [base[id(y)] for y in inner.terminator.operands]
    return run, view_of


def reshape_base(v: Value) -> Value:
    """The value a chain of reshapes (bare ``st.reshape`` ops, or view groups of reshapes only)
    starts from. A kernel reading a reshape reads its base's bytes instead: a reshape keeps the
    row-major order, and a strided base is made contiguous for the kernel like any operand."""
    while True:
        op = getattr(v, "owner", None)  # block arguments have none
        if isinstance(op, st.ReshapeOp):
            v = op.operand(0)
        elif isinstance(op, fusion.GroupOp) and op.kind == "view" and len(op.operands) == 1 \
                and len(op.results) == 1 and \
                all(isinstance(o, st.ReshapeOp) for o in op.body.ops[:-1]):
            v = op.operand(0)
        else:
            return v



def view_strides(op, strides=None, operand=None):
    """The strides of a view op's or group's results (``stitch_ir.strides``), from ``strides``
    for ``operand`` and contiguous strides for its other operands; False where a reshape is no
    view (torch would copy); None entries where shapes are symbolic (not simulated)."""
    def start(v):
        if operand is not None and v is operand:
            return strides
        return contiguous_strides(v.type.shape) if v.type.is_static else None

    def apply(o, src):
        if src is None or not (o.operand(0).type.is_static and o.result.type.is_static):
            return None
        out = view_op_strides(o, src)
        return False if out is None else out

    if not isinstance(op, fusion.GroupOp):
        out = apply(op, start(op.operand(0)))
        return False if out is False else [out]
    vals = {id(a): start(v) for a, v in zip(op.body.args, op.operands)}
    for o in op.body.ops[:-1]:
        out = apply(o, vals[id(o.operand(0))])
        if out is False:
            return False
        vals[id(o.result)] = out
    return [vals[id(y)] for y in op.body.terminator.operands]


def view_fn(op) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """View op ``op`` as a function of its operand, its sizes bound now; None where a size is
    symbolic (``_view`` then reads the call's binding)."""
    if not op.result.type.is_static:
        return None
    shape = tuple(op.result.type.shape)
    if isinstance(op, st.ReshapeOp):
        return lambda t: t.reshape(shape)
    if isinstance(op, st.PermuteOp):
        perm = tuple(op.attributes["perm"])
        return lambda t: t.permute(perm)
    if isinstance(op, st.BroadcastOp):
        return lambda t: t.expand(shape)
    a = op.attributes
    index = (slice(None),) * a["dim"] + (slice(a["start"], a["end"], a["step"]),)
    return lambda t: t[index]


def view(op, args: Sequence[torch.Tensor], binding: dict | None = None) -> torch.Tensor:
    x = args[0]
    if isinstance(op, st.ReshapeOp):
        return x.reshape(op.result.type.concrete(binding or {}))
    if isinstance(op, st.PermuteOp):
        return x.permute(list(op.attributes["perm"]))
    if isinstance(op, st.BroadcastOp):
        return x.expand(op.result.type.concrete(binding or {}))
    a = op.attributes
    return x.narrow(a["dim"], a["start"], a["end"] - a["start"])[
        (slice(None),) * a["dim"] + (slice(None, None, a["step"]),)]


class ViewMemos:
    """What a ``CompiledGraph``'s view steps remember between calls, so that a steady-state
    call makes each view with as few torch calls as it can: the geometry of static views
    (``_memo_geometry``), and views of parameters per call state (``_memo_views``)."""

    steps: list
    outputs: list[int]
    prog: object
    func: FuncOp
    _escaping: frozenset[int] | None
    _shared: frozenset[int] | None

    def _memo_geometry(self, run, reads: list[int], writes: list[int]):
        """A static view step as one tensor per result, made from its base's storage at the
        sizes, strides and offset the view chain gave on the first call with the bases'
        strides (a slice, a reshape and a permute cost ~1 us each in torch; one such tensor
        ~0.6 us). Where a result escapes the graph's own library and kernel calls (returned,
        or read by a torch op or a later view) or views a graph input, it is a real view
        (``as_strided``: autograd's view tracking and version counter); elsewhere an alias of
        the storage (``_reinterpret_tensor``, what inductor's generated code makes). A chain
        that copied (a reshape no strides express) keeps running as it is."""
        memo: dict = {}

        def strided(env, cs):
            bases = [env[i] for i in reads]
            key = tuple(b.stride() for b in bases)
            geo = memo.get(key)
            if geo is None:
                run(env, cs)
                memo[key] = self._geometry(bases, [env[w] for w in writes], writes, reads)
                return
            if geo is False:
                return run(env, cs)
            for w, k, size, stride, delta, real in geo:
                b = bases[k]
                env[w] = b.as_strided(size, stride, b.storage_offset() + delta) if real else \
                    _reinterpret(b, size, stride, delta)

        return strided

    def _geometry(self, bases: list, results: list, writes: list[int],
                  reads: list[int]) -> list | bool:
        """(slot, base position, size, stride, offset from the base's, real view) per result;
        False where a result shares no base's storage (the chain copied). A view of a graph
        input is a real view too, sharing the input's version counter: a parameter an
        optimizer updates in place between calls, whose views ``_memo_views`` keeps per call
        state, stays visible to anything keyed on versions."""
        escaping = self._escaping_views()
        inputs = set(self.prog.user_inputs)
        shared = self._shared_bases()
        storages = [b.untyped_storage().data_ptr() for b in bases]
        geo = []
        for w, t in zip(writes, results):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in storages or _reinterpret is None:
                return False
            k = storages.index(ptr)
            geo.append((w, k, tuple(t.shape), t.stride(),
                        t.storage_offset() - bases[k].storage_offset(),
                        w in escaping or reads[k] in inputs or reads[k] in shared))
        return geo

    def _escaping_views(self) -> frozenset[int]:
        """Slots whose tensor may leave the graph's own kernel and library calls: outputs the
        caller sees, and what a torch op, the interpreter or a view step reads (each may hand
        it on). Not the activations a training forward only saves for its backward
        (``layout_free_results``): autograd keeps those away from the user, and only stitch's
        backward reads them (charformer's forward made 188 such views a step, each an
        ``as_strided`` at 2-10 us, for nothing its aliases would not do)."""
        if self._escaping is None:
            out = set(self.outputs) - self._saved_only()
            for s in self.steps:
                if s.kind not in ("kernel", "library", "dead"):
                    out.update(s.reads)
            self._escaping = frozenset(out)
        return self._escaping

    def _saved_only(self) -> set[int]:
        """Output slots returned only as activations saved for the backward."""
        free = set(self.func.attr("layout_free_results", ()) or ())
        seen = {w for j, w in enumerate(self.outputs) if j not in free}
        return {w for j, w in enumerate(self.outputs) if j in free} - seen

    def _shared_bases(self) -> frozenset[int]:
        """Slots whose views must be real views even where the view is only saved for the
        backward: a tensor the caller can reach (an output it sees, or the base of a view that
        escapes) may be changed in place, and autograd finds that out from the version
        counter a real view shares with its base. Made once per graph, as ``_escaping``."""
        if self._shared is None:
            escaping = self._escaping_views()
            out = set(self.outputs) - self._saved_only()
            for s in self.steps:
                if s.kind == "view" and any(w in escaping for w in s.writes):
                    out.update(s.reads)
            self._shared = frozenset(out)
        return self._shared

    def _memo_views(self, run, reads: list[int], writes: list[int]):
        """Views of parameters are made once per call state, not per call. Under
        torch.compile a module's parameters are graph inputs (its weight transposes are view
        steps: 109 of them in a tiny T5); the same Parameter objects come every call, and a view
        of the same tensor object is the same view (it aliases the values, which may change in
        place). Anything else -- a new input tensor, an activation -- runs the views as usual."""
        inputs = set(self.prog.user_inputs)
        if not reads or not all(r in inputs for r in reads):
            return run
        k = len(self.steps)

        def memo(env, cs):
            hit = cs.view_memo.get(k)
            if hit is False:  # its inputs were no parameters: an activation, views per call
                return run(env, cs)
            args = [env[r] for r in reads]
            if hit is not None and all(a is b for a, b in zip(args, hit[0])):
                for w, t in zip(writes, hit[1]):
                    env[w] = t
                return
            run(env, cs)
            cs.view_memo[k] = (args, [env[w] for w in writes]) if all(
                isinstance(a, torch.nn.Parameter) for a in args) else False

        return memo
