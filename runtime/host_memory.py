"""Host memory: glibc's malloc in its steady state from the first call.

A compiled graph's large buffers (its outputs, what its library calls and torch fallbacks
allocate, the gradients autograd sums) are freed and allocated again on every call. glibc
serves a request of ``M_MMAP_THRESHOLD`` bytes or more (128 KiB at start) with a fresh ``mmap``
and returns it on ``free``, so each call faults every page of those buffers in again: about a
microsecond a 4 KiB page here, zeroing included (a oneDNN convolution backward writing 4 MiB:
0.47 ms a call settled, 2.6 ms not). glibc raises the threshold by itself, but only to the
largest mapped chunk freed so far (at most 32 MiB), and it trims the top of the heap above
twice that, handing back pages the next call faults in again: a process whose buffers vary in
size call to call keeps faulting (eager charformer alone: 8 thousand faults a call, step after
step). Measured with one model a process on a 2-core EPYC (`bench/results/host_memory`):
resnet18/b8 inference under stitch took 13-14 thousand page faults a call and 101-103 ms,
settled 0.2 thousand and 74-76 ms (inductor: 75-78); charformer's training step 75-83 -> 65-69
ms; eager alone, rffs_net 54-55 -> 34 ms and charformer inference 42-45 -> 30 ms.

``settle_malloc`` sets both thresholds once, to the values glibc's own adaptation ends at in a
long-running process (mapped above 32 MiB, trimmed above 64 MiB), so that the first calls of a
fresh process run as fast as the thousandth. It changes the whole process's allocator (eager
and inductor code in the same process run faster too), holds at most 64 MiB of free heap above
what glibc would, and does nothing off glibc. ``STITCH_MALLOC=default`` leaves malloc alone, as
does any threshold the environment sets for glibc (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import ctypes
import os
import threading

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the most it adapts to
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc's adaptation sets beside it

# the user's own malloc settings (glibc reads them at start): where any is set, it stays theirs
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")

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


def _left_alone() -> bool:
    """Whether malloc is the user's to tune: ``STITCH_MALLOC=default``, or glibc's own
    environment settings of the thresholds."""
    env = os.environ
    return env.get("STITCH_MALLOC", "") == "default" or any(k in env for k in USER_SETTINGS) \
        or any(t in env.get("GLIBC_TUNABLES", "") for t in USER_TUNABLES)


def settle_malloc() -> bool:
    """Set glibc's mmap and trim thresholds to their steady-state values, once a process;
    returns whether they are set (False off glibc, under ``STITCH_MALLOC=default``, or where
    the environment already sets them for glibc)."""
    global _settled
    if _settled is not None:
        return _settled
    with _lock:
        if _settled is None:
            _settled = False
            libc = None if _left_alone() else _libc()
            if libc is not None:
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                _settled = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _settled


__all__ = ["settle_malloc"]
