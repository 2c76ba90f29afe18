"""Dialects: importing this package registers every op (``st``, ``fusion``)."""

from stitch_ir.dialects import fusion, st

__all__ = ["fusion", "st"]
