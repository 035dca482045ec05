"""What the real-master benchmarks share: CPU of a worker's process tree, one timed build,
the interleaved rounds that compare pyworker with the reference on one master, and the
executable that starts the minimal pipelining worker (``minimal_worker.py``)."""

from __future__ import annotations

import shlex
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
from realmaster import RealMaster

WORKERS = ("reference", "pyworker")
MINIMAL_WORKER = Path(__file__).resolve().parent / "minimal_worker.py"


def minimal_worker_exe(master_venv: Path, directory: Path) -> str:
    """An executable that runs ``minimal_worker.py`` with the master venv's Python.

    The harness starts every worker as ``<exe> create-worker ...`` / ``<exe> start --nodaemon
    <dir>`` with an empty environment; this shell wrapper ``exec``s the script, so the pid
    the harness holds (and whose CPU :func:`tree_cpu` counts) is the worker's own.
    """
    exe = directory / "minimal-worker"
    python = shlex.quote(str(master_venv / "bin" / "python"))
    exe.write_text(f'#!/bin/sh\nexec {python} {shlex.quote(str(MINIMAL_WORKER))} "$@"\n')
    exe.chmod(0o755)
    return str(exe)


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
    benchmark: Any,
    rounds: int,
    one: Callable[[str], tuple[float, float]],
    workers: Sequence[str] = WORKERS,
) -> dict[str, tuple[list[float], list[float]]]:
    """Run ``one(worker)`` for each worker per round, rotating who goes first.

    The order turns by one worker each round (with two workers: it alternates), so each
    worker takes each place equally often. Returns ``{worker: (walls, cpus)}``; with
    ``--benchmark-disable`` a single round.
    """
    runs: dict[str, tuple[list[float], list[float]]] = {w: ([], []) for w in workers}
    order = list(workers)

    def one_round() -> None:
        for w in order:
            wall, cpu = one(w)
            runs[w][0].append(wall)
            runs[w][1].append(cpu)
        order.append(order.pop(0))

    disabled = getattr(benchmark, "disabled", False)
    benchmark.pedantic(one_round, rounds=1 if disabled else rounds, iterations=1)
    if disabled and not runs[workers[0]][0]:
        one_round()
    return runs


def median(values: list[float]) -> float:
    return statistics.median(values)
