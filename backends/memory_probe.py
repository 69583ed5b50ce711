"""Measure the peak memory a call allocates on CPU, to hold the plan's predictions to account.

PyTorch's CPU allocator and ONNX Runtime (with its arena and memory pattern off) both take
large blocks from glibc malloc. With the mmap threshold pinned low, every such block is its
own mapping, returned to the kernel when freed, so the process's resident set follows the
bytes actually allocated. Linux's ``VmHWM`` (peak resident set) can be reset through
``/proc/self/clear_refs``; the peak of a call is then ``VmHWM`` after it minus ``VmRSS``
before it. Inputs, weights and anything allocated before the call are in the baseline.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 64 * 1024


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    if not name or not Path("/proc/self/clear_refs").exists():
        return None
    libc = ctypes.CDLL(name)
    libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, 0)
    return libc


def available() -> bool:
    """Whether this process can measure (Linux with glibc)."""
    try:
        return _libc() is not None and _reset_peak()
    except OSError:
        return False


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(fn) -> tuple[int, object]:
    """(bytes the call's peak resident set rose above where it started, the call's result).

    Call ``fn`` once before measuring: first calls load code and warm caches."""
    libc = _libc()
    if libc is None:
        raise OSError("peak memory measurement needs Linux's /proc/self/clear_refs and glibc")
    libc.malloc_trim(0)
    _reset_peak()
    base = _status("VmRSS:")
    out = fn()
    return _status("VmHWM:") - base, out
