"""Linux process controls that both the front end and the executors use (``prctl``,
``malloc_trim``).

Shared by both sides: it imports nothing of pyworker.
"""

from __future__ import annotations

import ctypes
import os
import sys


def prctl(option: int, value: int) -> bool:
    """Linux ``prctl(option, value)``; False where it is not available."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def release_free_memory() -> bool:
    """Give the C library's free heap memory back to the kernel (glibc ``malloc_trim``):
    after a load, the pages freed objects leave in the heap stay resident until then.
    False where there is no ``malloc_trim``."""
    if sys.platform != "linux":
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def erase_initial_environment(names: set[str]) -> int:
    """Overwrite with zeros the entries of ``names`` in this process's initial environment
    block, the memory ``/proc/<pid>/environ`` shows; return how many were erased.

    Removing a variable from ``os.environ`` only drops libc's pointer to it: its text stays
    in the block the kernel wrote at ``execve``, where any process of the same user (a
    build) can read it. Only entries already removed from the environment may be passed:
    nothing points to them any more, so zeroing them changes no variable.
    """
    if sys.platform != "linux" or not names:
        return 0
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # fields 50 and 51 of proc(5) (env_start, env_end); [0] here is field 3
        start, end = int(fields[47]), int(fields[48])
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except (OSError, IndexError, ValueError):
        return 0
    if start <= 0 or len(block) > end - start:
        return 0
    erased = 0
    offset = 0
    for entry in block.split(b"\0"):
        name = entry.split(b"=", 1)[0].decode("utf-8", "surrogateescape")
        if entry and name in names and name not in os.environ:
            ctypes.memset(start + offset, 0, len(entry))
            erased += 1
        offset += len(entry) + 1
    return erased
