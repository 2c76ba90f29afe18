"""The pass manager (pipelines from strings, verification after each pass, dumps, timings) and
the semantic safety of canonicalize / cse / dce on the bert workload."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest

from passes import Pass, PassContext, PassManager, parse_pipeline
from passes.canonicalize import CanonicalizePass, CSEPass, DCEPass
from passes.classify import MEMORY_INTENSIVE, classify, summarize
from passes.pass_manager import PipelineError
from stitch_ir.core import Builder, FuncOp, Module, ReturnOp, VerifyError
from stitch_ir.dialects import st
from stitch_ir.parser import parse_module
from stitch_ir.types import DType, TensorType


def small_module() -> Module:
    return parse_module("""module {
  func.func @f(%arg0: tensor<3x4xf32>) -> (tensor<3x1xf32>) {
    %0 = "st.exp"(%arg0) : (tensor<3x4xf32>) -> tensor<3x4xf32>
    %1 = "st.exp"(%arg0) : (tensor<3x4xf32>) -> tensor<3x4xf32>
    %2 = "st.add"(%0, %1) : (tensor<3x4xf32>, tensor<3x4xf32>) -> tensor<3x4xf32>
    %3 = "st.sum"(%2) {dims = [1], keepdim = true} : (tensor<3x4xf32>) -> tensor<3x1xf32>
    "func.return"(%3) : (tensor<3x1xf32>) -> ()
  }
}""")


def test_pipeline_parsing_with_options():
    ps = parse_pipeline("canonicalize{max_rounds=3},cse, dce")
    assert [p.name for p in ps] == ["canonicalize", "cse", "dce"]
    assert ps[0] == CanonicalizePass(max_rounds=3)
    assert parse_pipeline("") == []


@pytest.mark.parametrize("text,message", [
    ("canonicalise", "unknown pass 'canonicalise'"),
    ("cse{depth=2}", "pass 'cse' has no option 'depth'"),
    ("canonicalize{max_rounds=many}", "needs a number"),
    ("canonicalize{max_rounds}", "must be key=value"),
    ("cse,,dce", "cannot parse pipeline at column 5"),
])
def test_pipeline_errors(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


def test_print_ir_after_all_and_time_passes():
    out = io.StringIO()
    PassManager.parse("cse,dce", print_ir_after_all=True, time_passes=True, out=out).run(
        small_module())
    text = out.getvalue()
    assert "IR Dump After cse" in text and "IR Dump After dce" in text
    assert "Pass execution timing report" in text
    assert text.count('"st.exp"') == 2  # one after cse, one after dce


def test_verifier_runs_after_every_pass():
    @dataclass(frozen=True)
    class BreakIt(Pass):
        name = "test-break-it"

        def run(self, module, ctx):
            # Corrupt the IR: a result type that no longer matches its op.
            op = module.func().body.ops[0]
            op.results[0].type = TensorType((9,), DType.f32)

    with pytest.raises(VerifyError, match="after pass 'test-break-it'"):
        PassManager([BreakIt()]).run(small_module())


def test_cse_then_dce_counts():
    m = small_module()
    ctx = PassManager.parse("cse,dce").run(m)
    assert ctx.stats["cse.removed"] == 1
    ops = [op.name for op in m.func().body.ops]
    assert ops == ["st.exp", "st.add", "st.sum", "func.return"]


def test_classify_every_st_op_has_a_class():
    from stitch_ir.core import OP_REGISTRY

    for name, cls in OP_REGISTRY.items():
        if name.startswith("st."):
            assert getattr(cls, "kind", "") in st.ALL_KINDS, name


def test_summary_counts_classes():
    t = TensorType((2, 3), DType.f32)
    f = FuncOp.create("f", [t])
    b = Builder(f.body)
    e = b.create(st.ExpOp, f.args[0])
    r = b.create(st.SumOp, e, dims=(1,), keepdim=False)
    p = b.create(st.PermuteOp, e, perm=(1, 0))
    b.insert(ReturnOp([r, p]))
    s = summarize(Module([f]))
    assert (s.counts["element-wise"], s.counts["reduce"], s.counts["layout"]) == (1, 1, 1)
    assert s.memory_intensive == 3
    assert {classify(op) for op in f.body.ops[:-1]} <= set(MEMORY_INTENSIVE)


def test_canonicalize_cse_dce_keep_bert_semantics():
    import models
    from stitch_ir.importer import import_model

    w = models.get("bert")
    prog = import_model(w.model, w.example_inputs)
    before = prog.run(*w.example_inputs)
    n_before = sum(1 for _ in prog.module.walk())
    ctx = PassContext()
    for p in (CanonicalizePass(), CSEPass(), DCEPass()):
        PassManager([p]).run(prog.module, ctx)
    after = prog.run(*w.example_inputs)
    assert sum(1 for _ in prog.module.walk()) < n_before
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_dce_masks_outputs_nothing_reads():
    """convolution_backward traced with output_mask [True, True, True] whose input gradient
    nobody reads (the first layer's, in a training graph) is asked for the other two only; the
    interpreter still agrees with torch."""
    import json

    import torch

    from stitch_ir.importer import import_model

    class M(torch.nn.Module):
        def forward(self, dy, x, w):
            out = torch.ops.aten.convolution_backward(dy, x, w, [4], [1, 1], [1, 1], [1, 1],
                                                      False, [0, 0], 1, [True, True, True])
            return out[1] * 2, out[2]

    torch.manual_seed(0)
    args = (torch.randn(2, 4, 5, 7), torch.randn(2, 3, 5, 7), torch.randn(4, 3, 3, 3))
    prog = import_model(M(), args)
    ctx = PassManager.parse("dce").run(prog.module)
    (call,) = [op for op in prog.module.walk() if op.name == "st.torch_call"]
    assert json.loads(call.attributes["args"])["args"][10] == [False, True, True]
    assert list(call.attributes["outputs"]) == [1, 2] and len(call.results) == 2
    assert ctx.stats["dce.masked-outputs"] == 1
    want = M()(*args)
    for got, w in zip(prog.run(*args), want):
        np.testing.assert_allclose(got, w.numpy(), rtol=1e-4, atol=1e-4)
