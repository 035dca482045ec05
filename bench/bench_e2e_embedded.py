"""End-to-end pytest-benchmark suite: a real pyworker process on the embedded master.

One worker process and one embedded master are started per module; each benchmark round
runs one validated scenario of :mod:`pyworker.bench` (a round fails if the worker loses or
corrupts data). The scenario's own figures (MiB/s, worker CPU per GiB, latency percentiles)
are attached to the benchmark's ``extra_info``.

    pytest bench/bench_e2e_embedded.py                       # measure
    pytest bench/bench_e2e_embedded.py --benchmark-disable   # CI: each scenario once, quickly

``PYWORKER_BENCH_SCALE`` multiplies the (small) sizes; ``PYWORKER_IO`` picks the backend.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest

from pyworker.bench import profiler as pb_bench
from pyworker.bench import scenarios as pb_scenarios

SCALE = float(os.environ.get("PYWORKER_BENCH_SCALE", "0.25"))


@pytest.fixture(scope="module")
def session() -> Iterator[tuple[pb_bench.Bench, pb_bench.Worker]]:
    opts = pb_bench.parse_args(["--quick", "--no-progress", "--scale", str(SCALE)])
    b = pb_bench.Bench(opts)
    try:
        b.workers = pb_bench.make_workers(opts, b.tmp)
        port = b.start_master([w.name for w in b.workers])
        worker = b.workers[0]
        worker.backend = pb_bench.detect_backend(worker.env)
        b.start_worker(worker, port)
        yield b, worker
    finally:
        b.close()


TRANSFERS = {"upload-file", "download-file", "upload-dir-none", "upload-dir-gz", "upload-dir-bz2"}
HAVE_TRANSFERS = importlib.util.find_spec("pyworker.executor.commands.transfer") is not None


def _scenario(name: str) -> pb_bench.Scenario:
    return next(s for s in pb_scenarios.all_scenarios() if s.name == name)


def _run(benchmark: Any, session: tuple[pb_bench.Bench, pb_bench.Worker], name: str) -> None:
    b, worker = session
    sc = _scenario(name)
    runs: list[pb_bench.Run] = []

    def once() -> None:
        r = pb_bench.Run(worker.label, True)
        sc.func(b, worker, r)  # raises BenchFailure on lost or corrupted data
        runs.append(r)

    benchmark.pedantic(once, rounds=3, iterations=1, warmup_rounds=0)
    summary = pb_bench.summarize(sc.kind, runs)
    benchmark.extra_info.update(
        {k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}
    )
    benchmark.extra_info["io_backend"] = worker.backend
    assert summary["ok"]


@pytest.mark.parametrize(
    "name",
    [
        "stdout-pipe",
        "stdout-pty",
        "streams",
        "upload-file",
        "download-file",
        "upload-dir-none",
        "upload-dir-gz",
        "upload-dir-bz2",
        "cpdir",
        "latency",
        "latency-stat",
        "latency-burst",
        "idle",
        "burst-8",
        "burst-64",
        "concurrent-streams",
        "concurrent-steps",
        "start-stop",
        "soak",
    ],
)
def test_e2e_embedded(benchmark: Any, session: Any, name: str) -> None:
    if name in TRANSFERS and not HAVE_TRANSFERS:
        pytest.skip("pyworker.executor.commands.transfer is not there yet")
    _run(benchmark, session, name)
