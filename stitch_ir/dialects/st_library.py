"""The ``st`` dialect's compute-intensive ops, kept as library calls (mm, bmm, addmm, linear,
convolution), and ``st.torch_call`` for anything else. ``stitch_ir.dialects.st`` re-exports
them (``st.ConvolutionOp``)."""

from __future__ import annotations

from stitch_ir.core import register_op
from stitch_ir.dialects.st_base import LIBRARY, TORCH, StOp
from stitch_ir.types import TensorType, broadcast_shapes

# ----------------------------------------------------------------------------------------------
# Compute-intensive ops, kept as library calls


def _mm_shape(a: tuple, b: tuple) -> tuple:
    if a[-1] != b[-2]:
        raise ValueError(f"contraction sizes differ: {a[-1]} vs {b[-2]}")
    return (a[-2], b[-1])


class LibraryOp(StOp):
    kind = LIBRARY


@register_op
class MatmulOp(LibraryOp):
    """``mm`` of two 2-D tensors."""

    name = "st.mm"
    num_operands = 2

    @classmethod
    def infer_types(cls, ts, attrs):
        a, b = ts
        if a.rank != 2 or b.rank != 2 or a.dtype != b.dtype:
            raise ValueError(f"expects two 2-D tensors of one dtype, got {a}, {b}")
        return [TensorType(_mm_shape(a.shape, b.shape), a.dtype)]


@register_op
class BatchMatmulOp(LibraryOp):
    name = "st.bmm"
    num_operands = 2

    @classmethod
    def infer_types(cls, ts, attrs):
        a, b = ts
        if a.rank != 3 or b.rank != 3 or a.dtype != b.dtype or a.shape[0] != b.shape[0]:
            raise ValueError(f"expects two 3-D tensors of one batch and dtype, got {a}, {b}")
        return [TensorType((a.shape[0],) + _mm_shape(a.shape, b.shape), a.dtype)]


@register_op
class AddmmOp(LibraryOp):
    """``beta * bias + alpha * (a @ b)``; bias broadcasts to the product's shape."""

    name = "st.addmm"
    num_operands = 3
    optional_attrs = ("alpha", "beta")

    @classmethod
    def infer_types(cls, ts, attrs):
        bias, a, b = ts
        if a.rank != 2 or b.rank != 2 or not (a.dtype == b.dtype == bias.dtype):
            raise ValueError(f"expects 2-D operands of one dtype, got {bias}, {a}, {b}")
        shape = _mm_shape(a.shape, b.shape)
        if broadcast_shapes(bias.shape, shape) != shape:
            raise ValueError(f"bias {list(bias.shape)} does not broadcast to {list(shape)}")
        return [TensorType(shape, a.dtype)]


@register_op
class LinearOp(LibraryOp):
    """``x @ w.T (+ b)``: x is [..., K], w is [N, K], b is [N]."""

    name = "st.linear"

    @classmethod
    def infer_types(cls, ts, attrs):
        if len(ts) not in (2, 3):
            raise ValueError(f"expects 2 or 3 operands, got {len(ts)}")
        x, w = ts[0], ts[1]
        if w.rank != 2 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"weight {w} does not match input {x}")
        if len(ts) == 3 and ts[2].shape != (w.shape[0],):
            raise ValueError(f"bias {ts[2]} must be [{w.shape[0]}]")
        return [x.with_shape(x.shape[:-1] + (w.shape[0],))]


@register_op
class ConvolutionOp(LibraryOp):
    """``aten.convolution``: N-d convolution (or transposed), weight [Cout, Cin/groups, *k]."""

    name = "st.convolution"
    required_attrs = ("stride", "padding", "dilation", "transposed", "output_padding", "groups")
    # channels_last: the input and the result are channels-last, [N, *spatial, C] (the
    # layout-channels-last pass chooses it; the weight stays [Cout, Cin/groups, *k])
    optional_attrs = ("channels_last",)

    @classmethod
    def infer_types(cls, ts, attrs):
        if len(ts) not in (2, 3):
            raise ValueError(f"expects input, weight and optional bias, got {len(ts)} operands")
        if attrs.get("channels_last"):
            x = ts[0]
            first = x.with_shape((x.shape[0], x.shape[-1], *x.shape[1:-1]))
            (y,) = cls.infer_types([first, *ts[1:]], {**attrs, "channels_last": False})
            return [y.with_shape((y.shape[0], *y.shape[2:], y.shape[1]))]
        x, w = ts[0], ts[1]
        nd = x.rank - 2
        if w.rank != x.rank or nd < 1:
            raise ValueError(f"input {x} and weight {w} ranks do not fit a convolution")
        stride, pad, dil, opad = (tuple(attrs[k]) for k in
                                  ("stride", "padding", "dilation", "output_padding"))
        groups = int(attrs["groups"])
        spatial = []
        for i in range(nd):
            k = w.shape[2 + i]
            n = x.shape[2 + i]
            if attrs["transposed"]:
                spatial.append((n - 1) * stride[i] - 2 * pad[i] + dil[i] * (k - 1) + opad[i] + 1)
            else:
                spatial.append((n + 2 * pad[i] - dil[i] * (k - 1) - 1) // stride[i] + 1)
        cout = w.shape[1] * groups if attrs["transposed"] else w.shape[0]
        return [x.with_shape((x.shape[0], cout, *spatial))]


# ----------------------------------------------------------------------------------------------
# Anything else: a call into torch, so that import never has to fail


@register_op
class TorchCallOp(StOp):
    """Calls ``torch.ops.<target>`` (e.g. ``aten.sort.default``).

    ``args`` is a JSON string describing the positional and keyword arguments, with
    ``{"operand": i}`` standing for operand i; ``results`` maps the op's outputs onto results.
    The interpreter resolves ``target`` by attribute lookup under ``torch.ops``, never by
    evaluating text.
    """

    name = "st.torch_call"
    kind = TORCH
    num_results = None
    required_attrs = ("target", "args")
    # ``outputs``: for an op returning a tuple, the tuple position of each result (outputs the
    # op was asked not to compute are skipped, so results and positions need not line up).
    # ``operand_perms`` / ``result_perms`` (one permutation per operand / result, empty for
    # none): operand i holds the op's argument permuted by ``operand_perms[i]`` (the call gets
    # it permuted back, a view), and result j is the op's output permuted by
    # ``result_perms[j]`` -- how ``layout-channels-last`` hands a convolution backward
    # channels-last buffers, which torch sees as channels-last [N, C, H, W] tensors.
    optional_attrs = ("outputs", "operand_perms", "result_perms")

    def arg_operand(self, k: int) -> int | None:
        """The operand passed as positional argument ``k``; None when that argument is not an
        operand (a constant, or absent)."""
        import json

        args = json.loads(self.attributes["args"]).get("args", [])
        a = args[k] if k < len(args) else None
        return a["operand"] if isinstance(a, dict) and "operand" in a else None

    def verify_(self) -> None:
        target = self.attributes["target"]
        if not isinstance(target, str) or target.count(".") < 2:
            raise self.error(f"'target' must look like 'aten.op.overload', got {target!r}")
        import json

        try:
            json.loads(self.attributes["args"])
        except (TypeError, ValueError) as e:
            raise self.error(f"'args' is not valid JSON: {e}") from None
        for key, values in (("operand_perms", self.operands), ("result_perms", self.results)):
            perms = self.attr(key)
            if perms is None:
                continue
            if len(perms) != len(values):
                raise self.error(f"'{key}' has {len(perms)} entries for {len(values)} values")
            for k, (p, v) in enumerate(zip(perms, values)):
                if p and sorted(p) != list(range(v.type.rank)):
                    raise self.error(f"'{key}'[{k}] = {list(p)} is not a permutation of "
                                     f"{v.type}'s dims")
