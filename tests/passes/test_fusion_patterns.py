"""Fusion planning on the patterns that matter: each becomes ONE kernel under ``stitch``; the
greedy (XLA / Inductor-style) baseline splits the ones whose reduction is broadcast back; and the
cases where the peers fall short (column softmax, layernorm backward, very long and very many
short rows) get the plan and thread mapping AStitch describes. Every applied plan is checked
against the unfused module in the interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cost_model import SM_80, cpu_spec
from passes import PassContext, PassManager
from stitch_ir.importer import import_model

CPU = cpu_spec(measure=False)
DEVICES = {"cpu": CPU, "sm_80": SM_80}


class Fn(torch.nn.Module):
    def __init__(self, fn, *params):
        super().__init__()
        self.fn = fn
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(p) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.ps)


def compile_plan(fn, inputs, params=(), planner="stitch", target="cpu", run=True):
    """Import, plan, apply and schedule; check the fused module against the unfused one."""
    prog = import_model(Fn(fn, *params).eval(), tuple(inputs))
    PassManager.parse("canonicalize,cse,dce").run(prog.module)
    want = prog.run(*inputs) if run else None
    ctx = PassContext(target=target, device_spec=DEVICES[target])
    PassManager.parse(f"fusion-plan{{planner={planner}}},fusion-apply,stitch-schedule").run(
        prog.module, ctx)
    if run:
        got = prog.run(*inputs)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    plan = ctx.results["plan"]["forward"]
    groups = [op for op in prog.module.func().body.ops if op.name == "fusion.group"]
    return plan, groups


def r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def _ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


ONE_GROUP = {
    # name: (fn, inputs, params, greedy splits it)
    "layernorm": (_ln, [r(6, 33)], [r(33), r(33)], True),
    "scale_mask_softmax": (lambda s, m: torch.softmax(s * 0.125 + (1.0 - m) * -10000.0, -1),
                           [r(2, 3, 7, 7), (r(2, 1, 1, 7) > 0).float()], [], True),
    "bias_gelu": (lambda x, b: F.gelu(x + b), [r(5, 40)], [r(40)], False),
    "bias_dropout_residual_layernorm": (
        lambda y, res, b, w, beta: _ln(F.dropout(y + b, 0.1, training=False) + res, w, beta),
        [r(6, 32), r(6, 32)], [r(32), r(32), r(32)], True),
    "rmsnorm": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
                [r(7, 24)], [r(24)], True),
    "gnn_gather_add_relu_index_add": (
        lambda x, e, src, dst: torch.zeros_like(x).index_add(0, dst, F.relu(x[src] + e)),
        [r(9, 8), r(13, 8), torch.randint(0, 9, (13,)), torch.randint(0, 9, (13,))], [], False),
    "adder_sub_abs_sum": (lambda x, w: -(x.unsqueeze(1) - w.unsqueeze(0).unsqueeze(-1)).abs()
                          .sum(2), [r(2, 9, 11)], [r(5, 9)], False),
    "attention_round": (
        lambda w, lv: (torch.softmax(-(w.unsqueeze(-1) - lv) ** 2 / 0.02, -1) * lv).sum(-1),
        [r(6, 5)], [torch.linspace(-1, 1, 16)], True),
    "mean_and_variance": (lambda x: (x.mean(-1), x.var(-1)), [r(5, 31)], [], False),
}


@pytest.mark.parametrize("name", sorted(ONE_GROUP))
def test_pattern_is_one_kernel_under_stitch(name):
    fn, inputs, params, greedy_splits = ONE_GROUP[name]
    plan, groups = compile_plan(fn, inputs, params)
    assert plan.kernels == 1, plan.summary()
    assert len([g for g in groups if g.kind != "view"]) == 1
    greedy, _ = compile_plan(fn, inputs, params, planner="greedy")
    if greedy_splits:
        assert greedy.kernels > 1, "greedy should split at the reduction broadcast back"
        assert any(r.reason == "policy" for r in greedy.reasons)
    assert plan.seconds <= greedy.seconds + 1e-12


def test_stitched_layernorm_schedule():
    plan, (group,) = compile_plan(_ln, [r(64, 256)], [r(256), r(256)], target="sm_80")
    a = group.attributes
    assert a["kind"] == "stitch"
    assert a["mapping"] in ("warp_per_row", "block_per_row")
    body = group.body.ops[:-1]
    assert all(body[k].name in ("st.var", "st.sum", "st.mean") for k in a["dominant"])
    schemes = dict(zip(range(len(body)), a["schemes"]))
    # The reductions are broadcast back over their rows: regional.
    assert all(schemes[k] == "regional" for k in a["dominant"])
    assert "local" in a["schemes"] and "recompute" in a["schemes"]
    # The input row is read before the reductions and again after them: kept regionally.
    assert "regional" in a["arg_schemes"]


def test_softmax_over_a_non_last_dim_is_one_column_kernel():
    plan, groups = compile_plan(lambda x: torch.softmax(x, 0), [r(33, 17)], target="sm_80")
    assert plan.kernels == 1
    (g,) = groups
    assert g.attributes["mapping"] == "column_tiles"


def _layernorm_backward(dy, x, w, b):
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return torch.ops.aten.native_layer_norm_backward(dy, x, [x.shape[-1]], mean, rstd, w, b,
                                                     [True, True, True])


@pytest.mark.parametrize("target,max_kernels", [("sm_80", 1), ("cpu", 2)])
def test_layernorm_backward_row_and_column_reductions(target, max_kernels):
    plan, groups = compile_plan(_layernorm_backward, [r(64, 48), r(64, 48)], [r(48), r(48)],
                                target=target)
    assert plan.kernels <= max_kernels, plan.summary()
    if target == "sm_80":
        (g,) = [g for g in groups if g.kind != "view"]
        assert g.attributes["grid_sync"], "dx (rows) and dw/db (columns): global stitching"
        assert "global" in g.attributes["schemes"]


def test_layernorm_backward_too_big_for_one_wave_is_not_globally_stitched():
    plan, _ = compile_plan(_layernorm_backward, [r(8192, 1024), r(8192, 1024)],
                           [r(1024), r(1024)], target="sm_80", run=False)
    assert plan.kernels > 1
    assert any(r.reason == "resource" and "grid" in r.detail for r in plan.reasons)


@pytest.mark.parametrize("shape,mapping", [((64, 30000), "split_row"),
                                           ((750000, 32), "rows_per_block")])
def test_adaptive_thread_mapping(shape, mapping):
    plan, (g,) = compile_plan(lambda x: torch.softmax(x, -1), [torch.empty(shape)],
                              target="sm_80", run=False)
    assert g.attributes["mapping"] == mapping


def test_a_fusion_that_would_make_a_cycle_is_refused_with_its_reason():
    # a -> mm -> c and a -> c: fusing a's op with c's op would wrap around the library call.
    def fn(x, w):
        a = torch.exp(x)
        return torch.relu(a @ w + a)

    plan, _ = compile_plan(fn, [r(8, 8)], [r(8, 8)])
    assert plan.kernels == 2
    assert any(r.reason == "cycle" for r in plan.reasons)


def test_regional_values_over_shared_memory_are_demoted_with_the_reason():
    # Rows of 60000 floats: a row kept for reuse after the reduction needs 240 KB of shared
    # memory, more than an A100 block has: demoted to global (re-read), still one kernel.
    plan, (g,) = compile_plan(_ln, [torch.empty(200, 60000)], [torch.empty(60000),
                                                              torch.empty(60000)],
                              target="sm_80", run=False)
    assert plan.kernels == 1
    assert g.attributes["demoted"] is True
    assert "global" in g.attributes["arg_schemes"]
    info = plan.groups[0]
    assert info.demoted and info.desc.bytes_read > 200 * 60000 * 4
