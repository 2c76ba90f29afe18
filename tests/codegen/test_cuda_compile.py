"""nvcc's compile of the sm_80 / sm_90 CUDA C kernels, without a GPU: cubin, PTX and the ptxas
resource report (registers, spills, shared memory) at the pattern set's GPU sizes, with no
spills; layernorm backward at a size whose blocks fit one wave is one cooperative kernel with
a grid barrier; a second build is a cache hit. Every pattern and every workload's CUDA C
groups for both targets, and every workload run with CUDA C groups in the cpu emulation
against eager: slow (STITCH_SLOW=1)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from passes import PassContext, PassManager
from runtime import cuda_build
from stitch_ir.dialects import fusion
from stitch_ir.importer import import_model

PIPELINE = "canonicalize,cse,dce,sink-broadcasts,fusion-plan{planner=stitch},fusion-apply," \
           "stitch-schedule{gpu_codegen=cuda}"
slow = pytest.mark.skipif(not os.environ.get("STITCH_SLOW"), reason="slow: set STITCH_SLOW=1")
needs_nvcc = pytest.mark.skipif(not (shutil.which("nvcc") or os.environ.get("NVCC")),
                                reason="nvcc is not installed")


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
    R, H, F2 = 8192, 1024, 2048

    def t(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype)

    return {
        "layernorm": (_ln, [t(R, H), t(H), t(H)]),
        "softmax": (lambda x: torch.softmax(x * 0.125, -1), [t(R, H)]),
        "bias_gelu": (lambda x, b: F.gelu(x + b), [t(R, F2), t(F2)]),
        "bias_residual_layernorm": (lambda y, b, r, w, beta: _ln(y + b + r, w, beta),
                                    [t(R, H), t(H), t(R, H), t(H), t(H)]),
        "rmsnorm": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
                    [t(R, H), t(H)]),
        # 1024 rows: the row and column phases' blocks fit one wave -> global stitching
        "layernorm_backward": (_ln_backward, [t(1024, H), t(H), t(1024, H)]),
        "layernorm_backward_8192": (_ln_backward, [t(R, H), t(H), t(R, H)]),
        "long_rows": (lambda x: torch.softmax(x, -1), [t(4, 65536)]),
        "column_sum": (lambda x: x.sum(0), [t(R, H)]),
        "half_layernorm": (_ln, [t(R, H, dtype=torch.float16), t(H, dtype=torch.float16),
                                 t(H, dtype=torch.float16)]),
    }


def groups_of(fn, inputs, target: str):
    prog = import_model(Fn(fn), tuple(inputs))
    PassManager.parse(PIPELINE).run(prog.module, PassContext(target=target))
    return [op for op in prog.module.walk() if isinstance(op, fusion.GroupOp) and op.kind != "view"]


def _compile(names, arch: int) -> list[dict]:
    reports = []
    for name in names:
        fn, inputs = gpu_patterns()[name]
        for group in groups_of(fn, inputs, f"sm_{arch}"):
            src, builds, note = cuda_build.build_group(group, arch, group.kind)
            # nothing had to be re-rendered, but for registers traded for one wave
            assert not note or "exceed one wave" in note and "split" not in note, note
            for b in builds:
                assert b.ptx_path.read_text().lstrip().startswith("//")
                assert b.cubin_path.stat().st_size
                reports.append({"pattern": name, "stitch": src.stitch, **b.report})
    return reports


_PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k0_stitched' for 'sm_80'
ptxas info    : Function properties for k0_stitched
    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'k1_elementwise' for 'sm_80'
ptxas info    : Function properties for k1_elementwise
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 21 registers, used 0 barriers, 376 bytes cmem[0]
"""


def test_parse_ptxas_report():
    got = cuda_build.parse_ptxas(_PTXAS)
    assert got["k0_stitched"] == {"registers": 40, "spill_stores": 4, "spill_loads": 8,
                                  "stack": 8, "smem": 1024, "barriers": 1}
    assert got["k1_elementwise"]["registers"] == 21 and got["k1_elementwise"]["smem"] == 0


@needs_nvcc
def test_pattern_set_compiles_for_sm80_without_spills():
    reports = _compile(["layernorm", "softmax", "layernorm_backward", "column_sum"], 80)
    assert not [r for r in reports if r["spill_bytes"]]
    assert all(0 < r["registers"] <= 255 and r["threads"] % 32 == 0 for r in reports)
    coop = [r for r in reports if r["cooperative"]]
    assert coop and all(r["pattern"] == "layernorm_backward" or r["pattern"] == "column_sum"
                        for r in coop)
    lnb = [r for r in coop if r["pattern"] == "layernorm_backward"]
    assert lnb and lnb[0]["grid_syncs"] >= 1 and lnb[0]["stitch"] == "global"


@needs_nvcc
def test_sm90_and_cache_hits():
    _compile(["layernorm"], 90)
    before = cuda_build.stats()
    reports = _compile(["layernorm"], 90)
    after = cuda_build.stats()
    assert after["compiled"] == before["compiled"]
    assert after["cache_hits"] - before["cache_hits"] == len({r["kernel"] for r in reports}) >= 1
    assert all(r["arch"] == "sm_90" for r in reports)


@needs_nvcc
def test_cli_emit_cuda_kernels(tmp_path):
    """stitchc compile --gpu-codegen cuda --emit kernels: .cu (with its headers), PTX, cubin and
    a report row per kernel; the globally stitched kernel is a cooperative launch."""
    fn, inputs = gpu_patterns()["layernorm_backward"]
    prog = import_model(Fn(fn), tuple(inputs))
    PassManager.parse(PIPELINE).run(prog.module, PassContext(target="sm_80"))
    rows = cuda_build.emit_cuda_kernels(prog.module, "sm_80", tmp_path)
    files = {p.suffix for p in tmp_path.iterdir()}
    assert {".cu", ".ptx", ".cubin", ".h"} <= files
    glob = [r for r in rows if r.get("cooperative")]
    # the row phase -> the column partials -> their combination: two grid barriers
    assert glob and glob[0]["grid_syncs"] == 2 and glob[0]["spill_bytes"] == 0
    cu = next(p for p in tmp_path.iterdir() if p.suffix == ".cu").read_text()
    assert cu.count("grid.sync();") == 2 and "st_warp_allreduce(" in cu


# -- everything (slow) ---------------------------------------------------------------------------


@slow
@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("arch", [80, 90])
def test_every_pattern_compiles(arch):
    reports = _compile(list(gpu_patterns()), arch)
    assert not [r for r in reports if r["spill_bytes"]], reports


@slow
@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("arch", [80, 90])
def test_workload_cuda_kernels_compile(arch):
    import models
    from runtime.cli import compile_model, pipeline_for

    for name in models.names():
        _, prog, _, _ = compile_model(name, pipeline_for("stitch", "cuda"), f"sm_{arch}")
        rows = cuda_build.emit_cuda_kernels(prog.module, f"sm_{arch}",
                                            cuda_build.cuda_dir() / f"emit-{name}")
        built = [r for r in rows if "kernel" in r]
        assert built, (name, rows)
        print(name, f"sm_{arch}", len(built), "kernels,",
              sum(1 for r in built if r["cooperative"]), "cooperative,",
              "max registers", max(r["registers"] for r in built),
              "spilling", [r["kernel"] for r in built if r["spill_bytes"]],
              "fallbacks", [r["fallback"] for r in rows if "fallback" in r])


@slow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["molcpt", "adder_quant", "visual_lexical", "bert", "rffs_net",
                                  "charformer", "rcrn", "rzcr", pytest.param(
                                      "attention_round", marks=pytest.mark.xfail(
                                          reason="quantises (round): libm's exp / erf an ulp "
                                          "off torch's flip a rounding; 9.3e-3 off eager "
                                          "(inductor: 8.7e-3), not within 1e-4"))])
def test_workload_cuda_kernels_emulated(name):
    """Every workload with every group it can given to CUDA C, run in the emulation."""
    import models
    from runtime.gpu_graph import compile_gpu_program

    w = models.get(name)
    prog = import_model(w.model, w.example_inputs)
    g = compile_gpu_program(prog, "sm_80", interpret=True, gpu_codegen="cuda")
    assert not g.fallbacks, g.fallbacks
    print(name, len(g.cuda_sources), "CUDA C groups,", len(g.triton_sources), "Triton groups;",
          "CUDA C fallbacks:", g.cuda_fallbacks)
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(w.model(*w.example_inputs))
    got = g(*w.example_inputs)
    for a, b in zip(got, want):
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a, b, atol=1e-4 * scale, rtol=1e-4, equal_nan=True)
