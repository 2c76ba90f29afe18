"""`KernelDesc`: what the cost model needs to know about one (candidate) fused kernel.

The description is independent of the IR: the planner summarises a fused group into one,
and the analytic model estimates it for any device.

Invariants:
- All counts are non-negative integers; `parallel_size >= 1`; `elem_bytes >= 1`.
- `bytes_read` / `bytes_written` are the kernel's minimum global-memory traffic: each input
  read once, each output written once, plus what it stitches through global memory (the
  builder counts those bytes; the model adds only what its own schedule adds, such as
  partial results of a split reduction).
- A `ReduceDesc` always describes `rows` independent reductions of `length` elements
  each; kind "all" has `rows == 1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ReduceKind = Literal["row", "column", "all"]
_KINDS = ("row", "column", "all")


@dataclass(frozen=True)
class ReduceDesc:
    """`rows` reductions of `length` elements each.

    kind "row":    each reduction reads `length` contiguous elements (reduce the last dim).
    kind "column": the reduced elements are strided: a [length, rows] row-major array
                   reduced over its first dim, so `rows` is the number of columns.
    kind "all":    the whole tensor to one value (`rows == 1`).
    """

    kind: ReduceKind
    rows: int
    length: int

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"ReduceDesc.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.rows < 1 or self.length < 1:
            raise ValueError(f"ReduceDesc needs rows, length >= 1, got {self.rows}, {self.length}")
        if self.kind == "all" and self.rows != 1:
            raise ValueError("a ReduceDesc of kind 'all' has rows == 1")

    @property
    def elements(self) -> int:
        return self.rows * self.length


@dataclass(frozen=True)
class KernelDesc:
    """One kernel, as the cost model sees it."""

    bytes_read: int  # minimum global-memory bytes read
    bytes_written: int  # minimum global-memory bytes written
    parallel_size: int  # independent output elements (or rows, for row-wise kernels)
    flops: int = 0  # simple arithmetic (add, mul, max, compare...); an FMA counts 2
    transcendentals: int = 0  # exp, erf, tanh, log, rsqrt... evaluations
    reduce: tuple[ReduceDesc, ...] = ()  # the reductions inside, any order
    smem_bytes_per_row: int = 0  # bytes of regional (shared-memory) values one row needs
    num_regional: int = 0  # values stitched through shared memory + block barrier
    num_global: int = 0  # values stitched through global memory + grid barrier
    num_ops: int = 1  # ops fused into the kernel
    needs_grid_sync: bool = False  # a grid-wide barrier is needed (implied by num_global)
    elem_bytes: int = 4  # element size of the main tensors (sets the vector width)
    regs_per_thread: int = 0  # measured (ptxas -v) registers per thread; 0 = estimate

    def __post_init__(self) -> None:
        ints = {
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "flops": self.flops,
            "transcendentals": self.transcendentals,
            "smem_bytes_per_row": self.smem_bytes_per_row,
            "num_regional": self.num_regional,
            "num_global": self.num_global,
            "num_ops": self.num_ops,
            "regs_per_thread": self.regs_per_thread,
        }
        for field, value in ints.items():
            if value < 0:
                raise ValueError(f"KernelDesc.{field} must be >= 0, got {value}")
        if self.parallel_size < 1:
            raise ValueError(f"KernelDesc.parallel_size must be >= 1, got {self.parallel_size}")
        if self.elem_bytes < 1:
            raise ValueError(f"KernelDesc.elem_bytes must be >= 1, got {self.elem_bytes}")
        if not isinstance(self.reduce, tuple):
            # A list would make the frozen dataclass unhashable.
            object.__setattr__(self, "reduce", tuple(self.reduce))

    @property
    def traffic(self) -> int:
        """Global-memory bytes moved: read + written."""
        return self.bytes_read + self.bytes_written

    @property
    def grid_syncs(self) -> int:
        """Grid-wide barriers the kernel's own stitching needs (one per global value)."""
        return max(self.num_global, 1 if self.needs_grid_sync else 0)

    @property
    def dominant_reduce(self) -> ReduceDesc | None:
        """The reduction that picks the thread mapping: the one touching most elements
        (the first such one on a tie), or None for a reduction-free kernel."""
        best: ReduceDesc | None = None
        for r in self.reduce:
            if best is None or r.elements > best.elements:
                best = r
        return best
