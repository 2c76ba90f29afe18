"""CPU side of the analytic model: OpenMP tasks over cores, bandwidth by working-set size.

Input: a `KernelDesc` and a CPU `DeviceSpec`. Output: a `Schedule`. Deterministic.

Model: time = per-kernel overhead + max(memory, compute) x load imbalance + barriers, where
- memory = bytes / copy bandwidth at the kernel's working-set size (bytes read + written:
  a small working set runs at cache speed, as the measured copies did) for the number of
  threads that have work (interpolated between the 1-thread and all-core tables);
- compute = flops / FLOP rate + transcendentals / their rate, over the threads with work
  (added, not overlapped: on a CPU both run on the same vector ports);
- fewer tasks than cores leaves cores idle, and tasks that do not divide evenly over the
  cores leave a tail (imbalance = waves x threads / tasks).

Invariants:
- Nothing is illegal on a CPU: every thread is resident, so a barrier is always possible;
  regional values that outgrow a core's L2 spill to memory and cost traffic instead.
- Latency is monotone in bytes (bandwidth tables never rise with size).
"""

from __future__ import annotations

import bisect
import math

from cost_model.devices import DeviceSpec
from cost_model.kernel import KernelDesc
from cost_model.schedule import Mapping, Schedule

MIN_SPLIT_ELEMS = 16384  # a split task reduces at least this many elements (64 KiB fp32)
COLUMN_BLOCK_BYTES = 64  # one cache line of columns per task: no false sharing
PARTIAL_BYTES = 8  # fp32/fp64 partial results written and read back by a split reduce


# Starting and joining an OpenMP team: waking the other threads and the closing barrier. On a
# quiet machine a few microseconds; when another process holds a core, the team waits for it
# to be scheduled (milliseconds), which a kernel on the calling thread never does.
TEAM_START_SECONDS = 5e-6
# The calling thread alone only for kernels whose estimate is below this: where starting a team
# is a sizeable share of the work. Past it, the estimate's own error (index arithmetic and
# gathers are not costed; a probe on a noisy machine can measure one thread's copy bandwidth
# as high as the team's) outweighs the start: on a 2-core EPYC whose probe read 47 GB/s for one
# thread and for both at 8 MiB, charformer's training step ran 4 MiB window-merge gathers on
# one thread (3.6 ms each).
SERIAL_MAX_SECONDS = 4 * TEAM_START_SECONDS


def cpu_schedule(desc: KernelDesc, spec: DeviceSpec) -> Schedule:
    mapping, why, tasks, split, rows = _mapping(desc, spec)
    cores = spec.cores
    threads = min(cores, tasks)
    syncs = desc.grid_syncs + (1 if split > 1 else 0)

    # Partials of a split reduction, then regional buffers that do not fit a core's L2.
    extra = 2 * PARTIAL_BYTES * (tasks if split > 1 else 0)
    spill = 0
    if desc.smem_bytes_per_row > spec.l2_bytes:
        spill = 2 * rows * desc.smem_bytes_per_row
    traffic = desc.traffic + extra + spill
    per_core_flops = spec.fp32_flops / cores
    per_core_trans = spec.transcendental_rate / cores

    def body(threads: int) -> tuple[float, float, float, int]:
        waves = math.ceil(tasks / threads)
        imbalance = waves * threads / tasks
        bw = bandwidth(spec, traffic, threads)
        mem = traffic / bw * imbalance
        comp = (desc.flops / per_core_flops + desc.transcendentals / per_core_trans) / threads
        return mem, comp * imbalance, bw, waves

    # The team: all cores when the work pays for starting them, else the calling thread alone
    # (a tiny kernel then costs a function call, and its barriers are free).
    mem, comp, bw, waves = body(threads)
    parallel = TEAM_START_SECONDS + max(mem, comp) + syncs * spec.barrier_base
    mem1, comp1, bw1, waves1 = body(1)
    if threads > 1 and max(mem1, comp1) <= min(parallel, SERIAL_MAX_SECONDS):
        threads, mem, comp, bw, waves = 1, mem1, comp1, bw1, waves1
        why += "; too little work for a team: the calling thread"
    sync = syncs * spec.barrier_base if threads > 1 else 0.0
    team_start = TEAM_START_SECONDS if threads > 1 else 0.0
    return Schedule(
        device=spec.name,
        mapping=mapping,
        why=why,
        threads_per_block=1,
        blocks=tasks,
        rows_per_block=1,
        split=split,
        smem_per_block=desc.smem_bytes_per_row,
        regs_per_thread=0,
        blocks_per_sm=1,
        occupancy=threads / cores,
        limiter="tasks" if tasks < cores else "cores",
        waves=waves,
        grid_syncs=syncs,
        extra_bytes=extra + spill,
        smem_opt_in=False,
        launch_seconds=spec.launch_overhead + team_start,
        memory_seconds=mem,
        memory_floor_seconds=traffic / bandwidth(spec, traffic, cores),
        compute_seconds=comp,
        latency_floor_seconds=0.0,
        sync_seconds=sync,
        resource_penalty_seconds=spill / bw,
        seconds=spec.launch_overhead + team_start + max(mem, comp) + sync,
        team=threads,
    )


def bandwidth(spec: DeviceSpec, working_set: int, threads: int) -> float:
    """Copy bandwidth (bytes/s) at this working-set size with `threads` threads."""
    one = _interpolate(spec.copy_bw_1, working_set)
    everyone = _interpolate(spec.copy_bw_all, working_set)
    if spec.cores <= 1:
        return everyone
    t = (min(threads, spec.cores) - 1) / (spec.cores - 1)
    return one + (everyone - one) * t


def _mapping(desc: KernelDesc, spec: DeviceSpec) -> tuple[Mapping, str, int, int, int]:
    """(mapping, why, tasks, split, rows)."""
    cores = spec.cores
    r = desc.dominant_reduce
    if r is None:
        # OpenMP's static schedule: one contiguous chunk per thread, no tail to speak of.
        tasks = min(desc.parallel_size, cores)
        return "cpu_elementwise", "no reduction: one chunk per core", tasks, 1, 1
    if r.kind == "column":
        per_task = max(1, COLUMN_BLOCK_BYTES // desc.elem_bytes)
        blocks = math.ceil(r.rows / per_task)
        if blocks >= cores:
            return "cpu_columns", f"{blocks} column blocks over {cores} cores", blocks, 1, r.rows
        split = max(1, min(math.ceil(cores / blocks), math.ceil(r.length / MIN_SPLIT_ELEMS)))
        why = f"{blocks} column blocks, reduced dim split {split} ways"
        return "cpu_columns", why, blocks * split, split, r.rows
    if r.rows >= cores:
        return "cpu_rows", f"<{r.rows}, {r.length}>: a task per row", r.rows, 1, r.rows
    split = max(1, min(math.ceil(cores / r.rows), math.ceil(r.length / MIN_SPLIT_ELEMS)))
    if split == 1:
        why = f"<{r.rows}, {r.length}>: rows too short to split"
        return "cpu_rows", why, r.rows, 1, r.rows
    why = f"<{r.rows}, {r.length}>: fewer rows than cores, each split {split} ways"
    return "cpu_split", why, r.rows * split, split, r.rows


def _interpolate(table: tuple[tuple[int, float], ...], size: int) -> float:
    """Bandwidth at `size`, linear in log(size) between measured points, flat outside."""
    sizes = [s for s, _ in table]
    i = bisect.bisect_left(sizes, size)
    if i == 0:
        return table[0][1]
    if i == len(table):
        return table[-1][1]
    (s0, b0), (s1, b1) = table[i - 1], table[i]
    t = math.log(size / s0) / math.log(s1 / s0)
    return b0 + (b1 - b0) * t
