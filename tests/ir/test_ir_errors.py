"""Every user-facing IR error: the verifier names the op and the problem, the parser names
file:line:col, and the parser never evaluates its input as code."""

from __future__ import annotations

import pytest

from stitch_ir.core import Builder, FuncOp, Module, ReturnOp, VerifyError
from stitch_ir.dialects import fusion, st
from stitch_ir.parser import ParseError, parse_module
from stitch_ir.types import DType, TensorType
from stitch_ir.verifier import verify

F32 = "tensor<4x8xf32>"


def module(body: str, args: str = f"%arg0: {F32}", results: str = F32) -> str:
    return f"module {{\n  func.func @forward({args}) -> ({results}) {{\n{body}\n  }}\n}}\n"


# (body, expected message fragment) -- each parses, and the verifier rejects it.
VERIFY_CASES = [
    (f'    %0 = "st.add"(%arg0) : ({F32}) -> {F32}\n    "func.return"(%0) : ({F32}) -> ()',
     "'st.add' op expects 2 operands, got 1"),
    (f'    %0 = "st.exp"(%arg0) : ({F32}) -> tensor<4x9xf32>\n'
     f'    "func.return"(%arg0) : ({F32}) -> ()',
     "result types (tensor<4x9xf32>) do not match the inferred (tensor<4x8xf32>)"),
    (f'    %0 = "st.sum"(%arg0) {{dims = [2], keepdim = false}} : ({F32}) -> tensor<4xf32>\n'
     f'    "func.return"(%arg0) : ({F32}) -> ()',
     "reduction dim 2 out of range for rank 2"),
    (f'    %0 = "st.sum"(%arg0) {{keepdim = false}} : ({F32}) -> tensor<4xf32>\n'
     f'    "func.return"(%arg0) : ({F32}) -> ()',
     "'st.sum' op requires attribute 'dims'"),
    (f'    %0 = "st.exp"(%arg0) {{color = "red"}} : ({F32}) -> {F32}\n'
     f'    "func.return"(%0) : ({F32}) -> ()',
     "has unknown attribute 'color'"),
    (f'    %0 = "st.reshape"(%arg0) {{shape = [5, 7]}} : ({F32}) -> tensor<5x7xf32>\n'
     f'    "func.return"(%arg0) : ({F32}) -> ()',
     "cannot reshape 32 elements to shape [5, 7]"),
    (f'    %0 = "st.permute"(%arg0) {{perm = [0, 0]}} : ({F32}) -> {F32}\n'
     f'    "func.return"(%0) : ({F32}) -> ()',
     "is not a permutation"),
    (f'    %0 = "st.exp"(%arg0) : ({F32}) -> {F32}\n'
     '    %1 = "st.cast"(%0) {dtype = i64} : (tensor<4x8xf32>) -> tensor<4x8xi64>\n'
     '    %2 = "st.exp"(%1) : (tensor<4x8xi64>) -> tensor<4x8xi64>\n'
     '    "func.return"(%0) : (tensor<4x8xf32>) -> ()',
     "operand element type i64 is not allowed (expects float)"),
    (f'    %0 = "st.index_select"(%arg0, %arg0) {{dim = 0}} : ({F32}, {F32}) -> {F32}\n'
     f'    "func.return"(%0) : ({F32}) -> ()',
     "index must be an integer tensor"),
    (f'    %0 = "st.broadcast"(%arg0) {{shape = [4, 9]}} : ({F32}) -> tensor<4x9xf32>\n'
     f'    "func.return"(%arg0) : ({F32}) -> ()',
     "dim 1 of size 8 cannot broadcast to 9"),
    (f'    %0 = "st.torch_call"(%arg0) {{args = "{{not json", target = "aten.sort.default"}}'
     f' : ({F32}) -> {F32}\n    "func.return"(%0) : ({F32}) -> ()',
     "'args' is not valid JSON"),
    (f'    "func.return"(%arg0) : ({F32}) -> ()\n    %0 = "st.exp"(%arg0) : ({F32}) -> {F32}',
     "does not end in"),
]


@pytest.mark.parametrize("body,message", VERIFY_CASES)
def test_verifier_rejects(body, message):
    text = module(body)
    try:
        m = parse_module(text, "case.sir")
    except ParseError as e:  # the last case is caught by the parser already
        assert message in str(e)
        return
    with pytest.raises(VerifyError) as err:
        verify(m)
    assert message in str(err.value)
    assert "case.sir:" in str(err.value), "verifier errors carry the op's location"


def test_verifier_rejects_value_from_outside_group():
    t = TensorType((3,), DType.f32)
    f = FuncOp.create("forward", [t])
    b = Builder(f.body)
    g = fusion.GroupOp.create([f.args[0]], [t], kind="loop")
    gb = Builder(g.body)
    leaked = gb.create(st.ExpOp, f.args[0])  # uses the function argument, not the block arg
    gb.insert(fusion.YieldOp([leaked]))
    b.insert(g)
    b.insert(ReturnOp([g.result]))
    with pytest.raises(VerifyError, match="defined outside its 'fusion.group'"):
        verify(Module([f]))


def test_verifier_rejects_use_before_def():
    t = TensorType((3,), DType.f32)
    f = FuncOp.create("forward", [t])
    b = Builder(f.body)
    e = b.create(st.ExpOp, f.args[0])
    n = b.create(st.NegOp, e)
    b.insert(ReturnOp([n]))
    body = f.body.ops
    body[0], body[1] = body[1], body[0]
    with pytest.raises(VerifyError, match="'st.neg' op operand #0 .* used before it is defined"):
        verify(Module([f]))


def test_verifier_group_yield_types():
    t = TensorType((3,), DType.f32)
    f = FuncOp.create("forward", [t])
    b = Builder(f.body)
    g = fusion.GroupOp.create([f.args[0]], [t.with_dtype(DType.f16)], kind="loop")
    gb = Builder(g.body)
    gb.insert(fusion.YieldOp([gb.create(st.ExpOp, g.body.args[0])]))
    b.insert(g)
    b.insert(ReturnOp([g.result]))
    with pytest.raises(VerifyError, match="'fusion.yield' operand types must equal"):
        verify(Module([f]))


# (text, expected "line:col: message")
PARSE_CASES = [
    ("module {\n  func.func @f() -> () {\n    %0 = \"st.nope\"() : () -> tensor<f32>\n",
     "3:10: unknown op 'st.nope'"),
    (module(f'    %0 = "st.exp"(%missing) : ({F32}) -> {F32}\n    "func.return"(%0) : ({F32}) -> ()'),
     "3:19: use of undefined value %missing"),
    (module(f'    %0 = "st.exp"(%arg0) : ({F32}) -> {F32}\n'
            f'    %0 = "st.exp"(%arg0) : ({F32}) -> {F32}\n    "func.return"(%0) : ({F32}) -> ()'),
     "4:5: redefinition of value %0"),
    (module('    %0 = "st.exp"(%arg0) : (tensor<4x8xq7>) -> tensor<4x8xf32>'),
     "3:29: invalid type tensor<4x8xq7>: unknown element type 'q7'"),
    (module(f'    %0 = "st.exp"(%arg0) : (tensor<4x9xf32>) -> {F32}'),
     "3:28: 'st.exp' operand #0 has type tensor<4x8xf32> but is annotated tensor<4x9xf32>"),
    (module(f'    %0 = "st.exp"(%arg0) {{x = 1, x = 2}} : ({F32}) -> {F32}'),
     "3:34: duplicate attribute 'x'"),
    (module(f'    %0 = "st.exp"(%arg0) {{x = os.system}} : ({F32}) -> {F32}'),
     "3:31: unknown attribute value 'os.system'"),
    ("module {\n  func.func @f() -> () {\n    \"func.return\"() : () -> ()\n  }\n} trailing",
     "5:3: unexpected 'trailing' after the module"),
    ("module {\n  func.func @f() -> () {\n    \"func.return\"() : () -> ()\n  }\n",
     "5:1: expected '}', found 'end of input'"),
    ("module {\n  func.func @f() -> (tensor<f32>) {\n    \"func.return\"() : () -> ()\n  }\n}",
     "2:21: function @f returns () but its signature says (tensor<f32>)"),
    ("module { $ }", "1:10: unexpected character '$'"),
    (module('    %0 = "st.constant"() {value = dense<"0x00"> : tensor<2xf32>} : () -> '
            'tensor<2xf32>'),
     "dense data has 1 bytes, which does not fit tensor<2xf32>"),
    (module(f'    %0 = "st.exp"(%arg0) {{s = "bad \\q escape"}} : ({F32}) -> {F32}'),
     "3:31: unknown escape '\\q' in string"),
]


@pytest.mark.parametrize("text,message", PARSE_CASES)
def test_parser_reports_line_and_column(text, message):
    with pytest.raises(ParseError) as err:
        parse_module(text, "in.sir")
    assert str(err.value).startswith("in.sir:"), str(err.value)
    assert message in str(err.value), str(err.value)


def test_parser_never_evaluates_input(tmp_path, monkeypatch):
    """Strings that look like code stay strings; nothing is executed or imported."""
    import builtins

    def boom(*a, **k):
        raise AssertionError("the parser evaluated input")

    sentinel = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {sentinel}')"
    text = module(
        f'    %0 = "st.torch_call"(%arg0) {{args = "{{\\"args\\": [{{\\"operand\\": 0}}]}}", '
        f'note = "{payload}", target = "aten.clone.default"}} : ({F32}) -> {F32}\n'
        f'    "func.return"(%0) : ({F32}) -> ()')
    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    m = parse_module(text)
    call = m.func().body.ops[0]
    assert call.attributes["note"] == payload
    assert not sentinel.exists()
    for bad in ("1 + 1", "[1, 2][0]", "(lambda: 0)()"):
        with pytest.raises(ParseError):
            parse_module(module(f'    %0 = "st.exp"(%arg0) {{x = {bad}}} : ({F32}) -> {F32}'))


def test_torch_call_target_is_looked_up_not_evaluated():
    from stitch_ir.interpreter import InterpreterError, resolve_torch_op

    assert resolve_torch_op("aten.sort.default") is not None
    for bad in ("aten.sort.default()", "__import__('os')", "aten.no_such_op.default"):
        with pytest.raises(InterpreterError):
            resolve_torch_op(bad)
