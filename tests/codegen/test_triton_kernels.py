"""The sm_80 target's Triton kernels, run under Triton's interpreter (no GPU) on hypothesis-drawn
small shapes with odd sizes and size-1 dims, against eager torch and the reference interpreter
(``stitch_ir.interpreter`` running the same fused module): the pattern set (layernorm, softmax,
bias + GELU, bias + residual + layernorm, RMSNorm, layernorm backward, GNN message passing, column
reductions), every thread mapping (warp_per_row, rows_per_block, block_per_row in one tile and
walked, split_row, column_tiles split or not), scatters (atomic and owned-destination), NaN in
max / argmax, float16 / bfloat16. Tests also assert on the generated source."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hs

from runtime.gpu_graph import compile_gpu_program
from stitch_ir import interpreter
from stitch_ir.dialects import fusion
from stitch_ir.importer import import_model

SIZES = hs.sampled_from([1, 2, 3, 7, 16, 33])


class Fn(torch.nn.Module):
    def __init__(self, fn, *params):
        super().__init__()
        self.fn = fn
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(p) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.ps)


@pytest.fixture(autouse=True)
def _seeded():
    """Inputs drawn with torch.randn repeat from run to run (a layernorm of 2 or 3 values is
    ill-conditioned: an unlucky draw broke the 1e-5 bound once)."""
    torch.manual_seed(0)


def run_triton(fn, inputs, params=(), atol=1e-5, rtol=1e-5, deterministic=False, target="sm_80"):
    """Compile for ``target``, run under the interpreter, check against eager and the reference
    interpreter; returns the graph."""
    model = Fn(fn, *params).eval()
    prog = import_model(model, tuple(inputs))
    g = compile_gpu_program(prog, target, interpret=True, deterministic=deterministic,
                            gpu_codegen="triton")
    assert not g.fallbacks, g.fallbacks
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(model(*inputs))
    got = g(*inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True)
    # the fused module on the reference interpreter (float32 numpy; half types compared in fp32)
    args = [prog.constants[i].detach().float().numpy() if prog.constants[i].dtype == torch.bfloat16
            else prog.constants[i].detach().numpy() for i in sorted(prog.constants)]
    user = [t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy() for t in inputs]
    full = [None] * len(prog.module.func().args)
    for i, t in zip(prog.user_inputs, user):
        full[i] = t
    for i, t in zip(sorted(prog.constants), args):
        full[i] = t
    ref = interpreter.run(prog.module, full)
    for a, r in zip(got, ref):
        np.testing.assert_allclose(a.float().numpy(), np.asarray(r, dtype=np.float32),
                                   atol=max(atol, 1e-5), rtol=max(rtol, 1e-5))
    return g


def sources(g) -> list[str]:
    return [s.source for s in g.triton_sources.values()]


def launches(g) -> list:
    return [launch for s in g.triton_sources.values() for launch in s.launches]


def mappings(g) -> list[str]:
    return [op.attr("mapping") for op in g.func.body.ops
            if isinstance(op, fusion.GroupOp) and op.kind != "view"]


def _ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _ln_backward(x, w, dy):
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    xhat = (x - mean) * rstd
    gw = dy * w
    dx = rstd * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
    return dx, (dy * xhat).sum(0), dy.sum(0)


# -- the pattern set -----------------------------------------------------------------------------


@settings(max_examples=3, deadline=None)
@given(SIZES, SIZES, SIZES)
def test_layernorm(a, b, c):
    g = run_triton(_ln, [torch.randn(a, b, c)], [torch.randn(c), torch.randn(c)])
    src = "\n".join(sources(g))
    assert src.count("@triton.jit") == len(launches(g)) == 1
    # named masks, explicit other=, the schedule's mapping named on the kernel
    assert "o_mask = o <" in src and "k_mask = k <" in src
    if c > 1:
        assert "mask=mask, other=0" in src
    assert re.search(r"# schedule: (rows_per_block|warp_per_row|block_per_row)", src)
    assert "# st ops:" in src


@settings(max_examples=3, deadline=None)
@given(SIZES, SIZES)
def test_scale_mask_softmax(a, c):
    mask = (torch.randn(a, 1, c) > 0).float()
    run_triton(lambda s, m: torch.softmax(s * 0.125 + (1.0 - m) * -10000.0, -1),
               [torch.randn(a, 3, c), mask])


@settings(max_examples=3, deadline=None)
@given(SIZES, SIZES)
def test_bias_gelu_and_rmsnorm(a, b):
    g = run_triton(lambda x, bias, w: (F.gelu(x + bias),
                                       x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w),
                   [torch.randn(a, b)], [torch.randn(b), torch.randn(b)])
    assert all(f"grid=({launch.grid},), num_warps={launch.num_warps}" in "".join(sources(g))
               for launch in launches(g))


@settings(max_examples=3, deadline=None)
@given(SIZES, SIZES)
def test_bias_residual_layernorm(a, c):
    run_triton(lambda y, r, b, w, beta: _ln(y + b + r, w, beta),
               [torch.randn(a, c), torch.randn(a, c)], [torch.randn(c), torch.randn(c), torch.randn(c)])


@settings(max_examples=3, deadline=None)
@given(SIZES, SIZES)
def test_layernorm_backward_row_then_column_kernels(a, c):
    """dx needs row reductions, dw / db column ones: one group, cut into a row kernel and a
    column kernel at the grid barrier (the row statistics pass through scratch)."""
    g = run_triton(_ln_backward, [torch.randn(a, c)], [torch.randn(c), torch.randn(a, c)],
                   atol=1e-4, rtol=1e-4)
    groups = [op for op in g.func.body.ops if isinstance(op, fusion.GroupOp) and op.kind != "view"]
    cut = [op for op in groups if len(op.attr("kernel_values")) > 1]
    if a > 1 and c > 1:
        assert cut and "column_tiles" in cut[0].attr("kernel_mappings")


@settings(max_examples=4, deadline=None)
@given(SIZES, hs.sampled_from([1, 5, 40]), hs.sampled_from([1, 3, 8]), hs.booleans(),
       hs.integers(0, 99))
def test_gnn_gather_add_relu_index_add(nodes, edges, feat, deterministic, seed):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(-nodes, nodes, (edges,), generator=gen)  # negative indices wrap
    dst = torch.randint(0, nodes, (edges,), generator=gen)
    g = run_triton(lambda x, e, s, d: torch.zeros_like(x).index_add(0, d, F.relu(x[s] + e)),
                   [torch.randn(nodes, feat), torch.randn(edges, feat), src, dst],
                   deterministic=deterministic)
    text = "\n".join(sources(g))
    if deterministic:
        assert "k0_index_add_owned" in text and "tl.atomic_add" not in text
    else:
        assert "tl.atomic_add" in text


def test_gather_out_of_range_raises():
    prog = import_model(Fn(lambda x, i: x[i] * 2), (torch.randn(4, 3), torch.tensor([0, 3])))
    g = compile_gpu_program(prog, "sm_80", interpret=True, gpu_codegen="triton")
    g(torch.randn(4, 3), torch.tensor([1, -4]))
    with pytest.raises(RuntimeError, match="out of range"):
        g(torch.randn(4, 3), torch.tensor([1, 4]))


@settings(max_examples=3, deadline=None)
@given(SIZES, SIZES)
def test_column_reductions(a, b):
    g = run_triton(lambda x: ((x * 2).sum(0), torch.softmax(x, 0)), [torch.randn(a, b)])
    if a > 1 and b > 1:
        assert "column_tiles" in mappings(g)


def test_column_reduction_middle_dim_split():
    """[4, 300, 5] summed over dim 1: column positions (4 x 5) split over several programs,
    the partials combined by a second kernel."""
    g = run_triton(lambda x: (x.sum(1, keepdim=True) * x).amax(1), [torch.randn(4, 300, 5)],
                   atol=1e-4, rtol=1e-5)
    assert "column_tiles" in mappings(g)


# -- mappings ------------------------------------------------------------------------------------


def test_rows_walked_tile_by_tile_and_split_rows():
    """A long row: a block per row walking its row, and (few rows) a row split over programs
    whose partials the next kernel combines."""
    g = run_triton(lambda x: torch.softmax(x, -1), [torch.randn(3, 70001)])
    assert mappings(g) == ["split_row"]
    assert len(launches(g)) == 3  # max partials, sum partials, combine + epilogue
    text = "\n".join(sources(g))
    assert "for k0 in range(k_lo, k_hi, BLOCK_K):" in text
    g = run_triton(lambda x: torch.log_softmax(x, -1), [torch.randn(200, 9000)],
                   atol=1e-4, rtol=1e-5)
    assert mappings(g) == ["block_per_row"]


def test_all_reduce_is_split():
    g = run_triton(lambda x: (x.sum(), x.amax(), x.mean()), [torch.randn(100_003)],
                   atol=1e-3, rtol=1e-5)
    assert mappings(g) == ["split_row"]


@settings(max_examples=3, deadline=None)
@given(SIZES, SIZES, hs.booleans())
def test_max_argmax_with_nan(a, b, nan):
    x = torch.randn(a, b)
    if nan:
        x[0, b // 2] = float("nan")
    run_triton(lambda x: (x.argmax(-1), x.amax(-1), x.amin(-1), x.argmin(-1)), [x])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_load_store_f32_accumulate(dtype):
    g = run_triton(lambda x, w, b: (_ln(x, w, b), F.gelu(x)),
                   [torch.randn(5, 33, dtype=dtype)],
                   [torch.randn(33, dtype=dtype), torch.randn(33, dtype=dtype)],
                   atol=2e-2, rtol=2e-2)
    text = "\n".join(sources(g))
    assert ".to(tl.float32)" in text  # loads widen; reductions accumulate in fp32


def test_scatter_add_and_scatter_reduce():
    idx = torch.tensor([[0, 1, 2, 0], [3, 0, 1, 1], [2, 2, 0, 3]])
    run_triton(lambda x, i, s: (x.scatter_add(0, i, s),
                                x.scatter_reduce(0, i, s, "amax", include_self=False)),
               [torch.randn(5, 4), idx, torch.randn(3, 4)])


def test_backend_training_step_on_triton_kernels():
    """torch.compile(backend="stitch") with the sm_80 target: forward and backward graphs as
    Triton kernels (interpreted here: CPU tensors; CUDA tensors pick the target themselves)."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # sizes static: an earlier Sequential would make them dynamic
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                torch.nn.Linear(16, 3))
    from runtime.backend import FALLBACKS

    before = sum(FALLBACKS.values())
    x = torch.randn(5, 12)
    ref = [p.detach().clone() for p in model.parameters()]
    compiled = torch.compile(model, backend="stitch",
                             options={"target": "sm_80", "interpret": True, "time_limit": 2,
                                      "gpu_codegen": "triton"})
    out = compiled(x)
    out.square().sum().backward()
    assert sum(FALLBACKS.values()) == before  # both graphs compiled, nothing ran as torch
    grads = [p.grad.clone() for p in model.parameters()]
    for p, r in zip(model.parameters(), ref):
        p.grad = None
        p.data.copy_(r)
    model(x).square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)
