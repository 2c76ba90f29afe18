"""The ``stitchc`` command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stitch_ir.parser import parse_module
from stitch_ir.verifier import verify

BIN = Path(sys.executable).parent


def stitchc(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "stitchc"), *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_compile_bert_writes_parsable_module(tmp_path):
    out = tmp_path / "OUT"
    r = stitchc("compile", "--model", "bert", "--target", "cpu", "--emit", "ir", "-o", str(out))
    assert r.returncode == 0, r.stderr
    m = parse_module((out / "module.sir").read_text(), "module.sir")
    verify(m)
    for cls in ("element-wise", "broadcast", "reduce", "layout", "gather/scatter", "library",
                "torch-call"):
        assert cls in r.stdout
    assert "torch-call ops: 0" in r.stdout
    assert "st.torch_call" not in (out / "module.sir").read_text()


def test_models_lists_all_nine():
    import models

    r = stitchc("models", "--fast")
    assert r.returncode == 0, r.stderr
    for name in models.names():
        assert name in r.stdout


def test_opt_reports_parse_errors_with_location(tmp_path):
    bad = tmp_path / "bad.sir"
    bad.write_text("module {\n  func.func @f() -> () {\n    %0 = \"st.nope\"() : () -> tensor<f32>\n")
    r = stitchc("opt", str(bad))
    assert r.returncode == 1
    assert f"{bad}:3:10: unknown op 'st.nope'" in r.stderr


def test_opt_reads_stdin_and_runs_pipeline():
    text = """module {
  func.func @f(%arg0: tensor<3xf32>) -> (tensor<3xf32>) {
    %0 = "st.reshape"(%arg0) {shape = [3]} : (tensor<3xf32>) -> tensor<3xf32>
    "func.return"(%0) : (tensor<3xf32>) -> ()
  }
}"""
    r = stitchc("opt", "-", "-p", "canonicalize", stdin=text)
    assert r.returncode == 0, r.stderr
    assert "st.reshape" not in r.stdout and '"func.return"(%arg0)' in r.stdout


def test_unknown_model_is_a_clear_error(tmp_path):
    r = stitchc("compile", "--model", "gpt5", "-o", str(tmp_path))
    assert r.returncode == 1
    assert "unknown workload 'gpt5'" in r.stderr


def test_unknown_pass_is_a_clear_error():
    r = stitchc("opt", "-", "-p", "fuse-everything", stdin="module {\n}\n")
    assert r.returncode == 1 and "unknown pass 'fuse-everything'" in r.stderr
