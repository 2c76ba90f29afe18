"""Generic textual form of the IR.

    module {
      func.func @forward(%arg0: tensor<4x8xf32>) -> (tensor<4x8xf32>) {
        %0 = "st.exp"(%arg0) : (tensor<4x8xf32>) -> tensor<4x8xf32>
        "func.return"(%0) : (tensor<4x8xf32>) -> ()
      }
    }

Ops print as ``%r0, %r1 = "name"(%a, %b) ({ regions }) {attrs} : (in types) -> out types``.
Values are renamed on printing (``%argN`` for function arguments, ``%N`` for everything else,
numbered per function), so ``print(parse(print(m))) == print(m)``. Attribute keys are sorted.
"""

from __future__ import annotations

import math

from stitch_ir.core import Attribute, Block, DenseAttr, FuncOp, Module, Operation, Value
from stitch_ir.types import DType, Sym, TensorType


def format_float(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    r = repr(float(v))
    return r if ("." in r or "e" in r) else r + ".0"


def format_attr(a: Attribute) -> str:
    if a is None:
        return "none"
    if isinstance(a, bool):
        return "true" if a else "false"
    if isinstance(a, int):
        return str(a)
    if isinstance(a, float):
        return format_float(a)
    if isinstance(a, str):
        return '"' + a.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(a, tuple):
        return "[" + ", ".join(format_attr(x) for x in a) + "]"
    if isinstance(a, DType):
        return a.value
    if isinstance(a, TensorType | Sym):
        return str(a)
    if isinstance(a, DenseAttr):
        return f'dense<"0x{a.data.hex().upper()}"> : {a.type}'
    raise TypeError(f"cannot print attribute {a!r}")


class Printer:
    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.counter = 0
        self.lines: list[str] = []

    def name(self, v: Value) -> str:
        n = self.names.get(id(v))
        if n is None:
            # A value used before it was printed (malformed IR): still print something useful.
            n = f"%<unknown:{v.type}>"
        return n

    def define(self, v: Value) -> str:
        n = f"%{self.counter}"
        self.counter += 1
        self.names[id(v)] = n
        return n

    def attrs(self, op: Operation, skip: tuple[str, ...] = ()) -> str:
        items = [(k, v) for k, v in sorted(op.attributes.items()) if k not in skip]
        if not items:
            return ""
        return " {" + ", ".join(f"{k} = {format_attr(v)}" for k, v in items) + "}"

    def block(self, b: Block, indent: int, header: bool) -> None:
        pad = "  " * indent
        if header:
            args = ", ".join(f"{self.define(a)}: {a.type}" for a in b.args)
            self.lines.append(f"{pad[:-2]}^bb0({args}):")
        for op in b.ops:
            self.op(op, indent)

    def op(self, op: Operation, indent: int) -> None:
        pad = "  " * indent
        ins = ", ".join(self.name(v) for v in op.operands)
        name = op.name
        results = ", ".join(self.define(r) for r in op.results)
        head = f"{pad}{results} = " if results else pad
        text = f'{head}"{name}"({ins})'
        if op.regions:
            self.lines.append(text + " ({")
            for r in op.regions:
                if r is not op.regions[0]:
                    self.lines.append(f"{pad}}}, {{")
                for b in r.blocks:
                    self.block(b, indent + 2, header=True)
            text = f"{pad}}})"
        in_types = ", ".join(str(v.type) for v in op.operands)
        out = [str(r.type) for r in op.results]
        out_types = out[0] if len(out) == 1 else "(" + ", ".join(out) + ")"
        self.lines.append(f"{text}{self.attrs(op)} : ({in_types}) -> {out_types}")

    def func(self, f: FuncOp) -> None:
        self.names.clear()
        self.counter = 0
        args = []
        for i, a in enumerate(f.args):
            n = f"%arg{i}"
            self.names[id(a)] = n
            args.append(f"{n}: {a.type}")
        try:
            outs = ", ".join(str(v.type) for v in f.return_op.operands)
        except Exception:
            outs = ""
        extra = self.attrs(f, skip=("sym_name",))
        attrs = f" attributes{extra}" if extra else ""
        self.lines.append(f"  func.func @{f.sym_name}({', '.join(args)}) -> ({outs}){attrs} {{")
        for op in f.body.ops:
            self.op(op, 2)
        self.lines.append("  }")


def print_module(m: Module) -> str:
    p = Printer()
    p.lines.append("module {")
    for f in m.funcs:
        p.func(f)
    p.lines.append("}")
    return "\n".join(p.lines) + "\n"


def print_op(op: Operation) -> str:
    p = Printer()
    for v in op.operands:
        p.names.setdefault(id(v), f"%in{len(p.names)}")
    p.op(op, 0)
    return "\n".join(p.lines)
