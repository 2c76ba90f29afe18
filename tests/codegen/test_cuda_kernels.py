"""The sm_80 target's CUDA C kernels, executed on the cpu: every kernel runs in the emulation
(``codegen/cuda/stitch_emu.h``: CUDA threads as fibers, real ``__syncthreads()``, warp shuffles
and ``grid.sync()``), on small drawn shapes with odd sizes and size-1 dims, in both thread
orders, with scratch and outputs poisoned first, against eager torch and the reference
interpreter. Every group kind and mapping: element-wise (vector loads), rows packed per block
(shuffles in lane segments), a warp per row (shuffles, no barrier), a block per row (shared
memory between barriers), split rows and column tiles (global stitching across grid barriers,
or split kernels), scatters with atomics, argmax with NaN, float16 / bfloat16. Tests assert
on the generated source, on the plan's choice of generator, and show the emulation catching a
kernel with a missing barrier."""

from __future__ import annotations

import dataclasses
import re
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hs

from codegen.cuda.kernel import render_group
from cost_model.devices import SM_80
from runtime import cuda_build
from runtime.gpu_graph import compile_gpu_program
from stitch_ir import interpreter
from stitch_ir.dialects import fusion
from stitch_ir.importer import dtype_to_torch, import_model

SIZES = hs.sampled_from([1, 2, 3, 7, 16, 33])
# A GPU with two SMs: the cost model's mappings for big shapes (a warp per row, splits that
# miss one wave) at shapes small enough to emulate.
TWO_SMS = dataclasses.replace(SM_80, name="sm_80", num_sms=2)


class Fn(torch.nn.Module):
    def __init__(self, fn, *params):
        super().__init__()
        self.fn = fn
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(p) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.ps)


def _reference(prog, inputs):
    args = {i: t.detach() for i, t in prog.constants.items()}
    full = [None] * len(prog.module.func().args)
    for i, t in zip(prog.user_inputs, inputs):
        full[i] = t
    for i, t in args.items():
        full[i] = t
    return interpreter.run(prog.module, [t.float().numpy() if t.dtype == torch.bfloat16 else
                                         t.numpy() for t in full])


def run_cuda(fn, inputs, params=(), atol=1e-5, rtol=1e-5, spec=None, mode="cuda"):
    """Compile with CUDA C groups, run in the emulation in both thread orders, check against
    eager and the reference interpreter; returns the graph."""
    model = Fn(fn, *params).eval()
    prog = import_model(model, tuple(inputs))
    g = compile_gpu_program(prog, "sm_80", interpret=True, gpu_codegen=mode, device_spec=spec)
    assert not g.fallbacks and not g.cuda_fallbacks, (g.fallbacks, g.cuda_fallbacks)
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(model(*inputs))
    ref = _reference(prog, inputs)
    for reverse in (False, True):
        g.emulation_reverse = reverse
        got = g(*inputs)
        for a, b, r in zip(got, want, ref):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True)
            np.testing.assert_allclose(a.float().numpy(), np.asarray(r, dtype=np.float32),
                                       atol=max(atol, 1e-5), rtol=max(rtol, 1e-5))
    return g


def cuda_text(g) -> str:
    return "\n".join(s.source for s in g.cuda_sources.values())


def groups(g) -> list:
    return [op for op in g.func.body.ops if isinstance(op, fusion.GroupOp) and op.kind != "view"]


def _ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _ln_backward(x, w, dy):
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    xhat = (x - mean) * rstd
    gw = dy * w
    dx = rstd * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
    return dx, (dy * xhat).sum(0), dy.sum(0)


# -- the pattern set, every mapping ---------------------------------------------------------------


@settings(max_examples=2, deadline=None)
@given(SIZES, SIZES, SIZES)
def test_layernorm(a, b, c):
    g = run_cuda(_ln, [torch.randn(a, b, c)], [torch.randn(c), torch.randn(c)])
    src = cuda_text(g)
    assert src.count("__global__ void") == 1 and "grid.sync()" not in src
    assert re.search(r"// kernel 0 of 1: (rows_per_block|warp_per_row|block_per_row)", src)
    assert "// st ops:" in src


def test_packed_short_rows_shuffle_in_lane_segments():
    """<7, 33>: 16 lanes per row, 16 rows per block, reduced by shuffles within each 16-lane
    segment: no shared memory, no barrier; rows kept in registers across the three levels."""
    g = run_cuda(_ln, [torch.randn(7, 33)], [torch.randn(33), torch.randn(33)])
    src = cuda_text(g)
    assert [op.attr("mapping") for op in groups(g)] == ["rows_per_block"]
    assert "st_warp_allreduce(acc0, StSum(), 16)" in src
    assert "__syncthreads()" not in src and "rows kept in registers" in src


def test_warp_per_row_shuffles_no_barrier():
    """A warp per row (a two-SM GPU makes 40 rows enough): the row reduced by shuffles, every
    lane holding the result, 16-byte vector loads and stores."""
    g = run_cuda(lambda x: torch.softmax(x * 0.125, -1), [torch.randn(40, 96)], spec=TWO_SMS)
    src = cuda_text(g)
    assert [op.attr("mapping") for op in groups(g)] == ["warp_per_row"]
    assert "st_warp_allreduce(acc0, StMax(), 32)" in src and "__syncthreads()" not in src
    assert "st_loadv<16>(" in src and "st_storev<16>(" in src


def test_block_per_row_shared_memory_between_barriers():
    """A block per row: warps combine by shuffles, their partials meet in __shared__ between
    two __syncthreads() per level (softmax: max, then sum), every thread reads the result back
    (regional stitching)."""
    g = run_cuda(lambda x: torch.softmax(x, -1), [torch.randn(5, 700)])
    src = cuda_text(g)
    assert [op.attr("mapping") for op in groups(g)] == ["block_per_row"]
    assert src.count("__syncthreads();") == 4
    assert "ST_SHARED_BASE(smem)" in src and "sh_red0[lane / 32] = acc0;" in src
    assert "grid.sync()" not in src


@settings(max_examples=2, deadline=None)
@given(SIZES, SIZES)
def test_bias_gelu_and_rmsnorm(a, b):
    run_cuda(lambda x, bias, w: (F.gelu(x + bias),
                                 x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w),
             [torch.randn(a, b)], [torch.randn(b), torch.randn(b)])


def test_elementwise_vector_loads():
    """An element-wise group: 4 floats per thread and step, loaded and stored 16 bytes at once
    where a buffer is read at the output's own index; the broadcast bias read element-wise."""
    g = run_cuda(lambda y, r, b: F.gelu(y + b) * r, [torch.randn(9, 64), torch.randn(9, 64)],
                 [torch.randn(64)])
    src = cuda_text(g)
    assert [op.attr("mapping") for op in groups(g)] == ["elementwise"]
    assert re.search(r"st_loadv<16>\(v_in\d, in\d \+ eb\)", src)
    assert "st_storev<16>(out0 + eb, s_out0)" in src


def test_bias_residual_layernorm():
    run_cuda(lambda y, r, b, w, beta: (_ln(y + b + r, w, beta), F.gelu(y + b)),
             [torch.randn(9, 64), torch.randn(9, 64)],
             [torch.randn(64), torch.randn(64), torch.randn(64)], atol=1e-5)


def test_split_row_global_stitching():
    """Few long rows: each split over blocks; the levels' partials cross grid barriers inside
    one cooperative kernel (they fit one wave), combined in chunk order."""
    g = run_cuda(lambda x: torch.softmax(x, -1), [torch.randn(3, 9001)], atol=1e-6)
    (op,) = groups(g)
    assert op.attr("mapping") == "split_row" and op.attr("cuda_stitch") == "global"
    (src,) = g.cuda_sources.values()
    assert src.stitch == "global" and len(src.launches) == 1 and src.launches[0].cooperative
    assert src.source.count("grid.sync();") == 2


def test_all_reduce():
    run_cuda(lambda x: (x.sum(), x.amax(), x.mean()), [torch.randn(20_011)], atol=1e-3)


@settings(max_examples=2, deadline=None)
@given(SIZES, SIZES)
def test_column_reductions(a, b):
    g = run_cuda(lambda x: ((x * 2).sum(0), torch.softmax(x, 0)), [torch.randn(a, b)])
    if a > 1 and b > 1:
        assert "column_tiles" in [op.attr("mapping") for op in groups(g)]
        assert "sh_red0[ty * 32 + tx] = acc0;" in cuda_text(g)


def test_reduction_result_read_through_a_reshape():
    """A per-row result stored in another shape of the same positions (rffs_net's [2, 1024]
    sums stored as [2048])."""
    run_cuda(lambda x: (x.sum(-1).reshape(-1) * 2, x.amax(-1).reshape(6)), [torch.randn(2, 3, 33)])


def test_column_middle_dim_split():
    run_cuda(lambda x: (x.sum(1, keepdim=True) * x).amax(1), [torch.randn(4, 300, 5)],
             atol=1e-4)


def test_mixed_types_int_sums_bool_outputs():
    """float16 in, float32 and bool out (stores wider than the loads), integer sums, products,
    any, var / std over a middle dim."""
    run_cuda(lambda x: (torch.softmax(x.float(), -1), x.float() > x.float().mean(-1, keepdim=True),
                        (x > 0).sum(-1)), [torch.randn(6, 48, dtype=torch.float16)],
             atol=1e-3, rtol=1e-3)
    run_cuda(lambda x: (x.sum(0), x.prod(0), x.amax(0).int(), (x > 0.5).any(0), x.var(0)),
             [torch.randn(40, 7)], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(7, 33), (2, 1)])
def test_max_argmax_with_nan(shape):
    x = torch.randn(*shape)
    x[0, shape[1] // 2] = float("nan")
    run_cuda(lambda x: (x.argmax(-1), x.amax(-1), x.amin(-1), x.argmin(-1)), [x])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_load_store_f32_accumulate(dtype):
    g = run_cuda(lambda x, w, b: (_ln(x, w, b), F.gelu(x)), [torch.randn(5, 40, dtype=dtype)],
                 [torch.randn(40, dtype=dtype), torch.randn(40, dtype=dtype)], atol=2e-2,
                 rtol=2e-2)
    src = cuda_text(g)
    assert "const uint16_t* __restrict__ in0" in src and "float acc0" in src
    assert ("st_h2f(" if dtype == torch.float16 else "st_bf2f(") in src


def test_gnn_gather_index_add_atomics_and_index_check():
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(-5, 5, (40,), generator=gen)
    dst = torch.randint(0, 5, (40,), generator=gen)
    fn = lambda x, e, s, d: torch.zeros_like(x).index_add(0, d, F.relu(x[s] + e))  # noqa: E731
    g = run_cuda(fn, [torch.randn(5, 8), torch.randn(40, 8), src, dst])
    text = cuda_text(g)
    assert "st_atomic_add(&" in text and "grid.sync();" in text  # the copy, then the atomics
    with pytest.raises(RuntimeError, match="out of range"):
        g(torch.randn(5, 8), torch.randn(40, 8), src, torch.full((40,), 5))


# -- global stitching, or split at the barrier ------------------------------------------------


def test_layernorm_backward_globally_stitched():
    """dx (row reductions) and dγ / dβ (column reductions) in one kernel across a grid barrier:
    the row statistics cross it through scratch."""
    g = run_cuda(_ln_backward, [torch.randn(37, 33)], [torch.randn(33), torch.randn(37, 33)],
                 atol=1e-4, rtol=1e-4)
    (op,) = [op for op in groups(g) if len(op.attr("kernel_values")) > 1]
    assert op.attr("cuda_stitch") == "global" and "fit" not in op.attr("cuda_why")
    src = g.cuda_sources[id(op)]
    assert src.source.count("grid.sync();") == 1 and len(src.launches) == 1
    assert src.launches[0].cooperative and "cooperative_groups::this_grid()" in src.source


def test_layernorm_backward_split_when_the_grid_misses_one_wave():
    """On a GPU with one SM holding one block, the three blocks of the row phase miss one wave:
    the plan splits the group at its barrier (a kernel per phase, no grid.sync) and says why;
    the split kernels compute the same."""
    from passes.gpu_codegen import stitching

    x, w, dy = torch.randn(37, 33), torch.randn(33), torch.randn(37, 33)
    src, want = _group_and_buffers(_ln_backward, [x], [w, dy])
    op = src.group
    tiny = dataclasses.replace(SM_80, num_sms=1, blocks_per_sm_max=1)
    attrs = stitching(op, tiny)
    assert attrs["cuda_stitch"] == "split"
    assert "split at 1 grid barrier" in attrs["cuda_why"] and "one wave = 1 x 1 = 1" in attrs["cuda_why"]
    op.set_attrs(**attrs)
    split = render_group(op, "ln_backward")
    assert split.stitch == "split" and "grid.sync()" not in split.source
    assert len(split.launches) == 2 and not any(ln.cooperative for ln in split.launches)
    got = _run_source(split, [x, w, dy], want)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for r in got for a, b in zip(r, want))


def test_plan_chooses_the_generator():
    x = torch.randn(37, 33)
    model = Fn(_ln_backward, torch.randn(33), torch.randn(37, 33))
    prog = import_model(model, (x,))
    g = compile_gpu_program(prog, "sm_80", interpret=True, gpu_codegen="auto")
    why = {op.attr("codegen"): op.attr("codegen_why") for op in groups(g)}
    assert "cuda" in why and "global stitching" in why["cuda"]
    prog = import_model(Fn(lambda x, b: F.gelu(x + b), torch.randn(33)), (x,))
    g = compile_gpu_program(prog, "sm_80", interpret=True, gpu_codegen="auto")
    assert [op.attr("codegen") for op in groups(g)] == ["triton"] and not g.cuda_sources
    g = compile_gpu_program(import_model(model, (x,)), "sm_80", interpret=True,
                            gpu_codegen="triton")
    assert {op.attr("codegen") for op in groups(g)} == {"triton"} and not g.cuda_sources


# -- the emulation catches what a GPU would do wrong ---------------------------------------------


def _group_and_buffers(fn, inputs, params=()):
    model = Fn(fn, *params).eval()
    prog = import_model(model, tuple(inputs))
    g = compile_gpu_program(prog, "sm_80", interpret=True, gpu_codegen="cuda")
    (op,) = [op for op in groups(g) if id(op) in g.cuda_sources]
    src = g.cuda_sources[id(op)]
    src.group = op
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(model(*inputs))
    return src, want


def _run_source(src, inputs: list, outputs_like: list) -> list[list[torch.Tensor]]:
    """``src``'s kernels in the emulation, both thread orders; the outputs of each order."""
    lib = cuda_build.emulation_library(src)
    results = []
    for reverse in (False, True):
        bufs = {f"in{k}": t for k, t in enumerate(inputs)}
        bufs.update({f"out{k}": torch.empty_like(t) for k, t in enumerate(outputs_like)})
        bufs.update({f"scr{k}": torch.empty(max(1, n), dtype=dtype_to_torch(dt))
                     for k, (n, dt) in enumerate(src.scratch)})
        bufs["err"] = torch.zeros(1, dtype=torch.int32)
        cuda_build.launch_emulated(src, lib, bufs, poison=True, reverse=reverse)
        results.append([bufs[f"out{k}"] for k in range(len(outputs_like))])
    return results


def _without(src, line: str):
    """``src`` with its first line containing ``line`` removed (a new symbol)."""
    lines = src.source.split("\n")
    k = next(i for i, ln in enumerate(lines) if line in ln)
    text = "\n".join(lines[:k] + lines[k + 1:])
    return dataclasses.replace(src, source=text, symbol=src.symbol + "_broken")


def _matches(results, want) -> bool:
    return all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for r in results for a, b in zip(r, want))


def test_missing_syncthreads_is_caught():
    """Drop the barrier between the warps writing their partials to shared memory and every
    thread reading them: in the emulation a thread then reads poison (or another warp's stale
    value), and the result is wrong; with the barrier, both thread orders are right."""
    x = torch.randn(5, 700)
    src, want = _group_and_buffers(lambda x: torch.softmax(x, -1), [x])
    assert _matches(_run_source(src, [x], want), want)
    broken = _without(src, "__syncthreads();")
    assert broken.source.count("__syncthreads();") == src.source.count("__syncthreads();") - 1
    assert not _matches(_run_source(broken, [x], want), want)


def test_missing_grid_sync_is_caught():
    """Drop the grid barrier of the globally stitched layernorm backward: the column phase reads
    row statistics other blocks have not written yet (poisoned scratch)."""
    x, w, dy = torch.randn(37, 33), torch.randn(33), torch.randn(37, 33)
    src, want = _group_and_buffers(_ln_backward, [x], [w, dy])
    ins = [x, w, dy]
    got = _run_source(src, ins, want)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for r in got for a, b in zip(r, want))
    broken = _without(src, "grid.sync();")
    got = _run_source(broken, ins, want)
    assert not all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for r in got for a, b in zip(r, want))


_STRICT = """#include "stitch_cuda.h"
extern "C" __global__ void divergent(float* out) {
  if (threadIdx.x < 16) __syncthreads();  // not every thread reaches it
  out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void no_coop(float* out) {
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  out[threadIdx.x] = 1.0f;
  grid.sync();
}
extern "C" __global__ void partial_mask(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffu, 1.0f, 1);
}
#if defined(ST_EMULATE)
extern "C" int divergent_emu(void* const* a) {
  return st_emu_launch(1, 64, 0, false, [=]() { divergent((float*)a[0]); });
}
extern "C" int no_coop_emu(void* const* a) {
  return st_emu_launch(2, 32, 0, false, [=]() { no_coop((float*)a[0]); });
}
extern "C" int partial_mask_emu(void* const* a) {
  return st_emu_launch(1, 32, 0, false, [=]() { partial_mask((float*)a[0]); });
}
#endif
"""


@pytest.mark.parametrize("kernel,why", [
    ("divergent", "exited while other threads of its block wait|deadlock"),
    ("no_coop", "not launched cooperatively"),
    ("partial_mask", "partial mask")])
def test_emulation_is_strict_where_cuda_is_undefined(kernel, why):
    src = types.SimpleNamespace(
        source=_STRICT, symbol="strict", scratch=[],
        launches=[types.SimpleNamespace(kernel=kernel, args=["out0"])])
    lib = cuda_build.emulation_library(src)
    with pytest.raises(RuntimeError, match=why):
        cuda_build.launch_emulated(src, lib, {"out0": torch.zeros(64)})


def test_backend_training_step_on_cuda_kernels():
    """torch.compile(backend="stitch", gpu_codegen="cuda"): forward and backward graphs' groups
    as CUDA C kernels, run in the emulation (CPU tensors)."""
    torch.manual_seed(0)
    # a fresh dynamo: an earlier test's Sequential of other sizes would make this one's sizes
    # dynamic (automatic dynamic shapes), and the GPU targets compile static shapes only
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                torch.nn.Linear(16, 3))
    from runtime.backend import FALLBACKS

    before = sum(FALLBACKS.values())
    x = torch.randn(5, 12)
    ref = [p.detach().clone() for p in model.parameters()]
    compiled = torch.compile(model, backend="stitch", options={
        "target": "sm_80", "interpret": True, "time_limit": 2, "gpu_codegen": "cuda"})
    compiled(x).square().sum().backward()
    assert sum(FALLBACKS.values()) == before
    grads = [p.grad.clone() for p in model.parameters()]
    for p, r in zip(model.parameters(), ref):
        p.grad = None
        p.data.copy_(r)
    model(x).square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)


def test_render_split_and_global_compute_the_same():
    """The same group rendered as one cooperative kernel and as split kernels."""
    x = torch.randn(3, 9001)
    src, want = _group_and_buffers(lambda x: torch.softmax(x, -1), [x])
    assert _matches(_run_source(src, [x], want), want)
    model = Fn(lambda x: torch.softmax(x, -1)).eval()
    prog = import_model(model, (x,))
    g = compile_gpu_program(prog, "sm_80", interpret=True, gpu_codegen="cuda")
    (op,) = groups(g)
    split = render_group(op, "softmax", stitch="split")
    assert split.stitch == "split" and len(split.launches) == 3 and "grid.sync" not in split.source
    assert _matches(_run_source(split, [x], want), want)
