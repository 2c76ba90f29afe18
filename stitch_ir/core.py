"""Core IR data structures: values, operations, blocks, regions, functions, modules.

Invariants:
- SSA: every ``Value`` is defined exactly once, by an operation result or a block argument, and
  knows its uses (``value.uses``), kept up to date by ``Operation.set_operand`` and
  ``Operation.erase``. Mutate IR through these methods (or ``Rewriter``), never by editing lists.
- Operations are instances of a registered subclass of ``Operation`` whose class attribute
  ``name`` is the dotted op name; the parser rejects names no dialect registered.
- Attributes are immutable Python values (see ``Attribute``); lists are stored as tuples.
- Each op has a ``loc``: ``file:line:col`` for parsed text, ``node <name> (<target>)`` for
  imported torch nodes; verifier and importer errors name it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from stitch_ir.types import DType, FunctionType, Sym, TensorType


class IRError(Exception):
    """An error about IR: verification, construction, parsing or interpretation."""


class VerifyError(IRError):
    pass


# ----------------------------------------------------------------------------------------------
# Attributes


@dataclass(frozen=True)
class DenseAttr:
    """A dense constant tensor, stored as raw little-endian bytes so it round-trips exactly."""

    type: TensorType
    data: bytes

    @staticmethod
    def from_array(arr: np.ndarray, dtype: DType | None = None) -> DenseAttr:
        arr = np.asarray(arr)
        dt = dtype or DType.from_numpy(arr.dtype)
        shape = tuple(int(d) for d in arr.shape)
        if dt is DType.bf16:
            # bfloat16 is the upper half of a float32 (rounded to nearest even): 2 bytes each.
            from stitch_ir.interpreter import round_bf16

            bits = round_bf16(arr.astype(np.float32)).view(np.uint32) >> np.uint32(16)
            return DenseAttr(TensorType(shape, dt), bits.astype("<u2").tobytes())
        data = arr.astype(dt.to_numpy(), copy=False).tobytes(order="C")
        return DenseAttr(TensorType(shape, dt), data)

    def to_array(self) -> np.ndarray:
        shape = tuple(int(d) for d in self.type.shape)
        if self.type.dtype is DType.bf16:
            bits = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << np.uint32(16)
            return bits.view(np.float32).reshape(shape).copy()
        return np.frombuffer(self.data, dtype=self.type.dtype.to_numpy()).reshape(shape).copy()


# An attribute is one of these (lists become tuples; a Sym is a symbolic size in a shape).
Attribute = int | float | bool | str | None | tuple | DType | TensorType | DenseAttr | Sym


def freeze_attr(v: Any) -> Attribute:
    """Convert a Python value to an immutable attribute; raises TypeError for anything else."""
    if isinstance(v, list | tuple):
        return tuple(freeze_attr(x) for x in v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if v is None or isinstance(v, int | float | bool | str | DType | TensorType | DenseAttr | Sym):
        return v
    raise TypeError(f"unsupported attribute value {v!r} ({type(v).__name__})")


# ----------------------------------------------------------------------------------------------
# Values


class Value:
    """An SSA value. ``uses`` is a list of (operation, operand index)."""

    __slots__ = ("type", "uses", "name_hint")

    def __init__(self, type: TensorType, name_hint: str | None = None):
        self.type = type
        self.uses: list[tuple[Operation, int]] = []
        self.name_hint = name_hint

    @property
    def users(self) -> list[Operation]:
        seen: dict[int, Operation] = {}
        for op, _ in self.uses:
            seen.setdefault(id(op), op)
        return list(seen.values())

    def replace_all_uses_with(self, new: Value) -> None:
        for op, i in list(self.uses):
            op.set_operand(i, new)


class OpResult(Value):
    __slots__ = ("owner", "index")

    def __init__(self, type: TensorType, owner: Operation, index: int):
        super().__init__(type)
        self.owner = owner
        self.index = index

    def __repr__(self) -> str:
        return f"<result #{self.index} of {self.owner.name}: {self.type}>"


class BlockArgument(Value):
    __slots__ = ("block", "index")

    def __init__(self, type: TensorType, block: Block, index: int, name_hint: str | None = None):
        super().__init__(type, name_hint)
        self.block = block
        self.index = index

    def __repr__(self) -> str:
        return f"<block arg #{self.index}: {self.type}>"


# ----------------------------------------------------------------------------------------------
# Operations

OP_REGISTRY: dict[str, type[Operation]] = {}


def register_op(cls: type[Operation]) -> type[Operation]:
    """Class decorator: make ``cls`` the class for ops named ``cls.name``."""
    if not cls.name or "." not in cls.name:
        raise ValueError(f"op class {cls.__name__} needs a dotted name")
    if cls.name in OP_REGISTRY and OP_REGISTRY[cls.name] is not cls:
        raise ValueError(f"op {cls.name} registered twice")
    OP_REGISTRY[cls.name] = cls
    return cls


class Operation:
    """An operation: operands, results, attributes and regions.

    Subclasses declare ``name`` and override ``verify_()`` for local checks. ``infer_types``
    (a classmethod) computes result types from operand types and attributes; when a subclass
    defines it, ``build`` uses it and the verifier checks declared types against it.
    """

    name: ClassVar[str] = ""
    # None means variadic.
    num_operands: ClassVar[int | None] = None
    num_results: ClassVar[int | None] = 1
    num_regions: ClassVar[int] = 0
    required_attrs: ClassVar[tuple[str, ...]] = ()
    optional_attrs: ClassVar[tuple[str, ...]] = ()
    # Attributes not in required/optional are rejected unless this is True.
    open_attrs: ClassVar[bool] = False

    def __init__(
        self,
        operands: Sequence[Value] = (),
        result_types: Sequence[TensorType] = (),
        attributes: dict[str, Any] | None = None,
        regions: Sequence[Region] = (),
        loc: str | None = None,
    ):
        self._operands: list[Value] = []
        for v in operands:
            if not isinstance(v, Value):
                raise IRError(f"'{self.name}': operand {v!r} is not a Value")
            self._operands.append(v)
            v.uses.append((self, len(self._operands) - 1))
        self.results: list[OpResult] = [OpResult(t, self, i) for i, t in enumerate(result_types)]
        self.attributes: dict[str, Attribute] = {
            k: freeze_attr(v) for k, v in (attributes or {}).items()
        }
        self.regions: list[Region] = list(regions)
        for r in self.regions:
            r.parent = self
        self.parent: Block | None = None
        self.loc = loc

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def infer_types(cls, operand_types: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        raise NotImplementedError(f"{cls.name} has no type inference; pass result types")

    @classmethod
    def build(cls, *operands: Value, loc: str | None = None, **attrs: Any) -> Operation:
        """Build with inferred result types: ``st.AddOp.build(a, b)``."""
        frozen = {k: freeze_attr(v) for k, v in attrs.items() if v is not None}
        types = cls.infer_types([v.type for v in operands], frozen)
        return cls(list(operands), types, frozen, loc=loc)

    # -- access ------------------------------------------------------------------------------
    @property
    def operands(self) -> tuple[Value, ...]:
        return tuple(self._operands)

    def operand(self, i: int) -> Value:
        return self._operands[i]

    @property
    def result(self) -> OpResult:
        if len(self.results) != 1:
            raise IRError(f"'{self.name}' has {len(self.results)} results, not one")
        return self.results[0]

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attributes.get(key, default)

    def set_attrs(self, **attrs: Any) -> None:
        """Set attributes (frozen: lists become tuples)."""
        for k, v in attrs.items():
            self.attributes[k] = freeze_attr(v)

    def set_operand(self, i: int, v: Value) -> None:
        old = self._operands[i]
        old.uses.remove((self, i))
        self._operands[i] = v
        v.uses.append((self, i))

    def drop_operand_uses(self) -> None:
        for i, v in enumerate(self._operands):
            v.uses.remove((self, i))
        self._operands = []

    def walk(self) -> Iterator[Operation]:
        """Pre-order walk over this op and every op nested in its regions."""
        yield self
        for r in self.regions:
            for b in r.blocks:
                for op in list(b.ops):
                    yield from op.walk()

    def erase(self) -> None:
        """Remove from the parent block; every result must be unused."""
        for r in self.results:
            if r.uses:
                raise IRError(f"cannot erase '{self.name}': result #{r.index} still has uses")
        for op in list(self.walk())[::-1]:
            op.drop_operand_uses()
        if self.parent is not None:
            self.parent.ops.remove(self)
            self.parent = None

    def where(self) -> str:
        return f" (at {self.loc})" if self.loc else ""

    # -- verification ------------------------------------------------------------------------
    def error(self, msg: str) -> VerifyError:
        return VerifyError(f"'{self.name}' op {msg}{self.where()}")

    def verify_(self) -> None:
        """Op-specific checks; raise ``self.error(...)``."""

    def verify_types(self) -> None:
        """Check declared result types against ``infer_types`` when the op has it."""
        try:
            inferred = type(self).infer_types([v.type for v in self._operands], self.attributes)
        except NotImplementedError:
            return
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise self.error(str(e)) from None
        declared = [r.type for r in self.results]
        if list(inferred) != declared:
            shown = ", ".join(map(str, inferred))
            raise self.error(
                f"result types ({', '.join(map(str, declared))}) do not match the inferred ({shown})"
            )

    def __repr__(self) -> str:
        from stitch_ir.printer import print_op

        return print_op(self)


# ----------------------------------------------------------------------------------------------
# Blocks and regions


class Block:
    def __init__(self, arg_types: Iterable[TensorType] = ()):
        self.args: list[BlockArgument] = [
            BlockArgument(t, self, i) for i, t in enumerate(arg_types)
        ]
        self.ops: list[Operation] = []
        self.parent: Region | None = None

    @property
    def parent_op(self) -> Operation | None:
        """The op whose region holds this block (a function, a fusion group), if any."""
        return self.parent.parent if self.parent is not None else None

    def add_arg(self, t: TensorType, name_hint: str | None = None) -> BlockArgument:
        a = BlockArgument(t, self, len(self.args), name_hint)
        self.args.append(a)
        return a

    def append(self, op: Operation) -> Operation:
        op.parent = self
        self.ops.append(op)
        return op

    def insert_before(self, anchor: Operation, op: Operation) -> Operation:
        op.parent = self
        self.ops.insert(self.ops.index(anchor), op)
        return op

    @property
    def terminator(self) -> Operation | None:
        return self.ops[-1] if self.ops else None


class Region:
    def __init__(self, blocks: Iterable[Block] = ()):
        self.blocks: list[Block] = []
        self.parent: Operation | None = None
        for b in blocks:
            self.add_block(b)

    def add_block(self, b: Block) -> Block:
        b.parent = self
        self.blocks.append(b)
        return b

    @property
    def block(self) -> Block:
        if len(self.blocks) != 1:
            raise IRError(f"region has {len(self.blocks)} blocks, expected one")
        return self.blocks[0]


# ----------------------------------------------------------------------------------------------
# Functions and modules


@register_op
class FuncOp(Operation):
    """``func.func``: a named function with one single-block region ending in ``func.return``."""

    name = "func.func"
    num_operands = 0
    num_results = 0
    num_regions = 1
    required_attrs = ("sym_name",)
    open_attrs = True

    @staticmethod
    def create(name: str, arg_types: Sequence[TensorType], **attrs: Any) -> FuncOp:
        body = Block(arg_types)
        return FuncOp((), (), {"sym_name": name, **attrs}, [Region([body])])

    @property
    def sym_name(self) -> str:
        return self.attributes["sym_name"]

    @property
    def body(self) -> Block:
        return self.regions[0].block

    @property
    def args(self) -> list[BlockArgument]:
        return self.body.args

    @property
    def return_op(self) -> Operation:
        t = self.body.terminator
        if t is None or t.name != "func.return":
            raise self.error("body does not end in 'func.return'")
        return t

    @property
    def type(self) -> FunctionType:
        outs = tuple(v.type for v in self.return_op.operands)
        return FunctionType(tuple(a.type for a in self.args), outs)

    def verify_(self) -> None:
        if not isinstance(self.sym_name, str) or not self.sym_name:
            raise self.error("needs a non-empty 'sym_name'")
        self.return_op  # noqa: B018 - raises when missing


@register_op
class ReturnOp(Operation):
    name = "func.return"
    num_results = 0

    def verify_(self) -> None:
        if not isinstance(self.parent and self.parent.parent and self.parent.parent.parent, FuncOp):
            raise self.error("must be directly inside 'func.func'")
        if self.parent.terminator is not self:
            raise self.error("must be the last op of its block")


@dataclass
class Module:
    """A module: an ordered collection of functions, looked up by name."""

    funcs: list[FuncOp] = field(default_factory=list)

    def add(self, f: FuncOp) -> FuncOp:
        if any(g.sym_name == f.sym_name for g in self.funcs):
            raise IRError(f"function @{f.sym_name} defined twice")
        self.funcs.append(f)
        return f

    def func(self, name: str | None = None) -> FuncOp:
        """The function named ``name``; with no name, the only (or first) function."""
        if name is None:
            if not self.funcs:
                raise IRError("module has no function")
            return self.funcs[0]
        for f in self.funcs:
            if f.sym_name == name:
                return f
        raise IRError(f"no function @{name} in module")

    def walk(self) -> Iterator[Operation]:
        for f in self.funcs:
            yield from f.walk()

    def __str__(self) -> str:
        from stitch_ir.printer import print_module

        return print_module(self)


class Builder:
    """Appends ops to a block (or inserts before an anchor op) and returns their results."""

    def __init__(self, block: Block, before: Operation | None = None):
        self.block = block
        self.before = before

    def insert(self, op: Operation) -> Operation:
        if self.before is None:
            self.block.append(op)
        else:
            self.block.insert_before(self.before, op)
        return op

    def create(self, cls: type[Operation], *operands: Value, loc: str | None = None, **attrs: Any
               ) -> Value:
        """Build ``cls`` with inferred types, insert it, return its single result."""
        return self.insert(cls.build(*operands, loc=loc, **attrs)).result
