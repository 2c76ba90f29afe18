"""Layout decisions on the cpu target: channels-last convolutions (``layout-channels-last``),
``sink-permutes``, ``pooled-conv-linear``, and the channels-last convolution backward; each
checked against eager torch and the reference interpreter."""

from __future__ import annotations

import pytest
import torch

from cost_model import cpu_spec
from passes import parse_pipeline
from runtime.graph import compile_program
from stitch_ir.importer import import_model


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
    with torch.no_grad():
        want = m(x)
    torch.testing.assert_close(g(x)[0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(prog.run(x)[0]), want, atol=1e-5, rtol=1e-5)


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
    with torch.no_grad():
        want = m(x)
    torch.testing.assert_close(g(x)[0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(prog.run(x)[0]), want, atol=1e-5, rtol=1e-5)


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
        with torch.no_grad():
            want = m(x)
        torch.testing.assert_close(g(x)[0], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(prog.run(x)[0]), want, atol=1e-5, rtol=1e-5)


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
