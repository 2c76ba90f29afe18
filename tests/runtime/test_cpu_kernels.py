"""The cpu target end to end: generated C++ kernels against eager torch (and so against the
interpreter the fusion tests check), on hypothesis-drawn shapes with odd sizes and size-1 dims,
for every kernel strategy: rows (stitched reductions), phases (column reductions, global
stitching, plain loops), gathers and scatters."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cpu_kernel_check import SIZES, Fn, _ln, run_both
from hypothesis import given, settings
from hypothesis import strategies as hs

from cost_model import cpu_spec
from runtime import backend, build
from runtime.graph import compile_program
from stitch_ir.importer import import_model


@settings(max_examples=3, deadline=None)
@given(SIZES, SIZES, SIZES)
def test_layernorm_rows(a, b, c):
    g = run_both(_ln, [torch.randn(a, b, c)], [torch.randn(c), torch.randn(c)])
    if c > 1 and a * b > 1:
        assert [s.source.strategy for s in g.steps if s.kind == "kernel"] == ["rows"]


@settings(max_examples=3, deadline=None)
@given(SIZES, SIZES)
def test_scale_mask_softmax_rows(a, c):
    mask = (torch.randn(a, 1, c) > 0).float()
    run_both(lambda s, m: torch.softmax(s * 0.125 + (1.0 - m) * -10000.0, -1),
             [torch.randn(a, 3, c), mask])


@settings(max_examples=4, deadline=None)
@given(SIZES, SIZES)
def test_streaming_row_outputs(a, c):
    """Rows kernels write large outputs through a row buffer with streaming stores; forced on
    small odd rows here, so most rows start unaligned and the head / tail copies run."""
    import codegen.cpp.rows as rows

    old, rows.STREAM_MIN_BYTES = rows.STREAM_MIN_BYTES, 0
    try:
        g = run_both(lambda x, w, b: (torch.softmax(x * 0.125, -1), _ln(x, w, b)),
                     [torch.randn(a, 3, c)], [torch.randn(c), torch.randn(c)])
    finally:
        rows.STREAM_MIN_BYTES = old
    srcs = [s.source.source for s in g.steps if s.kind == "kernel" and s.source.strategy == "rows"]
    assert srcs and all("st_stream_row(" in t and "st_stream_fence();" in t for t in srcs)


@pytest.mark.parametrize("l3_kib,streams", [(64, True), (1024, False)])
def test_streaming_stores_follow_the_devices_last_level_cache(l3_kib, streams):
    """A rows kernel streams its outputs where they reach the device's last-level cache
    (``stream_stores``, set by the schedule from the device spec): a 128 KiB layer norm output
    does on a 64 KiB L3 and does not on a 1 MiB one; the results match eager either way."""
    import dataclasses

    spec = dataclasses.replace(cpu_spec(measure=False), l3_bytes=l3_kib << 10)
    x, w, b = torch.randn(64, 512), torch.randn(512), torch.randn(512)
    model = Fn(_ln, w, b).eval()
    g = compile_program(import_model(model, (x,)), device_spec=spec)
    with torch.no_grad():
        torch.testing.assert_close(g(x)[0], model(x), atol=1e-5, rtol=1e-5)
    (src,) = [s.source.source for s in g.steps if s.kind == "kernel"]
    assert ("st_stream_fence();" in src) is streams


@settings(max_examples=3, deadline=None)
@given(SIZES, SIZES)
def test_column_softmax_phases(a, b):
    g = run_both(lambda x: torch.softmax(x, 0), [torch.randn(a, b)])
    assert g.kernels == 1


@settings(max_examples=3, deadline=None)
@given(SIZES, SIZES)
def test_bias_gelu_and_rmsnorm(a, b):
    run_both(lambda x, bias, w: (F.gelu(x + bias),
                                 x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w),
             [torch.randn(a, b)], [torch.randn(b), torch.randn(b)])


@settings(max_examples=3, deadline=None)
@given(SIZES, hs.sampled_from([1, 5, 40]), hs.sampled_from([1, 3, 8]), hs.integers(0, 99))
def test_gnn_gather_add_relu_index_add(nodes, edges, feat, seed):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, nodes, (edges,), generator=gen)
    dst = torch.randint(0, nodes, (edges,), generator=gen)
    run_both(lambda x, e, s, d: torch.zeros_like(x).index_add(0, d, F.relu(x[s] + e)),
             [torch.randn(nodes, feat), torch.randn(edges, feat), src, dst])


@settings(max_examples=8, deadline=None)
@given(SIZES, hs.sampled_from([1, 5, 40, 97]), hs.sampled_from([(), (1,), (3,), (2, 5), (33,)]),
       hs.booleans(), hs.integers(0, 99))
def test_index_add_owned_edge_chunks(nodes, edges, inner, floats, seed):
    """The owned-destination index_add loop lists a thread's owned edges a chunk at a time; 3
    here, so full and partial chunks and the clamped prefetch window all run. Each row must
    sum its edges in edge order: the same bits as a serial loop; an index out of range is an
    error."""
    import codegen.cpp.phases as phases

    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, nodes, (edges,), generator=gen)
    dst = torch.randint(0, nodes, (edges,), generator=gen)
    if floats:
        x, e = torch.randn(nodes, *inner, generator=gen), torch.randn(edges, *inner, generator=gen)
        fn = lambda x, e, s, d: (x * 0.5).index_add(0, d, F.relu(x[s] + e), alpha=2.0)  # noqa: E731
    else:
        x = torch.randint(-9, 9, (nodes, *inner), generator=gen)
        e = torch.randint(-9, 9, (edges, *inner), generator=gen)
        fn = lambda x, e, s, d: torch.zeros_like(x).index_add(0, d, x[s] * e)  # noqa: E731
    old, phases.PhaseKernel.SCATTER_CHUNK = phases.PhaseKernel.SCATTER_CHUNK, 3
    try:
        g = run_both(fn, [x, e, src, dst])
    finally:
        phases.PhaseKernel.SCATTER_CHUNK = old
    assert any("own_e[" in s.source.source for s in g.steps if s.kind == "kernel")
    with torch.no_grad():
        if floats:
            want, vals = x * 0.5, 2.0 * F.relu(x[src] + e)
        else:
            want, vals = torch.zeros_like(x), x[src] * e
        for k in range(edges):
            want[dst[k]] += vals[k]
    (got,) = g(x, e, src, dst)
    assert torch.equal(got, want)
    bad = dst.clone()
    bad[-1] = nodes
    with pytest.raises(RuntimeError, match="out of range"):
        g(x, e, src, bad)


def test_segment_softmax_scatter_reduce():
    parent = torch.tensor([[0, 0, 1, 1, 1, 2, 2]])

    def fn(x, p):
        idx = p.expand(x.shape[0], -1)
        m = torch.full((x.shape[0], 3), -1e9).scatter_reduce(1, idx, x, "amax")
        e = torch.exp(x - m.gather(1, idx))
        s = torch.zeros(x.shape[0], 3).scatter_add(1, idx, e)
        return e / s.gather(1, idx)

    run_both(fn, [torch.randn(4, 7), parent])


def test_layernorm_backward_global_stitch():
    def fn(dy, x, w, b):
        mean = x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        return torch.ops.aten.native_layer_norm_backward(dy, x, [x.shape[-1]], mean, rstd, w, b,
                                                         [True, True, True])

    run_both(fn, [torch.randn(9, 13), torch.randn(9, 13)], [torch.randn(13), torch.randn(13)],
             atol=1e-4, rtol=1e-4)


def test_adder_attention_round_argmax_layout():
    run_both(lambda x, w: -(x.unsqueeze(1) - w.unsqueeze(0).unsqueeze(-1)).abs().sum(2),
             [torch.randn(2, 5, 7)], [torch.randn(3, 5)])
    run_both(lambda w, lv: (torch.softmax(-(w.unsqueeze(-1) - lv) ** 2 / 0.02, -1) * lv).sum(-1),
             [torch.randn(6, 5)], [torch.linspace(-1, 1, 16)])
    run_both(lambda x: (x.argmax(-1), x.amax(0), torch.var_mean(x, 1)), [torch.randn(5, 7)])
    run_both(lambda x: torch.cat([F.pad(x.t(), (1, 2), value=0.5), x.t()[:, ::2].exp()], 1),
             [torch.randn(3, 5)])


def test_embedding_sum_layernorm_and_non_contiguous_input():
    table = torch.randn(11, 8)
    g = run_both(lambda ids, y, t: _ln(F.embedding(ids, t) + y, None, None),
                 [torch.tensor([[1, 0, 10], [3, 3, 2]]), torch.randn(2, 3, 8)], [table])
    ids = torch.tensor([[1, 0, 10], [3, 3, 2]])
    y = torch.randn(2, 8, 3).transpose(1, 2)  # non-contiguous
    (out,) = g(ids, y)
    torch.testing.assert_close(out, _ln(F.embedding(ids, table) + y, None, None))


def test_out_of_range_gather_is_an_error():
    g = run_both(lambda ids, t: F.embedding(ids, t) * 2, [torch.tensor([0, 2])],
                 [torch.randn(3, 4)])
    with pytest.raises(RuntimeError, match="out of range"):
        g(torch.tensor([0, 7]))


def test_bert_matches_eager_and_second_compile_hits_the_cache():
    import models

    w = models.get("bert")
    prog = import_model(w.model, w.example_inputs)
    g = compile_program(prog, device_spec=cpu_spec(measure=False))
    with torch.no_grad():
        want = w.model(*w.example_inputs)
    (got,) = g(*w.example_inputs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    got2 = g(*w.example_inputs)[0]  # the arena is reused across calls
    torch.testing.assert_close(got2, want, atol=1e-4, rtol=1e-4)
    before = build.stats()["compiled"]
    prog2 = import_model(w.model, w.example_inputs)
    compile_program(prog2, device_spec=cpu_spec(measure=False))
    assert build.stats()["compiled"] == before, "a second compile builds nothing"


def test_arena_reuses_storage():
    g = run_both(lambda x: torch.softmax(torch.softmax(x, -1).t() @ x, 0) + x.sum(),
                 [torch.randn(16, 16)])
    sizes = [iv[2] for _, _, iv in g.layout]
    assert g.arena_bytes <= sum(-(-n // 64) * 64 for n in sizes)
    assert np.isfinite(g.arena_bytes)


def test_outputs_reuse_storage_only_when_the_caller_dropped_them():
    """A large output's storage is reused once the caller holds no tensor on it (a view kept
    blocks it); the graph never holds a tensor it handed out, and holds nothing of a small
    output (allocated fresh per call)."""
    import sys

    from runtime.graph import REUSE_MIN_BYTES

    rows = REUSE_MIN_BYTES // (4 * 16) + 3
    g = run_both(lambda x: torch.softmax(x, -1), [torch.randn(rows, 16)])
    x = torch.randn(rows, 16)
    a = g(x)[0]
    b = g(x)[0]
    assert a.data_ptr() != b.data_ptr(), "a is still held: b needs its own storage"
    view = b.view(-1)
    ptr = b.data_ptr()
    del b
    c = g(x)[0]
    assert c.data_ptr() != ptr, "a view of b is still held"
    torch.testing.assert_close(view.view(rows, 16), torch.softmax(x, -1))
    ptr_c = c.data_ptr()
    assert sys.getrefcount(c) == 2, "the graph holds no tensor it handed out"
    del c
    d = g(x * 2)[0]
    assert d.data_ptr() == ptr_c, "nobody holds c: its storage is reused"
    torch.testing.assert_close(a, torch.softmax(x, -1))
    torch.testing.assert_close(d, torch.softmax(x * 2, -1))
    small = run_both(lambda x: torch.softmax(x, -1), [torch.randn(8, 16)])
    e = small(x[:8])[0]
    f = small(x[:8] * 2)[0]
    assert e.data_ptr() != f.data_ptr()
    torch.testing.assert_close(e, torch.softmax(x[:8], -1))
    torch.testing.assert_close(f, torch.softmax(x[:8] * 2, -1))
    held = [h for states in small._free_states.values() for cs in states
            for h in cs.handed_out.values()]
    assert not held, "a small output is allocated per call, never held"


def test_weight_gradients_are_taken_by_autograd_without_a_copy(monkeypatch):
    """A training step's weight gradients come out of the backward graph referenced by the
    caller only: AccumulateGrad takes the tensor itself (``p.grad = None`` between steps)
    instead of copying it -- each ``p.grad`` is the memory the backward graph wrote."""
    from runtime.graph import CompiledGraph

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(33, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                            torch.nn.Linear(64, 7))
    x = torch.randn(5, 33)
    f = torch.compile(m, backend="stitch")
    written: list[int] = []
    call = CompiledGraph.__call__

    def recording(self, *args):
        out = call(self, *args)
        written.extend(t.data_ptr() for t in out if isinstance(t, torch.Tensor))
        return out

    monkeypatch.setattr(CompiledGraph, "__call__", recording)
    for _ in range(3):
        written.clear()
        for p in m.parameters():
            p.grad = None
        f(x).square().mean().backward()
        for name, p in m.named_parameters():
            assert p.grad.data_ptr() in written, f"{name}: AccumulateGrad copied the gradient"
    want = torch.func.grad(lambda ps: torch.func.functional_call(m, ps, (x,)).square().mean())(
        {k: v.detach() for k, v in m.named_parameters()})
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("reduce", ["sum", "prod", "amax", "amin"])
@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce(reduce, include_self):
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 5, (3, 4), generator=gen)
    run_both(lambda x, i, s: x.scatter_reduce(1, i, s, reduce, include_self=include_self) * 2,
             [torch.randn(3, 5), idx, torch.randn(3, 4)])


@pytest.mark.parametrize("case", ["index_add", "scatter_add", "amax_no_self", "upsample_grad"])
def test_scatter_along_inner_dim_shares_outer_dims(case):
    """A scatter along dim > 0 with enough positions before it work-shares those (their
    destinations never meet) instead of every thread walking every update to apply the ones it
    owns; results match eager, with odd sizes and indices repeated."""
    gen = torch.Generator().manual_seed(5)
    if case == "index_add":
        idx = torch.randint(0, 7, (11,), generator=gen)
        fn, ins = (lambda x, i, s: (x * 0.5).index_add(2, i, s.exp(), alpha=3.0),
                   [torch.randn(3, 7, 7, 5), idx, torch.randn(3, 7, 11, 5)])
    elif case == "scatter_add":
        idx = torch.randint(0, 9, (17, 3, 13), generator=gen)
        fn, ins = (lambda x, i, s: x.scatter_add(2, i, s * 2), [torch.randn(17, 3, 9), idx,
                                                                torch.randn(17, 3, 13)])
    elif case == "amax_no_self":
        idx = torch.randint(0, 4, (19, 6), generator=gen)
        fn, ins = (lambda x, i, s: x.scatter_reduce(1, i, s + 1, "amax", include_self=False),
                   [torch.randn(19, 4), idx, torch.randn(19, 6)])
    else:  # upsample_nearest2d's backward as the decomposition writes it: index_add per row
        rows = torch.arange(10) // 2
        fn, ins = (lambda g, r: torch.zeros(2, 9, 5, 5).index_add(2, r, g.sum(-1).exp()[..., None]
                                                                  .expand(2, 9, 10, 5) * 0.5),
                   [torch.randn(2, 9, 10, 3), rows])
    g = run_both(fn, ins)
    src = "".join(k.source.source for k in g.steps if k.kind == "kernel")
    assert "own_lo" not in src and "f = 0; s0f <" in src, src


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                torch.int32])
def test_clamp_with_constant_bounds_is_eager_bit_for_bit(dt):
    """A clamp by constant bounds is one max and one min instruction (``st_max_c`` /
    ``st_min_c``) and gives eager's bits: NaN stays NaN, -0 clamped at 0 stays -0 (eager keeps
    the value when it equals the bound), infinities, values on the bounds, odd row lengths; a
    clamp by a tensor bound keeps the NaN-propagating st_max / st_min."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(5, 67, generator=gen) * 200).to(dt)
    if dt.is_floating_point:
        x[0, :8] = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"),
                                 -128.0, 127.0, 126.5]).to(dt)
    lo = torch.randn(5, 67, generator=gen).to(dt) if dt.is_floating_point else x // 3

    def fn(x, lo):
        return (x.clamp(-128, 127), x.clamp(min=0), (x * 2).clamp(max=0),
                x.clamp(lo, torch.full_like(lo, 127)))

    g = run_both(fn, [x, lo], atol=0, rtol=0)
    got = g(x, lo)
    with torch.no_grad():
        want = fn(x, lo)
    for a, b in zip(got, want):  # signed zeros too (assert_close takes -0 == 0); a NaN's sign
        if dt.is_floating_point:  # is x86's default NaN in eager's vector clamp, not compared
            assert torch.equal(a.signbit() | a.isnan(), b.signbit() | b.isnan())
    src = "".join(s.source.source.split('extern "C"')[1] for s in g.steps if s.kind == "kernel")
    assert "st_max_c(" in src and "st_min_c(" in src and "st_max(" in src, src


def _fake_quant(y):
    s = y.abs().amax() / 127
    return torch.round(y / s).clamp(-128, 127) * s


@settings(max_examples=4, deadline=None, derandomize=True)
@given(hs.sampled_from([1, 3]), hs.sampled_from([1000, 4097]), hs.sampled_from([1, 7, 64, 300]),
       hs.integers(0, 2**16))
def test_long_sum_feeding_round_is_correctly_rounded(a, n, b, seed):
    """adder_quant: a float32 sum accumulated one term at a time per output (the simd lanes are
    the outputs) was many ulps off, and a later round(y / s) landed on the other side of .5 (1e-3
    at the logits). Sums now accumulate in double: y is the correctly rounded sum, and the
    quantised values equal eager's ops on that sum bit for bit (derandomized: a one-ulp
    difference in y / s still flips about one round in 10^7)."""
    x = torch.randn(a, n, b, generator=torch.Generator().manual_seed(seed))
    model = Fn(lambda x: (x.sum(1), _fake_quant(x.sum(1)))).eval()
    g = compile_program(import_model(model, (x,)), device_spec=cpu_spec(measure=False))
    assert not g.fallbacks, g.fallbacks
    y, q = g(x)
    y_ref = x.double().sum(1).float()
    torch.testing.assert_close(y, y_ref, rtol=2e-7, atol=1e-6)
    assert torch.equal(q, _fake_quant(y_ref))


@settings(max_examples=6, deadline=None)
@given(hs.sampled_from([1, 3, 70, 257]), SIZES, hs.sampled_from([1, 5, 33, 1030]),
       hs.sampled_from(["sum", "mean", "amax", "amin", "prod", "any"]), hs.booleans())
def test_column_reductions_chunked(a, b, c, how, keepdim):
    """Reductions that keep the innermost dim run chunked over the reduced index space (partial
    rows in scratch, combined in chunk order); NaN propagates through max / min."""
    import codegen.cpp.columns as columns

    x = torch.randn(a, b, c)
    if how == "prod":
        x = 1 + 0.01 * x
    if how in ("amax", "amin") and x.numel() > 4:
        x[0, 0, 1 % c] = float("nan")
    dims = (0,) if b == 1 else (0, 1)

    def fn(x):
        if how == "any":
            return (x > 2.5).any(dims[0], keepdim=keepdim).float()
        if how == "prod":
            return torch.prod(x, dims[0], keepdim=keepdim)
        return getattr(torch, how)(x, dims, keepdim=keepdim)

    old = columns.COLUMN_CHUNK_MIN, columns.COLUMN_BLOCK
    columns.COLUMN_CHUNK_MIN, columns.COLUMN_BLOCK = 4, 16  # many chunks and blocks, odd tails
    try:
        run_both(fn, [x], atol=1e-5, rtol=1e-4)
    finally:
        columns.COLUMN_CHUNK_MIN, columns.COLUMN_BLOCK = old


def test_layout_only_groups_read_by_library_calls_are_views():
    """Slices and transposes of a weight that only matmuls read are torch views (no copy
    kernel) from 16 KiB on; the rest of the graph is unchanged."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 64, 64) / 8)

        def forward(self, x):
            for i in range(4):
                x = torch.relu(x @ self.w[i].t())
            return x

    m = M().eval()
    x = torch.randn(8, 64)
    g = compile_program(import_model(m, (x,)), device_spec=cpu_spec(measure=False))
    kernels = [s for s in g.steps if s.kind == "kernel"]
    assert len(kernels) == 4 and all("st.slice" not in s.source.source for s in kernels)
    with torch.no_grad():
        torch.testing.assert_close(g(x)[0], m(x))


@pytest.mark.parametrize(("scale", "zp", "lo", "hi"), [(0.05, 3, -128, 127), (1 / 3, -2, -8, 7)])
def test_fake_quantize_is_compiled_bit_for_bit(scale, zp, lo, hi):
    """fake_quantize_per_tensor_affine (QAT) becomes a fused kernel with eager's bits, including
    ties at half a step, and its gradient through the saved mask."""
    x = torch.cat([torch.randn(999) * 10, torch.tensor([(k + 0.5) * scale for k in range(-9, 9)])])

    def f(x):
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, lo, hi)

    before = sum(v for k, v in backend.FALLBACKS.items() if "fake_quant" in k)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="stitch")
    assert torch.equal(compiled(x), f(x))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    f(a).sum().backward()
    compiled(b).sum().backward()
    assert torch.equal(a.grad, b.grad)
    assert sum(v for k, v in backend.FALLBACKS.items() if "fake_quant" in k) == before


def test_integer_division_by_zero_raises_not_crashes():
    """An integer division by zero in a kernel raises, as eager does (it used to kill the
    process with SIGFPE); without a zero the results are eager's."""
    def f(a, b):
        return a // b, a % b, a.div(b, rounding_mode="trunc")

    a, b = torch.tensor([5, 7, -3, 9]), torch.tensor([2, 0, 1, -4])
    g = compile_program(import_model(Fn(f).eval(), (a, b)), device_spec=cpu_spec(measure=False))
    with pytest.raises(RuntimeError, match="division by zero"):
        g(a, b)
    ok = torch.tensor([2, 3, 1, -4])
    for x, y in zip(g(a, ok), f(a, ok)):
        assert torch.equal(x, y)


def test_negative_indices_wrap_only_where_eager_wraps():
    """x[idx] counts a negative index from the end; index_select, gather, embedding, index_add
    and scatter_add raise on it, as eager does (they used to wrap: a silent value)."""
    x = torch.randn(5, 3)
    neg = torch.tensor([-1, 2])
    (got,) = compile_program(import_model(Fn(lambda x, i: x[i]).eval(), (x, neg)),
                             device_spec=cpu_spec(measure=False))(x, neg)
    assert torch.equal(got, x[neg])
    for fn in (lambda x, i: torch.index_select(x, 0, i) * 2,
               lambda x, i: torch.gather(x, 0, i[:, None].expand(2, 3)) + 1,
               lambda x, i: torch.nn.functional.embedding(i, x) * 2,
               lambda x, i: torch.zeros(5, 3).index_add(0, i, x[:2]),
               lambda x, i: torch.zeros(5, 3).scatter_add(0, i[:, None].expand(2, 3), x[:2])):
        with pytest.raises((IndexError, RuntimeError)):
            fn(x, neg)  # eager raises
        g = compile_program(import_model(Fn(fn).eval(), (x, neg)), device_spec=cpu_spec(measure=False))
        with pytest.raises(RuntimeError, match="out of range"):
            g(x, neg)
        ok = torch.tensor([4, 2])
        torch.testing.assert_close(g(x, ok)[0], fn(x, ok))


def test_values_read_through_many_windows_are_materialised_once():
    """A 3x3 max pool reads its input at 9 positions per output: the batch norm + ReLU feeding it
    is computed once into scratch inside the kernel, not 9 times per output."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)

    def f(x):
        return torch.nn.functional.max_pool2d(torch.relu(bn(x)), 3, 2, 1)

    g = run_both(f, [torch.randn(2, 6, 17, 15)])
    (k,) = [s for s in g.steps if s.kind == "kernel"]
    assert k.source.strategy == "phases" and k.source.scratch  # the BN + ReLU in scratch
    body = k.source.source[k.source.source.index('extern "C"'):]
    assert body.count("std::sqrt") == 1


def test_views_of_inputs_are_returned_as_views():
    """A graph output that only moves an input (``w.t()``, as a training graph saves for its
    backward) is returned as a view of it, as eager returns it -- no copy kernel -- and a view
    of an intermediate is still a fresh tensor; values agree with eager."""
    torch.manual_seed(0)
    x, w = torch.randn(64, 96), torch.randn(128, 96)

    def f(x, w):
        y = torch.tanh(x @ w.t())
        return w.t(), y, y.t() * 2

    g = compile_program(import_model(Fn(f).eval(), (x, w)), device_spec=cpu_spec(measure=False))
    wt, y, yt = g(x, w)
    want = f(x, w)
    for a, b in zip((wt, y, yt), want):
        torch.testing.assert_close(a, b)
    assert wt.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    assert [s.kind for s in g.steps if g.outputs[0] in s.writes] == ["view"]
    assert yt.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()


@pytest.mark.parametrize("n,g,h,w", [(3, 2, 7, 5), (2, 3, 33, 16), (1, 1, 1, 1), (2, 1, 1, 16)])
def test_group_norm_reads_its_input_once_for_both_statistics(n, g, h, w):
    """A group norm: its sum and variance share one loop over the input, the variance's mean
    taken from the sum's accumulator (one accumulator adding the terms, not two), and the
    normalised output is one vectorised loop over a channel's H * W elements (they merge:
    every read continues along both), not a loop of W elements per (n, c, h)."""
    c = 4 * g
    x = torch.randn(n, c, h, w) * 2 + 1
    gm = run_both(lambda x, wt, b: F.group_norm(x, g, wt, b), [x], [torch.randn(c), torch.randn(c)],
                  atol=1e-4, rtol=1e-4)
    (k,) = [s for s in gm.steps if s.kind == "kernel"]
    src = k.source.source
    if k.source.strategy == "phases":
        (acc,) = re.findall(r"#pragma omp simd reduction\(\+:(acc\d+_1)\)\n", src)
        assert f"m = {acc} / (double)" in src and not re.search(r"acc\d+s\b", src), src
        # the squared deviations add in float within a loop, then in double (the sum does not)
        (dev,) = re.findall(r"#pragma omp simd reduction\(\+:(acc\d+p)\)\n", src)
        assert f"float {dev} = " in src and f"{dev[:-1]} += {dev};" in src, src
        if h * w > 1 and w > 1:
            assert re.search(rf"< {h * w}; \+\+i\d+_\d+\) {{", src), src


@pytest.mark.parametrize("n,c,h,w", [(2, 3, 7, 6), (1, 1, 5, 9), (3, 16, 16, 16)])
def test_max_pool_values_and_indices_are_one_scan(n, c, h, w):
    """A 3x3 max pool with its indices (a training graph's): one scan of the nine window
    slices, its running maximum and position computed beside each other in one loop nest (no
    argmax, no position table gathered, nothing staged in scratch); ties, NaN and -inf
    windows as eager."""
    x = torch.randn(n, c, h, w)
    x[..., 0, :2] = 1.5  # ties
    x[..., 1, :] = float("-inf")
    x[0, 0, -1, -1] = float("nan")
    gm = run_both(lambda x: F.max_pool2d(x, 3, 2, 1, return_indices=True), [x])
    (k,) = [s for s in gm.steps if s.kind == "kernel"]
    src = k.source.source
    assert "argmax" not in " ".join(k.name for k in gm.steps) and "where = k" not in src
    assert not re.search(r"\bscr\d", src), src
    lines = src.splitlines()
    stores = [i for i, text in enumerate(lines) if re.search(r"\bout[01]\[", text)]
    assert len(stores) == 2 and not any("#pragma omp for" in t
                                        for t in lines[min(stores):max(stores)]), src


def test_values_several_element_wise_ops_read_are_computed_once_in_place():
    """A value that several element-wise ops read at the same position (a running maximum
    compared and selected, eight times over) is not materialised in scratch: only reads at
    different positions (the nine windows of a pool) count."""
    x = torch.randn(3, 50)
    gm = run_both(lambda x: (lambda m: (m > 0.5) * m + (m < -0.5) * m * m + m.exp())(
        torch.tanh(x) * 2), [x])
    (k,) = [s for s in gm.steps if s.kind == "kernel"]
    assert not re.search(r"\bscr\d", k.source.source), k.source.source


def test_a_generator_error_is_raised_not_hidden_as_a_symbolic_misfit(monkeypatch):
    """A TypeError inside the cpp generator of a group without symbolic sizes is a bug: it is
    raised, not taken for "symbolic sizes" and the group silently handed to the interpreter
    (a mistyped property access once sent every half kernel there, the results still right)."""
    from codegen.cpp.phases import PhaseKernel
    from codegen.cpp.rows import RowKernel

    def broken(self, *a, **k):
        raise TypeError("'list' object is not callable")

    monkeypatch.setattr(RowKernel, "render", broken)
    monkeypatch.setattr(PhaseKernel, "render", broken)
    x = torch.randn(5, 7)
    with pytest.raises(TypeError, match="not callable"):
        compile_program(import_model(Fn(lambda x: (x * 2).softmax(-1)).eval(), (x,)),
                        device_spec=cpu_spec(measure=False))


@pytest.mark.parametrize("reduce,feat", [("sum", (4,)), ("amax", (4,)), ("sum", (3, 5)),
                                          ("amin", (2, 7)), ("sum", ()), ("amax", ())])
def test_scatters_split_destinations_across_threads(reduce, feat):
    """scatter_add / scatter_reduce along dim 0 with an index expanded over the features (a GAT
    softmax's max and sum, its messages per head): every thread lists the updates whose
    destination row it owns, in order, and applies them with the random rows prefetched -- no
    single-thread section, no per-update ownership branch, and the same bits at 1 and 2 threads
    (each destination still combines its updates in index order), matching eager."""
    gen = torch.Generator().manual_seed(3)
    nodes, edges = 37, 301
    x = torch.randn(nodes, *feat, generator=gen)
    ei = torch.randint(0, nodes, (2, edges), generator=gen)

    def fn(x, ei):
        msg = torch.nn.functional.leaky_relu(x[ei[0]] + x[ei[1]], 0.2)
        index = ei[1].view(-1, *[1] * len(feat)).expand_as(msg)
        if reduce == "sum":
            return torch.zeros_like(x).scatter_add(0, index, msg.exp())
        return torch.zeros_like(x).scatter_reduce(0, index, msg, reduce, include_self=False)

    prog = import_model(Fn(fn).eval(), (x, ei))
    g = compile_program(prog, device_spec=cpu_spec(measure=False))
    assert not g.fallbacks
    src = "".join(s.source.source for s in g.steps if s.kind == "kernel")
    assert "own_e[" in src and "omp single" not in src, src
    assert "continue;" not in src.split("own_e[")[1], src  # the walk tests no update's owner
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = g(x, ei)[0].clone()
        torch.set_num_threads(2)
        two = g(x, ei)[0].clone()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.testing.assert_close(two, fn(x, ei), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("edges,nodes", [(5000, 40), (6000, 37), (3, 40)])
def test_leading_unit_dims_are_not_the_work_shared_loop(edges, nodes):
    """A phases kernel's value of shape [1, N] (GAT's edge list with its self loops appended,
    [1, 219991], made in the kernel that scatters by it) shares N among the threads: a
    work-shared loop over the leading 1 gave all of it to one thread. Values as eager."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(nodes, 4, generator=gen)
    ei = torch.randint(0, nodes, (2, edges), generator=gen)

    def fn(x, ei):
        loops = torch.arange(nodes).view(1, -1)
        dst = torch.cat([ei[1:], loops], 1)  # [1, E + N]
        src = torch.cat([ei[:1], loops], 1)
        msg = x.index_select(0, src[0]) * 0.5
        return dst, torch.zeros_like(x).index_add(0, dst[0], msg)

    prog = import_model(Fn(fn).eval(), (x, ei))
    g = compile_program(prog, device_spec=cpu_spec(measure=False))
    src = "".join(s.source.source for s in g.steps if s.kind == "kernel")
    one = re.search(r"#pragma omp for collapse\(\d\)[^\n]*\n\s*for \(int64_t \w+ = 0; \w+ < 1;", src)
    assert (one is None) == (edges + nodes > 4096), src  # a short one stays as it was
    for got, want in zip(g(x, ei), fn(x, ei)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
