"""What a worker itself costs in memory, apart from the commands it runs.

The worker's own processes are its front end and the front end's children that run
``pyworker.executor`` (pyworker's executors); every other descendant is a command (or a
command's child) and is left out. The reference worker has no executors: its own memory is its
front end alone. For each process, psutil's ``memory_full_info()`` gives PSS (shared pages
divided among their sharers) and USS (pages only this process maps); both are summed.

:class:`OwnMemory` samples during a scenario and keeps the peak and the last sample. Reading
the smaps of 65 processes can take seconds of wall time on a loaded machine (little CPU), so
``sampling()`` does it in a thread, away from the loop that times the scenario.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

#: What marks an executor in its command line (the boot string of ``frontend/pool.py``).
EXECUTOR_MARK = "pyworker.executor"


def own_processes(front: psutil.Process) -> list[psutil.Process]:
    """The front end and its executor children (never the commands they start)."""
    procs = [front]
    try:
        children = front.children()
    except psutil.Error:
        return procs
    for child in children:
        try:
            if any(EXECUTOR_MARK in arg for arg in child.cmdline()):
                procs.append(child)
        except psutil.Error:
            pass
    return procs


@dataclass
class MemorySample:
    """PSS and USS summed over a worker's own processes, in bytes, and how many there were."""

    pss: int = 0
    uss: int = 0
    processes: int = 0
    executors: int = 0


def own_memory(front: psutil.Process) -> MemorySample:
    """One sample of the worker's own memory (processes that vanish meanwhile are skipped)."""
    s = MemorySample()
    for p in own_processes(front):
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        s.pss += info.pss
        s.uss += info.uss
        s.processes += 1
    s.executors = max(s.processes - 1, 0)
    return s


class OwnMemory:
    """Samples :func:`own_memory` at most every ``interval`` seconds (reading smaps is not
    free) and keeps the peak and the last sample; also the peak size of the whole tree."""

    def __init__(self, front: psutil.Process, interval: float = 0.2) -> None:
        self.front = front
        self.interval = interval
        self.peak = MemorySample()
        self.end = MemorySample()
        self.peak_tree_processes = 0
        self._last = 0.0
        self.sample(force=True)

    def sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        s = own_memory(self.front)
        try:
            tree = 1 + len(self.front.children(recursive=True))
        except psutil.Error:
            tree = 0
        self.peak_tree_processes = max(self.peak_tree_processes, tree)
        self.peak = MemorySample(
            max(self.peak.pss, s.pss), max(self.peak.uss, s.uss),
            max(self.peak.processes, s.processes), max(self.peak.executors, s.executors),
        )
        self.end = s

    def finish(self) -> None:
        """The last sample, taken when the scenario's commands have completed."""
        self.sample(force=True)

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """Sample every ``interval`` seconds in a thread while the block runs."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(self.interval):
                self.sample(force=True)

        thread = threading.Thread(target=run, daemon=True, name="own-memory")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def leftovers(front: psutil.Process) -> list[str]:
    """Descendants of the front end that are not its executors: after every command has
    completed there must be none (a command or a command's child left over)."""
    own = {p.pid for p in own_processes(front)}
    out: list[str] = []
    try:
        descendants = front.children(recursive=True)
    except psutil.Error:
        return out
    for p in descendants:
        if p.pid in own:
            continue
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
        except psutil.Error:
            pass
    return out
