"""What the real-master benchmarks share: CPU of a worker's process tree, one timed build,
and the interleaved rounds that compare pyworker with the reference on one master."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import psutil
from realmaster import RealMaster

WORKERS = ("reference", "pyworker")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants, the reaped ones included."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def timed_build(
    master: RealMaster, builder: str, pid: int, props: Mapping[str, str] | None = None
) -> tuple[float, float]:
    """Force one build and wait for it: (wall seconds, worker CPU seconds)."""
    cpu0 = tree_cpu(pid)
    t0 = time.perf_counter()
    b = master.force_build(builder, props, timeout=600)
    wall = time.perf_counter() - t0
    cpu = tree_cpu(pid) - cpu0
    assert b.result == "SUCCESS", b.describe()
    return wall, cpu


def interleaved(
    benchmark: Any, rounds: int, one: Callable[[str], tuple[float, float]]
) -> dict[str, tuple[list[float], list[float]]]:
    """Run ``one(worker)`` for each worker per round, alternating who goes first.

    Returns ``{worker: (walls, cpus)}``; with ``--benchmark-disable`` a single round.
    """
    runs: dict[str, tuple[list[float], list[float]]] = {w: ([], []) for w in WORKERS}
    order = list(WORKERS)

    def one_round() -> None:
        for w in order:
            wall, cpu = one(w)
            runs[w][0].append(wall)
            runs[w][1].append(cpu)
        order.reverse()

    disabled = getattr(benchmark, "disabled", False)
    benchmark.pedantic(one_round, rounds=1 if disabled else rounds, iterations=1)
    if disabled and not runs["pyworker"][0]:
        one_round()
    return runs


def median(values: list[float]) -> float:
    return statistics.median(values)
