"""Host memory: glibc's malloc in its steady state from the first call.

A compiled graph's large buffers (its outputs, what its library calls and torch fallbacks
allocate, the gradients autograd sums) are freed and allocated again on every call. glibc serves
a request of ``M_MMAP_THRESHOLD`` bytes or more (128 KiB at start) with a fresh ``mmap`` and
returns it on ``free``, so each call faults every page of those buffers in again: about a
quarter of a microsecond a 4 KiB page, a millisecond for every 16 MB touched. glibc raises the
threshold by itself, to the size of the largest mapped chunk freed so far (up to 32 MiB), but a
buffer of exactly that size is still mapped (the test is ``>=``), and trimming the heap above
twice the threshold hands pages back that the next call faults in again. Measured on a 2-core
EPYC, one model a process (`bench.host_memory`): charformer's training step went from 7-9
thousand page faults and 98-116 ms to none and 64-91 ms, under inductor as under stitch.

``settle_malloc`` sets both thresholds once, to the values glibc's own adaptation ends at in a
long-running process (mapped above 32 MiB, trimmed above 64 MiB), so that the first calls of a
fresh process run as fast as the thousandth. It changes the whole process's allocator (eager
and inductor code in the same process run faster too), holds at most 64 MiB of free heap above
what glibc would, and does nothing off glibc. ``STITCH_MALLOC=default`` leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import threading

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the most it adapts to
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc's adaptation sets beside it

_lock = threading.Lock()
_settled: bool | None = None  # None: not tried yet


def _libc():
    """The process's C library, if it is glibc (``mallopt`` means something else elsewhere)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (an AttributeError off glibc)
        return libc
    except (OSError, AttributeError):
        return None


def settle_malloc() -> bool:
    """Set glibc's mmap and trim thresholds to their steady-state values, once a process;
    returns whether they are set (False off glibc or under ``STITCH_MALLOC=default``)."""
    global _settled
    if _settled is not None:
        return _settled
    with _lock:
        if _settled is None:
            _settled = False
            libc = None if os.environ.get("STITCH_MALLOC", "") == "default" else _libc()
            if libc is not None:
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                _settled = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _settled


__all__ = ["settle_malloc"]
