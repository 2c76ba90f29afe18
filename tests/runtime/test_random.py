"""Random numbers compiled: ``st.seed`` (drawn per call from torch's generator) and ``st.rand``
(Philox4x32-10 of the seed and the element's position, as Triton's ``tl.rand``).

The streams are not eager's -- no compiler reproduces those -- but they are the same in the cpu
kernels, the interpreter and Triton, reproducible under ``torch.manual_seed``, fresh per call,
and the distributions are right: dropout keeps 1 - p of its inputs, scaled by 1 / (1 - p), and its
backward uses the same mask.
"""

from __future__ import annotations

import numpy as np
import torch

from cost_model import cpu_spec
from runtime import backend
from runtime.graph import compile_program
from stitch_ir.importer import import_model
from stitch_ir.interpreter import philox_uniform


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def test_philox_known_values():
    """Pinned first values of the stream (seed 0 and 12345, counters from 77), which Triton's
    tl.rand also gives (checked under TRITON_INTERPRET when this was written)."""
    np.testing.assert_array_equal(philox_uniform(0, np.arange(77, 80)),
                                  np.float32([0.9446847438812256, 0.718493640422821,
                                              0.28659480810165405]))
    np.testing.assert_array_equal(philox_uniform(12345, np.arange(77, 80)),
                                  np.float32([0.3112139403820038, 0.7422565817832947,
                                              0.21746955811977386]))


def test_cpu_kernel_draws_the_interpreters_stream():
    x = torch.randn(37, 129)
    prog = import_model(Fn(lambda x: (torch.rand_like(x) * x, torch.rand_like(x))).eval(), (x,))
    g = compile_program(prog, device_spec=cpu_spec(measure=False))
    assert g.kernels >= 1 and not g.fallbacks
    assert "st_rand(" in "".join(s.source.source for s in g.steps if s.kind == "kernel")
    torch.manual_seed(3)
    got = g(x)
    torch.manual_seed(3)
    want = prog.run(x)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.numpy(), b)
    u = got[1]
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02
    # two draws in one graph are independent streams
    assert not torch.equal(got[0], x * got[1])


def test_dropout_training_is_compiled_reproducible_and_differentiates_through_its_mask():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    drop = torch.nn.Dropout(0.25)
    model = torch.nn.Sequential(lin, torch.nn.ReLU(), drop).train()
    x = torch.randn(256, 64)
    before = dict(backend.FALLBACKS)
    compiled = torch.compile(model, backend="stitch")
    y = compiled(x)
    fell = {k for k, v in backend.FALLBACKS.items() if v != before.get(k, 0)}
    assert not [k for k in fell if "dropout" in k or "bernoulli" in k], fell
    h = torch.relu(lin(x)).detach()
    alive = h != 0
    kept = (y != 0) & alive
    rate = (kept.sum() / alive.sum()).item()
    assert abs(rate - 0.75) < 0.02, rate
    torch.testing.assert_close(y[kept], h[kept] / 0.75)
    # backward: d(sum y)/dW = (mask / 0.75 * [h > 0])^T x
    lin.zero_grad()
    y.sum().backward()
    upstream = kept.float() / 0.75
    torch.testing.assert_close(lin.weight.grad, upstream.T @ x, rtol=1e-4, atol=1e-4)
    torch.manual_seed(5)
    a = compiled(x)
    torch.manual_seed(5)
    b = compiled(x)
    assert torch.equal(a, b) and not torch.equal(compiled(x), compiled(x))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="stitch")(x), model(x))


def test_attention_dropout_draws_once_per_element():
    """A softmax followed by dropout whose mask is also an output (the forward of a training
    step saves it): the rows kernel draws each element once, keeps the mask in a byte row buffer
    for the last loop, and matches the interpreter's stream exactly; odd row lengths and a
    size-1 dim."""
    def fn(s, m):
        keep = torch.rand_like(s) < 0.9
        return keep, torch.softmax(s * 0.125 + m, -1) * keep * (1 / 0.9)

    for shape in [(2, 3, 5, 37), (1, 2, 7, 128)]:
        s, m = torch.randn(shape) * 3, torch.randn(shape[0], 1, 1, shape[-1])
        prog = import_model(Fn(fn).eval(), (s, m))
        g = compile_program(prog, device_spec=cpu_spec(measure=False))
        assert not g.fallbacks
        src = "".join(k.source.source for k in g.steps if k.kind == "kernel")
        body = src[src.index('extern "C"'):]
        assert body.count("st_rand(") == 1, body
        torch.manual_seed(4)
        got = g(s, m)
        torch.manual_seed(4)
        want = prog.run(s, m)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=1e-7)
        assert 0.85 < got[0].float().mean().item() < 0.95


def test_bernoulli_probability():
    p = torch.rand(64, 128)
    before = dict(backend.FALLBACKS)
    fn = torch.compile(lambda p: (torch.bernoulli(p), torch.bernoulli(p, 0.3)), backend="stitch")
    draws = torch.stack([torch.stack(fn(p)) for _ in range(40)])
    fell = {k for k, v in backend.FALLBACKS.items() if v != before.get(k, 0)}
    assert not [k for k in fell if "bernoulli" in k], fell
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    freq = draws[:, 0].mean(0)  # 40 draws of every element
    assert freq[p < 0.2].mean() < 0.12 and freq[p > 0.8].mean() > 0.88
    assert abs(draws[:, 0].mean().item() - p.mean().item()) < 0.01
    assert abs(draws[:, 1].mean().item() - 0.3) < 0.01


def test_triton_kernel_draws_the_same_stream():
    """The sm_80 target's kernel (tl.rand, under Triton's interpreter) equals the interpreter."""
    from runtime.gpu_graph import compile_gpu_program

    x = torch.randn(9, 33)
    prog = import_model(Fn(lambda x: torch.rand_like(x) * x).eval(), (x,))
    g = compile_gpu_program(prog, "sm_80", interpret=True)
    assert not g.fallbacks
    torch.manual_seed(11)
    (got,) = g(x)
    torch.manual_seed(11)
    (want,) = prog.run(x)
    np.testing.assert_array_equal(got.numpy(), want)
