"""stitch_ir: the stitch compiler's MLIR-style IR (types, ops, text form, verifier, interpreter).

The importer (torch -> ``st``) lives in ``stitch_ir.importer`` and is the only module here that
imports torch at module level.
"""

from stitch_ir import dialects
from stitch_ir.core import (
    Block,
    Builder,
    DenseAttr,
    FuncOp,
    IRError,
    Module,
    Operation,
    Region,
    Value,
    VerifyError,
)
from stitch_ir.parser import ParseError, parse_module
from stitch_ir.printer import print_module
from stitch_ir.types import DType, Sym, TensorType
from stitch_ir.verifier import verify

__all__ = [
    "Block", "Builder", "DType", "DenseAttr", "FuncOp", "IRError", "Module", "Operation",
    "ParseError", "Region", "Sym", "TensorType", "Value", "VerifyError", "dialects",
    "parse_module", "print_module", "verify",
]
