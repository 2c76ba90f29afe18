"""``torch.compile(model, backend="stitch")``: forward and backward match eager, unsupported ops
fall back to torch and are counted, a new batch size works, recompiling hits the kernel cache."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from runtime import backend, build


class Block(torch.nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear -> residual -> softmax head: the common chains."""

    def __init__(self, d=24, h=40, classes=7):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, h)
        self.fc2 = torch.nn.Linear(h, d)
        self.head = torch.nn.Linear(d, classes)

    def forward(self, x):
        y = x + self.fc2(F.gelu(self.fc1(self.ln(x))))
        return F.log_softmax(self.head(y), -1)


def _grads(model, fn, x, target):
    model.zero_grad()
    loss = F.nll_loss(fn(x).reshape(-1, 7), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_forward_and_training_step_match_eager():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(3, 5, 24)
    target = torch.randint(0, 7, (15,))
    want_loss, want = _grads(model, model, x, target)
    compiled = torch.compile(model, backend="stitch")
    got_loss, got = _grads(model, compiled, x, target)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-4, rtol=1e-4)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


def test_attention_training_step_matches_eager():
    """nn.TransformerEncoderLayer dispatches to cpu flash attention. torch's decomposition of
    its forward returns the attention weights as the logsumexp, which the flash backward then
    read: gradients were off by 8x (relative L2) before flash attention was kept whole."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                             norm_first=True)
    x = torch.randn(3, 9, 32)
    layer.zero_grad()
    layer(x).pow(2).mean().backward()
    want = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    torch.compile(layer, backend="stitch")(x).pow(2).mean().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)


class _Attention(torch.nn.Module):
    """An HF-style self-attention: q, k, v projections split into heads by view + transpose,
    cpu flash attention (sdpa), the heads merged back, an output projection."""

    def __init__(self, d=10, heads=2):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (f(x).view(b, s, self.h, d // self.h).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, s, d)).tanh()


def _train_like_eager(monkeypatch, m, x, options=None) -> list:
    """One training step of ``m`` on ``x`` compiled by stitch, its gradients checked against
    eager's; returns the CompiledGraphs it called (forward, backward), each with ``calls``: the
    (inputs, outputs) of every call."""
    from runtime.graph import CompiledGraph

    m(x).pow(2).mean().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    graphs = []
    call = CompiledGraph.__call__

    def grab(self, *a):
        if self not in graphs:
            graphs.append(self)
            self.calls = []
        out = call(self, *a)
        self.calls.append((a, out))
        return out

    monkeypatch.setattr(CompiledGraph, "__call__", grab)
    torch.compile(m, backend="stitch", options=options or {})(x).pow(2).mean().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)
    return graphs


def test_attention_layouts_keep_heads_inside_tokens(monkeypatch):
    """Training through cpu flash attention (odd sizes: 3 x 7 tokens, 2 heads of 5): the
    gradients match eager; the forward returns q, k and v for the backward as views of their
    projections (no kernel copies them head-major), and the backward holds flash's q, k and v
    gradients in the [B, S, H, D] memory torch answers in (``result_perms``), so the kernel
    summing the projections' bias gradients reads them as they are (attention this small is
    decomposed unless told not to: ``SMALL_ATTENTION_BYTES``)."""
    from stitch_ir import importer
    from stitch_ir.dialects import st

    monkeypatch.setattr(importer, "SMALL_ATTENTION_BYTES", 0)
    torch.manual_seed(0)
    fwd, bwd = _train_like_eager(monkeypatch, _Attention(), torch.randn(3, 7, 10))
    flash = [op for op in bwd.func.body.ops if isinstance(op, st.TorchCallOp)]
    assert [op.attr("result_perms") for op in flash] == [((0, 2, 1, 3),) * 3]
    # q, k, v (and flash's output) reach the backward as the views they were returned as
    assert [tuple(p) for p in bwd.func.attr("arg_perms")].count((0, 2, 1, 3)) == 4
    def header(src, key):
        return src.split(key)[1].split("\n")[0]

    copies = [s.name for s in fwd.steps if s.kind == "kernel" and set(header(
        s.source.source, "from st ops: ").split(", ")) <= {"st.permute", "st.reshape"}
        and header(s.source.source, "in0: ").count("x") == 4]  # rank 4: tensor<3x7x2x5xf32>
    assert not copies


def test_saved_activations_arrive_in_the_layout_the_backward_was_compiled_for(monkeypatch):
    """Training through decomposed (small) attention, odd sizes: the forward returns the head
    splits it copied for its bmms as those contiguous copies, and reports their strides, so
    every saved activation reaches the backward in the memory order the backward was compiled
    for (``arg_perms``). Traced, a head split is a permuted view of its projection; a backward
    compiled for that got the contiguous copy permuted back, copied it contiguous and permuted
    it again. The gradients match eager."""
    torch.manual_seed(0)
    fwd, bwd = _train_like_eager(monkeypatch, _Attention(d=12, heads=3), torch.randn(3, 7, 12))
    ((_, out),) = fwd.calls
    returned = {(t.data_ptr(), t.shape) for t in out if isinstance(t, torch.Tensor)}
    ((received, _),) = bwd.calls  # the backward's inputs as they came
    perms = list(bwd.func.attr("arg_perms", ())) or [()] * len(received)
    saved = [(t, tuple(p)) for t, p in zip(received, perms)
             if (t.data_ptr(), t.shape) in returned and t.dim() >= 3]
    assert len(saved) >= 3  # q, k, v or their copies, at least
    for t, p in saved:
        assert (t.permute(p) if p else t).is_contiguous(), (t.shape, t.stride(), p)


class _EagerAttention(_Attention):
    """HF BERT's eager attention: scores from ``q @ k.transpose(-1, -2)``, softmax, then v."""

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (f(x).view(b, s, self.h, d // self.h).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        p = torch.softmax(q @ k.transpose(-1, -2) / (d // self.h) ** 0.5, -1)
        return self.o((p @ v).transpose(1, 2).reshape(b, s, d)).tanh()


def test_saved_key_transpose_is_a_view_of_the_head_split(monkeypatch):
    """Training HF-style eager attention (odd sizes: 3 x 7 tokens, 3 heads of 4): the forward
    copies the key head-major, [B, H, S, D], a row at a time, and both its q k^T bmm and what it
    saves for the backward read that copy transposed (views), where it had copied k^T element by
    element, [B, H, D, S]. The gradients match eager."""
    torch.manual_seed(0)
    fwd, _ = _train_like_eager(monkeypatch, _EagerAttention(d=12, heads=3),
                               torch.randn(3, 7, 12), {"partition": "default"})
    copies = [s.source.source for s in fwd.steps if s.kind == "kernel" and
              "// from st ops: st.permute\n" in s.source.source]
    assert sum("out0: tensor<3x3x7x4xf32>" in c for c in copies) >= 2  # q, k head-major
    assert not any("tensor<3x3x4x7xf32>" in c for c in copies)  # no k^T copy


@pytest.mark.parametrize("mask", ["none", "causal", "float", "bool", "masked_rows"])
def test_small_attention_is_decomposed_and_matches_flash(mask):
    """Attention with small scores runs as matmuls around a fused softmax, and its backward as
    matmuls around fused element-wise ops (no flash call either way); forward and gradients
    match eager for each kind of mask, rows every key masks included; odd sizes: 3 x 7
    queries, 5 keys."""
    torch._dynamo.reset()
    backend.FALLBACKS.clear()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, n, 6, generator=g).requires_grad_() for n in (7, 5, 5))
    kw: dict = {"is_causal": True} if mask == "causal" else {}
    if mask == "float":
        kw["attn_mask"] = torch.randn(7, 5, generator=g)
    elif mask in ("bool", "masked_rows"):
        keep = torch.rand(3, 1, 7, 5, generator=g) > 0.3
        if mask == "masked_rows":
            keep[:, :, 2] = False
        kw["attn_mask"] = keep

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **kw).sin()

    want = f(q, k, v)
    want.sum().backward()
    want_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    got = torch.compile(f, backend="stitch")(q, k, v)
    got.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for t, w in zip((q, k, v), want_grads):
        torch.testing.assert_close(t.grad, w, atol=1e-5, rtol=1e-4)
    assert not any("flash_attention_for_cpu" in n for n in backend.FALLBACKS)
    with torch.no_grad():  # inference: no flash call either
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(f, backend="stitch")(q, k, v), want.detach(),
                                   atol=1e-5, rtol=1e-5)
    assert not any("flash_attention_for_cpu.default" in n for n in backend.FALLBACKS)


def test_small_attention_decomposition_answers_flash_strides():
    """The decomposition's results have flash's strides (the output in q's memory order, the
    logsumexp and the gradients [B, L, H] in memory): a graph traced against flash, re-traced
    per shape with the decomposition (option ``dynamic=False`` on a symbolic graph), views
    them so -- GPT-2's attention failed there with 'view size is not compatible'."""
    from stitch_ir.importer import _small_attention, _small_attention_backward

    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    flash_bw = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    for q in (torch.randn(2, 3, 5, 4), torch.randn(2, 5, 3, 4).transpose(1, 2)):
        k, v = torch.randn_like(q), torch.randn_like(q)
        want, got = flash(q, k, v), _small_attention(q, k, v)
        assert [t.stride() for t in got] == [t.stride() for t in want]
        g = torch.randn_like(want[0])
        want_bw = flash_bw(g, q, k, v, want[0], want[1], 0.0, False)
        got_bw = _small_attention_backward(g, q, k, v, got[0], got[1], 0.0, False)
        assert [t.stride() for t in got_bw] == [t.stride() for t in want_bw]
        for a, b in zip((*got, *got_bw), (*want, *want_bw)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, 2, 4).unbind(2)
            y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
            return y.transpose(1, 2).view(b, s, 8)

    torch._dynamo.reset()
    m = Heads()
    f = torch.compile(m, backend="stitch", dynamic=True, options={"dynamic": False})
    with torch.no_grad():
        for b in (2, 3):
            x = torch.randn(b, 5, 8)
            torch.testing.assert_close(f(x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_small_half_attention_is_decomposed_in_float(dt):
    """Half-precision attention decomposes too, computed in float and rounded once as flash's
    forward does. Judged against float64 (eager's flash backward rounds its intermediates in
    half: its bf16 gradients are further off): output and gradients no further from it than
    eager's (a causal mask, odd sizes)."""
    torch._dynamo.reset()
    backend.FALLBACKS.clear()
    g = torch.Generator().manual_seed(2)
    base = [torch.randn(2, 3, 5, 8, generator=g).to(dt) for _ in range(3)]

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    def run(fn, dtype):
        ts = [b.to(dtype).clone().requires_grad_() for b in base]
        out = fn(*ts)
        out.double().square().sum().backward()
        return [out] + [t.grad for t in ts]

    ref = run(f, torch.float64)
    eager = run(f, dt)
    got = run(torch.compile(f, backend="stitch"), dt)
    for r, e, s in zip(ref, eager, got):
        assert s.dtype is dt
        assert (s.double() - r).abs().max() <= 1.25 * (e.double() - r).abs().max() + 1e-3
    assert not any("flash_attention_for_cpu" in n for n in backend.FALLBACKS)


def test_unsupported_op_falls_back_and_is_counted():
    before = sum(v for k, v in backend.FALLBACKS.items() if "sort" in k)

    def fn(x):
        return torch.sort(torch.softmax(x, -1), -1).values.cumsum(-1)

    x = torch.randn(4, 9)
    got = torch.compile(fn, backend="stitch")(x)
    torch.testing.assert_close(got, fn(x))
    assert sum(v for k, v in backend.FALLBACKS.items() if "sort" in k) > before


def test_new_batch_size_and_cache_hit():
    torch.manual_seed(1)
    model = Block().eval()
    compiled = torch.compile(model, backend="stitch")
    with torch.no_grad():
        for batch in (2, 5, 3):  # the third shape makes dynamo pass a symbolic graph
            x = torch.randn(batch, 4, 24)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
    compiled_again = torch.compile(Block().eval(), backend="stitch")
    before = build.stats()["compiled"]
    with torch.no_grad():
        compiled_again(torch.randn(2, 4, 24))
    assert build.stats()["compiled"] == before, "same kernels: nothing is rebuilt"


def test_options_and_dump_dir(tmp_path):
    compiled = torch.compile(lambda x: torch.softmax(x * 2, -1), backend="stitch",
                             options={"dump_dir": str(tmp_path), "fusion": "greedy"})
    x = torch.randn(3, 8)
    torch.testing.assert_close(compiled(x), torch.softmax(x * 2, -1))
    graphs = list(tmp_path.glob("graph_*"))
    assert graphs
    d = graphs[0]
    assert (d / "before_fusion.sir").exists() and (d / "after_fusion.sir").exists()
    assert '"planner": "greedy"' in (d / "plan.json").read_text()
    assert list((d / "kernels").glob("*.cpp"))


def test_backend_is_registered_by_entry_point():
    code = ("import torch\n"
            "f = torch.compile(lambda x: torch.relu(x) + 1, backend='stitch')\n"
            "x = torch.randn(4)\n"
            "assert torch.equal(f(x), torch.relu(x) + 1)\n"
            "import sys; assert 'runtime.backend' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_channels_last_option_training_step():
    """options={"channels_last": True}: a conv net's training step (forward NHWC, convolution
    backward through torch) matches eager."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                            torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 10, 10)
    m.zero_grad()
    m(x).square().mean().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    torch.compile(m, backend="stitch", options={"channels_last": True})(x).square().mean().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_channels_last_weights_follow_in_place_updates():
    """Channels-last convolutions keep a channels-last copy of each weight per version: steps of
    an optimizer (in-place updates), a load_state_dict and a weight the graph computes itself
    are all seen on the next call -- no stale copy."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 9, 7)
    f = torch.compile(m, backend="stitch", options={"channels_last": True})
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        got = f(x)
        torch.testing.assert_close(got, m(x), atol=1e-5, rtol=1e-4)
        got.square().mean().backward()
        opt.step()
    with torch.no_grad():
        f(x)
        m.load_state_dict({k: torch.randn_like(v) for k, v in m.state_dict().items()})
        torch.testing.assert_close(f(x), m(x), atol=1e-5, rtol=1e-4)

    def dynamic_filter(x, w):
        return torch.nn.functional.conv2d(x, torch.tanh(w) * 2, padding=1)

    g = torch.compile(dynamic_filter, backend="stitch", options={"channels_last": True})
    w = torch.randn(5, 3, 3, 3)
    for _ in range(2):
        torch.testing.assert_close(g(x, w), dynamic_filter(x, w), atol=1e-5, rtol=1e-4)
        w = torch.randn(5, 3, 3, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_instance_norms_keep_their_rank(dtype):
    """Instance norms without running statistics are compiled as their formula over (H, W) --
    no reshape to [1, N * C, H, W], so channels-last layout changes sink through them -- in
    float32 / float64 (bfloat16 keeps torch's composite, which rounds where eager does); the
    forward and the gradients match eager; one with running statistics is left alone."""
    from runtime import backend

    torch.manual_seed(0)
    torch._dynamo.reset()
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.InstanceNorm2d(6),
                            torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(6, 5, 3, stride=2),
                            torch.nn.InstanceNorm2d(5, affine=True), torch.nn.ReLU(),
                            torch.nn.InstanceNorm2d(5, track_running_stats=True)).to(dtype)
    with torch.no_grad():
        m[4].weight.uniform_(0.5, 1.5)
        m[4].bias.uniform_(-1, 1)
    ref = copy.deepcopy(m)
    seen = []
    real = backend._instance_norm

    def spy(*a, **k):
        seen.append(1)
        return real(*a, **k)

    backend._instance_norm = spy
    try:
        x = torch.randn(2, 3, 11, 9, dtype=dtype)
        got = torch.compile(m, backend="stitch")(x)
    finally:
        backend._instance_norm = real
    want = ref(x)
    tol = {"atol": 3e-2, "rtol": 3e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(got, want, **tol)
    got.square().mean().backward()
    want.square().mean().backward()
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol)
    torch.testing.assert_close(m[6].running_mean, ref[6].running_mean, **tol)
    assert bool(seen) == (dtype != torch.bfloat16)  # traced (the two without running stats)


def test_training_at_new_batch_sizes_compiles_every_graph():
    """After a second batch size dynamo traces symbolically; a specialised graph may then
    return a size (a number) beside its tensors: it is passed through, the graph still compiles
    (it used to fall back to torch whole: "expected a tensor argument, got 5")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                torch.nn.Linear(16, 3))
    compiled = torch.compile(model, backend="stitch")
    before = {k: v for k, v in backend.FALLBACKS.items() if k.startswith("graph")}
    for n in (4, 5, 7):
        x = torch.randn(n, 12)
        model.zero_grad()
        model(x).square().sum().backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled(x).square().sum().backward()
        for p, w in zip(model.parameters(), want):
            torch.testing.assert_close(p.grad, w, atol=1e-5, rtol=1e-4)
    after = {k: v for k, v in backend.FALLBACKS.items() if k.startswith("graph")}
    assert after == before, after


def test_conv_graphs_try_both_layouts_and_keep_the_faster():
    """channels_last="auto": a graph with 2-d convolutions is compiled NCHW and channels-last;
    its first calls alternate between the two (each call runs one: batch-norm statistics update
    once per call) and the faster serves from then on. Every call is correct, trial or not;
    training works. The default (channels-last) and an explicit layout compile once."""
    from runtime import backend

    torch.manual_seed(0)
    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, stride=2)).train()
    ref = copy.deepcopy(net)
    trials = []
    real = backend._LayoutTrial.__init__

    def spy(self, *a):
        real(self, *a)
        trials.append(self)

    backend._LayoutTrial.__init__ = spy
    try:
        compiled = torch.compile(net, backend="stitch", options={"channels_last": "auto"})
        for _ in range(2 * backend._LayoutTrial.TRIALS + 2):
            x = torch.randn(2, 3, 9, 7)
            got, want = compiled(x), ref(x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            got.square().sum().backward()
            want.square().sum().backward()
        for p, q in zip(net.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(net[1].running_mean, ref[1].running_mean)
        assert trials and all(t.chosen in t.variants for t in trials)
        torch._dynamo.reset()
        n = len(trials)
        torch.compile(net, backend="stitch", options={"channels_last": False})(
            torch.randn(2, 3, 9, 7))
        torch._dynamo.reset()
        torch.compile(net, backend="stitch")(torch.randn(2, 3, 9, 7))
        assert len(trials) == n  # an explicit or the default layout: compiled once, no trial
    finally:
        backend._LayoutTrial.__init__ = real


def test_plain_inference_graphs_skip_aot_wrapper_and_the_rest_keep_it(monkeypatch):
    """An inference graph whose AOTAutograd wrapper would only call it goes to dynamo as it is;
    a graph that mutates an input, returns a view of one, mutates one of two aliased inputs or
    needs gradients keeps the wrapper -- and every one of them matches eager."""
    returned: list = []
    unwrapped = backend._unwrapped
    monkeypatch.setattr(backend, "_unwrapped",
                        lambda fn, grad: returned.append(grad) or unwrapped(fn, grad))

    def compiled(fn, *args, grad=False):
        torch._dynamo.reset()
        returned.clear()
        with torch.set_grad_enabled(grad):
            out = torch.compile(fn, backend="stitch")(*args)
        return out, list(returned)

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 1, 7, generator=g), torch.randn(3, 7, generator=g)
    lin = torch.nn.Linear(7, 4).requires_grad_(False)
    plain = lambda a, b: (F.silu(a) * b + 1, lin(a).sum(-1))  # noqa: E731
    for grad in (False, True):  # grad mode on with inputs that need none: still inference
        with torch.no_grad():
            want = plain(x, y)
        out, how = compiled(plain, x, y, grad=grad)
        assert how == [grad], "a plain inference graph is returned without the wrapper"
        for o, w in zip(out, want):
            torch.testing.assert_close(o, w)
            assert not o.requires_grad
    torch._dynamo.reset()  # asked to keep the wrapper
    returned.clear()
    with torch.no_grad():
        out = torch.compile(plain, backend="stitch", options={"aot_wrapper": True})(x, y)
    assert returned == [] and torch.allclose(out[0], F.silu(x) * y + 1)
    # an input mutated in place: the wrapper copies the result back
    a = x.clone()
    out, how = compiled(lambda t: t.mul_(2).add(1), a)
    assert how == [] and torch.equal(a, x * 2) and torch.equal(out, x * 2 + 1)
    # a view of an input returned: the wrapper makes it a view again
    out, how = compiled(lambda t: (t.transpose(0, 2), t * 3), x)
    assert how == [] and out[0]._base is x and torch.equal(out[1], x * 3)
    # one tensor passed twice: dynamo makes it one graph input
    out, how = compiled(lambda p, q: p * q + q, y, y)
    assert torch.allclose(out, y * y + y)
    # two views of one tensor, one of them mutated: AOTAutograd's synthetic base
    b = x.clone()
    out, how = compiled(lambda p, q: (p.add_(1), q * 2)[1], b[0], b[0, 0])
    assert how == [] and torch.equal(b[0], x[0] + 1) and torch.equal(out, (x[0, 0] + 1) * 2)
    # training: forward and backward graphs keep the wrapper
    w = torch.randn(7, generator=g, requires_grad=True)
    out, how = compiled(lambda t: (t * w).tanh().sum(), y, grad=True)
    out.backward()
    assert how == []
    with torch.no_grad():
        torch.testing.assert_close(w.grad, ((1 - (y * w).tanh() ** 2) * y).sum(0))


@pytest.mark.parametrize("size,train,want", [(6, True, False), (6, False, True),
                                             (32, True, True)])
def test_training_graphs_of_small_maps_keep_nchw(monkeypatch, size, train, want):
    """Convolutions run channels-last by default on the cpu, except in the forward and the
    backward graph of a training step whose median output map is small
    (``TRAINING_CHANNELS_LAST_MIN_MAP``); results and gradients match eager either way."""
    torch._dynamo.reset()
    seen: list = []
    compile_fx = backend.compile_fx
    monkeypatch.setattr(backend, "compile_fx", lambda gm, options, *a, **k: seen.append(
        options.get("channels_last")) or compile_fx(gm, options, *a, **k))
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                            torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1)).train(train)
    x = torch.randn(2, 3, size, size)
    ref = copy.deepcopy(m)
    with torch.set_grad_enabled(train):
        want_out = ref(x)
        got = torch.compile(m, backend="stitch")(x)
    torch.testing.assert_close(got, want_out, atol=1e-4, rtol=1e-4)
    if train:
        want_out.square().mean().backward()
        got.square().mean().backward()
        for (n, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=n)
    assert seen and set(seen) == {want}, seen
    assert len(seen) == (2 if train else 1)


class Chain(torch.nn.Module):
    """Element-wise ops after a parameter: what the backward reads is cheap to recompute."""

    def __init__(self, n=33):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.tanh(torch.sigmoid(x * self.w) * x).exp()


def test_training_forward_saves_less_under_the_min_cut_partition(monkeypatch):
    """Option ``partition="min_cut"``: AOTAutograd's min-cut partitioner recomputes cheap
    element-wise ops in the backward instead of saving them: the forward of an element-wise
    chain hands its backward only its input and result (``partition="default"`` also saves the
    sigmoid, the product and the tanh), and both match eager's gradients. ``auto``, the
    default, takes min-cut's split for a graph whose default partition saves at most
    ``MIN_CUT_MAX_SAVED_BYTES`` (this one) and the default's above it. An unknown partition is
    an error that names the option."""
    torch.manual_seed(0)
    model = Chain()
    x = torch.randn(7, 33)
    want = torch.autograd.grad(model(x).sum(), model.w)[0]
    original = backend.compile_fx
    outputs = {}
    for partition in ("min_cut", "default", None, "auto above the limit"):
        graphs = []
        monkeypatch.setattr(backend, "MIN_CUT_MAX_SAVED_BYTES",
                            0 if partition == "auto above the limit" else 2 << 20)

        def compile_fx(gm, options, *args, graphs=graphs, **kwargs):
            run = original(gm, options, *args, **kwargs)
            graphs.append(run.stitch_graph)
            return run

        monkeypatch.setattr(backend, "compile_fx", compile_fx)
        torch._dynamo.reset()
        m = copy.deepcopy(model)
        compiled = torch.compile(m, backend="stitch",
                                 options={"partition": partition} if partition in
                                 ("min_cut", "default") else {})
        compiled(x).sum().backward()
        torch.testing.assert_close(m.w.grad, want, atol=1e-5, rtol=1e-5)
        outputs[partition] = len(graphs[0].outputs)  # the forward: its result and what it saves
    assert outputs["min_cut"] == outputs[None] < outputs["default"] == \
        outputs["auto above the limit"], outputs
    torch._dynamo.reset()
    with pytest.raises(Exception, match="partition='fastest'"):
        torch.compile(copy.deepcopy(model), backend="stitch", options={"partition": "fastest"})(x)
