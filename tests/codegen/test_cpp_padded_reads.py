"""Padded reads and concatenations in cpu kernels: a bounds test (which part, inside the
padding or not) that does not change in the vector loop is hoisted above it and selects by a
bit blend (``st_pick``), so the loop vectorises; values against eager torch, NaN and infinities
included."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from cost_model import cpu_spec
from runtime import build
from runtime.graph import compile_program
from stitch_ir.importer import import_model


class ConvPool(torch.nn.Module):
    """A ResNet stem: convolution, batch norm, ReLU, a padded 3x3 / 2 max pool into the next
    convolution (and a padded average pool, zero fill, into another) -- run channels-last, the
    pools' taps are padded along H and W, outside the vector loop over C."""

    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, c, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(c)
        self.next = torch.nn.Conv2d(c, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.next(torch.nn.functional.max_pool2d(y, 3, 2, 1)), \
            self.next(torch.nn.functional.avg_pool2d(y - 0.5, 3, 2, 1, count_include_pad=True))


def _vectorised_simd_loops(source: str, tmp_path) -> tuple[int, int]:
    """(``#pragma omp simd`` loops in ``source``, how many of them GCC vectorised)."""
    tmp_path.mkdir()
    path = tmp_path / "k.cpp"
    path.write_text(source)
    flags = [f for f in build.default_flags() if f != "-shared"]
    r = subprocess.run([build.compiler(), *flags, "-c", str(path), "-o", str(tmp_path / "k.o"),
                        "-fopt-info-vec-optimized"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pragmas = [k + 1 for k, line in enumerate(source.splitlines()) if "#pragma omp simd" in line]
    done = {int(m) for m in re.findall(r"k\.cpp:(\d+):\d+: optimized: loop vectorized", r.stderr)}
    # GCC names a loop by a line of its header or first statement, just below the pragma
    return len(pragmas), sum(any(p < n <= p + 3 for n in done) for p in pragmas)


@pytest.mark.parametrize("n,c,h,w", [(2, 16, 9, 7), (1, 8, 1, 1), (3, 32, 12, 12)])
def test_padded_pool_taps_vectorise_and_match_eager(n, c, h, w, tmp_path):
    torch.manual_seed(0)
    m = ConvPool(c).eval()
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(n, 3, h, w)
    x[0, 0, 0, 0] = float("nan")  # NaN propagates through the max, as in eager
    x[-1, 1, -1, -1] = float("inf")
    g = compile_program(import_model(m, (x,)), device_spec=cpu_spec(measure=False),
                        channels_last=True)
    with torch.no_grad():
        want = m(x)
    for got, ref in zip(g(x), want):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    pooled = [s.source.source for s in g.steps
              if s.kind == "kernel" and "st.pad" in s.source.source.splitlines()[1]]
    assert pooled
    for k, source in enumerate(pooled):
        loops, vectorised = _vectorised_simd_loops(source, tmp_path / str(k))
        assert loops and vectorised == loops, (loops, vectorised)


class CatOuter(torch.nn.Module):
    """Concatenations along an outer dim (channels of NCHW, rows of a matrix), fused with
    element-wise producers and a consumer: the vector loop runs along W, so which part an
    element comes from does not change in it."""

    def forward(self, a, b, c):
        y = torch.cat([torch.tanh(a), b * 2, c + 1], 1)
        return torch.relu(y) * 0.5 - 1, torch.cat([a.flatten(1), c.flatten(1)], 0).sigmoid()


@pytest.mark.parametrize("n,h,w", [(2, 5, 33), (1, 1, 1), (3, 4, 64)])
def test_outer_concatenations_vectorise_and_match_eager(n, h, w, tmp_path):
    torch.manual_seed(0)
    a, b, c = torch.randn(n, 3, h, w), torch.randn(n, 2, h, w), torch.randn(n, 3, h, w)
    a[0, 0, 0, 0] = float("nan")
    m = CatOuter()
    g = compile_program(import_model(m, (a, b, c)), device_spec=cpu_spec(measure=False))
    for got, ref in zip(g(a, b, c), m(a, b, c)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    cats = [s.source.source for s in g.steps
            if s.kind == "kernel" and "st.cat" in s.source.source.splitlines()[1]]
    assert cats
    if w > 1:
        for k, source in enumerate(cats):
            loops, vectorised = _vectorised_simd_loops(source, tmp_path / str(k))
            assert loops and vectorised == loops, (loops, vectorised)
