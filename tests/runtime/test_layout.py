"""Layout decisions on the cpu target: channels-last convolutions (``layout-channels-last``),
``sink-permutes``, ``pooled-conv-linear``, and the channels-last convolution backward; each
checked against eager torch and the reference interpreter."""

from __future__ import annotations

import re

import pytest
import torch

from cost_model import cpu_spec
from passes import parse_pipeline
from runtime.graph import compile_program
from stitch_ir.dialects import st
from stitch_ir.importer import import_model


def _agrees_with_eager(m, x, prog, g) -> None:
    """The compiled graph and the reference interpreter both give eager's result."""
    with torch.no_grad():
        want = m(x)
    torch.testing.assert_close(g(x)[0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(prog.run(x)[0]), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_channels_last_convolutions(bias):
    """The layout-channels-last pass: the reference interpreter and the compiled graph agree with
    eager, the convolutions run on NHWC buffers, and consecutive layout changes fold."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=bias), torch.nn.BatchNorm2d(8),
                            torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1, bias=bias),
                            torch.nn.ReLU(), torch.nn.Conv2d(8, 5, 3, stride=2),
                            torch.nn.ConvTranspose2d(5, 6, 2, stride=2, bias=bias), torch.nn.GELU(),
                            torch.nn.ConvTranspose2d(6, 3, 3, padding=1, output_padding=0)).eval()
    x = torch.randn(2, 3, 9, 11)
    prog = import_model(m, (x,))
    g = compile_program(prog, device_spec=cpu_spec(measure=False), channels_last=True)
    convs = [op for op in g.func.body.ops if op.name == "st.convolution"]
    assert len(convs) == 5 and all(op.attr("channels_last") for op in convs)
    assert sum(op.attributes["transposed"] for op in convs) == 2
    _agrees_with_eager(m, x, prog, g)


def test_permutes_sink_between_channels_last_convolutions():
    """sink-permutes: in a residual block run channels-last (conv, BN, ReLU, conv, BN, + skip,
    ReLU, a channel mean with keepdim, a scale by a splat), the only layout changes left are at
    the block's input and output -- every value between the convolutions is channels-last --
    and the compiled graph agrees with eager and the interpreter."""
    from passes import PassContext, PassManager
    from passes.layout import ChannelsLastPass, SinkPermutesPass

    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.Conv2d(6, 6, 1)
            self.b1, self.b2 = torch.nn.BatchNorm2d(6), torch.nn.BatchNorm2d(6)

        def forward(self, x):
            y = self.c1(x) * 0.5
            y = self.b2(self.c2(torch.relu(self.b1(y))))
            z = torch.relu(y + torch.tanh(self.c1(x)))
            return self.c2(z - z.mean(1, keepdim=True) * 0.5)

    m = Block().eval()
    for b in (m.b1, m.b2):
        b.running_mean.uniform_(-1, 1)
        b.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 7, 5)
    prog = import_model(m, (x,))
    ctx = PassContext()
    PassManager([*parse_pipeline("canonicalize,cse,dce"), ChannelsLastPass(), SinkPermutesPass(),
                 *parse_pipeline("canonicalize,cse,dce")]).run(prog.module, ctx)
    perms = [op for op in prog.module.func().body.ops if op.name == "st.permute"
             and op.result.type.numel() > 6]  # not the [1, C, 1, 1] parameters' permutes
    assert len(perms) == 2, [str(p) for p in perms]  # the input to NHWC, the output back
    g = compile_program(import_model(m, (x,)), device_spec=cpu_spec(measure=False),
                        channels_last=True)
    _agrees_with_eager(m, x, prog, g)


@pytest.mark.parametrize("scale", [2, 2.5])
@pytest.mark.parametrize("n,h,w", [(2, 6, 5), (1, 1, 3), (3, 8, 8)])
def test_permutes_sink_through_cat_reshape_gather_pad_and_slice(n, h, w, scale):
    """A U-Net decoder step run channels-last: a skip connection concatenated with the
    upsampled decoder feature (nearest upsampling by 2 lowers to reshapes around a broadcast,
    by 2.5 to a reshape, an index_select and a reshape), padded, cropped by a slice, into the
    next convolution. Every value between the convolutions stays channels-last (the cat, the
    reshapes that merge or split H and W, the broadcast or the gather, the pad and the slice
    move below the permute): only the input and the output change layout; odd and size-1 maps;
    the compiled graph agrees with eager and the interpreter."""
    from passes import PassContext, PassManager
    from passes.layout import ChannelsLastPass, SinkPermutesPass

    torch.manual_seed(0)

    class Up(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.down = torch.nn.Conv2d(4, 5, 1, stride=2)  # ceil(h / 2) x ceil(w / 2)
            self.out = torch.nn.Conv2d(9, 2, 3)

        def forward(self, x):
            skip = torch.nn.functional.leaky_relu(self.enc(x), 0.2)
            y = torch.relu(self.down(skip))
            up = torch.nn.functional.interpolate(y, scale_factor=scale, mode="nearest")
            up = up[:, :, :skip.shape[2], :skip.shape[3]]
            z = torch.nn.functional.pad(torch.cat([skip, up], 1), (1, 1, 1, 1))
            return self.out(z[:, :, :, 1:])

    m = Up().eval()
    x = torch.randn(n, 3, h, w)
    prog = import_model(m, (x,))
    ops = {op.name for op in prog.module.func().body.ops}
    assert ("st.index_select" in ops) == (scale != 2), ops
    ctx = PassContext()
    PassManager([*parse_pipeline("canonicalize,cse,dce"), ChannelsLastPass(), SinkPermutesPass(),
                 *parse_pipeline("canonicalize,cse,dce")]).run(prog.module, ctx)
    perms = [op for op in prog.module.func().body.ops if op.name == "st.permute"
             and sum(d > 1 for d in op.result.type.shape) > 1]  # not a parameter's [1, C, 1, 1]
    # the input to NHWC, the output back
    assert len(perms) == 2, [str(p) for p in perms]
    g = compile_program(import_model(m, (x,)), device_spec=cpu_spec(measure=False),
                        channels_last=True)
    _agrees_with_eager(m, x, prog, g)


@pytest.mark.parametrize("n,h,w", [(2, 6, 5), (1, 1, 1), (3, 4, 9)])
def test_permutes_sink_through_reductions_that_drop_dims(n, h, w):
    """A channel attention run channels-last: the mean over H and W (no keepdim) and the max
    over C of the convolution's output are taken from the NHWC value itself (the reductions
    move below the permute: no reduction reads a transposed value), and the compiled graph
    agrees with eager and the interpreter; odd and 1x1 maps."""
    from passes import PassContext, PassManager
    from passes.layout import ChannelsLastPass, SinkPermutesPass

    torch.manual_seed(0)

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 8)
            self.out = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            gate = torch.sigmoid(self.fc(y.mean((2, 3))))[:, :, None, None]
            spatial = y.amax(1)[:, None]
            return self.out(y * gate + spatial)

    m = Attention().eval()
    x = torch.randn(n, 3, h, w)
    prog = import_model(m, (x,))
    ctx = PassContext()
    PassManager([*parse_pipeline("canonicalize,cse,dce"), ChannelsLastPass(), SinkPermutesPass(),
                 *parse_pipeline("canonicalize,cse,dce")]).run(prog.module, ctx)
    reads = [op.operand(0).owner for op in prog.module.func().body.ops
             if isinstance(op, st.ReduceOp)]
    assert reads and not any(isinstance(o, st.PermuteOp) for o in reads), \
        [str(o) for o in reads]
    g = compile_program(import_model(m, (x,)), device_spec=cpu_spec(measure=False),
                        channels_last=True)
    _agrees_with_eager(m, x, prog, g)


@pytest.mark.parametrize("bias", [True, False])
def test_channels_last_1d_convolutions(bias):
    """1-d convolutions run channels-last ([N, L, C] buffers, a height-1 NHWC convolution in
    torch): strided, padded, dilated, grouped and transposed ones, with BN + ReLU between them
    as a point-cloud MLP has; odd lengths and a length-1 input."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 1, bias=bias), torch.nn.BatchNorm1d(8),
                            torch.nn.ReLU(), torch.nn.Conv1d(8, 6, 3, stride=2, padding=2,
                                                             dilation=2, bias=bias),
                            torch.nn.ReLU(), torch.nn.Conv1d(6, 6, 3, padding=1, groups=3),
                            torch.nn.ConvTranspose1d(6, 4, 2, stride=2, bias=bias)).eval()
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.5, 2)
    for n, length in [(2, 13), (1, 1), (3, 64)]:
        x = torch.randn(n, 3, length)
        prog = import_model(m, (x,))
        g = compile_program(prog, device_spec=cpu_spec(measure=False), channels_last=True)
        convs = [op for op in g.func.body.ops if op.name == "st.convolution"]
        # over a length-1 input the first two (one tap meets the input) are linear
        # (pooled-conv-linear)
        assert len(convs) == (2 if length == 1 else 4)
        assert all(op.attr("channels_last") for op in convs)
        _agrees_with_eager(m, x, prog, g)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pooled_1x1_convolutions_become_linear(channels_last):
    """pooled-conv-linear: a squeeze-excitation block's 1x1 convolutions over pooled [N, C, 1, 1]
    maps run as ``linear`` (oneDNN's set-up costs 50 us each there), and so do k x k ones over a
    padded 1x1 map (one tap meets the input; dilated and strided too); a 1x1 convolution over a
    real map, a padded one (3x3 out) and a grouped one stay convolutions. Interpreter, compiled graph and
    eager agree."""
    torch.manual_seed(0)

    class SE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(6, 6, 1)
            self.down = torch.nn.Conv2d(6, 3, 1)
            self.up = torch.nn.Conv2d(3, 6, 1, bias=False)
            self.padded = torch.nn.Conv2d(6, 4, 1, padding=1)
            self.grouped = torch.nn.Conv2d(6, 6, 1, groups=2)
            # k x k over a padded 1x1 map: one tap meets the input
            self.k3 = torch.nn.Conv2d(6, 5, 3, padding=1)
            self.k3d = torch.nn.Conv2d(6, 5, (3, 5), stride=2, padding=(2, 4), dilation=2)

        def forward(self, x):
            x = self.body(x)
            s = torch.sigmoid(self.up(torch.relu(self.down(x.mean((2, 3), keepdim=True)))))
            p = x.amax((2, 3), keepdim=True)
            return x * s, self.padded(p), self.grouped(p), self.k3(p), self.k3d(p)

    m = SE().eval()
    x = torch.randn(3, 6, 5, 7)
    prog = import_model(m, (x,))
    g = compile_program(prog, device_spec=cpu_spec(measure=False), channels_last=channels_last)
    names = [op.name for op in g.func.body.ops]
    assert names.count("st.linear") == 4 and names.count("st.convolution") == 3
    with torch.no_grad():
        want = m(x)
    for got, w in zip(g(x), want):
        torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-5)
    for got, w in zip(prog.run(x), want):
        torch.testing.assert_close(torch.from_numpy(got), w, atol=1e-5, rtol=1e-5)


def _conv_net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, padding=1, stride=2), torch.nn.BatchNorm2d(12), torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(12, 12, 2, stride=2), torch.nn.GELU(),
        torch.nn.Conv2d(12, 12, 3, padding=1, groups=4), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(12, 4))


@pytest.mark.parametrize("shape", [(2, 3, 17, 13), (1, 3, 8, 8)])
def test_channels_last_training_keeps_activations_channels_last(shape, tmp_path):
    """A conv net's training step under torch.compile: the forward returns its saved
    activations as channels-last views (no transposed copies) and reports their strides, the
    backward takes them as permuted arguments (``arg_perms``) and runs convolution_backward on
    channels-last buffers (``operand_perms``) -- no kernel transposes a tile -- and the
    output, the input's gradient and every parameter's gradient (in eager's layout) agree
    with eager over two steps (odd sizes, a batch of one)."""
    import copy
    from pathlib import Path

    torch.manual_seed(0)
    m = _conv_net()
    ref = copy.deepcopy(m)
    torch._dynamo.reset()
    # asked for: a training graph of maps this small runs NCHW by default
    f = torch.compile(m, backend="stitch", dynamic=False,
                      options={"dump_dir": str(tmp_path), "channels_last": True})
    for _ in range(2):
        x = torch.randn(*shape)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, want = f(x1), ref(x2)
        out.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
        assert p.grad.stride() == q.grad.stride(), name
    graphs = sorted(Path(tmp_path).glob("graph_*/after_fusion.sir"))
    text = [g.read_text() for g in graphs]
    backward = [t for t in text if "convolution_backward" in t]
    assert backward and all("arg_perms" in t and "operand_perms" in t for t in backward)
    forward = [t for t in text if "convolution_backward" not in t]
    assert forward and all("layout_free_results" in t for t in forward)
    kernels = [k.read_text() for k in Path(tmp_path).glob("graph_*/kernels/*.cpp")]
    assert kernels and not any(re.search(r"\bstage\d+\[", k) for k in kernels)  # no transposed tiles


def test_channels_last_convolution_backward_matches_torch():
    """``layout-channels-last`` on a graph calling convolution_backward directly (strided,
    padded, grouped, transposed, 1-d; an input gradient read by an element-wise op): the
    interpreter (which applies ``operand_perms`` / ``result_perms`` itself) and the compiled
    graph agree with torch; an argument handed over channels-last (``permute_arguments``)
    gives the same values whether or not its memory is channels-last."""
    from passes.layout import permute_arguments

    cb = torch.ops.aten.convolution_backward

    class M(torch.nn.Module):
        def forward(self, dy, x, w, dy2, w2):
            gi, gw, gb = cb(dy, x, w, [6], [2, 2], [1, 1], [1, 1], False, [0, 0], 2,
                            [True, True, True])
            gi2, gw2, _ = cb(dy2, torch.tanh(gi) * x, w2, None, [2, 2], [0, 0], [1, 1], True,
                             [1, 1], 1, [True, True, False])
            # 1-d: run as a height-1 2-d backward
            l3 = gi2.flatten(2)[:, :, :11]
            gi3, gw3, gb3 = cb(torch.tanh(l3[:, :3, :5]), l3, w3, [3], [2], [1], [2], False,
                               [0], 1, [True, True, True])
            return gi2 * 2, gw, gb, gw2, gi3 + 1, gw3, gb3

    w3 = torch.randn(3, 4, 3)

    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 7)
    args = (torch.randn(3, 6, 5, 4), x, torch.randn(6, 2, 3, 3),
            torch.randn(3, 5, 19, 15), torch.randn(4, 5, 2, 2))
    want = M()(*args)
    for channels_last_x in (False, True):
        prog = import_model(M(), args)
        permute_arguments(prog.func, {1: (0, 2, 3, 1)})
        g = compile_program(prog, device_spec=cpu_spec(measure=False), channels_last=True)
        calls = [op for op in g.func.body.ops if op.name == "st.torch_call"]
        assert len(calls) == 3 and all(op.attr("operand_perms") for op in calls)
        xin = x.contiguous(memory_format=torch.channels_last) if channels_last_x else x
        got = g(args[0], xin, *args[2:])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        for a, b in zip(prog.run(*args), want):
            torch.testing.assert_close(torch.from_numpy(a), b, atol=1e-4, rtol=1e-4)


def test_scatter_does_not_read_a_large_buffer_transposed():
    """A scatter whose source is a large channels-last buffer read as NCHW (a nearest
    upsampling's backward after a channels-last convolution) is not fused with that permute:
    the cost model charges a cache line per element read transposed, so the permute runs as its
    own (tile-staged) copy kernel and the scatter reads it contiguously. Values agree with
    eager; a small buffer still fuses."""
    torch.manual_seed(0)
    for shape, split in (((2, 40, 40, 48), True), ((1, 8, 8, 16), False)):
        idx = torch.randint(0, 37, (shape[1] * shape[2],))

        def f(x, idx=idx):
            src = torch.tanh(x.permute(0, 3, 1, 2)).reshape(x.shape[0], x.shape[3], -1)
            return torch.zeros(x.shape[0], x.shape[3], 37).index_add(2, idx, src) * 2

        x = torch.randn(*shape)
        prog = import_model(_Fn(f), (x,))
        g = compile_program(prog, device_spec=cpu_spec(measure=False))
        torch.testing.assert_close(g(x)[0], f(x), atol=1e-4, rtol=1e-4)
        scatter = [s for s in g.steps if s.kind == "kernel" and "index_add" in s.source.source]
        assert len(scatter) == 1
        fused = "st.permute" in scatter[0].source.source.split("extern")[0]
        assert fused != split, scatter[0].source.source[:400]


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def test_head_splits_into_bmm_are_copy_kernels():
    """An attention's head splits (mm result viewed [B, S, H, D], permuted, reshaped for bmm) are
    no views of the mm result: the reshape would copy. They run as copy kernels, not as a view
    and torch's generic copy; values agree with eager.
    Odd sizes: S = 24, D = 40."""
    torch.manual_seed(0)
    b, s, h, d = 2, 24, 3, 40
    x, wq, wk = torch.randn(b * s, 56), torch.randn(56, h * d), torch.randn(56, h * d)

    def f(x, wq, wk):
        q = (x @ wq).view(b, s, h, d).permute(0, 2, 1, 3).reshape(b * h, s, d)
        k = (x @ wk).view(b, s, h, d).permute(0, 2, 3, 1).reshape(b * h, d, s)
        return torch.bmm(q, k).relu()

    g = compile_program(import_model(_Fn(f).eval(), (x, wq, wk)), device_spec=cpu_spec(measure=False))
    torch.testing.assert_close(g(x, wq, wk)[0], f(x, wq, wk), atol=1e-4, rtol=1e-5)
    kinds = [s.kind for s in g.steps]
    assert kinds.count("library") == 3 and kinds.count("kernel") == 3, kinds  # 2 copies, relu
    assert not [op for op in g.func.body.ops if isinstance(op, st.ReshapeOp) and
                isinstance(op.operand(0).owner, st.PermuteOp)]


def test_matmul_transposes_of_kernel_results_are_views():
    """A value a kernel computes and two matmuls read, one of them transposed (a weight
    gradient's ``grad.t() @ x``): the kernel writes it once; the transpose is a view, the BLAS
    flag, not a second (transposed) output of the kernel."""
    torch.manual_seed(0)
    x, w, w2 = torch.randn(96, 40), torch.randn(40, 72), torch.randn(72, 33)

    def f(x, w, w2):
        y = torch.tanh(x @ w) * 2
        return y @ w2, y.t() @ x

    g = compile_program(import_model(_Fn(f).eval(), (x, w, w2)), device_spec=cpu_spec(measure=False))
    for a, want in zip(g(x, w, w2), f(x, w, w2)):
        torch.testing.assert_close(a, want, atol=1e-4, rtol=1e-5)
    (k,) = [s for s in g.steps if s.kind == "kernel"]
    assert len(k.writes) == 1
    assert [op.attributes["perm"] for op in g.func.body.ops if isinstance(op, st.PermuteOp)] \
        == [(1, 0)]


def test_returned_transpose_of_an_argument_is_a_view():
    """A function returning a transpose of its argument (a training forward saving a tied
    embedding's ``w.t()`` for the backward) beside a kernel that reads the argument (the
    gather): the result is a view of the argument, as eager returns it, not a transposed copy
    the kernel writes as a second output."""
    torch.manual_seed(0)
    ids, w = torch.randint(0, 37, (3, 5)), torch.randn(37, 24)

    def f(ids, w):
        e = torch.nn.functional.layer_norm(torch.nn.functional.embedding(ids, w), (24,))
        wt = w.t()
        return e @ wt, wt

    g = compile_program(import_model(_Fn(f).eval(), (ids, w)), device_spec=cpu_spec(measure=False))
    got = g(ids, w)
    for a, want in zip(got, f(ids, w)):
        torch.testing.assert_close(a, want, atol=1e-4, rtol=1e-5)
    assert got[1].untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    (k,) = [s for s in g.steps if s.kind == "kernel"]
    assert len(k.writes) == 1


def test_transposed_head_splits_are_blas_flags():
    """A key read both as [B, H, S, D] (by one bmm) and transposed, [B, H, D, S] (by another:
    q k^T), from one projection: one copy kernel writes the head split, and the second bmm
    reads its transposed view (the BLAS flag), not a second, transposed copy. The same for a
    contiguous argument read transposed only. Odd sizes: S = 7, D = 5, H = 3."""
    torch.manual_seed(0)
    b, s, h, d = 2, 7, 3, 5
    x, wk, p, q = (torch.randn(b * s, 11), torch.randn(11, h * d), torch.randn(b * h, s, s),
                   torch.randn(b * h, s, d))

    def f(x, wk, p, q):
        k = (x @ wk).view(b, s, h, d)
        kt = k.permute(0, 2, 3, 1).reshape(b * h, d, s)
        kk = k.permute(0, 2, 1, 3).reshape(b * h, s, d)
        return torch.bmm(q, kt).tanh(), torch.bmm(p, kk).relu()

    def g(q, k):  # k a contiguous [B, H, S, D] argument, read only transposed
        return torch.bmm(q, k.permute(0, 1, 3, 2).reshape(b * h, d, s)).sigmoid()

    cg = compile_program(import_model(_Fn(f).eval(), (x, wk, p, q)),
                         device_spec=cpu_spec(measure=False))
    for got, want in zip(cg(x, wk, p, q), f(x, wk, p, q)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    copies = [s for s in cg.steps if s.kind == "kernel" and set(s.source.source.split(
        "from st ops: ")[1].split("\n")[0].split(", ")) <= {"st.permute", "st.reshape"}]
    assert len(copies) == 1 and len(copies[0].writes) == 1, [s.source.source[:300] for s in copies]
    k4 = torch.randn(b, h, s, d)
    cg = compile_program(import_model(_Fn(g).eval(), (q, k4)), device_spec=cpu_spec(measure=False))
    torch.testing.assert_close(cg(q, k4)[0], g(q, k4), atol=1e-5, rtol=1e-5)
    assert [s.kind for s in cg.steps if s.kind not in ("view", "dead")] == ["library", "kernel"]

    def only_kt(x, wk, q):  # the key read transposed only: its copy is the head split, rows of D
        kt = (x @ wk).view(b, s, h, d).permute(0, 2, 3, 1).reshape(b * h, d, s)
        return torch.bmm(q, kt).tanh()

    cg = compile_program(import_model(_Fn(only_kt).eval(), (x, wk, q)),
                         device_spec=cpu_spec(measure=False))
    torch.testing.assert_close(cg(x, wk, q)[0], only_kt(x, wk, q), atol=1e-4, rtol=1e-5)
    copies = [s for s in cg.steps if s.kind == "kernel" and
              "// from st ops: st.permute\n" in s.source.source]
    assert len(copies) == 1 and f"out0: tensor<{b}x{h}x{s}x{d}xf32>" in copies[0].source.source
