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
glibc_only = pytest.mark.skipif(_libc() is None, reason="glibc's mallopt only")

# A fresh process (malloc's thresholds are process state): settle malloc or not, then 30 rounds
# of filling a 16 MiB and a 24 MiB tensor and freeing both (what a call's outputs and library
# results do); prints the minor page faults per round after the first few.
PROBE = textwrap.dedent("""
    import resource, sys, torch
    from runtime.host_memory import settle_malloc
    if sys.argv[1] == "settle":
        settle_malloc()
    for _ in range(5):
        torch.ones(4 << 20), torch.ones(6 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(30):
        torch.ones(4 << 20), torch.ones(6 << 20)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30)
""")


def _faults_per_round(mode: str, env=None) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})), check=True, cwd=ROOT)
    return float(out.stdout.split()[-1])


@glibc_only
def test_settled_malloc_reuses_freed_buffers_without_faulting_them_in():
    # 10240 pages a round: glibc's default, adapting, still faults about 200 in every round
    # (glibc 2.36); settled, the freed chunks come back from the heap as they are.
    assert _faults_per_round("none") > 100
    assert _faults_per_round("settle") < 10


@glibc_only
def test_stitch_malloc_default_leaves_malloc_alone():
    assert _faults_per_round("settle", {"STITCH_MALLOC": "default"}) > 100


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
