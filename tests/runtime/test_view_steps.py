"""View steps of the cpu runtime: a static view step makes each result from its base's storage
at the geometry its view chain gave (``runtime.views.ViewMemos``), keyed by the bases' strides:
right for inputs of any strides, and a real view wherever the tensor leaves the graph's own
kernels and library calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cost_model import cpu_spec
from runtime.graph import compile_program
from stitch_ir.importer import import_model


@pytest.fixture
def graphs(monkeypatch) -> list:
    """The ``CompiledGraph`` of each graph ``torch.compile(..., backend="stitch")`` compiles in
    the test, in order (dynamo's caches reset first)."""
    from runtime import backend

    torch._dynamo.reset()
    got: list = []
    compile_fx = backend.compile_fx

    def grab(*a, **k):
        fn = compile_fx(*a, **k)
        got.append(fn.stitch_graph)
        return fn

    monkeypatch.setattr(backend, "compile_fx", grab)
    return got


class _Attention(torch.nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(k, n) / k ** 0.5)

    def forward(self, x):  # x: [B, L, 3, H, D]
        q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
        att = F.scaled_dot_product_attention(q, k, v)  # a torch op reads the views
        y = x.flatten(2)[:, :, : self.w.shape[0]] @ self.w  # a library call reads a slice
        return att, y, x.transpose(0, 1)  # a view of the input, returned


def test_view_steps_follow_their_bases_strides_and_stay_views_where_they_escape(monkeypatch):
    from stitch_ir import importer

    monkeypatch.setattr(importer, "SMALL_ATTENTION_BYTES", 0)  # flash: a torch op reads views
    torch.manual_seed(0)
    m = _Attention(40, 24).eval()
    shape = (4, 16, 3, 2, 32)
    x = torch.randn(shape)
    g = compile_program(import_model(m, (x,)), device_spec=cpu_spec(measure=False))
    assert not g.fallbacks
    assert sum(s.kind == "view" for s in g.call_steps) >= 2
    inputs = [x, torch.randn(shape), torch.randn(16, 4, 3, 2, 32).transpose(0, 1),  # strided
              torch.randn(4, 16, 3, 2, 40)[..., 3:35], x * 3]  # offset and strided; repeat
    for t in inputs:
        with torch.no_grad():
            want = m(t)
        got = g(t)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
        assert got[2]._base is t or got[2]._base is t._base, "a returned view is a real view"
        assert got[2].data_ptr() == t.data_ptr() and got[2].stride() == want[2].stride()


class _FlatWeightConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 3 * 3 * 3) / 5)

    def forward(self, x):  # the convolution reads a view of the parameter
        return F.conv2d(x, self.w.view(6, 3, 3, 3), padding=1).relu()


def test_views_of_parameters_see_in_place_updates_in_every_call_state(graphs):
    """A convolution weight that is a view of a parameter: the channels-last weight copy is
    redone after an in-place update (it reads the view's version counter, shared with the
    parameter only by a real view), in a second call state too (made once the geometry memo
    exists, as concurrent callers make them)."""
    torch.manual_seed(0)
    m = _FlatWeightConv()
    x = torch.randn(2, 3, 5, 7)
    f = torch.compile(m, backend="stitch")
    with torch.no_grad():
        torch.testing.assert_close(f(x), m(x))
        (g,) = graphs
        for states in g._free_states.values():
            states.clear()  # the next call makes a fresh state
        torch.testing.assert_close(f(x), m(x))
        m.w.mul_(-2)  # an optimizer step's in-place update
        torch.testing.assert_close(f(x), m(x))


class _ChannelsLastNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        y = self.c3(torch.tanh(self.c2(h)) * h)
        return y.square().mean(), h


def test_views_only_saved_for_the_backward_are_aliases(graphs, monkeypatch):
    """A channels-last training forward saves permuted views of its activations for the
    backward: those only saved are aliases of the kernels' buffers (no ``as_strided`` per
    step), while a view the caller gets stays a real view, so that changing it in place before
    the backward is caught by autograd as in eager; the gradients match eager's."""
    torch.manual_seed(0)
    m = _ChannelsLastNet()
    ref = _ChannelsLastNet()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 32, 33)
    f = torch.compile(m, backend="stitch", options={"channels_last": True})
    for _ in range(2):  # the second call runs the memoised geometry
        loss, h = f(x)
        loss.backward()
        want, h_ref = ref(x)
        want.backward()
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h, h_ref)
        for p, q in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)
            p.grad = q.grad = None
    def as_strided_calls(fn) -> int:
        with torch.profiler.profile() as prof:
            fn(x)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::as_strided")

    # against the same graph with every view a real one: the saved views are aliases
    from runtime.views import ViewMemos

    fw = graphs[0]
    aliased = sum(s.kind == "view" and set(s.writes) <= fw._saved_only() for s in fw.steps)
    real = as_strided_calls(f)
    torch._dynamo.reset()
    monkeypatch.setattr(ViewMemos, "_saved_only", lambda self: set())
    g = torch.compile(_ChannelsLastNet(), backend="stitch", options={"channels_last": True})
    for _ in range(2):
        g(x)
    assert aliased >= 1 and as_strided_calls(g) - real >= aliased, (aliased, real)
    loss, h = f(x)
    want, h_ref = ref(x)
    h_ref.mul_(2)
    h.mul_(2)  # the caller's view of a saved activation, changed in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        want.backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


class _TapConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(96, 80, 3, padding=1)  # a tap of 30 KiB: a view

    def forward(self, x):  # over a 1x1 map only the centre tap meets the input: a linear
        return self.conv(x).relu()


def test_a_linear_over_a_weight_tap_keeps_one_contiguous_copy_per_version(graphs):
    """A 3x3 convolution over 1x1 maps runs as a linear over the weight's centre tap, a view
    with no unit stride that BLAS cannot read: the copy is made once and reused while the
    parameter is unchanged, and made again after an in-place update; values match eager."""
    torch.manual_seed(0)
    m = _TapConv()
    x = torch.randn(5, 96, 1, 1)
    f = torch.compile(m, backend="stitch")
    with torch.no_grad():
        torch.testing.assert_close(f(x), m(x), atol=1e-5, rtol=1e-5)
        (g,) = graphs
        assert any(s.kind == "library" and s.name == "st.linear" for s in g.steps)

        def copies():
            return [hit[2] for states in g._free_states.values() for cs in states
                    for hit in cs.weight_memo.values()]

        first = copies()
        assert len(first) == 1 and first[0].is_contiguous()
        torch.testing.assert_close(f(x), m(x), atol=1e-5, rtol=1e-5)
        assert copies()[0] is first[0]  # reused
        m.conv.weight.mul_(-2)  # an optimizer step's in-place update
        torch.testing.assert_close(f(x), m(x), atol=1e-5, rtol=1e-5)
        assert copies()[0] is not first[0]
