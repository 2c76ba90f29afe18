"""How a library convolution step calls torch: the layouts oneDNN is fast on.

``runtime.graph`` builds one run function per ``st.convolution``; this module is that function.
A channels-last convolution (``layout-channels-last``) holds [N, *spatial, C] buffers: torch gets
the channels-last view of the logical [N, C, *spatial] tensor and a channels-last weight, and
answers NHWC memory, all without copies. A 1-d one runs as a 2-d convolution of height 1.

Invariants: a run function writes exactly its one result slot; it copies nothing of the input a
kernel wrote (those are contiguous already); a weight's channels-last copy is reused only while
it is the same tensor at the same version.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from stitch_ir.dialects import st

if TYPE_CHECKING:
    from runtime.graph import CallState


# Whether oneDNN runs float16 convolutions and matrix products on this cpu (AVX512-FP16 /
# AMX-FP16). Where it does not, torch falls back to reference paths: resnet18-tiny's float16
# training step spent 51 ms in _slow_conv2d (a 3x3 backward over an 8x128x1x1 map: 9.9 ms, 0.15
# in float32), and a 256x256x256 float16 mm takes 12.4 ms (0.2 ms in float32).
ONEDNN_FLOAT16 = bool(getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_fp16_supported",
                                 lambda: False)())


def in_float(fn: Callable) -> Callable:
    """``fn`` (a convolution or its backward) computing in float32 on float16 operands, its
    float16 results rounded once: the reference path accumulates in float32 too, so the values
    agree to the last rounding (checked against eager in ``tests/runtime/test_cpu_half.py``)."""
    half = torch.float16

    def run(*args, **kwargs):
        up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == half else a for a in args]
        out = fn(*up, **kwargs)
        if isinstance(out, torch.Tensor):
            return out.to(half)
        return type(out)(t.to(half) if isinstance(t, torch.Tensor) else t for t in out)
    return run


def half_in_float(op) -> bool:
    """Whether ``op`` (a convolution, a matrix product) computes on float16 tensors that oneDNN
    cannot run here (``ONEDNN_FLOAT16``): it then runs in float32. (A convolution backward
    always does: ``torch_call_fn``.)"""
    return not ONEDNN_FLOAT16 and has_float16(op)


def has_float16(op) -> bool:
    """Whether an operand or result of ``op`` is float16."""
    from stitch_ir.types import DType

    return any(getattr(v.type, "dtype", None) is DType.f16 for v in [*op.operands, *op.results])


def torch_call_fn(op) -> Callable:
    """The torch function an ``st.torch_call`` runs: its target, computing a float16
    convolution backward in float32 on every cpu. Where oneDNN reports float16 support
    (``ONEDNN_FLOAT16``: AVX512-FP16 without AMX-FP16, a Sapphire Rapids Xeon) its float16
    forward is fast (an 8x16x32x32 3x3: 0.50 ms, 0.30 in float32) but its backward is not: 57
    ms against 0.64 in float32 (8x64x8x8: 63 against 0.53), and a float16 ResNet training step
    spent nearly all its 128 ms there, under eager and inductor alike."""
    from stitch_ir.interpreter import resolve_torch_op

    fn = resolve_torch_op(op.attributes["target"])
    if op.attributes["target"] == "aten.convolution_backward.default" and has_float16(op):
        return in_float(fn)
    return fn


def convolution_run(op, reads: list[int], writes: list[int], memo: int | None) -> Callable:
    """The run function ``(env, cs)`` of convolution ``op`` reading ``reads`` (input, weight,
    optional bias) into ``writes[0]``. ``memo``: the key under which the call state keeps the
    weight's channels-last copy (the step index, for a weight the caller passes); None copies
    every call (a weight the graph computes lives in an arena buffer rewritten in place)."""
    a = op.attributes
    conv = in_float(torch.convolution) if half_in_float(op) else torch.convolution
    args = (list(a["stride"]), list(a["padding"]), list(a["dilation"]), bool(a["transposed"]),
            list(a["output_padding"]), int(a["groups"]))
    if a.get("channels_last") and op.result.type.rank == 3:
        # [N, L, C] buffers: a 2-d channels-last convolution of height 1 over the [N, 1, L, C]
        # view (oneDNN's 1-d path on NLC memory is slower than NCL, its NHWC 2-d path faster);
        # the weight gains a unit height
        args2 = ([1, *args[0]], [0, *args[1]], [1, *args[2]], args[3], [0, *args[4]], args[5])

        def run(env, cs):
            b = env[reads[2]] if len(reads) == 3 else None
            x = _contiguous(env[reads[0]]).unsqueeze(1).permute(0, 3, 1, 2)
            y = conv(x, _channels_last_weight(cs, memo, env[reads[1]], 2), b, *args2)
            env[writes[0]] = y.permute(0, 2, 3, 1).squeeze(1)
    elif a.get("channels_last"):
        to_last, to_first = st.channels_last_perms(op.result.type.rank)

        def run(env, cs):
            b = env[reads[2]] if len(reads) == 3 else None
            # an NCHW tensor viewed as NHWC (a graph input) is made NHWC first: the
            # convolution then runs and answers channels-last
            y = conv(_contiguous(env[reads[0]]).permute(to_first),
                     _channels_last_weight(cs, memo, env[reads[1]]), b, *args)
            env[writes[0]] = y.permute(to_last)
    else:
        def run(env, cs):
            b = env[reads[2]] if len(reads) == 3 else None
            env[writes[0]] = conv(env[reads[0]], env[reads[1]], b, *args)
    return run


def permuted_call_run(op, fn, reads: list[int], writes: list[int], key: int,
                      user_inputs: set[int]) -> Callable:
    """The run function of an ``st.torch_call`` with ``operand_perms`` / ``result_perms`` (a
    channels-last ``convolution_backward``, cpu flash attention's results held as torch answers
    them): each permuted operand is handed over permuted
    back -- a channels-last view of the NHWC buffer, no copy -- and each permuted result
    permuted, which is contiguous when torch answers channels-last. Results that are not
    permuted are made contiguous (a weight gradient comes back channels-last; the caller gets
    eager's layout).

    A convolution backward's weight goes in channels-last memory (memoized under ``key`` when
    the caller passes it, as for the forward: oneDNN reorders an OIHW weight next to NHWC
    activations on every call). A 1-d one runs as a 2-d one of height 1, as the forward does:
    oneDNN's 1-d backward on [N, L, C] memory is 5x slower than on NCL, and its NHWC 2-d
    backward faster than both (2x128x1024 -> 1024, k=1: 13.2 / 2.7 / 2.4 ms)."""
    from stitch_ir.interpreter import torch_args_decoder, torch_call_results

    spec = op.attributes["args"]
    ins = [st.inverse_perm(p) if p else None
           for p in op.attr("operand_perms") or [()] * len(reads)]
    outs = [p if p else None for p in op.attr("result_perms") or [()] * len(writes)]
    weight = unit = None
    small = False
    if op.attributes["target"] == "aten.convolution_backward.default":
        import json

        weight = op.arg_operand(2)
        # the output gradient's spatial sizes (held [N, *spatial, C])
        small = math.prod(op.operand(op.arg_operand(0)).type.shape[1:-1]) <= SMALL_MAP
        if op.operand(weight).type.rank == 3:  # height 1: a unit dim in every operand
            d = json.loads(spec)
            unit = 2
            a = d["args"]
            for i, pad in ((4, 1), (5, 0), (6, 1), (8, 0)):  # stride, padding, dilation, opad
                a[i] = [pad, *a[i]]
            spec = json.dumps(d)
    memo = key if weight is not None and reads[weight] in user_inputs else None
    # (``small``) oneDNN's channels-last backward loses on small output maps (2 threads here): a 4x4 output
    # took 4.5 ms against 3.1 ms NCHW (rcrn: 2x256x8x8 -> 256, 4x4/s2), 0.72 against 0.48 ms
    # (visual_lexical: 2x128x8x8 -> 256, 3x3/s2), and a little longer in three other 4x4 cases;
    # from 8x8 on channels-last was as fast or faster (16x16 and up: 10-75% faster). Such a
    # backward runs NCHW on copies (its tensors are small: microseconds), and its input gradient
    # is copied back channels-last, so the kernels around it still read one layout.

    strided = takes_strided(op.attributes["target"])
    decode = torch_args_decoder(spec)

    def run(env, cs):
        ops = []
        for k, (i, q) in enumerate(zip(reads, ins)):
            t = env[i]
            if isinstance(t, torch.Tensor):
                t = t if strided and q is None else _contiguous(t)
                if q is not None:
                    t = t.permute(q)
                    if unit is not None:
                        t = t.unsqueeze(unit)
                    if small:
                        t = t.contiguous()
                elif k == weight:
                    t = _channels_last_weight(cs, memo, t, unit) if not small else \
                        t if unit is None else t.unsqueeze(unit)
            ops.append(t)
        a, kw = decode(ops)
        for w, t, p in zip(writes, torch_call_results(op, fn(*a, **kw)), outs):
            if unit is not None and t.dim() == 4:  # not the bias gradient
                t = t.squeeze(unit)
            env[w] = (t.permute(p).contiguous() if small else t.permute(p)) if p is not None \
                else t if strided else _contiguous(t)
    return run


def takes_strided(target: str) -> bool:
    """Torch ops that get their operands as they are, strided: stride-reading ops (as_strided),
    and the ops eager itself hands strided views (cpu flash attention: q, k, v are transposes
    of the projections; copying them cost three copies per attention call). Other ops get
    contiguous operands: st values are logical tensors, so a view step may hand a torch op a
    strided operand where the traced graph had a contiguous one (the importer drops AOT's
    clones), and some ops read their operands as if contiguous (_embedding_bag_forward_only
    did)."""
    return target.startswith(("aten.as_strided", "aten.set_",
                              "aten._scaled_dot_product_flash_attention"))


SMALL_MAP = 16  # output positions per image up to which a backward runs NCHW (see above)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _channels_last_weight(cs: CallState, k: int | None, w: torch.Tensor,
                          unit_dim: int | None = None) -> torch.Tensor:
    """The weight in channels-last memory (with a unit dim inserted at ``unit_dim`` first, for a
    1-d convolution run as 2-d). oneDNN reorders an OIHW weight for an NHWC convolution on every
    call, and slowly: rcrn's 256x256x4x4 weight, 2.26 ms a call with an OIHW weight, 0.56 ms
    with an OHWI one. The copy is kept in the call state under ``k`` while the weight is the
    same tensor at the same version (an optimizer step's in-place update makes a new copy; an
    inference weight is copied once); ``k`` None: copied every call."""
    hit = cs.weight_memo.get(k) if k is not None else None
    if hit is not None and hit[0] is w and hit[1] == w._version:
        return hit[2]
    v = w if unit_dim is None else w.unsqueeze(unit_dim)
    cl = v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v.contiguous()
    if k is not None:
        cs.weight_memo[k] = (w, w._version, cl)
    return cl
