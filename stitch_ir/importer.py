"""The torch importer: torch model + example inputs -> torch.export -> core aten -> ``st``.

Pipeline: ``torch.export.export`` (non-strict), then ``run_decompositions`` with torch's
core-aten table extended by torch's own decompositions of the composite ops whose inside we
want to fuse (layer norm, softmax, GELU, batch norm, their backwards, ...; see
``FUSABLE_DECOMPOSITIONS``). Each FX node then becomes ``st`` ops:

- element-wise ops get explicit ``st.broadcast`` and ``st.cast`` operands (torch's implicit
  broadcasting and type promotion made visible); Python scalars become splat constants;
- an op whose result has no elements (a 0 in its static shape) becomes an empty constant;
- views, squeeze / unsqueeze / expand / select become ``st.reshape`` / ``st.broadcast`` /
  ``st.slice``; clones and aliases disappear (values are immutable in ``st``);
- any aten op without an ``st`` counterpart becomes ``st.torch_call`` (counted in summaries),
  so import never fails on an unknown op. A construct that cannot be represented at all (a
  non-tensor graph input or output, in-place mutation of an input) raises ``ImportError_``
  naming the FX node and its op.

The function's arguments are the exported program's placeholders in order (parameters,
buffers, lifted constants, then user inputs), named by the ``arg_names`` attribute; their
values are kept on the returned ``ImportedProgram`` so the interpreter can run the module.
"""

from __future__ import annotations

import json
import math
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from stitch_ir.core import Builder, DenseAttr, FuncOp, IRError, Module, ReturnOp, Value
from stitch_ir.dialects import st
from stitch_ir.types import DType, Sym, TensorType

aten = torch.ops.aten
prims = torch.ops.prims


class ImportError_(IRError):
    """A model construct the importer cannot represent; names the FX node and op."""


_TORCH_TO_DTYPE = {
    torch.float64: DType.f64, torch.float32: DType.f32, torch.float16: DType.f16,
    torch.bfloat16: DType.bf16, torch.int64: DType.i64, torch.int32: DType.i32,
    torch.int16: DType.i16, torch.int8: DType.i8, torch.uint8: DType.u8, torch.bool: DType.i1,
}
_DTYPE_TO_TORCH = {v: k for k, v in _TORCH_TO_DTYPE.items()}


def dtype_from_torch(dt: torch.dtype) -> DType:
    try:
        return _TORCH_TO_DTYPE[dt]
    except KeyError:
        raise ImportError_(f"unsupported dtype {dt}") from None


def dtype_to_torch(dt: DType) -> torch.dtype:
    return _DTYPE_TO_TORCH[dt]


def _dim(d: Any) -> int | Sym:
    """A size: an int, or a symbol times an int (``s0``, ``128*s0``) with the traced value as
    its hint. Other expressions (two symbols multiplied, s0 + 1) are not supported."""
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        expr = d.node.expr
        if expr.is_number:
            return int(expr)
        shape_env = d.node.shape_env
        values = getattr(shape_env, "backed_var_to_val", None)
        if values is None and shape_env is not None:
            values = shape_env.var_to_val
        coef, names, hints = 1, [], []
        for a in (expr.args if expr.is_Mul else (expr,)):
            base, power = (a.args if a.is_Pow else (a, 1))
            if a.is_Integer and int(a) > 0:
                coef *= int(a)
            elif base.is_Symbol and getattr(power, "is_Integer", power == 1) and int(power) > 0:
                hint = values.get(base) if values is not None else None
                names += [str(base)] * int(power)
                hints += [int(hint) if hint is not None else 0] * int(power)
            else:
                break
        else:
            if names:
                return Sym(tuple(names), coef, tuple(hints))
    raise ImportError_(f"unsupported symbolic size {d}")


def _empty(val: Any) -> bool:
    """A static-shaped, zero-element tensor of a dtype stitch holds."""
    return (isinstance(val, torch.Tensor) and val.layout == torch.strided
            and val.dtype in _TORCH_TO_DTYPE and all(isinstance(d, int) for d in val.shape)
            and 0 in val.shape)


def type_from_meta(val: Any) -> TensorType:
    return TensorType(tuple(_dim(d) for d in val.shape), dtype_from_torch(val.dtype))


# Composite ops decomposed with torch's own tables before import, so their insides can fuse.
FUSABLE_DECOMPOSITIONS = [
    aten.native_layer_norm, aten._softmax, aten._log_softmax, aten.gelu, aten.native_batch_norm,
    aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_functional, aten.native_group_norm, aten.leaky_relu,
    aten.hardtanh, aten.silu, aten.elu, aten.hardsigmoid, aten.hardswish, aten.mish,
    aten.softplus, aten.logsumexp, aten.tanh_backward, aten.gelu_backward,
    aten._softmax_backward_data, aten._log_softmax_backward_data,
    aten.native_layer_norm_backward, aten.threshold_backward, aten.sigmoid_backward,
    aten.native_batch_norm_backward, aten.native_group_norm_backward,
    aten.leaky_relu_backward, aten.silu_backward, aten.hardtanh_backward, aten.elu_backward,
    aten.embedding_dense_backward, aten.nll_loss_forward, aten.nll_loss_backward,
    aten.log_sigmoid_forward, aten.lerp, aten.rsub,
    aten.mse_loss, aten.binary_cross_entropy, aten.binary_cross_entropy_with_logits,
    aten.smooth_l1_loss, aten.huber_loss, aten.std, aten.std_mean, aten.var_mean,
    aten.masked_fill, aten.clamp_min, aten.clamp_max, aten.index_fill, aten.repeat, aten.roll,
    aten.tril, aten.triu, aten.mv, aten.dot, aten.baddbmm, aten.addmv, aten.norm,
    aten.linalg_vector_norm, aten.native_dropout_backward, aten.squeeze, aten.pixel_shuffle,
    aten._adaptive_avg_pool2d, aten.upsample_nearest2d, aten.upsample_bilinear2d, aten.flip,
    aten._batch_norm_with_update_functional, aten._batch_norm_with_update, aten.ldexp,
]
# Ops the core-aten table would decompose that ``st`` represents directly (and better: an
# index_add decomposed into index_put loses its scatter structure). torch's take decomposes to
# x.reshape(-1)[index], which turns a 0-d index into a data-dependent Python int. And cpu flash
# attention: torch's decomposition of it (meant for export) returns the attention weights where
# the op returns its logsumexp, so under AOTAutograd the decomposed forward fed the
# un-decomposed flash backward a wrong logsumexp -- silently wrong gradients in float32 (a
# TransformerEncoderLayer's were off by 8x). It stays one torch call, forward and backward.
# addcdiv, addcmul, linalg_cross and addr are lowered by rules that round in half precision
# where eager's cpu kernels do (importer_lowerings), not where the decompositions do.
KEEP = [aten.index_add, aten.scatter_add, aten.scatter_reduce, aten.var, aten.index_select,
        aten.take, aten._scaled_dot_product_flash_attention_for_cpu, aten.addcdiv, aten.addcmul,
        aten.linalg_cross, aten.addr]


def decomposition_table() -> dict:
    from torch._decomp import core_aten_decompositions, get_decompositions

    table = dict(core_aten_decompositions())
    table.update(get_decompositions(FUSABLE_DECOMPOSITIONS))
    for packet in KEEP:
        for name in packet.overloads():
            table.pop(getattr(packet, name), None)
    table[aten.silu.default] = _silu
    for nd, packet in UPSAMPLE_NEAREST:  # see whole_factor_upsampling
        fwd, bwd = packet.default, getattr(aten, f"{packet.__name__}_backward").default
        table[fwd] = _repeat_upsample(nd, table.get(fwd))
        table[packet.vec] = _repeat_upsample_vec(nd, table.get(packet.vec, packet.vec.decompose))
        table[bwd] = _repeat_upsample_backward(nd, table.get(bwd))
    table[aten._scaled_dot_product_flash_attention_for_cpu.default] = _small_attention
    table[aten._scaled_dot_product_flash_attention_for_cpu_backward.default] = \
        _small_attention_backward
    return table


# Attention whose score matrix is at most this large is decomposed into two matmuls around a
# softmax that fuses with its scale and mask (it stays in cache); larger runs torch's flash
# kernel. Measured on this 2-core cpu (float32, q/k/v strided views of a projection): B1 H2 L16
# D32 flash 27 us against 24 decomposed, B8 H2 L16 45 against 72, B1 H12 L128 D64 (768 KiB of
# scores) 424 against 337 us; B8 H12 L128 (6 MiB) 3.1 ms flash against 4.2 ms decomposed.
SMALL_ATTENTION_BYTES = 1 << 20


def _small_attention(q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """cpu flash attention (output and logsumexp, which its backward reads) as matmuls and a
    softmax, where the scores are small (``SMALL_ATTENTION_BYTES``): torch's flash kernel
    spends 8-40 us setting up on a tiny model's attention. Rows that every key masks give 0
    and a logsumexp of 0, as the flash kernel does; half types compute in float and round the
    output once, as it does. Static shapes without dropout only; anything else stays the flash
    call (NotImplemented)."""
    if not _is_small_attention(q, k, v, dropout_p):
        return NotImplemented
    dt = q.dtype  # half types: in float throughout, the output rounded once (as flash does)
    q, k, v, attn_mask = _widened(q, k, v, attn_mask)
    s = _scores(q, k, is_causal, attn_mask, scale)
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)  # a row masked throughout
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    out = torch.matmul(e / torch.where(z == 0, 1.0, z), v)
    lse = torch.where(z == 0, 0.0, m + torch.log(z)).squeeze(-1)
    out = out.to(dt)
    # flash's strides: the output in q's memory order, the logsumexp [B, L, H] in memory (a
    # graph traced against flash's strides views them so: gpt2's re-trace per shape did)
    if q.stride(1) < q.stride(2):
        out = _heads_inside(out)
    return out, _heads_inside(lse)


def _small_attention_backward(grad_out, q, k, v, out, lse, dropout_p, is_causal, *,
                              attn_mask=None, scale=None):
    """cpu flash attention's backward as matmuls and element-wise ops, where its forward was
    decomposed (``_small_attention``): the probabilities again from the scores and the saved
    logsumexp, then dS = P * (dO V^T - rowsum(dO * O)). Masked-out entries have P = 0, so they
    get no gradient; a row masked throughout (logsumexp 0) neither."""
    if not _is_small_attention(q, k, v, dropout_p):
        return NotImplemented
    dt = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, attn_mask, grad_out, out = _widened(q, k, v, attn_mask, grad_out, out)
    p = torch.exp(_scores(q, k, is_causal, attn_mask, scale) - lse.unsqueeze(-1))
    grad_v = torch.matmul(p.transpose(-2, -1), grad_out)
    dp = torch.matmul(grad_out, v.transpose(-2, -1))
    ds = p * (dp - (grad_out * out).sum(-1, keepdim=True))
    grad_q = torch.matmul(ds, k) * scale
    grad_k = torch.matmul(ds.transpose(-2, -1), q) * scale
    # flash's backward answers each gradient with [B, L, H, D] memory
    return tuple(_heads_inside(g.to(dt)) for g in (grad_q, grad_k, grad_v))


def _heads_inside(t):
    """``t`` [B, H, L, ...] as it is, held in [B, L, H, ...] memory (flash's layouts)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _widened(*ts):
    """Half-precision tensors as float32 (flash attention computes in float); others as given."""
    return [t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t
            for t in ts]


def _is_small_attention(q, k, v, dropout_p) -> bool:
    """Whether cpu flash attention over these operands is decomposed: static shapes, one head
    count, no dropout, at most ``SMALL_ATTENTION_BYTES`` of scores."""
    shapes = (*q.shape, *k.shape, *v.shape)
    return all(isinstance(d, int) for d in shapes) and dropout_p == 0.0 and \
        q.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) and \
        q.dim() == 4 and \
        k.shape[:2] == q.shape[:2] and v.shape[:2] == q.shape[:2] and \
        q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * max(q.element_size(), 4) <= \
        SMALL_ATTENTION_BYTES  # half types' scores are float


def _scores(q, k, is_causal: bool, attn_mask, scale):
    """q k^T scaled, with the causal and the additive mask."""
    L, S = q.shape[2], k.shape[2]
    s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        s = s + attn_mask
    return s


def _silu(x):
    """silu as eager's cpu kernel computes it, x / (1 + exp(-x)) in float (torch's
    decomposition, x * sigmoid(x), rounds differently: a float16 result an ulp off eager's)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf / (1 + torch.exp(-xf))).to(x.dtype)


def _repeat_factors(in_sp, out_sp, scales) -> list[int] | None:
    """Per spatial dim, the k with which nearest upsampling from ``in_sp`` to ``out_sp`` reads
    input index i // k at output index i -- checked against the index eager's cpu kernel
    computes (``nearest_idx``: float32 floor(i * scale), scale 1/scales[d] when given, else
    in/out) at every output index -- or None where some dim is not such a repeat (or a size is
    symbolic)."""
    ks = []
    for d, (n_in, n_out) in enumerate(zip(in_sp, out_sp)):
        if not (isinstance(n_in, int) and isinstance(n_out, int)) or n_in <= 0 or n_out % n_in:
            return None
        k = n_out // n_in
        s = scales[d] if scales and scales[d] is not None and scales[d] > 0 else None
        if n_out not in (n_in, 2 * n_in):  # eager's kernel takes those two exactly
            scale = np.float32(1.0 / s) if s is not None else np.float32(n_in) / np.float32(n_out)
            i = np.arange(n_out, dtype=np.float32)
            got = np.minimum(np.floor(i * scale).astype(np.int64), n_in - 1)
            if not np.array_equal(got, np.arange(n_out) // k):
                return None
        ks.append(k)
    return ks


def _repeated(x, nd: int, ks: list[int]):
    """``x`` with each of its last ``nd`` dims repeated element-wise ``ks`` times, as a
    broadcast and a reshape ([.., H, W] -> [.., H, 1, W, 1] -> [.., H, kh, W, kw] -> [.., H*kh,
    W*kw]): fusable layout ops read at an affine index."""
    lead, sp = list(x.shape[:-nd]), list(x.shape[-nd:])
    spread = [s for n in sp for s in (n, 1)]
    wide = [s for n, k in zip(sp, ks) for s in (n, k)]
    return x.reshape(lead + spread).expand(lead + wide).reshape(
        lead + [n * k for n, k in zip(sp, ks)])


def _repeat_upsample(nd: int, fallback):
    """Nearest upsampling by whole factors as ``_repeated``, where the decomposition gathers
    through an index table (and its backward scatters). Any other size goes to ``fallback``."""

    def upsample(x, output_size, *scales, **kwargs):
        ks = _repeat_factors(list(x.shape[-nd:]), list(output_size), scales)
        if ks is None or kwargs:
            return fallback(x, output_size, *scales, **kwargs) if fallback else NotImplemented
        return _repeated(x, nd, ks)

    return upsample


def _repeat_upsample_vec(nd: int, fallback):
    """``_repeat_upsample`` for the ``.vec`` overload (an output size, or scale factors from
    which torch floors it)."""

    def upsample_vec(x, output_size, scale_factors):
        sp = list(x.shape[-nd:])
        ks = None
        if output_size is not None:
            ks = _repeat_factors(sp, list(output_size), [None] * nd)
        elif scale_factors is not None and all(isinstance(n, int) for n in sp):
            out = [int(math.floor(float(n) * float(f))) for n, f in zip(sp, scale_factors)]
            ks = _repeat_factors(sp, out, list(scale_factors))
        return fallback(x, output_size, scale_factors) if ks is None else _repeated(x, nd, ks)

    return upsample_vec


UPSAMPLE_NEAREST = ((1, aten.upsample_nearest1d), (2, aten.upsample_nearest2d),
                    (3, aten.upsample_nearest3d))


@contextmanager
def whole_factor_upsampling() -> Iterator[None]:
    """While AOTAutograd traces, nearest upsampling by whole factors is ``_repeated``'s
    broadcast. Under its Python dispatcher torch decomposes these ops above autograd (Python
    kernels at the Autograd and CompositeImplicitAutograd keys) before the decomposition table
    is consulted, so the table entries (enough for ``run_decompositions``) are never reached
    there: the kernels are swapped for the trace (falling back to torch's for any other size)
    and restored."""
    from torch._C import DispatchKey

    saved = []
    for nd, packet in UPSAMPLE_NEAREST:
        for op, make in ((packet.default, _repeat_upsample), (packet.vec, _repeat_upsample_vec)):
            for key in (DispatchKey.Autograd, DispatchKey.CompositeImplicitAutograd):
                old = op.py_kernels.get(key)
                if old is not None:
                    saved.append((op, key, old))
                    op.py_kernels[key] = make(nd, old)
            op._dispatch_cache.clear()
    try:
        yield
    finally:
        for op, key, old in saved:
            op.py_kernels[key] = old
            op._dispatch_cache.clear()


def _repeat_upsample_backward(nd: int, fallback):
    """The gradient of ``_repeat_upsample``: each input element sums its k-block of the output
    gradient (a reshape and one reduction)."""

    def upsample_backward(grad, output_size, input_size, *scales):
        ks = _repeat_factors(list(input_size[-nd:]), list(output_size), scales)
        if ks is None:
            return fallback(grad, output_size, input_size, *scales) if fallback else NotImplemented
        lead = list(input_size[:-nd])
        wide = [s for n, k in zip(input_size[-nd:], ks) for s in (n, k)]
        blocks = grad.reshape(lead + wide)
        dims = [len(lead) + 2 * d + 1 for d in range(nd)]
        if grad.dtype in (torch.float16, torch.bfloat16):  # eager's kernel sums in float
            return blocks.float().sum(dims).to(grad.dtype)
        return blocks.sum(dims)

    return upsample_backward


@dataclass
class ImportedProgram:
    """An imported model: the ``st`` module plus the values of its non-user arguments."""

    module: Module
    arg_names: list[str]
    # Parameters, buffers and lifted constants by argument position; user inputs are absent.
    constants: dict[int, torch.Tensor] = field(default_factory=dict)
    user_inputs: list[int] = field(default_factory=list)

    @property
    def func(self) -> FuncOp:
        return self.module.func()

    def full_inputs(self, user_inputs: Sequence[torch.Tensor | np.ndarray]) -> list[np.ndarray]:
        if len(user_inputs) != len(self.user_inputs):
            raise IRError(f"model takes {len(self.user_inputs)} inputs, got {len(user_inputs)}")
        args: list[Any] = [None] * len(self.arg_names)
        for i, t in self.constants.items():
            args[i] = to_numpy(t)
        for i, x in zip(self.user_inputs, user_inputs):
            args[i] = to_numpy(x)
        return args

    def run(self, *user_inputs: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        """Run the module with the reference interpreter."""
        from stitch_ir.interpreter import run

        return run(self.module, self.full_inputs(user_inputs))


def to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


def export_model(model: torch.nn.Module, example_inputs: tuple,
                 dynamic: dict[str, int] | None = None) -> torch.export.ExportedProgram:
    """torch.export, decomposed to core aten. ``dynamic``: symbol name -> the dim it is in every
    tensor input (``{"batch": 0}``: a symbolic batch size)."""
    shapes = None
    if dynamic:
        (name, dim), = dynamic.items()
        d = torch.export.Dim(name, min=1)
        shapes = tuple({dim: d} if isinstance(a, torch.Tensor) and a.dim() > dim else None
                       for a in example_inputs)
        import inspect

        params = list(inspect.signature(model.forward).parameters.values())
        if params and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
            shapes = (shapes,)  # forward(*xs): one argument, the tuple
    with warnings.catch_warnings():
        # torch.export's own pytree deprecation noise, raised on every export in torch 2.13
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        ep = torch.export.export(model, tuple(example_inputs), strict=False, dynamic_shapes=shapes)
        return ep.run_decompositions(decomposition_table())


def import_model(model: torch.nn.Module, example_inputs: tuple, name: str = "forward",
                 dynamic: dict[str, int] | None = None) -> ImportedProgram:
    """Export ``model`` on ``example_inputs`` and import it into ``st`` (``dynamic``: see
    ``export_model``)."""
    ep = export_model(model, example_inputs, dynamic)
    sig = ep.graph_signature
    kinds = {s.arg.name: s for s in sig.input_specs}
    consts: dict[int, torch.Tensor] = {}
    user: list[int] = []
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    state = dict(ep.state_dict)
    state.update(ep.constants)
    for i, n in enumerate(placeholders):
        spec = kinds[n.name]
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
            user.append(i)
        else:
            consts[i] = state[spec.target]
    module = GraphImporter(ep.graph_module.graph, name).run()
    return ImportedProgram(module, [n.name for n in placeholders], consts, user)


def import_graph(gm: torch.fx.GraphModule, name: str = "forward") -> Module:
    """Import an FX graph already in core aten (e.g. from AOTAutograd) into ``st``. Placeholders
    that pass a symbolic size (a dynamic graph's ``s0``) get no function argument; the module's
    ``size_inputs`` maps their positions to the sizes."""
    imp = GraphImporter(gm.graph, name)
    module = imp.run()
    module.size_inputs = imp.size_inputs
    return module


# ----------------------------------------------------------------------------------------------


Handler = Callable[["GraphImporter", Node], Any]
HANDLERS: dict[Any, Handler] = {}


def handles(*targets):
    def deco(fn: Handler) -> Handler:
        for t in targets:
            packet = getattr(t, "overloads", None)
            if packet is not None:  # an OpOverloadPacket: register every overload
                for o in t.overloads():
                    HANDLERS[getattr(t, o)] = fn
            else:
                HANDLERS[t] = fn
        return fn

    return deco


class GraphImporter:
    def __init__(self, graph: torch.fx.Graph, name: str):
        self.graph = graph
        self.name = name
        self.env: dict[Node, Any] = {}
        self.node: Node | None = None
        self.b: Builder | None = None

    # -- helpers -------------------------------------------------------------------------------
    def fail(self, msg: str) -> ImportError_:
        n = self.node
        where = f"node '{n.name}' ({n.target})" if n is not None else "graph"
        return ImportError_(f"cannot import {where}: {msg}")

    @property
    def loc(self) -> str:
        n = self.node
        return f"node {n.name} ({n.target})" if n is not None else "graph"

    def create(self, cls, *operands: Value, **attrs) -> Value:
        try:
            return self.b.create(cls, *operands, loc=self.loc, **attrs)
        except (ValueError, TypeError, KeyError, IRError) as e:
            raise self.fail(f"{cls.name}: {e}") from None

    def rand(self, shape: tuple) -> Value:
        """Uniform [0, 1) float32 of ``shape``: the graph's seed (one ``st.seed`` per graph,
        drawn per call) on a counter range of its own."""
        if getattr(self, "_seed", None) is None:
            self._seed = self.b.insert(st.SeedOp((), [TensorType((), DType.i64)], {},
                                                 loc=self.loc)).result
            self._rand_offset = 0
        offset = self._rand_offset
        self._rand_offset += max(1, math.prod(shape))
        seed = self.broadcast(self._seed, tuple(shape))
        return self.create(st.RandOp, seed, offset=offset)

    def out_type(self, k: int | None = None) -> TensorType:
        val = self.node.meta.get("val")
        if k is not None:
            val = val[k]
        if not isinstance(val, torch.Tensor):
            raise self.fail(f"expected a tensor result, got {type(val).__name__}")
        return type_from_meta(val)

    def value(self, a: Any) -> Value:
        if isinstance(a, Node):
            v = self.env.get(a)
            if isinstance(v, Value):
                return v
            raise self.fail(f"argument '{a.name}' is not a single tensor")
        raise self.fail(f"expected a tensor argument, got {a!r}")

    def constant(self, value: float | int | bool, t: TensorType) -> Value:
        if t.dtype.is_bool:
            value = bool(value)
        elif t.dtype.is_int:
            if isinstance(value, float) and not value.is_integer():
                raise self.fail(f"non-integral scalar {value} for {t.dtype}")
            value = int(value)
        else:
            value = float(value)
        return self.b.insert(st.ConstantOp((), [t], {"value": value}, loc=self.loc)).result

    def cast(self, v: Value, dt: DType) -> Value:
        return v if v.type.dtype is dt else self.create(st.CastOp, v, dtype=dt)

    def broadcast(self, v: Value, shape: tuple) -> Value:
        if v.type.shape == tuple(shape):
            return v
        return self.create(st.BroadcastOp, v, shape=tuple(shape))

    def reshape(self, v: Value, shape: Sequence) -> Value:
        shape = tuple(shape)
        if v.type.shape == shape:
            return v
        return self.create(st.ReshapeOp, v, shape=shape)

    def operand(self, a: Any, dt: DType, shape: tuple) -> Value:
        """A tensor or scalar argument as a value of dtype ``dt`` and shape ``shape``."""
        if isinstance(a, Node):
            return self.broadcast(self.cast(self.value(a), dt), shape)
        if isinstance(a, bool | int | float):
            return self.constant(a, TensorType(shape, dt))
        if isinstance(a, torch.SymInt | torch.SymFloat):
            raise self.fail("symbolic scalar arguments are not supported")
        raise self.fail(f"unsupported argument {a!r}")

    def arg_dtype(self, a: Any):
        if isinstance(a, Node):
            t = self.value(a).type
            return torch.empty((0,) if t.rank else (), dtype=dtype_to_torch(t.dtype))
        return a

    def result_dtype(self, *args: Any) -> DType:
        return dtype_from_torch(torch.result_type(*(self.arg_dtype(a) for a in args[:2])) if
                                len(args) >= 2 else self.value(args[0]).type.dtype)

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> Module:
        everything = [n for n in self.graph.nodes if n.op == "placeholder"]
        placeholders, arg_types = [], []
        self.size_inputs: dict[int, Sym] = {}  # placeholder position -> the size it passes
        for k, n in enumerate(everything):
            self.node = n
            val = n.meta.get("val")
            if isinstance(val, torch.SymInt):  # a symbolic size passed in: no tensor argument
                self.env[n] = self.size_inputs[k] = _dim(val)
                continue
            if not isinstance(val, torch.Tensor):
                raise self.fail(f"graph input is a {type(val).__name__}, not a tensor")
            placeholders.append(n)
            arg_types.append(type_from_meta(val))
        f = FuncOp.create(self.name, arg_types, arg_names=[n.name for n in placeholders])
        self.b = Builder(f.body)
        for n, a in zip(placeholders, f.args):
            self.env[n] = a
        for n in self.graph.nodes:
            self.node = n
            if n.op == "call_function":
                self.env[n] = self.call(n)
            elif n.op == "output":
                outs = []
                for a in torch.utils._pytree.tree_leaves(n.args[0]):
                    if a is None:
                        continue
                    outs.append(self.value(a))
                self.b.insert(ReturnOp(outs, loc=self.loc))
            elif n.op == "get_attr":
                self.env[n] = self.attribute(n)
            elif n.op != "placeholder":
                raise self.fail(f"unsupported FX node kind '{n.op}'")
        self.node = None
        return Module([f])

    def attribute(self, n: Node) -> Value:
        """A tensor the graph module holds (a lifted constant): a dense ``st.constant``."""
        obj: Any = self.graph.owning_module
        for part in str(n.target).split("."):
            obj = getattr(obj, part, None)
        if not isinstance(obj, torch.Tensor) or obj.layout != torch.strided:
            raise self.fail(f"attribute '{n.target}' is not a dense tensor")
        t = obj.detach()
        dt = dtype_from_torch(t.dtype)
        arr = to_numpy(t.float() if t.dtype == torch.bfloat16 else t)
        return self.b.insert(st.ConstantOp.dense(DenseAttr.from_array(arr, dt))).result

    def call(self, n: Node) -> Any:
        if n.target is operator.getitem:
            container = self.env[n.args[0]]
            return container[n.args[1]]
        if isinstance(n.meta.get("val"), torch.SymInt):  # a size computed from sizes
            return _dim(n.meta["val"])
        if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
            raise self.fail("in-place / mutating ops are not supported; export should have "
                            "functionalised them")
        if n.meta.get("val") is None and not n.users and "assert" in str(n.target):
            return None  # run-time shape / dtype assertions: the types already say it
        if _empty(n.meta.get("val")):  # no element to compute: an (empty) constant
            return self.constant(0, type_from_meta(n.meta["val"]))
        handler = HANDLERS.get(n.target)
        if handler is not None:
            return handler(self, n)
        return self.torch_call(n)

    def torch_call(self, n: Node) -> Any:
        if not isinstance(n.target, torch._ops.OpOverload):
            raise self.fail("only aten / prims operators can be called through torch")
        operands: list[Value] = []

        def enc(a):
            if isinstance(a, Node):
                operands.append(self.value(a))
                return {"operand": len(operands) - 1}
            if isinstance(a, list | tuple):
                return [enc(x) for x in a]
            if isinstance(a, torch.dtype):
                return {"dtype": str(a).removeprefix("torch.")}
            if isinstance(a, torch.device):
                return {"device": str(a)}
            if isinstance(a, torch.layout):
                return {"layout": str(a).removeprefix("torch.")}
            if isinstance(a, torch.memory_format):
                return {"memory_format": str(a).removeprefix("torch.")}
            if a is None or isinstance(a, bool | int | str):
                return a
            if isinstance(a, float):
                if not math.isfinite(a):
                    raise self.fail(f"non-finite scalar argument {a}")
                return a
            raise self.fail(f"argument {a!r} cannot be passed to torch")

        spec = {"args": enc(list(n.args)), "kwargs": {k: enc(v) for k, v in n.kwargs.items()}}
        val = n.meta.get("val")
        leaves = val if isinstance(val, tuple | list) else [val]
        types = []
        for leaf in leaves:
            if leaf is None and isinstance(val, tuple | list):
                continue  # an output the op was asked not to compute (e.g. an output_mask)
            if not isinstance(leaf, torch.Tensor):
                raise self.fail(f"op returns a {type(leaf).__name__}, which stitch cannot hold")
            types.append(type_from_meta(leaf))
        attrs = {"target": str(n.target), "args": json.dumps(spec)}
        if isinstance(val, tuple | list):
            attrs["outputs"] = [k for k, leaf in enumerate(leaves) if leaf is not None]
        op = st.TorchCallOp(operands, types, attrs, loc=self.loc)
        self.b.insert(op)
        if not isinstance(val, tuple | list):
            return op.results[0]
        results = iter(op.results)
        return [None if leaf is None else next(results) for leaf in leaves]


# Handlers for the individual ops live in importer_ops, importer_lowerings and importer_pooling
# (registered on import; no op is handled by two of them).
from stitch_ir import importer_lowerings, importer_ops, importer_pooling  # noqa: E402,F401
