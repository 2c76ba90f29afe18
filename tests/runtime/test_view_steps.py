"""View steps of the cpu runtime: a static view step makes each result from its base's storage
at the geometry its view chain gave (``runtime.views.ViewMemos``), keyed by the bases' strides:
right for inputs of any strides, and a real view wherever the tensor leaves the graph's own
kernels and library calls."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cost_model import cpu_spec
from runtime.graph import compile_program
from stitch_ir.importer import import_model


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
