"""Exact lowerings of aten ops without an ``st`` counterpart (``stitch_ir/importer_lowerings.py``)
and the rank-0 / bool / get_attr cases the OpInfo sweep found: each imported module runs in the
interpreter against eager torch, and the op no longer becomes an ``st.torch_call``; one case per
lowering also runs end to end through ``backend="stitch"``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from passes.classify import summarize
from stitch_ir.importer import import_graph, import_model
from stitch_ir.interpreter import run
from stitch_ir.verifier import verify

g = torch.Generator().manual_seed(0)
index_put = torch.ops.aten.index_put.default  # takes None for the dims not indexed


def rnd(*shape):
    return torch.randn(shape, generator=g)


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def check(fn, *inputs, torch_calls=()):
    """Import through torch.export, run in the interpreter, compare exactly-ish with eager; the
    only torch calls left are ``torch_calls``."""
    prog = import_model(Fn(fn), inputs)
    verify(prog.module)
    assert sorted(summarize(prog.module).torch_call_targets) == sorted(torch_calls)
    want = fn(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    got = prog.run(*inputs)
    assert len(got) == len(want)
    for a, w in zip(got, want):
        assert a.shape == tuple(w.shape) and a.dtype == w.numpy().dtype
        np.testing.assert_allclose(a, w.numpy(), rtol=1e-6, atol=1e-6, equal_nan=True)
    return prog


VIEWS = {
    "as_strided_overlapping": (lambda x: x.as_strided((3, 4), (2, 1), 1), rnd(4, 5)),
    "as_strided_expanding": (lambda x: x.as_strided((2, 3, 2), (0, 4, 1), 2), rnd(20)),
    "as_strided_contiguous_run": (lambda x: x.as_strided((2, 3), (3, 1), 5) * 2, rnd(12)),
    "as_strided_scalar": (lambda x: x.as_strided((), (), 7), rnd(3, 4)),
    "unfold": (lambda x: x.unfold(1, 3, 2), rnd(2, 7, 3)),
    "unfold_scalar": (lambda x: x.unfold(0, 1, 1), rnd()),
    "diagonal": (lambda x: x.diagonal(), rnd(4, 6)),
    "diagonal_offsets_dims": (lambda x: (x.diagonal(2, 0, 2), x.diagonal(-1, 2, 1),
                                         x.diagonal(9, 0, 1)), rnd(3, 4, 5)),
    "trace": (torch.trace, rnd(5, 3)),
    "permute_copy": (lambda x: torch.permute_copy(x, (2, 0, 1)), rnd(2, 3, 4)),
    "narrow_copy": (lambda x: torch.narrow_copy(x, 1, -3, 2), rnd(2, 5)),
    "unbind_copy": (lambda x: torch.unbind_copy(x, 1), rnd(2, 3, 2)),
}


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_strided_views_are_gathers(name):
    fn, x = VIEWS[name]
    check(fn, x)


def test_as_strided_of_a_transposed_input_stays_a_torch_call():
    """as_strided addresses storage: on a non-contiguous input its meaning is not a function
    of the logical elements, so it is left to torch."""
    def fn(x):
        return torch.ops.aten.as_strided.default(x.t(), (2, 2), (1, 2))

    gm = make_fx(fn)(rnd(3, 4))
    module = import_graph(gm)
    assert "aten.as_strided.default" in summarize(module).torch_call_targets


SCATTERS = {
    "slice_scatter_unit_step": (lambda x, s: torch.slice_scatter(x, s, 1, 1, 3), rnd(3, 5),
                                rnd(3, 2)),
    "slice_scatter_whole_and_tail": (lambda x, s: (torch.slice_scatter(x, s[:, :2], 1, 3),
                                                   torch.slice_scatter(x, s[:, :5] * 2, 1)),
                                     rnd(3, 5), rnd(3, 5)),
    "slice_scatter_step": (lambda x, s: torch.slice_scatter(x, s, 0, 1, None, 3), rnd(8, 2),
                           rnd(3, 2)),
    "diagonal_scatter": (lambda x, s: torch.diagonal_scatter(x, s, -1, 1, 0), rnd(4, 3, 2),
                         rnd(2, 2)),
    "diagonal_scatter_positive_offset": (lambda x, s: torch.diagonal_scatter(x, s, 2), rnd(4, 5),
                                         rnd(3)),
    "as_strided_scatter": (lambda x, s: torch.as_strided_scatter(x, s, (2, 2), (4, 2), 1),
                           rnd(3, 4), rnd(2, 2)),
    "scatter_src_larger_than_index": (
        lambda x, s: x.scatter(1, torch.tensor([[2, 0], [1, 3]]), s), rnd(2, 4), rnd(3, 3)),
    "scatter_value_repeated_index": (
        lambda x: x.scatter(0, torch.tensor([[1, 1, 0]]), -2.5), rnd(3, 3)),
    "scatter_reduce_add_multiply": (
        lambda x, s: (x.scatter(0, torch.tensor([[1, 1], [0, 1]]), s, reduce="add"),
                      x.scatter(0, torch.tensor([[1, 1]]), 3.0, reduce="multiply")),
        rnd(2, 2), rnd(2, 2)),
    "index_put_dim1_negative": (
        lambda x, v: index_put(x, [None, torch.tensor([-1, 0])], v), rnd(3, 4), rnd(3, 1)),
    "index_put_accumulate_dim1": (
        lambda x, v: index_put(x, [None, torch.tensor([1, 1, 2])], v, True), rnd(2, 4), rnd(3)),
    "index_put_bool": (
        lambda x: torch.index_put(x, (torch.tensor([2, 0]),), torch.tensor([True, False])),
        torch.tensor([True, True, False, False])),
    "index_copy": (lambda x, s: x.index_copy(1, torch.tensor([2, 0]), s), rnd(3, 4), rnd(3, 2)),
    "index_fill": (lambda x: x.index_fill(0, torch.tensor([1, 2]), 7.0), rnd(4, 2)),
}


@pytest.mark.parametrize("name", sorted(SCATTERS))
def test_scatters_lower_exactly(name):
    fn, *inputs = SCATTERS[name]
    check(fn, *inputs)


def test_repeated_scatter_indices_keep_the_last_write():
    """torch's serial cpu loop lets the last write win (torch calls it undefined)."""
    idx = torch.tensor([[1, 0], [1, 1], [0, 1]])
    check(lambda x, s: x.scatter(0, idx, s), rnd(3, 2), rnd(3, 2))
    check(lambda x, v: torch.index_put(x, (torch.tensor([2, 2, 0, -2]),), v), rnd(4), rnd(4))
    check(lambda x, v: index_put(x, [None, torch.tensor([1, 1, 0])], v), rnd(2, 3), rnd(2, 3))
    check(lambda x, s: x.put(torch.tensor([3, 0, 3]), s), rnd(2, 2), rnd(3))
    check(lambda x: torch.index_put(x, (torch.tensor([1, 1]),), torch.tensor([True, False])),
          torch.tensor([False, True, True]))


def test_overlapping_as_strided_scatter_stays_a_torch_call():
    check(lambda x, s: torch.as_strided_scatter(x, s, (2, 2), (1, 1)), rnd(2, 2), rnd(2, 2),
          torch_calls=["aten.as_strided_scatter.default"])


@pytest.mark.parametrize("reduce", ["prod", "mean", "amax", "amin"])
@pytest.mark.parametrize("include_self", [True, False])
def test_index_reduce_is_scatter_reduce(reduce, include_self):
    idx = torch.tensor([0, 2, 2, 0, 3])
    check(lambda x, s: x.index_reduce(1, idx, s, reduce, include_self=include_self),
          rnd(2, 4), rnd(2, 5))
    check(lambda x, s: x.index_reduce(0, torch.tensor([0]), s, reduce,
                                      include_self=include_self), rnd(), rnd())


def test_copy_broadcasts_and_casts():
    check(lambda x, s: torch.ops.aten.copy.default(x, s), rnd(3, 4), rnd(4))
    check(lambda x, s: torch.ops.aten.copy.default(x, s),
          torch.zeros(2, 3, dtype=torch.bool), rnd(2, 3))
    check(lambda x, s: torch.ops.aten.copy.default(x, s), torch.zeros(2, dtype=torch.int32),
          torch.tensor([-2.7, 3.9]))


def test_fmax_fmin_ignore_nan_and_int_fmod_by_a_constant():
    a = torch.tensor([1.0, float("nan"), 3.0, float("nan"), -0.5])
    b = torch.tensor([2.0, 0.5, float("nan"), float("nan"), -1.0])
    check(lambda a, b: (torch.fmax(a, b), torch.fmin(a, b)), a, b)
    check(lambda i: torch.fmod(i, 3), torch.tensor([-7, -3, 0, 4, 8]))
    check(lambda x: torch.roll(x, (2, -1), (0, 1)), rnd(4, 3))
    check(lambda x: torch.fmod(x, 1.5), rnd(4), torch_calls=["aten.fmod.Scalar"])


def test_rank0_index_and_arg_reductions():
    x = rnd()
    check(lambda x: (x.argmax(), x.argmax(0, keepdim=True), x.max(0)[1], x.min(0, True)[0]), x)
    check(lambda x, i, j: (x.index_select(0, i), x.index_select(0, j)), x, torch.tensor([0]),
          torch.tensor(0))
    check(lambda x, s: x.index_add(0, torch.tensor([0]), s, alpha=2.0), x, rnd())
    check(lambda x, i: torch.gather(x, 0, i), x, torch.tensor([0, 0]))
    check(lambda x, i: torch.gather(x, 0, i), rnd(3), torch.tensor(2))


def test_bool_mul_add_max_are_logical():
    a = torch.tensor([True, False, True, False])
    b = torch.tensor([True, True, False, False])
    check(lambda a, b: (a * b, a + b, torch.maximum(a, b), torch.minimum(a, b)), a, b)
    check(lambda x: torch.isclose(x, x + 1e-9) * torch.isfinite(x), rnd(5))


def test_graph_constants_import_as_dense_constants():
    """A tensor created inside the traced function is a get_attr node of the graph module."""

    def fn(x):
        return x * torch.tensor([1.0, -2.0, 0.5]) + torch.tensor(3, dtype=torch.int64)

    x = rnd(2, 3)
    gm = make_fx(fn)(x)
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    module = import_graph(gm)
    verify(module)
    (got,) = run(module, [x.numpy()])
    np.testing.assert_allclose(got, fn(x).numpy(), rtol=1e-7)


def _pool_edge_cases():
    x = torch.full((1, 1, 5, 5), float("-inf"))
    x[0, 0, 0, :2] = 1.0
    x[0, 0, 3, 3] = x[0, 0, 4, 4] = float("nan")
    x[0, 0, 2, 0] = x[0, 0, 2, 1] = 2.0
    return x


@pytest.mark.parametrize("fn,inputs", [
    (lambda x, s: torch.slice_scatter(x, s, 0, 1, None, 3).diagonal(1), (rnd(8, 5), rnd(3, 5))),
    (lambda x, s: x.scatter(1, torch.tensor([[2, 0], [1, 3]]), s).unfold(1, 2, 1),
     (rnd(2, 4), rnd(2, 2))),
    (lambda x, v: index_put(x, [None, torch.tensor([2, 0])], v).as_strided((2, 2), (1, 3)),
     (rnd(3, 3), rnd(3, 1))),
    (lambda x: torch.nn.functional.max_pool2d(x, 3, 1, 1, return_indices=True)[1] * 1.0,
     (_pool_edge_cases(),)),
    (lambda x: torch.nn.functional.max_pool2d(x, 3, 2, 1, 2, True, True)[1] * 1.0,
     (rnd(2, 3, 7, 6),)),
    (lambda x, v: torch.index_put(x, (torch.tensor([2, 2, 0, 2, 1]),), v) * 1.0,
     (rnd(4, 3), rnd(5, 3))),
], ids=["slice_scatter_diagonal", "scatter_unfold", "index_put_as_strided",
        "max_pool_indices_edge_cases", "max_pool_indices_dilated_ceil",
        "index_put_repeated_last_write"])
def test_lowerings_end_to_end(fn, inputs):
    from runtime import backend

    torch._dynamo.reset()
    before = backend.FALLBACKS.copy()
    got = torch.compile(fn, backend="stitch", fullgraph=True)(*inputs)
    torch._dynamo.reset()
    want = fn(*inputs)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not (backend.FALLBACKS - before), backend.FALLBACKS - before


POOLS = {
    "overlapping_padded": dict(kernel_size=3, stride=2, padding=1),
    "dilated_ceil": dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 1), dilation=(2, 1),
                         ceil_mode=True),
    "ceil_no_padding": dict(kernel_size=2, stride=2, ceil_mode=True),
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_max_pool_with_indices_is_a_scan_of_window_slices(name):
    kw = POOLS[name]
    pool = torch.nn.functional.max_pool2d
    check(lambda x: pool(x, return_indices=True, **kw), rnd(2, 3, 7, 6))
    check(lambda x: pool(x, return_indices=True, **kw), rnd(2, 5, 5))


def test_max_pool_with_indices_of_large_windows_is_windows_and_argmax():
    """Windows of more than SLICE_WINDOW elements (9 x 9), and 3-d pooling."""
    check(lambda x: torch.nn.functional.max_pool2d(x, 9, 3, 4, return_indices=True),
          rnd(2, 3, 13, 11))
    check(lambda x: torch.nn.functional.max_pool3d(x, 3, 2, 1, return_indices=True),
          rnd(2, 3, 5, 7, 6))


def test_max_pool_indices_follow_torch_on_ties_nan_and_minus_inf():
    """Ties: the first maximum; NaN: the last NaN of the window; a window of only -inf: its
    first in-bounds position (torch's cpu kernel)."""
    check(lambda x: torch.nn.functional.max_pool2d(x, 3, 1, 1, return_indices=True),
          _pool_edge_cases())


def test_max_pool_training_step_end_to_end():
    from runtime import backend

    x = rnd(2, 3, 8, 8).requires_grad_()
    torch._dynamo.reset()
    before = backend.FALLBACKS.copy()
    torch.compile(lambda x: torch.nn.functional.max_pool2d(x, 3, 2, 1).sum(),
                  backend="stitch")(x).backward()
    torch._dynamo.reset()
    got, x.grad = x.grad, None
    torch.nn.functional.max_pool2d(x, 3, 2, 1).sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=0, atol=0)
    assert not (backend.FALLBACKS - before), backend.FALLBACKS - before


def test_max_pool_backward_scatters_to_the_argmax():
    def fn(x, g):
        _, idx = torch.nn.functional.max_pool2d(x, 3, 2, 1, return_indices=True)
        return torch.ops.aten.max_pool2d_with_indices_backward(g, x, [3, 3], [2, 2], [1, 1],
                                                               [1, 1], False, idx)

    check(fn, rnd(2, 2, 6, 5), rnd(2, 2, 3, 3))


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
    dict(kernel_size=(2, 3), stride=1, divisor_override=4),
    dict(kernel_size=2, stride=3, padding=1, ceil_mode=True),
], ids=["padded", "exclude_pad_ceil", "divisor_override", "gapped_ceil"])
def test_avg_pool_is_window_sum_over_divisor(kw):
    pool = torch.nn.functional.avg_pool2d
    check(lambda x: pool(x, **kw), rnd(2, 3, 7, 6))
    check(lambda x: pool(x, **kw), rnd(3, 5, 5))


def test_take_with_any_index_rank():
    check(lambda x, i: torch.take(x, i), rnd(3, 4), torch.tensor([[0, -1], [5, 11]]))
    check(lambda x, i: torch.take(x, i), rnd(3, 4), torch.tensor(7))  # torch's decomposition fails
    check(lambda x, i: torch.take(x, i), rnd(), torch.tensor([0, 0]))


def test_put_angle_ldexp():
    check(lambda x, s: x.put(torch.tensor([4, -1, 0]), s), rnd(2, 3), rnd(3))
    check(lambda x, s: x.put(torch.tensor([[1, 1], [4, 1]]), s, accumulate=True), rnd(2, 3),
          rnd(2, 2))
    check(torch.angle, torch.tensor([-2.0, -0.0, 0.0, 3.0, float("nan"), float("-inf")]))
    check(torch.ldexp, rnd(4), torch.tensor([1, -2, 3, 0]))


def test_batch_norm_with_update_decomposes_end_to_end():
    from runtime import backend

    x, w, b = rnd(4, 3, 5), rnd(3), rnd(3)
    stats = [torch.zeros(3), torch.ones(3)]
    want_stats = [s.clone() for s in stats]

    def fn(x, w, b, mean, var):
        return torch.ops.aten._batch_norm_with_update(x, w, b, mean, var, 0.1, 1e-5)[0]

    torch._dynamo.reset()
    before = backend.FALLBACKS.copy()
    got = torch.compile(fn, backend="stitch", fullgraph=True)(x, w, b, *stats)
    torch._dynamo.reset()
    want = fn(x, w, b, *want_stats)
    torch.testing.assert_close(got, want)
    for s, t in zip(stats, want_stats):  # the running statistics are updated in place
        torch.testing.assert_close(s, t)
    assert not (backend.FALLBACKS - before), backend.FALLBACKS - before


def test_index_put_on_adjacent_dims_linearises_the_indices():
    i0, i1 = torch.tensor([[0], [2], [-1]]), torch.tensor([0, -1])
    check(lambda x, v: index_put(x, [None, i0, i1], v), rnd(2, 4, 3, 2), rnd(3, 2, 2))
    # repeated positions accumulate
    check(lambda x, v: index_put(x, [i0, torch.tensor([1, -2])], v, True), rnd(4, 3), rnd(2))
    check(lambda x, v: index_put(x, [torch.tensor([[1, 0]]), torch.tensor([[2, 2]])], v),
          rnd(3, 4, 2), rnd(1, 2, 2))


def test_empty_results_import_as_empty_constants():
    """Nothing to compute: no kernel (the cpp target has none for zero-size tensors) and no
    interpreter fallback. (A reduction that reads an empty graph input directly still runs in
    the interpreter; the sum here reads an empty constant.)"""
    from runtime import backend

    def fn(x):
        return torch.sigmoid(x) * 2, (x * 3).sum(1)

    prog = check(fn, rnd(2, 0, 3))
    names = {op.name for op in prog.module.func().body.ops}
    assert "st.sigmoid" not in names and "st.mul" not in names, names
    torch._dynamo.reset()
    before = backend.FALLBACKS.copy()
    got = torch.compile(fn, backend="stitch", fullgraph=True)(rnd(2, 0, 3))
    torch._dynamo.reset()
    assert [tuple(t.shape) for t in got] == [(2, 0, 3), (2, 3)]
    assert not got[1].any()
    assert not (backend.FALLBACKS - before), backend.FALLBACKS - before


def test_3d_pools_with_indices_and_backward():
    F = torch.nn.functional
    check(lambda x: F.max_pool3d(x, 3, 2, 1, return_indices=True), rnd(1, 2, 5, 6, 4))
    check(lambda x: F.max_pool3d(x, (2, 3, 2), 1, (1, 0, 1), (1, 1, 2), True, True),
          rnd(2, 4, 5, 6))
    check(lambda x: F.avg_pool3d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
          rnd(1, 2, 5, 6, 4))

    def bw(x, g):
        _, idx = F.max_pool3d(x, 2, 1, 1, return_indices=True)
        return torch.ops.aten.max_pool3d_with_indices_backward(g, x, [2, 2, 2], [1, 1, 1],
                                                               [1, 1, 1], [1, 1, 1], False, idx)

    check(bw, rnd(1, 2, 3, 4, 3), rnd(1, 2, 4, 5, 4))


def test_adaptive_pools_with_uneven_windows():
    F = torch.nn.functional
    check(lambda x: F.adaptive_max_pool2d(x, (3, 4), return_indices=True), rnd(2, 3, 7, 5))
    check(lambda x: F.adaptive_max_pool3d(x, (2, 3, 2), return_indices=True), rnd(2, 5, 4, 3))
    check(lambda x: F.adaptive_avg_pool3d(x, (2, 3, 4)), rnd(1, 2, 5, 4, 6))
    edge = _pool_edge_cases()  # ties, NaN windows, -inf windows
    check(lambda x: F.adaptive_max_pool2d(x, 3, return_indices=True), edge)

    def bw(x, g):
        _, idx = F.adaptive_max_pool2d(x, (3, 2), return_indices=True)
        return torch.ops.aten.adaptive_max_pool2d_backward(g, x, idx)

    check(bw, rnd(2, 5, 4), rnd(2, 3, 2))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_is_an_index_add_into_bags(mode):
    F = torch.nn.functional
    w = rnd(7, 3)
    idx = torch.tensor([1, 6, 0, 0, 4, 2, 6, 3])
    offsets = torch.tensor([0, 3, 3, 6])  # bag 1 is empty
    check(lambda w, i, o: F.embedding_bag(i, w, o, mode=mode), w, idx, offsets)
    check(lambda w, i, o: F.embedding_bag(i, w, o, mode=mode, include_last_offset=True), w, idx,
          torch.tensor([0, 2, 2, 5, 8]))  # the last offset is the number of indices
    check(lambda w, i: F.embedding_bag(i, w, mode=mode), w, idx.reshape(2, 4))  # 2-d: rows
    if mode != "max":
        check(lambda w, i, o: F.embedding_bag(i, w, o, mode=mode, padding_idx=0), w, idx, offsets)
    if mode == "sum":
        check(lambda w, i, o, p: F.embedding_bag(i, w, o, mode="sum", per_sample_weights=p), w,
              idx, offsets, rnd(8))


UPSAMPLES = [  # (input shape, interpolate's arguments, whether every factor is whole)
    ((2, 3, 5, 7), dict(scale_factor=2), True),
    ((1, 2, 1, 3), dict(scale_factor=(3, 1)), True),
    ((2, 3, 4), dict(size=12), True),  # 1-d
    ((1, 2, 3, 4, 5), dict(size=(6, 8, 5)), True),  # 3-d, one dim not scaled
    ((2, 3, 5, 7), dict(scale_factor=1.5), False),
    ((2, 3, 5, 7), dict(size=(11, 14)), False),
    ((2, 3, 5, 7), dict(scale_factor=2.1), True),  # 10 = 2 * 5: eager's kernel takes i >> 1
]


@pytest.mark.parametrize("shape,kw,whole", UPSAMPLES, ids=[str(u[1]) for u in UPSAMPLES])
def test_nearest_upsampling_by_whole_factors_is_a_broadcast(shape, kw, whole):
    """Nearest upsampling whose output repeats every input element k times along each dim
    (checked against eager's own index formula) imports as a broadcast between reshapes, no
    gather; other sizes keep torch's gather. Values exact against eager; the traced kernels at
    torch's dispatch keys are back as they were afterwards."""
    from torch._C import DispatchKey

    op = torch.ops.aten.upsample_nearest2d.vec
    before = dict(op.py_kernels)
    prog = check(lambda x: torch.nn.functional.interpolate(x, mode="nearest", **kw) * 2,
                 rnd(*shape))
    ops = {o.name for o in prog.module.func().body.ops}
    assert ("st.index_select" not in ops) == whole, ops
    assert op.py_kernels[DispatchKey.Autograd] is before[DispatchKey.Autograd]


@pytest.mark.parametrize("shape,kw,whole", UPSAMPLES[:2] + UPSAMPLES[4:5],
                         ids=[str(u[1]) for u in UPSAMPLES[:2] + UPSAMPLES[4:5]])
def test_nearest_upsampling_training_step(shape, kw, whole):
    """Through ``backend="stitch"``: the gradient of a whole-factor upsampling is a sum over
    each k-block (a reduction, no scatter), and matches eager; bfloat16 sums in float as
    eager's kernel does."""
    from bench.clients import recording

    fn = lambda x: torch.nn.functional.interpolate(x, mode="nearest", **kw) ** 2  # noqa: E731
    for dt in (torch.float32, torch.bfloat16):
        x = rnd(*shape).to(dt).requires_grad_()
        torch._dynamo.reset()
        with recording() as rec:
            y = torch.compile(fn, backend="stitch")(x)
            w = rnd(*y.shape).to(dt)
            (y.float() * w.float()).sum().backward()
        torch._dynamo.reset()
        got, x.grad = x.grad, None
        (fn(x).float() * w.float()).sum().backward()
        # float32: the block sums add in another order; bfloat16: eager rounds each product
        # (and each partial sum) to bfloat16 where a fused kernel keeps them in float, so a
        # sum that cancels differs by an ulp of its terms, not of its result
        tol = dict(rtol=1e-5, atol=1e-5) if dt == torch.float32 else \
            dict(rtol=1.6e-2, atol=1.6e-2 * x.grad.abs().max().item())
        torch.testing.assert_close(got, x.grad, **tol)
        kinds = " ".join(s.source.symbol for gr in rec["graphs"] for s in gr.steps
                         if s.kind == "kernel")
        assert ("scatter" not in kinds and "gather" not in kinds) == whole, kinds


def test_nearest_upsampling_backward_table_entry():
    """``upsample_nearest2d_backward`` itself (left by a graph that did not decompose the
    forward): the block sum for whole factors, against eager; NotImplemented (torch's own
    handling) for others."""
    from stitch_ir.importer import decomposition_table

    bwd = decomposition_table()[torch.ops.aten.upsample_nearest2d_backward.default]
    grad = rnd(2, 3, 10, 21)
    want = torch.ops.aten.upsample_nearest2d_backward(grad, [10, 21], [2, 3, 5, 7], 2.0, 3.0)
    torch.testing.assert_close(bwd(grad, [10, 21], [2, 3, 5, 7], 2.0, 3.0), want)
    assert bwd(rnd(2, 3, 11, 14), [11, 14], [2, 3, 5, 7]) is NotImplemented
