"""KernelDesc / ReduceDesc: validation and the derived properties the model relies on."""

from __future__ import annotations

import pytest

from cost_model import KernelDesc, ReduceDesc

BAD_REDUCES = [
    # (kind, rows, length, message)
    ("diag", 4, 4, "kind"),
    ("row", 0, 4, "rows, length"),
    ("column", 4, 0, "rows, length"),
    ("all", 2, 4, "rows == 1"),
]


@pytest.mark.parametrize(("kind", "rows", "length", "message"), BAD_REDUCES)
def test_bad_reduce_desc(kind, rows, length, message):
    with pytest.raises(ValueError, match=message):
        ReduceDesc(kind, rows, length)  # type: ignore[arg-type]


BAD_KERNELS = [
    ({"bytes_read": -1}, "bytes_read"),
    ({"bytes_written": -4}, "bytes_written"),
    ({"flops": -1}, "flops"),
    ({"smem_bytes_per_row": -1}, "smem_bytes_per_row"),
    ({"num_global": -1}, "num_global"),
    ({"parallel_size": 0}, "parallel_size"),
    ({"elem_bytes": 0}, "elem_bytes"),
]


@pytest.mark.parametrize(("override", "field"), BAD_KERNELS)
def test_bad_kernel_desc(override, field):
    fields = {"bytes_read": 4, "bytes_written": 4, "parallel_size": 1} | override
    with pytest.raises(ValueError, match=field):
        KernelDesc(**fields)


def test_dominant_reduce_is_the_largest_first_on_ties():
    small, big, tie = ReduceDesc("row", 8, 8), ReduceDesc("column", 64, 64), ReduceDesc("row", 64, 64)
    desc = KernelDesc(1, 1, 1, reduce=(small, big, tie))
    assert desc.dominant_reduce is big
    assert KernelDesc(1, 1, 1).dominant_reduce is None


def test_reduce_list_becomes_tuple_and_desc_is_hashable():
    desc = KernelDesc(1, 1, 1, reduce=[ReduceDesc("all", 1, 10)])  # type: ignore[arg-type]
    assert isinstance(desc.reduce, tuple)
    assert hash(desc) == hash(KernelDesc(1, 1, 1, reduce=(ReduceDesc("all", 1, 10),)))


@pytest.mark.parametrize(
    ("num_global", "needs_grid_sync", "syncs"), [(0, False, 0), (0, True, 1), (2, False, 2), (3, True, 3)]
)
def test_grid_syncs(num_global, needs_grid_sync, syncs):
    desc = KernelDesc(1, 1, 1, num_global=num_global, needs_grid_sync=needs_grid_sync)
    assert desc.grid_syncs == syncs


def test_traffic():
    assert KernelDesc(100, 28, 1).traffic == 128
