"""``split-column-variance``: a variance over dims that keep the innermost one (a channel LayerNorm
on NCHW) is computed as a mean and a sum of squared deviations, each a column reduction along the
contiguous dim -- where the fused variance walked each output's terms a row apart (charformer's
[2, 32, 32, 32] over dim 1: 240 us against inductor's 36)."""

from __future__ import annotations

import pytest
import torch

from passes import PassContext, PassManager, parse_pipeline
from stitch_ir.importer import import_model

SPLIT = "canonicalize,cse,dce,split-column-variance,canonicalize,cse"


class Var(torch.nn.Module):
    def __init__(self, dims, correction=1, keepdim=True):
        super().__init__()
        self.dims, self.correction, self.keepdim = dims, correction, keepdim

    def forward(self, x):
        return torch.var(x, dim=self.dims, correction=self.correction, keepdim=self.keepdim)


class LayerNorm2d(torch.nn.Module):
    """ConvNeXt's channel LayerNorm over an NCHW map: the user's own mean beside the variance."""

    def __init__(self, c: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(c))
        self.b = torch.nn.Parameter(torch.randn(c))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        v = x.var(1, keepdim=True, unbiased=False)
        return self.w[:, None, None] * (x - u) / torch.sqrt(v + 1e-6) + self.b[:, None, None]


def _ops(model, x, pipeline=SPLIT):
    prog = import_model(model, (x,))
    PassManager(parse_pipeline(pipeline)).run(prog.module, PassContext())
    return [op.name for op in prog.module.func().body.ops]


def test_a_variance_keeping_the_innermost_dim_becomes_a_mean_and_a_sum():
    ops = _ops(Var((1,)), torch.randn(2, 5, 3, 7))
    assert "st.var" not in ops
    assert ops.count("st.mean") == 1 and ops.count("st.sum") == 1


def test_the_users_mean_and_the_variances_mean_are_one_op():
    assert _ops(LayerNorm2d(5), torch.randn(2, 5, 3, 7)).count("st.mean") == 1


@pytest.mark.parametrize("model, x", [
    (Var((3,)), torch.randn(2, 5, 3, 7)),  # a row variance: in registers already
    (Var((1, 3)), torch.randn(2, 5, 3, 7)),  # reduces the innermost dim too
    (Var((1,)), torch.randn(2, 5, 3, 7).half()),  # half: the fused op accumulates in float32
    (Var((1,)), torch.randn(6, 5, 3, 1)),  # innermost dim of 1: nothing to run along
])
def test_other_variances_keep_their_fused_form(model, x):
    assert "st.var" in _ops(model, x)


@pytest.mark.parametrize("shape, dims, correction, keepdim", [
    ((2, 5, 3, 7), (1,), 1, True),
    ((3, 1, 4, 9), (1,), 0, True),  # one term: the population variance is 0
    ((3, 1, 4, 9), (1,), 1, False),  # one term, Bessel's correction: 0 / 0, NaN as eager
    ((5, 17), (0,), 1, False),  # a variance over the batch of a matrix
    ((2, 6, 1, 11), (0, 2), 2, True),
    ((1, 13, 5, 3), (-3,), 0, False),
])
def test_split_variance_matches_eager(shape, dims, correction, keepdim):
    from cost_model import cpu_spec
    from runtime.graph import compile_program

    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1.5  # an offset: a one-pass E[x^2] - E[x]^2 would show it
    model = Var(dims, correction, keepdim)
    g = compile_program(import_model(model, (x,)), device_spec=cpu_spec(measure=False))
    (got,) = g(x)
    torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5, equal_nan=True)


def test_channel_layernorm_runs_its_reductions_as_columns():
    """End to end, odd sizes: eager's answer, and both reductions run along the contiguous dim
    (an accumulator row per task), none walking an output's terms a row apart."""
    from cost_model import cpu_spec
    from runtime.graph import compile_program

    torch.manual_seed(0)
    m, x = LayerNorm2d(6), torch.randn(3, 6, 5, 9)
    g = compile_program(import_model(m, (x,)), device_spec=cpu_spec(measure=False))
    with torch.no_grad():
        want = m(x)
    (got,) = g(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (source,) = [s.source.source for s in g.steps if s.kind == "kernel"]
    assert source.count("cacc") >= 2 and "st.var" not in source.splitlines()[1], source
