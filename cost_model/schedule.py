"""`Schedule`: the analytic model's chosen thread mapping for a kernel, and its estimate.

Invariants:
- A schedule is data (frozen): the mapping, the launch shape, the resources it uses, the
  occupancy those allow, and the time split into its parts.
- `seconds == launch_seconds + body + sync_seconds` where body is the largest of
  `memory_seconds`, `compute_seconds` and `latency_floor_seconds`; `seconds` is `math.inf` exactly when
  `legal` is False, and then `reason` says which resource ran out.
- On a CPU, a "block" is one parallel task and an "SM" is one core: `threads_per_block`
  is 1 and `blocks_per_sm` is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mapping = Literal[
    # GPU (AStitch's adaptive thread mappings)
    "elementwise",  # no reduction: one vector of elements per thread
    "warp_per_row",  # row reduce, rows up to ~1024 elements: a warp reduces a row by shuffles
    "block_per_row",  # row reduce, long rows (or too few rows for warps): a block per row
    "rows_per_block",  # row reduce, many short rows: several rows packed per warp / block
    "split_row",  # few very long rows (or one "all" reduce): a row split over blocks
    "column_tiles",  # column reduce: 32-column tiles, the reduced dim possibly split
    # CPU (OpenMP over tasks, one core per task at a time)
    "cpu_elementwise",
    "cpu_rows",  # a task per row; regional values stay in a per-thread row buffer
    "cpu_split",  # too few rows for the cores: rows split, partials combined after a barrier
    "cpu_columns",  # column reduce: tasks over column blocks, the reduced dim possibly split
]


@dataclass(frozen=True)
class Schedule:
    """The mapping chosen for one kernel on one device, with the estimate it implies."""

    device: str
    mapping: Mapping
    why: str  # one line: why this mapping

    # launch shape
    threads_per_block: int
    blocks: int
    rows_per_block: int  # rows (row reduce), column tiles or element vectors per block
    split: int  # blocks sharing one row / column tile (split_row, column_tiles); 1 = none

    # resources and occupancy
    smem_per_block: int  # bytes: regional values + reduction scratch
    regs_per_thread: int
    blocks_per_sm: int  # resident blocks per SM, 0 when a block does not fit at all
    occupancy: float  # resident threads / max threads per SM
    limiter: str  # what bounds blocks_per_sm: blocks | threads | registers | shared memory
    waves: int  # ceil(blocks / (SMs x blocks_per_sm))
    grid_syncs: int  # grid-wide barriers (global stitches + split reductions)
    extra_bytes: int  # traffic the schedule adds (split partials, CPU buffer spills)
    smem_opt_in: bool  # shared memory above the 48 KiB static limit (dynamic opt-in)

    # estimate, seconds
    launch_seconds: float
    memory_seconds: float
    memory_floor_seconds: float  # same bytes at the device's best bandwidth (full fill)
    compute_seconds: float
    latency_floor_seconds: float  # dependent DRAM round trips per wave (GPU); 0 on a CPU
    sync_seconds: float
    resource_penalty_seconds: float  # body time lost to registers / shared memory limits
    seconds: float

    legal: bool = True
    reason: str = ""  # why not legal; "" when legal
    # CPU: OpenMP threads the kernel runs on. 1 = the calling thread alone, no parallel team:
    # starting and joining a team costs more than a tiny kernel's work. 0 on a GPU.
    team: int = 0

    @property
    def fits_one_wave(self) -> bool:
        """All blocks resident at once: the condition for a grid-wide barrier."""
        return self.legal and self.waves <= 1

    @property
    def parallelism_loss_seconds(self) -> float:
        """Memory time lost because the launch does not fill the device."""
        return max(0.0, self.memory_seconds - self.memory_floor_seconds)
