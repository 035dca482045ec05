"""Shell output and step latency against a real Buildbot 4.3.0 master: pyworker next to the
reference worker on the same master, in the same run, interleaved round by round.

* ``stdout``: one step printing ``PYWORKER_BENCH_STDOUT_MIB`` MiB of 70-character lines;
* ``streams``: 8 builders at once, each printing an eighth of that;
* ``trivial``: a build of ``TRIVIAL_STEPS`` steps running ``true`` (time per step);
* ``trivial8``: 8 builders at once, each a build of ``TRIVIAL_STEPS`` such steps (wall time
  of the 8 builds, and worker CPU per step).

Printed with ``-s`` and stored in ``extra_info``: MiB/s (or ms per step), worker CPU seconds
per GiB (front end, executors and commands, via psutil), and the pyworker/reference ratio::

    PYWORKER_BENCH_STDOUT_MIB=256 pytest bench/bench_shell_realmaster.py -s
    pytest bench --benchmark-disable     # CI: once each, small sizes
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realmaster import Builder, RealMaster
from realmaster_bench import WORKERS, interleaved, median, timed_build, tree_cpu

MiB = 1024 * 1024
STDOUT_MIB = int(os.environ.get("PYWORKER_BENCH_STDOUT_MIB", "8"))
ROUNDS = int(os.environ.get("PYWORKER_BENCH_ROUNDS", "3"))
STREAMS = 8
TRIVIAL_STEPS = 10
LINE = "the quick brown fox jumps over the lazy dog 0123456789 worker master!"


def _print_step(mib: float) -> str:
    count = int(mib * MiB)
    return (f"[steps.ShellCommand(command=\"yes '{LINE}' | head -c {count}\","
            " logEnviron=False)]")


@pytest.fixture(scope="module")
def setup(
    bench_master_venv: Path, bench_reference_worker: str, bench_pyworker: str,
    tmp_path_factory: Any,
) -> Iterator[dict[str, Any]]:
    builders: dict[str, Builder] = {}
    for w in WORKERS:
        builders[f"stdout-{w}"] = Builder(_print_step(STDOUT_MIB), workers=[w])
        for i in range(STREAMS):
            builders[f"stream{i}-{w}"] = Builder(_print_step(STDOUT_MIB / STREAMS), workers=[w])
        trivial = ("[" + ", ".join(["steps.ShellCommand(command=['true'], logEnviron=False)"]
                                   * TRIVIAL_STEPS) + "]")
        builders[f"trivial-{w}"] = Builder(trivial, workers=[w])
        for i in range(STREAMS):
            builders[f"trivial{i}-{w}"] = Builder(trivial, workers=[w])
    m = RealMaster(tmp_path_factory.mktemp("bench-shell"), builders, venv=bench_master_venv,
                   workers=WORKERS)
    try:
        m.start()
        pids = {
            "reference": m.start_worker(bench_reference_worker, "reference").pid,
            "pyworker": m.start_worker(bench_pyworker, "pyworker").pid,
        }
        yield {"master": m, "pids": pids}
    finally:
        m.stop()


def _report(benchmark: Any, name: str, result: dict[str, float]) -> None:
    benchmark.extra_info.update(result)
    print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in result.items()))


def test_stdout(benchmark: Any, setup: dict[str, Any]) -> None:
    m: RealMaster = setup["master"]
    runs = interleaved(benchmark, ROUNDS,
                       lambda w: timed_build(m, f"stdout-{w}", setup["pids"][w]))
    gib = STDOUT_MIB / 1024
    result = {}
    for w in WORKERS:
        result[f"{w}_mib_s"] = round(STDOUT_MIB / median(runs[w][0]), 2)
        result[f"{w}_cpu_s_per_gib"] = round(median(runs[w][1]) / gib, 2)
    result["ratio"] = round(result["pyworker_mib_s"] / result["reference_mib_s"], 2)
    result["cpu_ratio"] = round(
        result["reference_cpu_s_per_gib"] / max(result["pyworker_cpu_s_per_gib"], 1e-6), 2
    )
    _report(benchmark, f"stdout {STDOUT_MIB} MiB", result)


def test_concurrent_streams(benchmark: Any, setup: dict[str, Any]) -> None:
    m: RealMaster = setup["master"]

    def one(w: str) -> tuple[float, float]:
        cpu0 = tree_cpu(setup["pids"][w])
        t0 = time.perf_counter()
        builds = m.force_builds([(f"stream{i}-{w}", None) for i in range(STREAMS)], timeout=600)
        wall = time.perf_counter() - t0
        assert all(b.result == "SUCCESS" for b in builds), [b.describe() for b in builds]
        return wall, tree_cpu(setup["pids"][w]) - cpu0

    runs = interleaved(benchmark, ROUNDS, one)
    result = {f"{w}_mib_s": round(STDOUT_MIB / median(runs[w][0]), 2) for w in WORKERS}
    result["ratio"] = round(result["pyworker_mib_s"] / result["reference_mib_s"], 2)
    _report(benchmark, f"{STREAMS} concurrent streams, {STDOUT_MIB} MiB in all", result)


def test_trivial_steps(benchmark: Any, setup: dict[str, Any]) -> None:
    m: RealMaster = setup["master"]
    runs = interleaved(benchmark, ROUNDS,
                       lambda w: timed_build(m, f"trivial-{w}", setup["pids"][w]))
    result = {f"{w}_ms_per_step": round(median(runs[w][0]) / TRIVIAL_STEPS * 1000, 1)
              for w in WORKERS}
    result["speedup"] = round(result["reference_ms_per_step"] / result["pyworker_ms_per_step"], 2)
    _report(benchmark, f"trivial steps ({TRIVIAL_STEPS} per build)", result)



def test_eight_builders_of_trivial_steps(benchmark: Any, setup: dict[str, Any]) -> None:
    m: RealMaster = setup["master"]

    def one(w: str) -> tuple[float, float]:
        cpu0 = tree_cpu(setup["pids"][w])
        t0 = time.perf_counter()
        builds = m.force_builds([(f"trivial{i}-{w}", None) for i in range(STREAMS)],
                                timeout=600)
        wall = time.perf_counter() - t0
        assert all(b.result == "SUCCESS" for b in builds), [b.describe() for b in builds]
        return wall, tree_cpu(setup["pids"][w]) - cpu0

    runs = interleaved(benchmark, ROUNDS, one)
    steps = STREAMS * TRIVIAL_STEPS
    result: dict[str, float] = {}
    for w in WORKERS:
        result[f"{w}_wall_s"] = round(median(runs[w][0]), 2)
        result[f"{w}_cpu_ms_per_step"] = round(median(runs[w][1]) / steps * 1000, 2)
    result["speedup"] = round(result["reference_wall_s"] / result["pyworker_wall_s"], 2)
    result["cpu_ratio"] = round(result["reference_cpu_ms_per_step"]
                                / max(result["pyworker_cpu_ms_per_step"], 1e-6), 2)
    _report(benchmark, f"{STREAMS} builders x {TRIVIAL_STEPS} trivial steps at once", result)
