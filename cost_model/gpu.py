"""GPU side of the analytic model: AStitch's adaptive thread mapping, occupancy, waves, time.

Input: a `KernelDesc` and a GPU `DeviceSpec`. Output: a `Schedule`. Deterministic, no GPU.

Invariants:
- The dominant reduction (`KernelDesc.dominant_reduce`) alone picks the mapping; the other
  ops follow it (AStitch's dominant / sub-dominant ops).
- Mapping rules (row reduce <R rows, L elements>, vector width v = 16 B / element size):
  L/v < 32 lanes -> rows_per_block; L <= 1024 elements and R >= 8 rows per SM ->
  warp_per_row; L <= 1024 or R >= #SMs -> block_per_row; else split_row, each row over
  k blocks so that R x k blocks fill one wave (k == 1, a row that is one block's work,
  stays block_per_row). Column reduce -> column_tiles (the reduced dim split the same way
  when the tiles alone do not fill a wave); "all" -> split_row with one row; no reduction
  -> elementwise.
- Occupancy is bounded by blocks, threads, registers and shared memory per SM, exactly as
  the CUDA occupancy calculator does (registers per warp rounded up to the allocation unit,
  1 KiB reserved shared memory per block).
- Threads per block and rows per block are powers of two (Triton's num_warps and tile sizes
  must be): a size that does not fit is rounded down, an element-wise block rounded up.
- Memory time is linear in bytes for a fixed launch shape, and the launch shape depends on
  the parallel structure only, never on bytes: latency is monotone in bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cost_model.devices import DeviceSpec
from cost_model.kernel import KernelDesc, ReduceDesc
from cost_model.schedule import Mapping, Schedule

VEC_BYTES = 16  # widest vector load (ld.global.v4.f32)
DEFAULT_TPB = 256  # threads per block for elementwise, warp_per_row, rows_per_block
ROW_ELEMS_PER_LANE = 32  # warp_per_row keeps a row in the warp: <= 1024 fp32 elements
WARP_ROWS_PER_SM = 8  # below this many rows per SM a warp per row leaves the GPU idle
SPLIT_TPB = 512  # block size of split_row
MIN_VECS_PER_THREAD = 4  # split_row never splits a row so far that a thread has less
COLUMN_TILE = 32  # columns per column_tiles block: one coalesced 128 B line per warp row
COLUMN_ROW_GROUPS = 8  # thread rows of a column tile (256 threads)
MIN_COLUMN_ROWS_PER_THREAD = 16
ACC_BYTES = 4  # fp32 accumulators and partial results
REG_BASE = 16  # indices, pointers, loop bounds
REGS_PER_VECTOR = VEC_BYTES // 4
# Little's law: a warp keeps one 16 B vector per lane in flight. An SM cannot draw much
# more than its fair share of DRAM bandwidth however many warps it holds (limited
# outstanding misses): cap at 1.5x.
BYTES_IN_FLIGHT_PER_WARP = 32 * VEC_BYTES
SM_SHARE_MAX = 1.5
WARPS_FOR_COMPUTE = 8  # 4 schedulers x 2 warps hide FMA latency
TRANSCENDENTAL_FLOPS = 8  # range reduction / polynomial FMAs around each SFU result


@dataclass(frozen=True)
class _Shape:
    """A launch shape before occupancy and timing."""

    mapping: Mapping
    why: str
    tpb: int
    rows_per_block: int
    split: int
    blocks: int
    smem: int
    extra_bytes: int = 0
    extra_syncs: int = 0  # grid barriers the mapping adds (split reduction used in-kernel)
    extra_launches: int = 0  # second pass combining split partials


def gpu_schedule(desc: KernelDesc, spec: DeviceSpec) -> Schedule:
    regs = desc.regs_per_thread or estimate_regs(desc)
    shape = _shape(desc, spec, regs)
    bps, limiter = occupancy(spec, shape.tpb, regs, shape.smem)
    slots = spec.num_sms * bps
    waves = math.ceil(shape.blocks / slots) if slots else 0
    syncs = desc.grid_syncs + shape.extra_syncs
    error = _resource_error(desc, spec, shape, regs, bps, limiter)
    if not error and syncs and waves > 1:
        error = (
            f"grid sync: {shape.blocks} blocks ({shape.mapping}) cannot all be resident in "
            f"one wave (at most {slots} = {spec.num_sms} SMs x {bps} blocks per SM)"
        )

    launch = spec.launch_overhead * (1 + shape.extra_launches)
    traffic = desc.traffic + shape.extra_bytes
    mem = comp = body = math.inf
    sync = penalty = floor = 0.0
    if not error:
        phases = 1 + len(desc.reduce) + shape.extra_syncs
        mem, comp, floor = _timing(desc, spec, shape, bps, traffic, phases)
        body = max(mem, comp, floor)
        # The same launch with occupancy bounded by threads and blocks only: what registers
        # and shared memory cost.
        free_bps = min(spec.blocks_per_sm_max, spec.threads_per_sm // shape.tpb)
        penalty = max(0.0, body - max(_timing(desc, spec, shape, free_bps, traffic, phases)))
        sync = syncs * (spec.barrier_base + spec.barrier_per_block * shape.blocks)
    return Schedule(
        device=spec.name,
        mapping=shape.mapping,
        why=shape.why,
        threads_per_block=shape.tpb,
        blocks=shape.blocks,
        rows_per_block=shape.rows_per_block,
        split=shape.split,
        smem_per_block=shape.smem,
        regs_per_thread=regs,
        blocks_per_sm=bps,
        occupancy=bps * shape.tpb / spec.threads_per_sm,
        limiter=limiter,
        waves=waves,
        grid_syncs=syncs,
        extra_bytes=shape.extra_bytes,
        smem_opt_in=shape.smem > spec.smem_per_block_default,
        launch_seconds=launch,
        memory_seconds=mem,
        memory_floor_seconds=traffic / (spec.mem_bandwidth * spec.mem_efficiency),
        compute_seconds=comp,
        latency_floor_seconds=floor,
        sync_seconds=sync,
        resource_penalty_seconds=penalty,
        seconds=launch + body + sync,
        legal=not error,
        reason=error,
    )


def estimate_regs(desc: KernelDesc) -> int:
    """Registers per thread when ptxas has not said: a base plus one 4-register vector per
    live value. A fused DAG's width (live values) grows far slower than its size; sqrt is
    the assumption."""
    live = 2 + math.ceil(math.sqrt(desc.num_ops))
    regs = REG_BASE + REGS_PER_VECTOR * live + (8 if desc.reduce else 0)
    return _round_up(regs, 8)


def occupancy(spec: DeviceSpec, tpb: int, regs: int, smem: int) -> tuple[int, str]:
    """Resident blocks per SM and what limits them (the first of equal limits, in the order
    blocks, threads, registers, shared memory, so a resource is named only when binding)."""
    warps = math.ceil(tpb / spec.warp_size)
    regs_per_warp = _round_up(regs * spec.warp_size, spec.reg_alloc_unit)
    limits = {
        "blocks": spec.blocks_per_sm_max,
        "threads": spec.threads_per_sm // (warps * spec.warp_size),
        "registers": spec.regs_per_sm // (regs_per_warp * warps),
        "shared memory": spec.smem_per_sm // (smem + spec.smem_reserved_per_block),
    }
    limiter = min(limits, key=lambda k: limits[k])
    return limits[limiter], limiter


def _shape(desc: KernelDesc, spec: DeviceSpec, regs: int) -> _Shape:
    r = desc.dominant_reduce
    if r is None:
        return _elementwise_shape(desc, spec)
    if r.kind == "column":
        return _column_shape(desc, spec, r, regs)
    if r.kind == "all":
        return _split_shape(desc, spec, r.rows, r.length, regs, "an all-reduce: ")
    return _row_shape(desc, spec, r, regs)


def _elementwise_shape(desc: KernelDesc, spec: DeviceSpec) -> _Shape:
    vec = _vec(desc)
    n = desc.parallel_size
    # blocks of a power-of-two number of warps: Triton's num_warps and tile sizes must be
    tpb = min(DEFAULT_TPB, _pow2_ceil(_round_up(math.ceil(n / vec), spec.warp_size)))
    blocks = math.ceil(n / (tpb * vec))
    return _Shape(
        "elementwise", f"no reduction: {vec} elements per thread", tpb, 1, 1, blocks, desc.smem_bytes_per_row
    )


def _row_shape(desc: KernelDesc, spec: DeviceSpec, r: ReduceDesc, regs: int) -> _Shape:
    rows, length = r.rows, r.length
    warp, vec, smem_row = spec.warp_size, _vec(desc), desc.smem_bytes_per_row
    lanes = _pow2_ceil(math.ceil(length / vec))
    if lanes < warp:
        # A warp per row would leave lanes idle: pack DEFAULT_TPB / lanes rows per block.
        rpb = _rows_fitting(spec, DEFAULT_TPB // lanes, smem_row)
        tpb = _round_up(rpb * lanes, warp)
        why = f"<{rows}, {length}>: short rows need {lanes} threads each, {rpb} rows per block"
        return _Shape("rows_per_block", why, tpb, rpb, 1, math.ceil(rows / rpb), rpb * smem_row)
    short = length <= warp * ROW_ELEMS_PER_LANE
    if short and rows >= spec.num_sms * WARP_ROWS_PER_SM:
        rpb = _rows_fitting(spec, DEFAULT_TPB // warp, smem_row)
        why = f"<{rows}, {length}>: row fits one warp's registers, enough rows to fill the GPU"
        return _Shape("warp_per_row", why, rpb * warp, rpb, 1, math.ceil(rows / rpb), rpb * smem_row)
    if short or rows >= spec.num_sms:
        tpb = min(_tpb_cap(spec, regs), max(warp, _pow2_ceil(math.ceil(length / vec))))
        scratch = (tpb // warp) * ACC_BYTES  # one partial per warp for the block reduce
        why = (
            f"<{rows}, {length}>: too few rows for a warp each"
            if short
            else f"<{rows}, {length}>: long rows, at least one per SM"
        )
        return _Shape("block_per_row", why, tpb, 1, 1, rows, smem_row + scratch)
    return _split_shape(desc, spec, rows, length, regs, f"<{rows}, {length}>: ")


def _split_shape(desc: KernelDesc, spec: DeviceSpec, rows: int, length: int, regs: int, why: str) -> _Shape:
    """Split each row over `k` blocks so that rows x k blocks fill one wave."""
    warp, vec, smem_row = spec.warp_size, _vec(desc), desc.smem_bytes_per_row
    tpb = min(SPLIT_TPB, _tpb_cap(spec, regs))
    scratch = (tpb // warp) * ACC_BYTES
    max_k = max(1, math.ceil(length / (tpb * vec * MIN_VECS_PER_THREAD)))
    k = max_k
    for _ in range(2):  # k sets shared memory per block, which sets the wave's capacity
        bps, _ = occupancy(spec, tpb, regs, math.ceil(smem_row / k) + scratch)
        k = max(1, min(max_k, spec.num_sms * bps // rows))
    smem = math.ceil(smem_row / k) + scratch
    if k == 1:
        return _Shape("block_per_row", why + "row fits one block's work", tpb, 1, 1, rows, smem)
    in_kernel = desc.num_regional > 0 or desc.grid_syncs > 0
    return _Shape(
        "split_row",
        why
        + f"few long rows: each split over {k} blocks"
        + (", combined after a grid barrier" if in_kernel else ", combined by a second pass"),
        tpb,
        1,
        k,
        rows * k,
        smem,
        extra_bytes=2 * rows * k * ACC_BYTES,  # partials written, then read back
        extra_syncs=1 if in_kernel else 0,
        extra_launches=0 if in_kernel else 1,
    )


def _column_shape(desc: KernelDesc, spec: DeviceSpec, r: ReduceDesc, regs: int) -> _Shape:
    cols, length = r.rows, r.length
    tpb = COLUMN_TILE * COLUMN_ROW_GROUPS
    tiles = math.ceil(cols / COLUMN_TILE)
    scratch = tpb * ACC_BYTES  # the tile's partials, reduced across thread rows
    bps, _ = occupancy(spec, tpb, regs, COLUMN_TILE * desc.smem_bytes_per_row + scratch)
    max_split = max(1, math.ceil(length / (COLUMN_ROW_GROUPS * MIN_COLUMN_ROWS_PER_THREAD)))
    split = max(1, min(max_split, spec.num_sms * bps // tiles))
    smem = COLUMN_TILE * math.ceil(desc.smem_bytes_per_row / split) + scratch
    why = f"column reduce <{cols} columns, {length} rows>: {COLUMN_TILE}-column tiles"
    if split == 1:
        return _Shape("column_tiles", why, tpb, 1, 1, tiles, smem)
    in_kernel = desc.num_regional > 0 or desc.grid_syncs > 0
    return _Shape(
        "column_tiles",
        why + f", reduced dim split over {split} blocks",
        tpb,
        1,
        split,
        tiles * split,
        smem,
        extra_bytes=2 * cols * split * ACC_BYTES,
        extra_syncs=1 if in_kernel else 0,
        extra_launches=0 if in_kernel else 1,
    )


def _resource_error(
    desc: KernelDesc, spec: DeviceSpec, shape: _Shape, regs: int, bps: int, limiter: str
) -> str:
    if regs > spec.regs_per_thread_max:
        return (
            f"registers: {regs} per thread exceed the {spec.regs_per_thread_max} a thread "
            f"may use ({desc.num_ops} fused ops)"
        )
    if shape.smem > spec.smem_per_block:
        return (
            f"shared memory: {shape.smem} bytes per block ({shape.mapping}, "
            f"{desc.smem_bytes_per_row} per row x {shape.rows_per_block} rows) exceed "
            f"the {spec.smem_per_block} a block may use; demote regional values to global"
        )
    if bps == 0:
        return f"{limiter}: not even one {shape.tpb}-thread block fits on an SM"
    return ""


def _timing(
    desc: KernelDesc, spec: DeviceSpec, shape: _Shape, bps: int, traffic: int, phases: int
) -> tuple[float, float, float]:
    """(memory, compute, latency floor) seconds, wave by wave: full waves, then the tail."""
    warps = math.ceil(shape.tpb / spec.warp_size)
    slots = spec.num_sms * bps
    full, tail = divmod(shape.blocks, slots)
    bw = spec.mem_bandwidth * spec.mem_efficiency
    per_block = traffic / shape.blocks
    fma = (desc.flops + TRANSCENDENTAL_FLOPS * desc.transcendentals) / spec.fp32_flops
    compute_full = max(fma, desc.transcendentals / spec.transcendental_rate)
    mem = comp = 0.0
    for n, count in ((slots, full), (tail, 1 if tail else 0)):
        if count:
            mem += count * per_block * n / (bw * _bandwidth_fill(spec, n, warps))
            comp += count * compute_full * (n / shape.blocks) / _compute_fill(spec, n, warps)
    waves = full + (1 if tail else 0)
    # A wave cannot finish faster than its dependent DRAM round trips (one per phase).
    return mem, comp, waves * phases * spec.mem_latency


def _bandwidth_fill(spec: DeviceSpec, blocks: int, warps_per_block: int) -> float:
    """Fraction of the device's bandwidth `blocks` resident blocks can draw (Little's law)."""
    need_per_sm = spec.mem_bandwidth * spec.mem_latency / spec.num_sms

    def share(warps: int) -> float:
        return min(SM_SHARE_MAX, warps * BYTES_IN_FLIGHT_PER_WARP / need_per_sm)

    return min(1.0, _spread(spec, blocks, warps_per_block, share))


def _compute_fill(spec: DeviceSpec, blocks: int, warps_per_block: int) -> float:
    return _spread(spec, blocks, warps_per_block, lambda w: min(1.0, w / WARPS_FOR_COMPUTE))


def _spread(spec: DeviceSpec, blocks: int, warps_per_block: int, share) -> float:
    # The block scheduler spreads blocks evenly: `extra` SMs hold one block more.
    per_sm, extra = divmod(blocks, spec.num_sms)
    total = extra * share((per_sm + 1) * warps_per_block)
    total += (spec.num_sms - extra) * share(per_sm * warps_per_block)
    return total / spec.num_sms


def _tpb_cap(spec: DeviceSpec, regs: int) -> int:
    """The largest block (whole warps) whose registers fit one block's register file."""
    per_warp = _round_up(regs * spec.warp_size, spec.reg_alloc_unit)
    warps = min(spec.threads_per_block_max // spec.warp_size, spec.regs_per_block // per_warp)
    return _pow2_floor(max(1, warps)) * spec.warp_size


def _rows_fitting(spec: DeviceSpec, want: int, smem_row: int) -> int:
    """Rows per block, shrunk until their regional values fit one block (at least 1: a
    single row that does not fit is reported as a shared-memory error)."""
    if smem_row == 0:
        return want
    return _pow2_floor(max(1, min(want, spec.smem_per_block // smem_row)))


def _vec(desc: KernelDesc) -> int:
    return max(1, VEC_BYTES // desc.elem_bytes)


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit
