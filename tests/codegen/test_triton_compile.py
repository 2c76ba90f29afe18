"""Triton's own compile of the sm_80 / sm_90 kernels, without a GPU: PTX, cubin and resource
reports, at the pattern set's GPU sizes (the shapes bench/gpu_check.py times), with no register
spills; a second build is a cache hit. The same for every workload's kernels (slow: run with
STITCH_SLOW=1), and those kernels under the interpreter against eager."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from passes import PassContext, PassManager
from runtime import triton_build
from stitch_ir.dialects import fusion
from stitch_ir.importer import import_model

PIPELINE = "canonicalize,cse,dce,sink-broadcasts,fusion-plan{planner=stitch},fusion-apply," \
           "stitch-schedule"
slow = pytest.mark.skipif(not os.environ.get("STITCH_SLOW"), reason="slow: set STITCH_SLOW=1")


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _ln_backward(x, w, dy):
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    xhat = (x - mean) * rstd
    gw = dy * w
    dx = rstd * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
    return dx, (dy * xhat).sum(0), dy.sum(0)


def gpu_patterns() -> dict:
    """The pattern set at GPU sizes (meta tensors are enough to plan and compile)."""
    R, H, F2 = 8192, 1024, 2048
    nodes, edges, feat = 200_000, 1_000_000, 64

    def t(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype)

    i64 = torch.int64
    return {
        "layernorm": (_ln, [t(R, H), t(H), t(H)]),
        "softmax": (lambda x: torch.softmax(x * 0.125, -1), [t(R, H)]),
        "bias_gelu": (lambda x, b: F.gelu(x + b), [t(R, F2), t(F2)]),
        "bias_residual_layernorm": (lambda y, b, r, w, beta: _ln(y + b + r, w, beta),
                                    [t(R, H), t(H), t(R, H), t(H), t(H)]),
        "rmsnorm": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
                    [t(R, H), t(H)]),
        "layernorm_backward": (_ln_backward, [t(R, H), t(H), t(R, H)]),
        "gnn": (lambda x, e, s, d: torch.zeros_like(x).index_add(0, d, F.relu(x[s] + e)),
                [t(nodes, feat), t(edges, feat), torch.zeros(edges, dtype=i64),
                 torch.zeros(edges, dtype=i64)]),
        "column_sum": (lambda x: x.sum(0), [t(R, H)]),
    }


def groups_of(fn, inputs, target: str):
    prog = import_model(Fn(fn), tuple(inputs))
    PassManager.parse(PIPELINE).run(prog.module, PassContext(target=target))
    return [op for op in prog.module.walk() if isinstance(op, fusion.GroupOp) and op.kind != "view"]


def _compile_all(names, arch: int) -> list[dict]:
    reports = []
    for name in names:
        fn, inputs = gpu_patterns()[name]
        for group in groups_of(fn, inputs, f"sm_{arch}"):
            src, builds, note = triton_build.build_group(group, arch, group.kind)
            assert not note, note  # nothing had to be re-rendered
            for b in builds:
                assert b.ptx_path.read_text().startswith("//") and b.cubin_path.stat().st_size
                reports.append({"pattern": name, **b.report})
    return reports


def test_pattern_set_compiles_for_sm80_without_spills():
    reports = _compile_all(list(gpu_patterns()), 80)
    assert {r["pattern"] for r in reports} == set(gpu_patterns())
    spilled = [r for r in reports if r["spill_bytes"]]
    assert not spilled, spilled
    assert all(0 < r["registers"] <= 255 and r["num_warps"] in (1, 2, 4, 8, 16, 32)
               for r in reports)


def test_sm90_and_cache_hits():
    names = ["layernorm", "gnn"]
    _compile_all(names, 90)
    before = triton_build.stats()
    reports = _compile_all(names, 90)  # rendered again: the same source, nothing compiled
    after = triton_build.stats()
    assert after["compiled"] == before["compiled"]
    assert after["cache_hits"] - before["cache_hits"] == len(reports)
    assert all(r["arch"] == "sm_90" and not r["spill_bytes"] for r in reports)


def test_cli_emit_kernels(tmp_path, capsys):
    """stitchc compile --emit kernels on a GPU target: per-kernel source, PTX, cubin, report."""
    from runtime.triton_build import emit_kernels

    fn, inputs = gpu_patterns()["layernorm_backward"]
    prog = import_model(Fn(fn), tuple(inputs))
    PassManager.parse(PIPELINE).run(prog.module, PassContext(target="sm_80"))
    rows = emit_kernels(prog.module, "sm_80", tmp_path)
    # the row statistics and dx; the column sums (dw, db) split over programs, then combined
    whats = [r["what"] for r in rows]
    assert any(w.startswith("column_tiles") and "partials" in w for w in whats), whats
    assert any(w.startswith("column_tiles") and "combine" in w for w in whats), whats
    files = {p.suffix for p in tmp_path.iterdir()}
    assert {".py", ".ptx", ".cubin", ".json"} <= files
    assert json.loads((tmp_path / "kernels.json").read_text())[0]["spill_bytes"] == 0


# -- every workload (slow) -----------------------------------------------------------------------


@slow
@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_workload_kernels_compile(arch):
    import models
    from runtime.cli import compile_model, pipeline_for

    for name in models.names():
        _, prog, _, _ = compile_model(name, pipeline_for("stitch"), f"sm_{arch}")
        rows = triton_build.emit_kernels(prog.module, f"sm_{arch}",
                                         triton_build.triton_dir() / f"emit-{name}")
        assert rows and not [r for r in rows if "unsupported" in r], (name, rows)


@slow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["molcpt", "adder_quant", "visual_lexical", "bert", "rffs_net",
                                  "charformer", "rcrn", "rzcr", "attention_round"])
def test_workload_kernels_interpreted(name):
    import models
    from runtime.gpu_graph import compile_gpu_program

    w = models.get(name)
    prog = import_model(w.model, w.example_inputs)
    g = compile_gpu_program(prog, "sm_80", interpret=True)
    assert not g.fallbacks, g.fallbacks
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(w.model(*w.example_inputs))
    got = g(*w.example_inputs)
    for a, b in zip(got, want):
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a, b, atol=1e-4 * scale, rtol=1e-4, equal_nan=True)
