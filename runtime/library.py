"""The run functions of library steps (matrix products, linears, convolutions) of a cpu
``CompiledGraph``: torch's calls on the step's operands, written into the step's output where
the call takes an ``out=`` (``runtime.graph.OUT_LIBRARY_OPS``), float16 products where oneDNN
has none computed in float32, and weights BLAS or oneDNN cannot take as they are copied once
per parameter version (kept in the call state)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from runtime.convolution import convolution_run, half_in_float
from stitch_ir.dialects import st

if TYPE_CHECKING:
    from runtime.graph import CallState


def library_run(op, reads: list[int], writes: list[int], out: Callable, k: int,
                weight_is_input: bool) -> Callable:
    """The run function of library op ``op`` (step ``k``), reading slots ``reads`` and writing
    ``writes``; ``out(env, cs)`` gives its output buffer; ``weight_is_input``: its second
    operand is a graph input (a parameter, whose copies are kept per call state)."""
    if isinstance(op, MATRIX_PRODUCTS) and half_in_float(op):
        return _float_product(op, reads, writes, out)
    if isinstance(op, st.MatmulOp):
        def run(env, cs):
            torch.mm(env[reads[0]], env[reads[1]], out=out(env, cs))
    elif isinstance(op, st.BatchMatmulOp):
        def run(env, cs):
            torch.bmm(env[reads[0]], env[reads[1]], out=out(env, cs))
    elif isinstance(op, st.AddmmOp):
        alpha, beta = op.attr("alpha", 1), op.attr("beta", 1)
        def run(env, cs):
            torch.addmm(env[reads[0]], env[reads[1]], env[reads[2]], beta=beta, alpha=alpha,
                        out=out(env, cs))
    elif isinstance(op, st.LinearOp):
        def run(env, cs):
            b = env[reads[2]] if len(reads) == 3 else None
            w = env[reads[1]]
            if w.stride(-1) != 1 and w.stride(0) != 1:
                w = _blas_weight(cs, k, w)
            env[writes[0]] = torch.nn.functional.linear(env[reads[0]], w, b)
    else:  # convolution: a parameter's channels-last copy is kept per call state
        return convolution_run(op, reads, writes, k if weight_is_input else None)
    return run


def _blas_weight(cs: CallState, k: int, w: torch.Tensor) -> torch.Tensor:
    """A linear's weight with neither dim of unit stride (one tap of a 3x3 convolution weight:
    ``passes.layout.PooledConvToLinearPass``), which BLAS cannot read: torch copied it on every
    call (resnet18-tiny's 128x128 taps: 60-110 us a linear, against 5 us contiguous). The copy
    is kept in the call state under step ``k`` while the weight is the same tensor at the same
    version: a parameter's view, made once per call state, whose version counter an
    optimizer's in-place update bumps."""
    hit = cs.weight_memo.get(k)
    if hit is not None and hit[0] is w and hit[1] == w._version:
        return hit[2]
    copy = w.contiguous()
    cs.weight_memo[k] = (w, w._version, copy)
    return copy


MATRIX_PRODUCTS = (st.MatmulOp, st.BatchMatmulOp, st.AddmmOp, st.LinearOp)


def _float_product(op, reads: list[int], writes: list[int], out: Callable) -> Callable:
    """The run function of a float16 matrix product where oneDNN has none
    (``runtime.convolution.ONEDNN_FLOAT16``): computed in float32 and rounded once into the
    float16 result. torch's float16 fallback accumulates in float32 too, 12-60x slower here."""
    mm = {st.MatmulOp: torch.mm, st.BatchMatmulOp: torch.bmm}.get(type(op))
    alpha, beta = op.attr("alpha", 1), op.attr("beta", 1)

    def run(env, cs):
        a = [env[i].float() for i in reads]
        if mm is not None:
            y = mm(a[0], a[1])
        elif isinstance(op, st.AddmmOp):
            y = torch.addmm(a[0], a[1], a[2], beta=beta, alpha=alpha)
        else:
            y = torch.nn.functional.linear(a[0], a[1], a[2] if len(a) == 3 else None)
        if isinstance(op, st.LinearOp):
            env[writes[0]] = y.half()
        else:
            out(env, cs).copy_(y)
    return run
