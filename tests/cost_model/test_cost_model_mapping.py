"""Thread mapping and occupancy: AStitch's adaptive mappings, chosen by the dominant reduce."""

from __future__ import annotations

import math

import pytest
from cost_model_cases import F32, elementwise, row_reduce

from cost_model import CPU_FIXED, SM_80, SM_90, KernelDesc, ReduceDesc, schedule
from cost_model.devices import KiB
from cost_model.gpu import occupancy

GPUS = [SM_80, SM_90]


def reduce_desc(kind: str, rows: int, length: int, **kw) -> KernelDesc:
    fields = dict(
        bytes_read=rows * length * F32,
        bytes_written=rows * F32,
        parallel_size=rows,
        reduce=(ReduceDesc(kind, rows, length),),  # type: ignore[arg-type]
    )
    return KernelDesc(**(fields | kw))


MAPPINGS = [
    # (kind, rows, length, acceptable GPU mappings)
    ("row", 750_000, 32, {"rows_per_block"}),  # AStitch: many short rows packed
    ("row", 1_000_000, 4, {"rows_per_block"}),
    ("row", 64, 30_000, {"split_row"}),  # AStitch: few long rows split
    ("row", 8, 1_000_000, {"split_row"}),
    ("row", 8192, 1024, {"warp_per_row", "block_per_row"}),
    ("row", 8192, 512, {"warp_per_row"}),
    ("row", 64, 1024, {"block_per_row"}),  # too few rows to give each a warp
    ("row", 100_000, 4096, {"block_per_row"}),
    ("row", 200, 30_000, {"block_per_row"}),  # long rows, but one per SM at least
    ("all", 1, 10_000_000, {"split_row"}),
    ("all", 1, 1000, {"block_per_row"}),  # one block's work: no split
    ("column", 512, 4096, {"column_tiles"}),
    ("column", 100_000, 64, {"column_tiles"}),
]


@pytest.mark.parametrize("spec", GPUS, ids=lambda s: s.name)
@pytest.mark.parametrize(("kind", "rows", "length", "expected"), MAPPINGS)
def test_gpu_mapping(spec, kind, rows, length, expected):
    s = schedule(reduce_desc(kind, rows, length), spec)
    assert s.legal, s.reason
    assert s.mapping in expected, s.why


@pytest.mark.parametrize("spec", GPUS, ids=lambda s: s.name)
def test_no_reduction_is_elementwise_vectorised(spec):
    s = schedule(elementwise(1 << 20), spec)
    assert s.mapping == "elementwise"
    assert s.blocks * s.threads_per_block * 4 == 1 << 20  # 4 fp32 per 16-byte vector
    half = schedule(elementwise(1 << 20, elem_bytes=2), spec)
    assert half.blocks * 2 == s.blocks  # 8 halves per vector


def test_rows_per_block_packs_short_rows():
    s = schedule(reduce_desc("row", 750_000, 32), SM_80)
    # 32 elements = 8 vectors: 8 threads per row, 32 rows in a 256-thread block.
    assert (s.threads_per_block, s.rows_per_block) == (256, 32)
    assert s.blocks == math.ceil(750_000 / 32)


@pytest.mark.parametrize("spec", GPUS, ids=lambda s: s.name)
@pytest.mark.parametrize("regional", [0, 1])
def test_split_row_fills_one_wave(spec, regional):
    desc = reduce_desc("row", 64, 30_000, num_regional=regional, smem_bytes_per_row=30_000 * F32)
    s = schedule(desc, spec)
    assert s.mapping == "split_row" and s.split > 1 and s.blocks == 64 * s.split
    assert s.fits_one_wave
    assert s.extra_bytes == 2 * 64 * s.split * 4  # partial sums out and back
    # Used inside the kernel: a grid barrier; otherwise a second pass (one more launch).
    assert s.grid_syncs == regional
    assert math.isclose(s.launch_seconds, spec.launch_overhead * (2 - regional))


@pytest.mark.parametrize(
    ("spec", "smem_row", "rows_per_block"),
    [(SM_80, 0, 8), (SM_80, 4 * KiB, 8), (SM_80, 40 * KiB, 4), (SM_90, 40 * KiB, 4), (SM_80, 100 * KiB, 1)],
)
def test_warp_per_row_shrinks_blocks_to_fit_shared_memory(spec, smem_row, rows_per_block):
    s = schedule(reduce_desc("row", 100_000, 1024, smem_bytes_per_row=smem_row, num_regional=1), spec)
    assert s.mapping == "warp_per_row" and s.legal
    assert s.rows_per_block == rows_per_block
    assert s.threads_per_block == 32 * rows_per_block
    assert s.smem_per_block == rows_per_block * smem_row <= spec.smem_per_block
    assert s.smem_opt_in == (s.smem_per_block > 48 * KiB)


OCCUPANCY = [
    # (spec, threads per block, regs per thread, smem per block, blocks per SM, limiter)
    (SM_80, 32, 32, 0, 32, "blocks"),
    (SM_80, 256, 32, 0, 8, "threads"),
    (SM_80, 1024, 32, 0, 2, "threads"),
    (SM_80, 1024, 64, 0, 1, "registers"),
    (SM_80, 256, 128, 0, 2, "registers"),
    (SM_80, 256, 255, 0, 1, "registers"),
    (SM_80, 256, 32, 100 * KiB, 1, "shared memory"),
    (SM_90, 256, 32, 100 * KiB, 2, "shared memory"),
    (SM_80, 256, 32, 20 * KiB, 7, "shared memory"),  # 164 KiB / (20 + 1 reserved) KiB
    (SM_80, 1024, 256, 0, 0, "registers"),  # a block's registers exceed the SM's
]


@pytest.mark.parametrize(("spec", "tpb", "regs", "smem", "bps", "limiter"), OCCUPANCY)
def test_occupancy(spec, tpb, regs, smem, bps, limiter):
    assert occupancy(spec, tpb, regs, smem) == (bps, limiter)


@pytest.mark.parametrize("spec", GPUS, ids=lambda s: s.name)
@pytest.mark.parametrize("n", [1, 1000, 1 << 20, 1 << 26])
def test_waves(spec, n):
    s = schedule(elementwise(n), spec)
    assert s.waves == math.ceil(s.blocks / (spec.num_sms * s.blocks_per_sm))
    assert math.isclose(s.occupancy, s.blocks_per_sm * s.threads_per_block / spec.threads_per_sm)


CPU_MAPPINGS = [
    # (desc, mapping, tasks, split) on the fixed 2-core spec
    (elementwise(1 << 20), "cpu_elementwise", 2, 1),
    (elementwise(1), "cpu_elementwise", 1, 1),
    (reduce_desc("row", 8192, 1024), "cpu_rows", 8192, 1),
    (reduce_desc("row", 1, 1 << 20), "cpu_split", 2, 2),
    (reduce_desc("row", 1, 100), "cpu_rows", 1, 1),
    (reduce_desc("all", 1, 1 << 20), "cpu_split", 2, 2),
    (reduce_desc("column", 4096, 512), "cpu_columns", 256, 1),
    (reduce_desc("column", 16, 1 << 20), "cpu_columns", 2, 2),
]


@pytest.mark.parametrize(("desc", "mapping", "tasks", "split"), CPU_MAPPINGS)
def test_cpu_mapping(desc, mapping, tasks, split):
    s = schedule(desc, CPU_FIXED)
    assert (s.mapping, s.blocks, s.split) == (mapping, tasks, split)
    assert s.legal and s.fits_one_wave == (s.waves <= 1)
    assert s.grid_syncs == (1 if split > 1 else 0)


def test_dominant_reduce_picks_the_mapping():
    # Layernorm backward: row reductions (dx) and a column reduction (dw) of the same size.
    rows, cols = 8192, 1024
    desc = row_reduce(rows, cols, reduce=(ReduceDesc("column", cols, rows), ReduceDesc("row", rows, cols)))
    assert schedule(desc, SM_80).mapping == "column_tiles"
