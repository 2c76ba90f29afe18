"""Dynamic shapes: a graph compiled once for a symbolic size (a batch) runs at every size.

The symbol is in the IR's types (``tensor<?s0x64xf32>``, ``?128*s0`` where a reshape merges it);
the planner plans at the traced size (the hint); the cpu kernels read the size from an argument;
the arena is laid out per size when a call first brings it. Checked against eager at sizes
drawn by hypothesis, with no kernel built after the first compile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hs

from cost_model import cpu_spec
from runtime import backend, build
from runtime.graph import compile_program
from stitch_ir.importer import import_model
from stitch_ir.parser import parse_module
from stitch_ir.printer import print_module
from stitch_ir.types import Sym


class Fn(torch.nn.Module):
    def __init__(self, fn, *params):
        super().__init__()
        self.fn = fn
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(p) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.ps)


def _block(x, idx, w, b, table):
    """Rows (layer norm, softmax), a column sum over the batch, a mean of everything, a gather,
    a reshape merging the batch with a static dim, a broadcast."""
    y = F.layer_norm(x, (x.shape[-1],), w, b)
    z = y.reshape(-1, 4, x.shape[-1] // 4).sum(-1)
    return (torch.softmax(y * 0.5, -1), y.sum(0), x.mean(), F.embedding(idx, table) * 2,
            torch.relu(z + w[:4]))


PARAMS = (torch.randn(64), torch.randn(64), torch.randn(33, 8))


def _compiled():
    g = compile_program(import_model(Fn(_block, *PARAMS), (torch.randn(6, 64),
                                                            torch.randint(0, 33, (6, 3))),
                                     dynamic={"batch": 0}),
                        device_spec=cpu_spec(measure=False))
    assert g.symbols and not g.fallbacks
    return g


_GRAPH = []


@settings(max_examples=6, deadline=None)
@given(hs.sampled_from([1, 2, 3, 6, 7, 33, 130]), hs.integers(0, 10**6))
def test_one_symbolic_graph_runs_every_batch_size(n, seed):
    if not _GRAPH:
        _GRAPH.append(_compiled())
    g = _GRAPH[0]
    gen = torch.Generator().manual_seed(seed)
    x, idx = torch.randn(n, 64, generator=gen), torch.randint(0, 33, (n, 3), generator=gen)
    before = build.stats()["compiled"]
    got = g(x, idx)
    assert build.stats()["compiled"] == before  # nothing built for a new size
    with torch.no_grad():
        want = _block(x, idx, *PARAMS)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_symbolic_ir_prints_and_parses():
    g = _compiled()
    text = print_module(g.prog.module)
    assert "?s" in text
    assert print_module(parse_module(text)) == text
    sym = next(d for a in g.func.args for d in a.type.shape if isinstance(d, Sym))
    assert sym.hint == 6


def test_wrong_static_dim_is_a_clear_error():
    g = _compiled()
    import pytest

    with pytest.raises(ValueError, match="compiled for"):
        g(torch.randn(5, 63), torch.randint(0, 33, (5, 3)))


def test_torch_compile_dynamic_training_builds_kernels_once():
    """torch.compile(dynamic=True): forward and backward graphs are symbolic; new batch sizes
    run them (no graph is specialised, no kernel built) and match eager, gradients too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                torch.nn.Linear(32, 5))
    compiled = torch.compile(model, backend="stitch", dynamic=True)
    before = dict(backend.FALLBACKS)
    built = None
    for n in (4, 7, 33, 64):
        x = torch.randn(n, 16)
        model.zero_grad()
        model(x).square().mean().backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        start = build.stats()["compiled"]
        compiled(x).square().mean().backward()
        if built is not None:
            assert build.stats()["compiled"] == start, n
        built = True
        for p, w in zip(model.parameters(), want):
            torch.testing.assert_close(p.grad, w, atol=1e-6, rtol=1e-5)
    fell = {k for k, v in backend.FALLBACKS.items() if v != before.get(k, 0)}
    assert not fell, fell


def test_bert_at_five_batch_sizes_builds_kernels_once():
    """The bert workload called at batch 1, 3, 8, 17 and 64: dynamo compiles batch 1 static,
    then one symbolic graph for every other size."""
    import models

    w = models.get("bert")
    m = w.model.eval()
    compiled = torch.compile(m, backend="stitch")

    def batch(n):
        return tuple(t[:1].expand(n, *t.shape[1:]).contiguous() for t in w.example_inputs)

    built = []
    with torch.no_grad():
        for n in (1, 3, 8, 17, 64):
            xs = batch(n)
            start = build.stats()["compiled"]
            got = torch.utils._pytree.tree_leaves(compiled(*xs))[0]
            built.append(build.stats()["compiled"] - start)
            want = torch.utils._pytree.tree_leaves(m(*xs))[0]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert built[2:] == [0, 0, 0], built  # sizes 8, 17, 64: the symbolic graph of size 3


def test_symbolic_sequence_length_with_square_attention_scores():
    """A sequence length that changes: attention scores are [B, S, S] (a product of symbols),
    softmax rows of symbolic length; one compile for every length."""
    torch.manual_seed(0)

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
            self.ln = torch.nn.LayerNorm(32)

        def forward(self, x):
            a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 5.6, -1)
            return self.ln(a @ x + x)

    m = Attention().eval()
    compiled = torch.compile(m, backend="stitch", dynamic=True)
    built = []
    with torch.no_grad():
        for s in (7, 16, 33, 5):
            x = torch.randn(2, s, 32)
            start = build.stats()["compiled"]
            torch.testing.assert_close(compiled(x), m(x), atol=1e-5, rtol=1e-5)
            built.append(build.stats()["compiled"] - start)
    assert built[1:] == [0, 0, 0], built
