"""Process-wide allocator settings for calibration workers (glibc malloc only).

A trial allocates its margin series afresh (``n`` float64 per instrument and consumer, ~15 MB
per instrument on five years of minute bars) and frees them at its end. glibc's malloc
hands such blocks back to the kernel — ``mmap``'d ones on ``free``, heap tops above its trim
threshold on ``free`` too — so the next trial's arrays are new pages, each first touched
through a page fault. Measured on issue 15's 1,000-trial calibration (one worker): 11.1
million minor faults and a margin-series step of 53.4 ms a trial with glibc's defaults,
0.18 million and 32.2 ms with this setting (``bench/RESULTS.md``). The cost: the process
keeps the memory of its largest trial (its peak RSS was the same either way).

Called by the entry points that run trials (``marginlab calibrate`` / ``worker``, the
service's queue and embedded workers), never on import: it changes the whole process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["retain_freed_memory"]

# mallopt(3) parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# mallopt takes an int: the largest settable thresholds.
_MAX_INT = 2**31 - 1
# Blocks up to 1 GiB from the heap (glibc accepts up to its int limit on 64-bit); larger
# ones stay mmap'd — a series that size is rare, and then its faults are a small share.
MMAP_THRESHOLD_BYTES = 1 << 30

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Make glibc's malloc serve blocks up to ``MMAP_THRESHOLD_BYTES`` from its heap and
    keep freed memory for reuse instead of returning it to the kernel.

    Returns whether the settings took effect: ``False`` off Linux, on a C library other
    than glibc (musl, macOS: nothing is changed), or if ``mallopt`` refused them. Calling it
    again is a no-op that returns the first call's answer.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        # glibc exports gnu_get_libc_version; musl has mallopt as a stub that does nothing.
        libc.gnu_get_libc_version  # noqa: B018 - the lookup is the check
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Trim first: setting either threshold turns off glibc's dynamic adjustment of both.
    trimmed = mallopt(_M_TRIM_THRESHOLD, _MAX_INT) == 1
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    _applied = trimmed and mapped
    return _applied
