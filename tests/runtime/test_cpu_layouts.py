"""The cpu target's kernels over buffers in another memory order, against eager torch: staged
transposes (tiles copied along the input's contiguous dim, transposed in registers), copies split
at the runs a reshape made, cats staged a part per tile, and reductions along a strided dim run
as column passes -- on drawn shapes with partial tiles and size-1 dims."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
import torch.nn.functional as F
from cpu_kernel_check import Fn, run_both
from hypothesis import example, given, settings
from hypothesis import strategies as hs

from cost_model import cpu_spec
from runtime.graph import compile_program
from stitch_ir.importer import import_model


@contextlib.contextmanager
def staged_at_any_size():
    """Layout choices (staging, column reductions) taken at the tests' small sizes too, not
    only for buffers of at least ``codegen.cpp.layout.MIN_BYTES``."""
    import codegen.cpp.layout as layout

    old, layout.MIN_BYTES = layout.MIN_BYTES, 0
    try:
        yield
    finally:
        layout.MIN_BYTES = old


@settings(max_examples=4, deadline=None)
@given(hs.sampled_from([1, 2, 3]), hs.sampled_from([5, 33, 64]), hs.sampled_from([1, 7, 40]),
       hs.sampled_from([1, 9, 32]), hs.sampled_from([torch.float32, torch.bfloat16]))
def test_transposing_kernels_stage_tiles(n, c, h, w, dt):
    """A kernel whose output's innermost dim strides through a large input (an NHWC buffer read
    in NCHW order: batch norm + residual after a channels-last convolution) copies the input in
    L1 tiles and computes over contiguous tile rows; partial tiles and size-1 dims included."""
    with staged_at_any_size():  # stage at these small sizes too
        torch.manual_seed(n * 1000 + c * 10 + h + w)
        xp = torch.randn(n, h, w, c).to(dt)
        res = torch.randn(n, c, h, w).to(dt)
        s, b = torch.randn(c, 1, 1).to(dt), torch.randn(c, 1, 1).to(dt)
        # bfloat16: eager rounds each of the three ops (an ulp is 2^-5 between 4 and 8), the
        # kernel only its result (float32 half precision): 4e-2 apart where they cancel
        g = run_both(lambda xp, res, s, b: torch.relu(xp.permute(0, 3, 1, 2) * s + b + res),
                     [xp, res, s, b], atol=4e-2 if dt == torch.bfloat16 else 1e-5,
                     rtol=1e-2 if dt == torch.bfloat16 else 1e-5)
    src = "".join(k.source.source for k in g.steps if k.kind == "kernel")
    if w > 1 and c > 1:
        assert re.search(r"\bstage\d+\[", src)


@pytest.mark.parametrize("dt", [torch.float32, torch.int32, torch.float16, torch.float64])
@pytest.mark.parametrize("rows,cols", [(64, 96), (33, 70), (1, 40), (32, 1)])
def test_staged_tiles_transpose_in_registers(dt, rows, cols):
    """A transposing copy (attention's key permute, a weight transpose a training graph saves)
    stages its tiles: 4-byte values (float32, int32, and float16 computed in float) are copied
    into a tile in input order by a vector loop and transposed by ``st_tile_t`` (16 x 16
    register blocks on AVX-512: bert's key permute 22.5 -> 10 us); float64 keeps the scalar
    staging loop. Full tiles, partial ones and size-1 dims, eager's values bit for bit."""
    with staged_at_any_size():
        torch.manual_seed(rows * 100 + cols)
        x = (torch.randn(2, rows, 3, cols) * 100).to(dt)
        fn = lambda x: x.permute(0, 2, 3, 1) + x.permute(0, 2, 3, 1)  # noqa: E731
        g = compile_program(import_model(Fn(fn).eval(), (x,)), device_spec=cpu_spec(measure=False))
        (got,) = g(x)
    assert got.dtype == dt and torch.equal(got, fn(x))
    src = "".join(k.source.source for k in g.steps if k.kind == "kernel")
    if rows > 1 and cols > 1:
        assert re.search(r"\bstage\d+\[", src)
        assert ("st_tile_t(stage" in src) == (dt != torch.float64), src[-1500:]


@pytest.mark.parametrize("a,c1,c2,d,add", [
    (2, 4, 8, 64, True), (1, 5, 16, 33, True), (3, 3, 4, 40, False), (2, 8, 8, 64, False),
    (1, 2, 2, 9, True), (2, 1, 32, 7, True)])
def test_staged_copies_read_runs_split_by_a_reshape(a, c1, c2, d, add):
    """A transpose whose contiguous dim a reshape split into runs of ``c2`` (charformer's heads,
    permuted and concatenated: 8-float runs of a [256, 16, 128] buffer): the staged copy loop
    runs over one run at a time, its index exact with no ``/`` or ``%`` of the vector loop's
    variable (``(pt * 32 + pl) / 8`` had made every load a gather: 1.19 -> 0.69 ms); runs
    shorter than 4 and whole-tile runs keep the one copy loop. Partial tiles, the transpose
    read by an element-wise op or copied out, eager's values bit for bit."""
    torch.manual_seed(a * 1000 + c1 * 100 + c2 * 10 + d)
    x = torch.randn(a, c1, d, c2)
    y = torch.randn(a, c1 * c2, d)

    def fn(x, y):
        t = x.permute(0, 1, 3, 2).reshape(a, c1 * c2, d)
        return t * y + 1 if add else t + 0  # staged as a computed value / as a read

    with staged_at_any_size():
        g = compile_program(import_model(Fn(fn).eval(), (x, y)),
                            device_spec=cpu_spec(measure=False))
        (got,) = g(x, y)
    assert torch.equal(got, fn(x, y))
    src = "".join(k.source.source for k in g.steps if k.kind == "kernel")
    assert re.search(r"\bstage\d+\[", src), src[-1500:]
    split = 4 <= c2 < 32
    assert bool(re.search(r"for \(int64_t ph\d+ = 0", src)) == split, src[-2000:]
    if split:
        loads = [ln for ln in src.splitlines() if re.search(r"\bpq\d+\b", ln) and "in0[" in ln]
        assert loads and not any(re.search(rf"[/%] {c2}\b", ln) for ln in loads), loads


@pytest.mark.parametrize("b,p,l1,h,d,first", [
    (2, 64, 32, 2, 16, True), (3, 5, 64, 2, 16, True), (1, 33, 32, 3, 5, True),
    (2, 37, 32, 4, 2, True), (1, 64, 16, 2, 8, True), (2, 64, 32, 2, 16, False),
    (1, 33, 64, 3, 8, False)])
def test_staged_cat_tiles_read_one_part_each(b, p, l1, h, d, first):
    """A cat along the innermost dim of a transposed buffer and a head merge (charformer's
    head-permuted cat): where the parts start at multiples of the tile, each staged tile reads
    one part, the cat resolved (no select of both parts' loads), the transposed part along p
    and the other along the tile's rows in its contiguous runs (no / or % of the vector loop's
    variable), whichever part comes first; other cats keep the select. Partial tiles and odd
    sizes; eager's values bit for bit."""
    torch.manual_seed(b * 1000 + p * 10 + l1 + h + d)
    x, z = torch.randn(b, l1, p), torch.randn(b, h, p, d)

    def fn(x, z):
        t, m = x.transpose(1, 2), z.permute(0, 2, 1, 3).reshape(b, p, h * d)
        return torch.cat([t, m] if first else [m, t], 2) * 2

    with staged_at_any_size():
        g = compile_program(import_model(Fn(fn).eval(), (x, z)),
                            device_spec=cpu_spec(measure=False))
        (got,) = g(x, z)
    assert torch.equal(got, fn(x, z))
    (k,) = [s for s in g.steps if s.kind == "kernel"]
    body = k.source.source[k.source.source.index('extern "C"'):]
    cut = l1 if first else h * d
    segmented = cut % 32 == 0  # the transposed part first or second
    assert bool(re.search(rf"if \(lt\d+ \* 32 >= {cut} ", body)) == segmented, body
    if segmented:
        assert "st_pick" not in body and not re.search(r"\bok\d+\b", body), body
        if d in (4, 8, 16) and h > 1:  # runs that divide the tile
            loads = [ln for ln in body.splitlines() if re.search(r"\blq\d+\b", ln) and "in1[" in ln]
            assert loads and not any(re.search(rf"[/%] {d}\b", ln) for ln in loads), loads


@pytest.mark.parametrize("b,h,s,d", [
    (2, 2, 64, 16), (1, 3, 5, 8), (2, 4, 7, 4), (3, 2, 9, 33), (1, 1, 5, 16), (2, 2, 3, 2)])
def test_vector_loops_read_runs_split_by_a_reshape(b, h, s, d):
    """A plain nest whose innermost dim a reshape merged from two dims that are not adjacent in
    the buffer (a head merge [B, H, S, D] -> [B, S, H * D] read in the output's order): the
    vector loop runs over one contiguous run of D at a time, no / or % of its variable in a
    load (charformer's [256, 64, 16] -> [2, 64, 64, 32] head copy had gathered every 16-float
    run); a whole contiguous row (one head) or rows under 8 keep the one loop. Eager's values
    bit for bit, odd sizes included."""
    torch.manual_seed(b * 1000 + h * 100 + s * 10 + d)
    x, y = torch.randn(b, h, s, d), torch.randn(s, h * d)

    def fn(x, y):
        return x.permute(0, 2, 1, 3).reshape(b, s, h * d) * y + 1

    g = compile_program(import_model(Fn(fn).eval(), (x, y)), device_spec=cpu_spec(measure=False))
    (got,) = g(x, y)
    assert torch.equal(got, fn(x, y))
    src = "".join(k.source.source for k in g.steps if k.kind == "kernel")
    split = h > 1 and h * d >= 8 and d >= 4
    assert bool(re.search(r"for \(int64_t i\d+_\d+h = 0", src)) == split, src[-2000:]
    if split:
        loads = [ln for ln in src.splitlines() if re.search(r"_\d+q\b", ln) and "in0[" in ln]
        assert loads and not any(re.search(rf"[/%] {d}\b", ln) for ln in loads), loads


@settings(max_examples=4, deadline=None)
@given(hs.sampled_from([1, 2]), hs.sampled_from([5, 33, 64]), hs.sampled_from([1, 7, 16]),
       hs.sampled_from([1, 9, 32]))
def test_several_transposed_reads_stage_together(n, c, h, w):
    """An NCHW loop reading two NHWC buffers and a mask computed in NHWC, then permuted (CBAM's
    channel-max backward: where the channel max was hit, counted per position): every transposed
    read is staged in its own tile buffer, the computed mask too, so the loop over contiguous
    tile rows has no strided load left; odd sizes, partial tiles and size-1 dims included."""
    with staged_at_any_size():
        xp, yp = torch.randn(n, h, w, c), torch.randn(n, h, w, c)
        res = torch.randn(n, c, h, w)

        def fn(xp, yp, res):
            hit = (xp == xp.amax(-1, keepdim=True)).float()
            hit = hit / hit.sum(-1, keepdim=True)
            return res + hit.permute(0, 3, 1, 2) * yp.permute(0, 3, 1, 2) + \
                xp.permute(0, 3, 1, 2)

        g = run_both(fn, [xp, yp, res])
    src = "".join(k.source.source for k in g.steps if k.kind == "kernel")
    if w > 1 and c > 1:
        assert re.search(r"stage\d+_2\[", src), src  # three staged tiles in one nest


@settings(max_examples=4, deadline=None)
@given(hs.sampled_from([1, 2]), hs.sampled_from([5, 33, 64]), hs.sampled_from([1, 7, 16]),
       hs.sampled_from([3, 40, 64]))
def test_transpose_after_elementwise_then_merged_dims_stage_tiles(n, c, h, w):
    """rffs_net's batch norm + ReLU, then a permute whose result is reshaped (merging the batch
    with the old innermost dim): the kernel loops over the permuted value, not the merged
    output, and stages the computed value in tiles read along the input's contiguous dim."""
    with staged_at_any_size():
        x = torch.randn(n, c, h, w)
        mean, var, s, b = torch.randn(c), torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)

        def fn(x, mean, var, s, b):
            y = F.relu(F.batch_norm(x, mean, var, s, b, False, 0.1, 1e-5))
            return y.permute(0, 3, 1, 2).reshape(n * w, c, h)

        g = run_both(fn, [x, mean, var, s, b])
    src = "".join(k.source.source for k in g.steps if k.kind == "kernel")
    if w > 1 and h > 1 and c > 1:
        assert re.search(r"\bstage\d+\[", src)


@settings(max_examples=5, deadline=None)
@given(hs.sampled_from([1, 2]), hs.sampled_from([1, 5, 64]), hs.sampled_from([1, 3, 16]),
       hs.sampled_from([3, 33, 64]), hs.sampled_from(["amax", "sum", "mean", "amin", "var"]),
       hs.booleans())
def test_reductions_over_a_strided_dim_run_along_the_contiguous_one(n, p, k, c, how, keep):
    """Reducing the innermost dim of a channels-last buffer seen as [N, C, P, K] (a max over
    neighbours after an edge convolution): the kernel runs along C, where the buffer is
    contiguous (the column path), and agrees with eager; odd and size-1 dims included."""
    with staged_at_any_size():
        x = torch.randn(n, p, k, c)
        s = torch.rand(c, 1, 1) + 0.5
        fn = {"amax": torch.amax, "amin": torch.amin, "sum": torch.sum, "mean": torch.mean,
              "var": torch.var}[how]
        g = run_both(lambda x, s: fn(torch.relu(x.permute(0, 3, 1, 2) * s), -1, keepdim=keep),
                     [x, s], atol=1e-4, rtol=1e-5)
    src = "".join(st.source.source for st in g.steps if st.kind == "kernel")
    if k > 1 and c > 1:
        assert "cacc" in src


@settings(max_examples=6, deadline=None)
@given(hs.sampled_from([1, 2, 3]), hs.sampled_from([1, 5, 16]), hs.sampled_from([1, 7]),
       hs.sampled_from([3, 33, 64]), hs.sampled_from([0, 1]), hs.sampled_from([3.0, 1e3]))
@example(2, 16, 7, 64, 1, 1e3)
def test_channels_last_variance_runs_as_two_column_passes(n, h, w, c, correction, offset):
    """A training batch norm's statistics over a channels-last activation seen as NCHW: the
    variance over N, H, W runs along C in two column passes (the means, then the squared
    deviations from them), not one strided walk per channel; it agrees with eager, also on
    values far from zero (a one-pass sum of squares would lose them) and with one term."""
    with staged_at_any_size():
        x = torch.randn(n, h, w, c) + offset * torch.rand(c)

        def fn(x):
            t = x.permute(0, 3, 1, 2)
            return torch.var(t, (0, 2, 3), correction=correction), t.mean((0, 2, 3))

        g = run_both(fn, [x], atol=1e-4, rtol=1e-4)
    (k,) = [st for st in g.steps if st.kind == "kernel"]
    if k.source.strategy == "phases" and w > 1 and c > 1:  # rows: a few tiny channels
        assert re.search(r"\bmean\d+\[", k.source.source) and k.source.source.count("cacc") >= 2
