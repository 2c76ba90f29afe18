"""A phase of a CUDA C kernel: the unit of work between two grid barriers.

A group's kernels are cut into phases (``codegen.cuda.kernel``); each phase is a loop over its
*units* (rows, row chunks, column tiles, element vectors: what one block of the schedule
does), ``for (unit = blockIdx.x; unit < UNITS; unit += gridDim.x)``. Launched as its own kernel
its grid is UNITS and the loop runs once per block; inside one cooperative kernel the grid is
one wave and phases are separated by ``grid.sync()``. So a phase's text is the same in both.

Invariants of a phase's text: every thread of the block runs the unit loop the same number of
times and reaches every ``__syncthreads()`` in it (masks, never early exits); threads beyond
the phase's own block size (a cooperative kernel's block is the largest phase's) only take part
in barriers; shared memory is carved at fixed offsets from ``smem`` (16-byte aligned).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class Phase:
    lines: list[str]  # the phase body (inside its own braces), indented for the kernel body
    threads: int  # the schedule's threads per block for this phase
    units: int  # blocks it needs when launched alone
    smem: int  # bytes of shared memory it carves
    what: str  # one line: what it computes and how it is mapped
    mapping: str
    reads: set[str] = field(default_factory=set)  # buffer names it loads
    writes: set[str] = field(default_factory=set)  # buffer names it stores
    vector: set[str] = field(default_factory=set)  # buffers accessed 16 bytes at a time
    uses_err: bool = False
    syncthreads: int = 0  # __syncthreads() in its text


class Smem:
    """Shared memory carved at fixed, 16-byte aligned offsets."""

    def __init__(self):
        self.size = 0
        self.decls: list[str] = []

    def carve(self, name: str, ctype: str, count: int, itemsize: int) -> str:
        self.decls.append(f"{ctype}* {name} = reinterpret_cast<{ctype}*>(smem + {self.size});")
        self.size += -(-max(1, count) * itemsize // 16) * 16
        return name


CTYPE_SIZE = {"float": 4, "double": 8, "int64_t": 8, "int": 4, "int32_t": 4, "int16_t": 2,
              "int8_t": 1, "uint8_t": 1, "bool": 1, "uint16_t": 2}


def buffer_uses(text: str, names: list[str]) -> tuple[set[str], set[str]]:
    """(read, written) buffer names of a phase's text: an element read (``b[i]`` not assigned),
    a vector load from ``b + ...``; an element assigned, a vector store or an atomic."""
    reads, writes = set(), set()
    for b in names:
        if re.search(rf"\b{b}\[[^\]]*\](?!\s*=(?!=))", text) or \
                re.search(rf"st_loadv<\d+>\([^;]*?, {b} \+", text):
            reads.add(b)
        if re.search(rf"\b{b}\[[^\]]*\]\s*=(?!=)", text) or \
                re.search(rf"st_storev<\d+>\({b} \+|st_atomic_add\(&{b}\[", text):
            writes.add(b)
    return reads, writes
