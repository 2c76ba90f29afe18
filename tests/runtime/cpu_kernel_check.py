"""Shared by the cpu target's end-to-end tests: compile a function with the cpu target and check
it against eager torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as hs

from cost_model import cpu_spec
from runtime.graph import compile_program
from stitch_ir.importer import import_model

SIZES = hs.sampled_from([1, 2, 3, 7, 16, 33])


class Fn(torch.nn.Module):
    def __init__(self, fn, *params):
        super().__init__()
        self.fn = fn
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(p) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.ps)


def run_both(fn, inputs, params=(), atol=1e-5, rtol=1e-5):
    model = Fn(fn, *params).eval()
    prog = import_model(model, tuple(inputs))
    g = compile_program(prog, device_spec=cpu_spec(measure=False))
    assert not g.fallbacks, g.fallbacks
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(model(*inputs))
    got = g(*inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True)
    return g


def _ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
