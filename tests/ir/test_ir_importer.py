"""The importer: torch model -> torch.export -> core aten -> st, checked by running the imported
module in the interpreter against eager torch, on odd shapes and size-1 dims."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hs

from passes import PassManager
from passes.classify import summarize
from stitch_ir.importer import ImportError_, import_model
from stitch_ir.parser import parse_module
from stitch_ir.printer import print_module
from stitch_ir.verifier import verify


def check(model: torch.nn.Module, *inputs: torch.Tensor, atol=1e-5, rtol=1e-5, canonical=True,
          allow_torch_call=False):
    model.eval()
    prog = import_model(model, inputs)
    verify(prog.module)
    if canonical:
        PassManager.parse("canonicalize,cse,dce").run(prog.module)
    if not allow_torch_call:
        s = summarize(prog.module)
        assert s.counts["torch-call"] == 0, s.torch_call_targets
    with torch.no_grad():
        want = model(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    got = prog.run(*inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.numpy(), atol=atol, rtol=rtol)
    # and the module survives a text round trip
    assert print_module(parse_module(print_module(prog.module))) == print_module(prog.module)
    return prog


class Fn(torch.nn.Module):
    def __init__(self, fn, *params: torch.Tensor):
        super().__init__()
        self.fn = fn
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(p) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.ps)


g = torch.Generator().manual_seed(0)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


PATTERNS = {
    "layernorm": (lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b), [rnd(3, 7, 13)],
                  [rnd(13), rnd(13)]),
    "softmax_scale_mask": (lambda x, m: torch.softmax(x * 0.125 + (1 - m) * -10000.0, -1),
                           [rnd(2, 3, 5, 5), (rnd(2, 1, 1, 5) > 0).float()], []),
    "softmax_dim0": (lambda x: torch.softmax(x, 0), [rnd(7, 1, 3)], []),
    "log_softmax": (lambda x: F.log_softmax(x, -1), [rnd(5, 11)], []),
    "bias_gelu": (lambda x, b: F.gelu(x + b), [rnd(3, 17)], [rnd(17)]),
    "bias_gelu_tanh": (lambda x, b: F.gelu(x + b, approximate="tanh"), [rnd(3, 17)], [rnd(17)]),
    "rmsnorm": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
                [rnd(4, 9)], [rnd(9)]),
    "batchnorm_eval_relu": (None, [rnd(2, 3, 5, 1)], []),
    "adder": (lambda x, w: -(x.unsqueeze(1) - w.unsqueeze(0).unsqueeze(-1)).abs().sum(2),
              [rnd(2, 6, 7)], [rnd(4, 6)]),
    "gnn_gather_add_relu_index_add": (
        lambda x, e, src, dst: torch.zeros_like(x).index_add(0, dst, F.relu(x[src] + e)),
        [rnd(6, 4), rnd(9, 4), torch.tensor([0, 1, 1, 5, 3, 3, 3, 2, 0]),
         torch.tensor([1, 1, 0, 2, 4, 4, 5, 5, 0])], []),
    "segment_softmax": (
        lambda x, parent: torch.exp(x - torch.full((2, 3), -1e9).scatter_reduce(
            1, parent.expand(2, -1), x, "amax", include_self=True).gather(1, parent.expand(2, -1))),
        [rnd(2, 7), torch.tensor([[0, 0, 1, 1, 1, 2, 2]])], []),
    "attention_round": (
        lambda w, lv: (torch.softmax(-(w.unsqueeze(-1) - lv) ** 2 / 0.02, -1) * lv).sum(-1),
        [rnd(5, 3)], [torch.linspace(-1, 1, 8)]),
    "layout_mix": (lambda x: torch.cat([x.transpose(0, 1)[:, 1:], x.t().flip(0)[:, :1]], 1)
                   .reshape(-1)[::2], [rnd(3, 5)], []),
    "pad_slice_select": (lambda x: F.pad(x, (1, 2, 0, 1), value=0.5)[1, :, 2:-1], [rnd(2, 3, 4)],
                         []),
    "var_mean_std": (lambda x: (torch.var(x, 1, keepdim=True), x.std(0), torch.var_mean(x, -1)[1]),
                     [rnd(4, 6, 3)], []),
    "max_argmax": (lambda x: (x.max(1).values, x.argmax(-1), x.amin((0, 2))), [rnd(3, 4, 5)], []),
    "int_math": (lambda a, b: (a // b, torch.div(a, b, rounding_mode="trunc"), a % b, a / b,
                               (a > b) & (b > 0)),
                 [torch.tensor([7, -7, 3, -9]), torch.tensor([2, 2, -4, 5])], []),
    "where_clamp_cast": (lambda x: torch.where(x > 0, x.clamp(max=0.5), x.clamp(-0.3)).to(
        torch.float16).to(torch.float32), [rnd(4, 5)], []),
    "embedding_mm": (lambda ids, w, p: F.embedding(ids, w) @ p, [torch.tensor([[1, 0, 3]])],
                     [rnd(4, 5), rnd(5, 2)]),
    "conv_bn_relu": (None, [rnd(1, 3, 7, 6)], []),
    "iota_full": (lambda x: x + torch.arange(x.shape[-1]) * 0.5 + torch.ones(x.shape[-1]),
                  [rnd(2, 3)], []),
}


def _bn_relu():
    m = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    m[0].running_mean.uniform_(-1, 1)
    m[0].running_var.uniform_(0.5, 2)
    return m


def _conv_bn_relu():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, stride=2), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.ConvTranspose2d(4, 2, 2, stride=2))


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_imports_and_matches_eager(name):
    fn, inputs, params = PATTERNS[name]
    if name == "batchnorm_eval_relu":
        model = _bn_relu()
    elif name == "conv_bn_relu":
        model = _conv_bn_relu()
    else:
        model = Fn(fn, *params)
    check(model, *inputs, atol=1e-4)


@settings(max_examples=6, deadline=None)
@given(hs.lists(hs.sampled_from([1, 2, 3, 7, 13]), min_size=1, max_size=3),
       hs.integers(0, 1000))
def test_layernorm_softmax_on_drawn_shapes(shape, seed):
    torch.manual_seed(seed)
    n = shape[-1]
    model = Fn(lambda x, w, b: torch.softmax(F.layer_norm(x, (n,), w, b), -1), torch.randn(n),
               torch.randn(n))
    check(model, torch.randn(*shape), atol=1e-5)


def test_bert_imports_without_torch_call_and_matches_eager():
    import models

    w = models.get("bert")
    prog = check(w.model, *w.example_inputs, atol=1e-4, rtol=1e-4)
    s = summarize(prog.module)
    assert s.memory_intensive > 100 and s.counts["library"] > 0


def test_unknown_op_becomes_torch_call_and_still_runs():
    model = Fn(lambda x: torch.cumsum(torch.sort(x, -1).values, -1) + 1)
    prog = check(model, rnd(3, 6), allow_torch_call=True)
    targets = summarize(prog.module).torch_call_targets
    assert "aten.sort.default" in targets


def test_non_tensor_output_is_an_error_naming_the_node():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.aten._local_scalar_dense.default(x.sum())

    with pytest.raises(ImportError_, match=r"cannot import node '.*' \(aten\._local_scalar_dense"):
        import_model(M(), (rnd(3),))


def test_float16_model_imports():
    model = Fn(lambda x: F.gelu(x * 2) + 1)
    x = rnd(3, 5, dtype=torch.float16)
    check(model, x, atol=2e-3, rtol=2e-3)


def test_op_with_omitted_outputs_imports_as_torch_call():
    """convolution_backward asked for the input gradient only returns None for the others."""

    def fn(dy, x, w):
        return torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], [1, 1], [1, 1], False,
                                                   [0, 0], 1, [True, False, False])[0]

    prog = check(Fn(fn), rnd(1, 2, 5, 5), rnd(1, 3, 5, 5), rnd(2, 3, 3, 3), atol=1e-4,
                 allow_torch_call=True)
    assert "aten.convolution_backward.default" in summarize(prog.module).torch_call_targets


def test_non_overlapping_pooling_imports_as_reductions():
    def fn(x):
        return F.avg_pool2d(x, 2) + F.max_pool2d(x, 2), F.avg_pool2d(x, 3, 1)  # overlapping

    prog = check(Fn(fn), rnd(2, 3, 6, 6), atol=1e-5)
    s = summarize(prog.module)
    # non-overlapping windows are reshapes + reductions; overlapping small ones a chain of
    # strided slices (index maps: no gathered window)
    assert s.counts["gather/scatter"] == 0, s.counts
    assert sum(op.name == "st.slice" for op in prog.module.walk()) >= 9


def test_multi_index_on_adjacent_dims_imports_without_torch_call():
    """Nearest upsampling indexes H and W with two broadcast index tensors."""
    check(Fn(lambda x: F.interpolate(x, scale_factor=2, mode="nearest") * 2), rnd(2, 3, 4, 5))
    ih, iw = torch.tensor([[0], [2], [-1]]), torch.tensor([1, 0, 3, 3])
    check(Fn(lambda x: x[:, ih, iw] + 1), rnd(2, 4, 5))
