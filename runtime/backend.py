"""``torch.compile(model, backend="stitch")``: the stitch pipeline as a dynamo backend.

Registered through the ``torch_dynamo_backends`` entry point (see pyproject.toml), so
``backend="stitch"`` works after install without importing anything. AOTAutograd splits each
dynamo graph into forward and backward aten graphs (decomposed with the same table as the
``stitchc`` path); both go through the same import -> plan -> fuse -> generate -> build
pipeline, so training works and backward's memory-intensive ops fuse like any others.

Options (``torch.compile(..., options={...})``): ``target`` (``cpu``; ``sm_80`` / ``sm_90``:
Triton kernels, chosen by default when the inputs are CUDA tensors; with CPU tensors they run
under Triton's interpreter, ``interpret``),
``gpu_codegen`` (``auto`` | ``triton`` | ``cuda``: which generator each GPU group gets; CUDA C
groups run in the cpu emulation when interpreted), ``fusion`` (none | greedy | stitch),
``time_limit`` (seconds the stitch planner may search per graph, default 10),
``cost_model`` (``analytic`` | ``learned`` | ``auto``, the default: the learned model where one
trained on this machine won its held-out evaluation; see ``cost_model.learned``),
``half_precision`` (cpu; also ``STITCH_HALF_PRECISION``: ``float32``, the default, keeps a
kernel's float16 / bfloat16 values in float32 between its loads and stores, as Inductor does,
rounding casts and what a discontinuous function reads; ``eager``: every op's result rounded,
eager's bits; see ``codegen.cpp.emit``),
``channels_last`` (``True``, the cpu default: convolutions run channels-last, ``layout-channels-last``
and ``sink-permutes``, the faster layout on every conv workload and client net measured in
inference, see passes/layout.py -- except training graphs of small maps,
``TRAINING_CHANNELS_LAST_MIN_MAP``; ``False``: as traced, the GPU targets' default until a GPU
run measures it;
``auto``: a graph with convolutions is compiled both ways, its first calls alternate between the
two and the faster serves from then on), ``dump_dir``
(also ``STITCH_DUMP_DIR``): each compiled graph's IR before and after fusion, its plan and its
kernel sources; ``aot_wrapper`` (``True``: keep AOTAutograd's runtime wrapper around an
inference graph that needs none, see ``stitch_backend``); ``partition`` (``auto``, the
default: ``min_cut`` for graphs that save little, else ``default``; or either of those: what a
training graph's forward saves for its backward, see ``_partitioner``).

Shapes: a graph whose inputs carry symbolic sizes (``dynamic=True``, or dynamo's automatic
dynamic shapes after a second input shape) is compiled once for every size: sizes of the form
``k * s`` are symbolic in the IR, planned at the traced size, read by the kernels from an
argument; the arena is laid out per size without a rebuild. Where stitch cannot (a product of
two symbols, a convolution over symbolic spatial dims, a GPU target), the graph is specialised
at call time instead: each new shape is re-traced and compiled (cached per shape), and the
reason is counted (``symbolic: ...``). Option ``dynamic=False`` always specialises.

Fallbacks: aten ops without an ``st`` counterpart run as torch ops inside the compiled graph
(``st.torch_call``); a graph stitch cannot compile at all runs as torch would run it. Both are
counted in ``FALLBACKS`` and logged once per graph — never a silent wrong result.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("stitch")

FALLBACKS: Counter = Counter()  # op or reason -> count, over the process
_graph_ids = itertools.count()


def _dump(dump_dir: str | None, gid: int, name: str, text: str) -> None:
    if not dump_dir:
        return
    path = Path(dump_dir) / f"graph_{gid:03d}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def compile_fx(gm: torch.fx.GraphModule, options: dict, example_inputs=None) -> Any:
    """Compile one static aten graph; returns a callable ``f(*tensors) -> list`` shaped like the
    graph's outputs (``None`` where the graph returns None). ``example_inputs``: the tensors
    (or fakes) the graph will be called with; their strides choose the arguments' memory
    order (``_argument_orders``)."""
    import passes
    from passes import PassContext, PassManager
    from passes.classify import summarize
    from passes.layout import permute_arguments
    from runtime.graph import CompiledGraph
    from stitch_ir.importer import ImportedProgram, import_graph
    from stitch_ir.printer import print_module

    gid = next(_graph_ids)
    dump_dir = options.get("dump_dir") or os.environ.get("STITCH_DUMP_DIR")
    # Number outputs (a size the backward needs, concrete once a symbolic graph is specialised
    # per shape) are not tensors to compute: the call returns them as they are.
    out_node = [n for n in gm.graph.nodes if n.op == "output"][0]
    outs = out_node.args[0]
    flat = list(outs) if isinstance(outs, list | tuple) else [outs]
    numbers = {k: a for k, a in enumerate(flat) if isinstance(a, int | float | bool)}
    # a symbolic size returned (for the backward): its value follows the call's inputs
    sym_outs = {k: a.meta["val"] for k, a in enumerate(flat) if isinstance(a, torch.fx.Node)
                and isinstance(a.meta.get("val"), torch.SymInt)}
    original = out_node.args
    if numbers or sym_outs:
        out_node.args = ([None if k in numbers or k in sym_outs else a
                          for k, a in enumerate(flat)],)
    try:
        module = import_graph(gm)
    finally:  # the caller's graph stays as it was (it may run it, or specialise it, next)
        out_node.args = original
    sizes = module.size_inputs  # positions of symbolic-size inputs: the call drops them
    placeholders = [n for k, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")
                    if k not in sizes]
    prog = ImportedProgram(module, [n.name for n in placeholders], {},
                           list(range(len(placeholders))))
    if example_inputs is not None:
        tensors = [x for k, x in enumerate(example_inputs) if k not in sizes]
        permute_arguments(module.func(), _argument_orders(tensors))
    saved = _saved_for_backward(len(flat))
    if saved:  # return positions of the saved activations, among the present outputs
        present_at = [k for k, a in enumerate(flat) if a is not None and k not in numbers
                      and k not in sym_outs]
        module.func().set_attrs(layout_free_results=[
            j for j, k in enumerate(present_at) if k in saved])
    _dump(dump_dir, gid, "before_fusion.sir", print_module(module))
    fusion = options.get("fusion", "stitch")
    budget = float(options.get("time_limit", 10.0))
    gpu_codegen = options.get("gpu_codegen", "auto")
    pipeline = passes.pipeline(fusion, budget, _channels_last(options, gm),
                               cost_model=options.get("cost_model"), gpu_codegen=gpu_codegen)
    target = options.get("target", "cpu")
    ctx = PassContext(target=target)
    PassManager.parse(pipeline).run(module, ctx)
    plan = ctx.results["plan"][module.func().sym_name]
    _dump(dump_dir, gid, "after_fusion.sir", print_module(module))
    _dump(dump_dir, gid, "plan.json", plan.dumps())
    if target == "cpu":
        graph = CompiledGraph(prog, half_precision=options.get("half_precision"))
        # dynamo's guards have checked every input's shape, strides and dtype (autograd, a
        # backward's gradients), and a per-shape specialisation is looked up by shape and dtype
        graph.check_inputs = False
    else:  # Triton kernels, on the inputs' CUDA device (or interpreted: options["interpret"])
        from runtime.gpu_graph import TritonGraph

        graph = TritonGraph(prog, target, interpret=options.get("interpret"))
    suffix = ".cpp" if target == "cpu" else ".py"
    for step in graph.steps:
        if step.source is not None:
            cuda = step.source.symbol.startswith("stitch_cuda_")
            _dump(dump_dir, gid, f"kernels/{step.source.symbol}{'.cu' if cuda else suffix}",
                  step.source.source)
    _report_output_strides(module.func(), flat, numbers, sym_outs)
    fell = summarize(module).torch_call_targets
    for target, n in fell.items():
        FALLBACKS[target] += n
    for reason in graph.fallbacks:
        FALLBACKS[f"interpreter: {reason}"] += 1
    if fell or graph.fallbacks:
        log.warning("stitch: graph %d runs %d op(s) through torch (%s)%s", gid,
                    sum(fell.values()), ", ".join(f"{t} x{n}" for t, n in fell.items()),
                    f" and {len(graph.fallbacks)} group(s) through the interpreter"
                    if graph.fallbacks else "")
    present = [a is not None and k not in numbers and k not in sym_outs
               for k, a in enumerate(flat)]
    from stitch_ir.importer import _dim
    from stitch_ir.types import Sym

    sym_dims = {k: _dim(v) for k, v in sym_outs.items()}
    if not sizes and all(present):
        # nothing to drop or add around the graph's tensors: the graph is the call (a Python
        # frame less per call: about a microsecond of a small graph's 12)
        graph.stitch_graph = graph
        return graph

    def run(*args):
        if sizes:
            args = [a for k, a in enumerate(args) if k not in sizes]
        got = iter(graph(*args))
        out = [next(got) if p else numbers.get(k) for k, p in enumerate(present)]
        if sym_dims:
            binding = graph.bind(args)
            for k, d in sym_dims.items():
                out[k] = d.value(binding) if isinstance(d, Sym) else d
        return out

    run.stitch_graph = graph
    return run


def _argument_orders(tensors) -> dict[int, tuple[int, ...]]:
    """Arguments of rank 3 and more that arrive permuted (tensors whose memory is a permutation
    of their dims, dense: channels-last activations as a channels-last forward saves them for
    its backward, an attention's q, k and v as views of the projections): the permutation that
    makes each contiguous, by argument position."""
    out = {}
    for k, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() < 3 or t.is_contiguous() or \
                any(isinstance(d, torch.SymInt) for d in (*t.shape, *t.stride())):
            continue
        order = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))  # outermost first
        if t.permute(order).is_contiguous():
            out[k] = order
    return out


def _saved_for_backward(n_outputs: int) -> set[int]:
    """In a training forward compiled under AOTAutograd, the output positions it saves for the
    backward (whose memory order only stitch's own backward reads); empty otherwise."""
    from torch._guards import TracingContext

    tc = TracingContext.try_get()
    meta = getattr(tc, "fw_metadata", None) if tc is not None else None
    if meta is None or getattr(tc, "output_strides", None) is None:
        return set()
    try:
        return set(range(n_outputs)[meta.tensors_saved_for_backwards_slice])
    except (AssertionError, AttributeError, TypeError):
        return set()


def _report_output_strides(func, flat: list, numbers: dict, sym_outs: dict) -> None:
    """Tell AOTAutograd the strides of outputs returned in another memory order (a permute of
    a buffer the graph wrote, returned as a view: ``layout_free_results``), so that the
    backward graph is compiled for the strides it will get; None (as traced) for the rest."""
    from torch._guards import TracingContext

    from passes.rewrite import defining_op
    from stitch_ir.core import BlockArgument
    from stitch_ir.dialects import st

    tc = TracingContext.try_get()
    # one report per forward graph (a layout trial compiles two: the first one reports)
    if tc is None or tc.output_strides is None or tc.output_strides:
        return
    returned = iter(func.return_op.operands)
    strides: list = []
    for k, a in enumerate(flat):
        if a is None or k in numbers or k in sym_outs:
            strides.append(None)
            continue
        v = next(returned)
        op = defining_op(v)
        if isinstance(op, st.PermuteOp) and not isinstance(op.operand(0), BlockArgument) and \
                op.operand(0).type.is_static:
            base = torch.empty(op.operand(0).type.shape, device="meta")
            strides.append(tuple(base.permute(op.attributes["perm"]).stride()))
        elif v.type.is_static and _written_contiguous(func, v):
            strides.append(tuple(torch.empty(v.type.shape, device="meta").stride()))
        else:
            strides.append(None)
    tc.output_strides.extend(strides)


def _written_contiguous(func, v) -> bool:
    """Whether the graph returns ``v`` as a contiguous tensor it wrote: a kernel's result, a
    matrix product's (``out=``), or a reshape of one. The traced strides may say otherwise: an
    attention's head split, traced as a permuted view of its projection, is returned as the
    contiguous copy the kernel wrote for the bmm -- a backward compiled for the traced strides
    took that copy permuted back, copied it contiguous and permuted it again (bert-tiny: six
    such copies a training step)."""
    from passes.rewrite import defining_op
    from runtime.views import runs_as_views
    from stitch_ir.dialects import fusion, st

    op = defining_op(v)
    while isinstance(op, st.ReshapeOp):
        op = defining_op(op.operand(0))
    if isinstance(op, st.MatmulOp | st.BatchMatmulOp | st.AddmmOp):
        return True
    return isinstance(op, fusion.GroupOp) and op.kind != "view" and \
        not runs_as_views(func, op)


def _static(example_inputs) -> bool:
    return all(not isinstance(x, torch.SymInt) and not (
        isinstance(x, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in x.shape))
        for x in example_inputs)


def _compiler(options: dict):
    from functorch.compile import make_boxed_func

    def compile_graph(gm: torch.fx.GraphModule, example_inputs):
        opts = dict(options)
        # the target follows the inputs' device: CUDA tensors get the device's sm_* target
        dev = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), None)
        if dev is not None and dev.type == "cuda" and "target" not in opts:
            from runtime.gpu_graph import target_of

            opts["target"] = target_of(dev)
        if _static(example_inputs):
            fn = _or_torch(gm, opts, example_inputs)
        else:
            fn = _symbolic(gm, opts) if opts.get("dynamic", True) else None
            fn = fn if fn is not None else _specialising(gm, opts)
        boxed = make_boxed_func(fn)
        if hasattr(fn, "stitch_graph"):  # stitch's own (not a graph run through torch)
            boxed.stitch_call = fn
        return boxed

    return compile_graph


def _or_torch(gm, options, example_inputs=None):
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        # AOTAutograd compiles under a fake-tensor mode; stitch's constants must be real.
        with unset_fake_temporarily():
            if options.get("channels_last") == "auto" and _has_conv(gm) and \
                    options.get("target", "cpu") == "cpu":
                first = compile_fx(gm, {**options, "channels_last": False}, example_inputs)
                return _LayoutTrial(first, compile_fx(gm, {**options, "channels_last": True},
                                                      example_inputs))
            return compile_fx(gm, {**options, "channels_last": _channels_last(options, gm)},
                              example_inputs)
    except Exception as e:  # noqa: BLE001 - any failure: run this graph as torch would
        FALLBACKS[f"graph: {type(e).__name__}"] += 1
        log.warning("stitch: a graph runs through torch unfused: %s", e)
        return gm.forward


# A training graph runs its convolutions channels-last by default only where their median
# output map has at least this many positions. Measured here (training steps, 2 threads), the
# median map against channels-last / NCHW step time: resnet18-tiny 10 positions, 9.2 / 7.9 ms;
# rzcr 40, 19.7 / 18.6; visual_lexical 160, 2.31 / 2.23; rcrn 256, 67.1 / 66.8; charformer
# 1024, 75.9 / 78.1; rffs_net 1024, 59.4 / 67.2. oneDNN's channels-last backward pays on large
# maps only; inference graphs gain from channels-last at every size measured.
TRAINING_CHANNELS_LAST_MIN_MAP = 512


def _channels_last(options: dict, gm: torch.fx.GraphModule | None = None) -> bool:
    """Whether convolutions run channels-last: as asked, else on the cpu target (measured there;
    the GPU targets keep the traced layout until a GPU run has measured it) -- except in a
    training graph of small maps (``TRAINING_CHANNELS_LAST_MIN_MAP``)."""
    if "channels_last" in options or options.get("target", "cpu") != "cpu":
        return options.get("channels_last", False) is True
    return gm is None or not _small_map_training(gm)


def _small_map_training(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` is a training graph (a forward that saves activations for its backward,
    or a backward: it takes convolution gradients) whose convolutions' median output map is
    below ``TRAINING_CHANNELS_LAST_MIN_MAP`` positions (static shapes only)."""
    aten = torch.ops.aten
    maps, backward = [], False
    for n in gm.graph.nodes:
        if n.target is aten.convolution.default:
            val = n.meta.get("val")
        elif n.target is aten.convolution_backward.default:
            backward = True
            val = n.args[0].meta.get("val") if isinstance(n.args[0], torch.fx.Node) else None
        else:
            continue
        if not isinstance(val, torch.Tensor) or val.dim() < 3 or \
                any(isinstance(d, torch.SymInt) for d in val.shape):
            return False
        maps.append(val.shape[2:].numel())
    if not maps:
        return False
    if not backward:
        out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        if not _saved_for_backward(len(out) if isinstance(out, list | tuple) else 1):
            return False  # an inference graph
    maps.sort()
    return maps[len(maps) // 2] < TRAINING_CHANNELS_LAST_MIN_MAP


def _has_conv(gm) -> bool:
    """Whether the graph runs a 1-d or 2-d convolution (a 3-d or 4-d input, plain or
    transposed): the layout trial's candidates."""
    conv = torch.ops.aten.convolution.default
    for n in gm.graph.nodes:
        if n.target is conv and isinstance(n.args[0], torch.fx.Node):
            val = n.args[0].meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() in (3, 4):
                return True
    return False


class _LayoutTrial:
    """``channels_last="auto"``: a graph with convolutions, compiled twice: as traced, and
    channels-last (the default since channels-last weights, 1-d and transposed convolutions and
    sink-permutes made it the faster layout on every conv net measured here; the planner does
    not cost layouts yet, and alternating two graphs in one process slows both, so the trial
    is noisy: an opt-in). The first
    ``2 * TRIALS`` calls alternate between the two -- each call runs one of them, so a training
    graph's buffer updates happen once -- and the faster median then serves every call
    (channels-last only when at least ``MARGIN`` faster). Both are correct; only time differs."""

    TRIALS = 4
    MARGIN = 0.05

    def __init__(self, first, channels_last):
        import threading

        self.variants = (first, channels_last)
        self.times: tuple[list[float], list[float]] = ([], [])
        self.chosen = None
        self.calls = 0
        self.lock = threading.Lock()
        self.stitch_graph = first.stitch_graph

    def __call__(self, *args):
        import time

        if self.chosen is not None:
            return self.chosen(*args)
        with self.lock:
            k = self.calls % 2
            self.calls += 1
        t0 = time.perf_counter()
        out = self.variants[k](*args)
        dt = time.perf_counter() - t0
        with self.lock:
            self.times[k].append(dt)
            if self.chosen is None and min(map(len, self.times)) >= self.TRIALS:
                a, b = (sorted(t)[len(t) // 2] for t in self.times)
                pick = 1 if b < (1 - self.MARGIN) * a else 0
                self.chosen = self.variants[pick]
                self.stitch_graph = self.chosen.stitch_graph
                log.debug("stitch: layout trial: NCHW %.3f ms, channels-last %.3f ms: %s", a * 1e3,
                          b * 1e3, "channels-last" if pick else "NCHW")
        return out


def _symbolic(gm, options):
    """Compile a graph with symbolic sizes once, for every size (kernels take the sizes as
    arguments; the arena is laid out per size); None where stitch cannot (then it is
    specialised per shape, and the reason is counted)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        with unset_fake_temporarily():
            fn = compile_fx(gm, options)
        if fn.stitch_graph.fallbacks:
            raise RuntimeError("groups in the interpreter")
        return fn
    except Exception as e:  # noqa: BLE001 - any failure: specialise per shape instead
        FALLBACKS[f"symbolic: {type(e).__name__}"] += 1
        log.warning("stitch: a symbolic graph is specialised per shape instead: %s", e,
                    exc_info=bool(os.environ.get("STITCH_DEBUG")))
        return None


def _specialising(gm, options):
    """Compile per concrete input shape (symbolic graphs are re-traced with real shapes)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from stitch_ir.importer import decomposition_table

    cache: dict[tuple, Any] = {}

    def run(*args):
        key = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        fn = cache.get(key)
        if fn is None:
            ints = {i: a for i, a in enumerate(args) if not isinstance(a, torch.Tensor)}

            def concrete(*tensors):
                it = iter(tensors)
                return gm(*[ints[i] if i in ints else next(it) for i in range(len(args))])

            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            static = make_fx(concrete, decomposition_table=decomposition_table())(*tensors)
            inner = _or_torch(static, options)
            fn = cache[key] = (lambda *a, inner=inner: inner(
                *[x for x in a if isinstance(x, torch.Tensor)]))
        return fn(*args)

    return run


def _instance_norm(x, weight=None, bias=None, eps=1e-5):
    """``F.instance_norm`` without running statistics, over the input's own rank."""
    dims = list(range(2, x.dim()))
    y = (x - x.mean(dims, keepdim=True)) * torch.rsqrt(x.var(dims, keepdim=True, correction=0)
                                                       + eps)
    shape = [1, -1] + [1] * len(dims)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _rank_preserving_instance_norm(gm: torch.fx.GraphModule) -> None:
    """Instance norms without running statistics, in float32 / float64, become their formula
    over (H, W) in the dynamo graph. torch's own composite reshapes [N, C, H, W] to
    [1, N * C, H, W] for a batch norm; that reshape stops ``sink-permutes`` in a channels-last
    graph, and rcrn's norm kernels then read their NCHW inputs transposed."""
    import inspect

    import torch.nn.functional as F

    signature = inspect.signature(F.instance_norm)
    changed = False
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not F.instance_norm:
            continue
        a = signature.bind(*n.args, **n.kwargs)
        a.apply_defaults()
        a = a.arguments
        val = a["input"].meta.get("example_value") if isinstance(a["input"], torch.fx.Node) \
            else None
        if a["running_mean"] is not None or a["running_var"] is not None or \
                not a["use_input_stats"] or not isinstance(val, torch.Tensor) or \
                val.dtype not in (torch.float32, torch.float64) or val.dim() < 3:
            continue
        n.target = _instance_norm
        n.args = (a["input"],)
        n.kwargs = {"weight": a["weight"], "bias": a["bias"], "eps": a["eps"]}
        changed = True
    if changed:
        gm.recompile()


def _plain_inference(gm: torch.fx.GraphModule, n_inputs: int) -> bool:
    """Whether AOTAutograd's runtime wrapper around the inference graph ``gm`` it is compiling
    does nothing but call it: no input mutated (no copy back), no output aliasing an input or
    another output (no view regenerated), no effect tokens, tensor subclasses or functionalised
    RNG state, and the graph takes the dynamo graph's inputs as they are (no duplicate inputs
    removed, no synthetic bases)."""
    from torch._functorch._aot_autograd.schemas import OutputType, PlainTensorMeta
    from torch._guards import TracingContext

    tc = TracingContext.try_get()
    meta = getattr(tc, "fw_metadata", None) if tc is not None else None
    if meta is None:
        return False
    try:
        return (sum(1 for n in gm.graph.nodes if n.op == "placeholder") == n_inputs
                and not any(i.mutates_data or i.mutates_metadata for i in meta.input_info)
                and meta.num_mutated_inp_runtime_indices == 0
                and all(o.output_type == OutputType.non_alias for o in meta.output_info)
                and meta.num_intermediate_bases == 0 and not meta.tokens
                and not meta.num_graphsafe_rng_states and meta.grad_enabled_mutation is None
                and not getattr(meta, "is_rng_op_functionalized", False)
                and all(isinstance(m, PlainTensorMeta | int) for m in
                        (*meta.subclass_inp_meta, *meta.subclass_fw_graph_out_meta)))
    except (AttributeError, TypeError):  # another torch's metadata: keep the wrapper
        return False


def _unwrapped(fn, grad_enabled: bool):
    """The compiled inference graph as dynamo calls it, without AOTAutograd's wrapper (about
    1.1 us a call: several frames and list copies around a call that returns the graph's outputs
    as they are); with grad mode off during the call, as the wrapper would have it."""
    if not grad_enabled:
        return fn
    set_grad = torch._C._set_grad_enabled

    def call(*args):
        set_grad(False)
        try:
            return fn(*args)
        finally:
            set_grad(True)

    call.stitch_graph = fn.stitch_graph
    return call


PARTITIONS = ("auto", "default", "min_cut")
# ``partition="auto"``: a training graph whose default partition saves at most this many bytes
# for its backward is split by the min-cut partitioner instead (see ``_partitioner``).
MIN_CUT_MAX_SAVED_BYTES = 2 << 20


def _partitioner(opts: dict):
    """How AOTAutograd splits a training graph into forward and backward (option ``partition``):
    ``default`` saves every value the backward reads; ``min_cut`` (inductor's partitioner)
    saves the fewest bytes and recomputes cheap element-wise ops in the backward, where they
    fuse into its kernels; ``auto`` (the default) is ``min_cut`` where the default partition
    saves at most ``MIN_CUT_MAX_SAVED_BYTES``, else ``default`` (and for symbolic sizes, whose
    bytes are not known without guarding on them).

    Why the split by size: a small graph's step is mostly per-tensor costs (each saved tensor is
    a forward output: an allocation, AOTAutograd's bookkeeping, a backward input), which
    min-cut cuts; a large one's is memory traffic, where recomputing in the backward can cost
    more than it saves. Measured (``bench.clients``, alternating the two, two runs each, a 2-core
    EPYC): ``min_cut`` made the training steps of 24 small clients 1.53x -> 1.60x of inductor in
    geometric mean (bert-tiny/b8/f32 0.90-0.95x -> 0.97-1.03x, gin/n100 1.40x -> 1.58x) but
    adder_quant's 35-37 -> 48-50 ms, attention_round's 32-37 -> 38-40 ms and rcrn's
    0.98-1.00x -> 0.95x, all of which save tens of MiB; rffs_net, bert, charformer, rzcr,
    visual_lexical and molcpt within the noise."""
    from torch._functorch.partitioners import (
        default_partition,
        min_cut_rematerialization_partition,
    )

    which = opts.get("partition", "auto")
    if which not in PARTITIONS:
        raise ValueError(f"stitch option partition={which!r}: expected one of {PARTITIONS}")
    if which != "auto":
        return min_cut_rematerialization_partition if which == "min_cut" else default_partition

    def auto(joint_module, joint_inputs, **kwargs):
        fw, bw = default_partition(joint_module, joint_inputs, **kwargs)
        saved = _saved_bytes(fw, kwargs["num_fwd_outputs"])
        if saved is None or saved > MIN_CUT_MAX_SAVED_BYTES:
            return fw, bw
        keep = ("num_fwd_outputs", "static_lifetime_input_indices")
        return min_cut_rematerialization_partition(
            joint_module, joint_inputs, **{k: v for k, v in kwargs.items() if k in keep})

    return auto


def _saved_bytes(fw: torch.fx.GraphModule, num_fwd_outputs: int) -> int | None:
    """Bytes of the tensors forward graph ``fw`` saves for its backward (its outputs after the
    first ``num_fwd_outputs``); None where a size is symbolic."""
    out = next(n for n in fw.graph.nodes if n.op == "output").args[0]
    total = 0
    for node in out[num_fwd_outputs:]:
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if isinstance(val, torch.Tensor):
            n = val.numel()
            if not isinstance(n, int):  # a symbolic size (int() of it would guard on its hint)
                return None
            total += n * val.element_size()
    return total


def stitch_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None,
                   **kwargs):
    """The dynamo backend: AOTAutograd with stitch compiling the forward and backward graphs.
    An inference graph whose AOTAutograd wrapper would only call it is returned to dynamo as it
    is (``_plain_inference``; option ``aot_wrapper=True`` keeps the wrapper)."""
    from torch._dynamo.backends.common import aot_autograd

    from stitch_ir.importer import decomposition_table, whole_factor_upsampling

    opts = {**(options or {}), **kwargs}
    _rank_preserving_instance_norm(gm)
    compile_graph = _compiler(opts)
    plain: list = []

    def inference(fx: torch.fx.GraphModule, inputs):
        boxed = compile_graph(fx, inputs)
        fn = getattr(boxed, "stitch_call", None)
        plain.append(fn if fn is not None and _plain_inference(fx, len(example_inputs)) else None)
        return boxed

    with whole_factor_upsampling():
        compiled = aot_autograd(fw_compiler=compile_graph, bw_compiler=compile_graph,
                                inference_compiler=inference, partition_fn=_partitioner(opts),
                                decompositions=decomposition_table())(gm, example_inputs)
    if len(plain) == 1 and plain[0] is not None and not opts.get("aot_wrapper") and \
            not any(True for _ in gm.parameters()) and not any(True for _ in gm.buffers()) and \
            all(isinstance(x, torch.Tensor | int | torch.SymInt) for x in example_inputs):
        return _unwrapped(plain[0], torch.is_grad_enabled())
    return compiled
