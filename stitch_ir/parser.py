"""Parser for the generic textual form written by ``printer``.

A hand-written lexer and recursive-descent parser. It never evaluates input as code: numbers go
through ``int``/``float``, strings through an explicit escape table, and op names are looked up
in the op registry. Every error is a ``ParseError`` whose message starts ``file:line:col:``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stitch_ir import dialects  # noqa: F401 - registers the dialects' ops
from stitch_ir.core import (
    OP_REGISTRY,
    Block,
    BlockArgument,
    DenseAttr,
    FuncOp,
    IRError,
    Module,
    Operation,
    Region,
    Value,
)
from stitch_ir.types import DType, Sym, TensorType


class ParseError(IRError):
    pass


@dataclass
class Token:
    kind: str  # value, symbol, block, string, number, type, dense, word, punct, eof
    text: str
    line: int
    col: int


_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r]+|//[^\n]*)
  | (?P<nl>\n)
  | (?P<type>tensor<[^>\n]*>)
  | (?P<value>%[A-Za-z0-9_.$#-]+)
  | (?P<symbol>@[A-Za-z_][A-Za-z0-9_.$-]*)
  | (?P<sym>\?(?:[0-9]+\*)?[A-Za-wyz_][A-Za-wyz0-9_]*(?:\*[A-Za-wyz_][A-Za-wyz0-9_]*)*)
  | (?P<block>\^[A-Za-z0-9_]+)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<arrow>->)
  | (?P<number>-?(?:inf\b|nan\b|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?))
  | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[(){}\[\],:=<>])
    """,
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


def tokenize(text: str, filename: str) -> list[Token]:
    toks: list[Token] = []
    line, line_start, pos = 1, 0, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        col = pos - line_start + 1
        if m is None:
            raise ParseError(f"{filename}:{line}:{col}: unexpected character {text[pos]!r}")
        kind = m.lastgroup
        if kind == "nl":
            line += 1
            line_start = m.end()
        elif kind != "ws":
            toks.append(Token("punct" if kind == "arrow" else kind, m.group(), line, col))
        pos = m.end()
    toks.append(Token("eof", "", line, pos - line_start + 1))
    return toks


def parse_sym(text: str) -> Sym:
    """``s0``, ``128*s0``, ``s0*s1``, ``4*s1*s1``."""
    parts = text.split("*")
    coef = int(parts[0]) if parts[0].isdigit() else 1
    return Sym(tuple(p for p in parts if not p.isdigit()), coef)


def parse_type_text(text: str) -> TensorType:
    """Parse the inside of ``tensor<...>``; raises ValueError with the problem."""
    parts = text.split("x")
    try:
        dtype = DType(parts[-1])
    except ValueError:
        raise ValueError(f"unknown element type {parts[-1]!r}") from None
    dims: list[int | Sym] = []
    for p in parts[:-1]:
        if p.startswith("?"):
            dims.append(parse_sym(p[1:]))
        elif p.isdigit():
            dims.append(int(p))
        else:
            raise ValueError(f"bad dimension {p!r}")
    return TensorType(tuple(dims), dtype)


class Parser:
    def __init__(self, text: str, filename: str = "<string>"):
        self.filename = filename
        self.toks = tokenize(text, filename)
        self.i = 0
        self.scopes: list[dict[str, Value]] = []

    # -- token helpers -----------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def loc(self, t: Token | None = None) -> str:
        t = t or self.tok
        return f"{self.filename}:{t.line}:{t.col}"

    def fail(self, msg: str, t: Token | None = None) -> ParseError:
        return ParseError(f"{self.loc(t)}: {msg}")

    def next(self) -> Token:
        t = self.tok
        self.i += 1
        return t

    def at(self, text: str) -> bool:
        return self.tok.text == text and self.tok.kind in ("punct", "word")

    def accept(self, text: str) -> bool:
        if self.at(text):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> Token:
        if not self.at(text):
            shown = self.tok.text or "end of input"
            raise self.fail(f"expected '{text}', found '{shown}'")
        return self.next()

    def expect_kind(self, kind: str, what: str) -> Token:
        if self.tok.kind != kind:
            shown = self.tok.text or "end of input"
            raise self.fail(f"expected {what}, found '{shown}'")
        return self.next()

    # -- values --------------------------------------------------------------------------------
    def lookup(self, t: Token) -> Value:
        for scope in reversed(self.scopes):
            if t.text in scope:
                return scope[t.text]
        raise self.fail(f"use of undefined value {t.text}", t)

    def define(self, t: Token, v: Value) -> None:
        if any(t.text in s for s in self.scopes):
            raise self.fail(f"redefinition of value {t.text}", t)
        self.scopes[-1][t.text] = v

    # -- types and attributes ----------------------------------------------------------------
    def parse_type(self) -> TensorType:
        t = self.expect_kind("type", "a tensor type")
        try:
            return parse_type_text(t.text[len("tensor<"):-1])
        except (ValueError, TypeError) as e:
            raise self.fail(f"invalid type {t.text}: {e}", t) from None

    def parse_type_list(self) -> list[TensorType]:
        self.expect("(")
        types: list[TensorType] = []
        if not self.at(")"):
            types.append(self.parse_type())
            while self.accept(","):
                types.append(self.parse_type())
        self.expect(")")
        return types

    def parse_string(self, t: Token) -> str:
        body, out, k = t.text[1:-1], [], 0
        while k < len(body):
            c = body[k]
            if c == "\\":
                esc = body[k + 1]
                if esc not in _ESCAPES:
                    raise self.fail(f"unknown escape '\\{esc}' in string", t)
                out.append(_ESCAPES[esc])
                k += 2
            else:
                out.append(c)
                k += 1
        return "".join(out)

    def parse_attr(self):
        t = self.tok
        if t.kind == "number":
            self.next()
            if t.text in ("inf", "-inf", "nan") or any(c in t.text for c in ".eE"):
                return float(t.text)
            return int(t.text)
        if t.kind == "string":
            self.next()
            return self.parse_string(t)
        if t.kind == "type":
            return self.parse_type()
        if t.kind == "sym":
            self.next()
            return parse_sym(t.text[1:])
        if self.accept("["):
            items = []
            if not self.at("]"):
                items.append(self.parse_attr())
                while self.accept(","):
                    items.append(self.parse_attr())
            self.expect("]")
            return tuple(items)
        if t.kind == "word":
            self.next()
            if t.text in ("true", "false"):
                return t.text == "true"
            if t.text == "none":
                return None
            if t.text == "dense":
                return self.parse_dense()
            try:
                return DType(t.text)
            except ValueError:
                raise self.fail(f"unknown attribute value '{t.text}'", t) from None
        raise self.fail(f"expected an attribute value, found '{t.text or 'end of input'}'")

    def parse_dense(self) -> DenseAttr:
        self.expect("<")
        s = self.expect_kind("string", 'a hex string "0x..."')
        hexdata = self.parse_string(s)
        self.expect(">")
        self.expect(":")
        ty = self.parse_type()
        if not re.fullmatch(r"0x([0-9A-Fa-f]{2})*", hexdata):
            raise self.fail("dense data must be a hex string like \"0x0A1B\"", s)
        data = bytes.fromhex(hexdata[2:])
        if not ty.is_static or len(data) != ty.numel() * ty.dtype.itemsize:
            raise self.fail(f"dense data has {len(data)} bytes, which does not fit {ty}", s)
        return DenseAttr(ty, data)

    def parse_attr_dict(self) -> dict:
        attrs: dict = {}
        self.expect("{")
        if not self.at("}"):
            while True:
                key = self.expect_kind("word", "an attribute name")
                if key.text in attrs:
                    raise self.fail(f"duplicate attribute '{key.text}'", key)
                self.expect("=")
                attrs[key.text] = self.parse_attr()
                if not self.accept(","):
                    break
        self.expect("}")
        return attrs

    # -- structure -----------------------------------------------------------------------------
    def parse_module(self) -> Module:
        self.expect("module")
        self.expect("{")
        m = Module()
        while not self.at("}"):
            start = self.tok
            if start.kind == "eof":
                raise self.fail("expected '}', found 'end of input'")
            f = self.parse_func()
            if any(g.sym_name == f.sym_name for g in m.funcs):
                raise self.fail(f"function @{f.sym_name} defined twice", start)
            m.add(f)
        self.expect("}")
        if self.tok.kind != "eof":
            raise self.fail(f"unexpected '{self.tok.text}' after the module")
        return m

    def parse_func(self) -> FuncOp:
        start = self.expect("func.func")
        name = self.expect_kind("symbol", "a function name '@name'").text[1:]
        self.expect("(")
        arg_toks: list[tuple[Token, TensorType]] = []
        if not self.at(")"):
            while True:
                vt = self.expect_kind("value", "an argument name '%name'")
                self.expect(":")
                arg_toks.append((vt, self.parse_type()))
                if not self.accept(","):
                    break
        self.expect(")")
        self.expect("->")
        out_types_tok = self.tok
        out_types = self.parse_type_list()
        attrs = {}
        if self.accept("attributes"):
            attrs = self.parse_attr_dict()
        f = FuncOp.create(name, [t for _, t in arg_toks], **attrs)
        f.loc = self.loc(start)
        self.scopes = [{}]
        for (vt, _), a in zip(arg_toks, f.args):
            self.define(vt, a)
        self.expect("{")
        while not self.at("}"):
            f.body.append(self.parse_op())
        self.expect("}")
        ret = f.body.terminator
        if ret is None or ret.name != "func.return":
            raise self.fail(f"function @{name} does not end in \"func.return\"", start)
        got = [v.type for v in ret.operands]
        if got != out_types:
            raise self.fail(f"function @{name} returns ({', '.join(map(str, got))}) but its "
                            f"signature says ({', '.join(map(str, out_types))})", out_types_tok)
        return f

    def parse_region(self) -> Region:
        self.expect("{")
        region = Region()
        while self.tok.kind == "block":
            self.next()
            self.expect("(")
            block = Block()
            self.scopes.append({})
            if not self.at(")"):
                while True:
                    vt = self.expect_kind("value", "a block argument '%name'")
                    self.expect(":")
                    arg: BlockArgument = block.add_arg(self.parse_type())
                    self.define(vt, arg)
                    if not self.accept(","):
                        break
            self.expect(")")
            self.expect(":")
            while not (self.at("}") or self.tok.kind == "block"):
                block.append(self.parse_op())
            self.scopes.pop()
            region.add_block(block)
        self.expect("}")
        return region

    def parse_op(self) -> Operation:
        start = self.tok
        result_toks: list[Token] = []
        if self.tok.kind == "value":
            result_toks.append(self.next())
            while self.accept(","):
                result_toks.append(self.expect_kind("value", "a result name '%name'"))
            self.expect("=")
        name_tok = self.expect_kind("string", 'an op name like "st.add"')
        op_name = self.parse_string(name_tok)
        cls = OP_REGISTRY.get(op_name)
        if cls is None:
            raise self.fail(f"unknown op '{op_name}'", name_tok)
        if cls is FuncOp:
            raise self.fail("'func.func' is only allowed at module level", name_tok)
        self.expect("(")
        operands: list[Value] = []
        if not self.at(")"):
            while True:
                operands.append(self.lookup(self.expect_kind("value", "an operand '%name'")))
                if not self.accept(","):
                    break
        self.expect(")")
        regions: list[Region] = []
        if self.at("(") and self.toks[self.i + 1].text == "{":
            self.next()
            regions.append(self.parse_region())
            while self.accept(","):
                regions.append(self.parse_region())
            self.expect(")")
        attrs = self.parse_attr_dict() if self.at("{") else {}
        self.expect(":")
        types_tok = self.tok
        in_types = self.parse_type_list()
        self.expect("->")
        if self.at("("):
            out_types = self.parse_type_list()
        else:
            out_types = [self.parse_type()]
        if len(in_types) != len(operands):
            raise self.fail(f"'{op_name}' has {len(operands)} operands but {len(in_types)} "
                            "operand types", types_tok)
        for k, (v, t) in enumerate(zip(operands, in_types)):
            if v.type != t:
                raise self.fail(f"'{op_name}' operand #{k} has type {v.type} but is annotated "
                                f"{t}", types_tok)
        if len(out_types) != len(result_toks):
            raise self.fail(f"'{op_name}' names {len(result_toks)} results but has "
                            f"{len(out_types)} result types", start)
        try:
            op = cls(operands, out_types, attrs, regions, loc=self.loc(start))
        except (IRError, TypeError) as e:
            raise self.fail(f"cannot build '{op_name}': {e}", start) from None
        for t, r in zip(result_toks, op.results):
            self.define(t, r)
        return op


def parse_module(text: str, filename: str = "<string>") -> Module:
    """Parse a whole module; raises ParseError naming file:line:col."""
    return Parser(text, filename).parse_module()
