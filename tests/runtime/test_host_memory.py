"""runtime.host_memory: compiling a graph leaves glibc's malloc in its steady state, so buffers
a call frees serve the next call without faulting their pages in again."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import runtime.graph
from runtime.graph import compile_program
from runtime.host_memory import _libc
from stitch_ir.importer import import_model

ROOT = str(Path(__file__).resolve().parents[2])
glibc_only = pytest.mark.skipif(
    _libc() is None, reason="settle_malloc tunes glibc's malloc; this C library is not glibc")

# A fresh process (malloc's thresholds are process state): settle malloc or not, then calls of a
# oneDNN convolution backward whose 4 MiB input gradient (and scratch) the caller frees, as a
# training step's library calls do; prints the minor page faults per call, the median of 5
# windows of 8 calls (a one-time event, the heap growing or the kernel moving pages, falls in
# one window).
PROBE = textwrap.dedent("""
    import resource, statistics, sys, torch
    from runtime.host_memory import settle_malloc
    if sys.argv[1] == "settle":
        settle_malloc()
    torch.manual_seed(0)
    g, x, w = torch.randn(2, 16, 64, 64), torch.randn(2, 128, 64, 64), torch.randn(16, 128, 1, 1)
    def step():
        torch.ops.aten.convolution_backward(g, x, w, [0], [1, 1], [0, 0], [1, 1], False, [0, 0],
                                            1, [True, True, False])
    for _ in range(5):
        step()
    windows = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(8):
            step()
        windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
    print(statistics.median(windows))
""")


def _python(code: str, *args: str, env=None) -> str:
    """stdout of ``code`` in a fresh interpreter, with this environment less STITCH_MALLOC
    (unless ``env`` sets it) and ``env`` added."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != "STITCH_MALLOC"},
                               **(env or {})}, check=True, cwd=ROOT).stdout


def _faults_per_call(mode: str, env=None) -> float:
    return float(_python(PROBE, mode, env=env).split()[-1])


def _faulting_by_default() -> float:
    """The probe's faults per call under glibc's defaults; skips where this glibc (or oneDNN)
    does not fault there, which leaves nothing to settle."""
    plain = _faults_per_call("none")
    if plain < 100:
        pytest.skip(f"glibc's defaults here already reuse the probe's buffers ({plain:.0f} "
                    "page faults a call): nothing for settle_malloc to change")
    return plain


@glibc_only
def test_settled_malloc_reuses_freed_buffers_without_faulting_them_in():
    # glibc 2.36's default faults the 4 MiB output and more in on every call (2144 pages);
    # settled, the freed chunks come back from the heap as they are
    _faulting_by_default()
    assert _faults_per_call("settle") < 10


@glibc_only
def test_stitch_malloc_default_leaves_malloc_alone():
    plain = _faulting_by_default()
    assert _faults_per_call("settle", {"STITCH_MALLOC": "default"}) > plain / 2


@glibc_only
@pytest.mark.parametrize("setting", [("MALLOC_TRIM_THRESHOLD_", "1000000"),
                                     ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")])
def test_the_users_own_malloc_settings_are_left_alone(setting):
    # (STITCH_MALLOC=default: test_stitch_malloc_default_leaves_malloc_alone, by its effect)
    probe = "from runtime.host_memory import settle_malloc; print(settle_malloc())"
    assert _python(probe).split() == ["True"]
    assert _python(probe, env=dict([setting])).split() == ["False"]


def test_compiling_a_graph_settles_malloc(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime.graph, "settle_malloc", lambda: calls.append(1) or True)

    class Affine(torch.nn.Module):
        def forward(self, a):
            return a * 2 + 1

    g = compile_program(import_model(Affine(), (torch.randn(5, 3),)))
    x = torch.randn(5, 3)
    torch.testing.assert_close(g(x)[0], x * 2 + 1)
    assert calls
