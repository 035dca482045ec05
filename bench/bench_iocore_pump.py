"""Benchmark of ``StreamPump`` (both twins): a child's stdout -> TEXT frames into a drained pipe.

The child is ``cat`` of a text file in the page cache (lines of about 80 characters); the
pump runs the executor's loop (``poll`` then ``read_from``) in the benchmark thread, and a
second thread drains the frame pipe, as the front end would.  ``raw-copy`` is the floor: the
same loop moving the bytes as frames without decoding or splitting.

Run:   .venv/bin/python -m pytest bench/bench_iocore_pump.py --benchmark-columns=min,mean,rounds
Quick: .venv/bin/python -m pytest bench/bench_iocore_pump.py --benchmark-disable  (2 MiB)
Size:  PUMP_BENCH_MIB=1024 (default 256).

``extra_info`` per case: ``MiB``, best ``MiB/s`` (wall), ``cpu_s_per_GiB`` (CPU time of the
pumping thread: ``time.thread_time``, i.e. what the executor spends) and
``proc_cpu_s_per_GiB`` (the whole benchmark process, drain thread included).  Pipe sizes:
``pipe64k`` is what the executor has today, ``pipe1m`` raises both pipes to 1 MiB with
``F_SETPIPE_SZ`` (fewer, larger reads and frames).  A summary table is printed at the end.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pyworker import wire
from pyworker.iocore import _python

try:
    from pyworker.iocore import _c
except ImportError:  # pragma: no cover - C core not built
    _c = None  # type: ignore[assignment]

READ_SIZE = 256 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def quick(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("benchmark_disable", False))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory, quick: bool) -> tuple[Path, int]:
    """Typical build output: lines of words, about 80 characters each."""
    rng = random.Random(7)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz_./-0123456789", k=rng.randint(2, 12)))
             for _ in range(5000)]
    block = bytearray()
    while len(block) < 1 << 20:
        line = bytearray()
        while len(line) < rng.randint(40, 120):
            line += rng.choice(words) + b" "
        block += line[:-1] + b"\n"
    mib = 2 if quick else int(os.environ.get("PUMP_BENCH_MIB", "256"))
    path = tmp_path_factory.mktemp("pump") / "build.log"
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
    return path, mib * len(block)


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    if RESULTS:
        print("\n\npump benchmark (best of the rounds)")
        print(f"{'case':<28}{'MiB/s':>10}{'CPU s/GiB':>12}{'proc CPU s/GiB':>16}")
        for name, r in sorted(RESULTS.items()):
            print(f"{name:<28}{r['MiB/s']:>10.0f}{r['cpu_s_per_GiB']:>12.3f}"
                  f"{r['proc_cpu_s_per_GiB']:>16.3f}")


class _Drain:
    """A thread reading the frame pipe and counting payload bytes."""

    def __init__(self, pipe_size: int | None) -> None:
        self.rfd, self.wfd = os.pipe()
        if pipe_size:
            fcntl.fcntl(self.wfd, F_SETPIPE_SZ, pipe_size)
        self.payload = 0
        self._decoder = wire.FrameDecoder()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while data := os.read(self.rfd, 1 << 20):
            for _, _, payload in self._decoder.feed(data):
                self.payload += len(payload)

    def close(self) -> int:
        os.close(self.wfd)
        self._thread.join(60)
        os.close(self.rfd)
        return self.payload


def _raw_copy(out_fd: int) -> Any:
    """The floor: frames of the raw bytes, no decoding or splitting."""

    class RawCopy:
        def read_from(self, fd: int, max_bytes: int = READ_SIZE) -> int:
            data = os.read(fd, max_bytes)
            if data:
                _python._write_all(out_fd, wire.frame(wire.TEXT, data, 1))
            return len(data)

        def flush(self) -> None:
            pass

    return RawCopy()


def _factory(backend: str) -> Callable[[int], Any]:
    if backend == "raw-copy":
        return _raw_copy
    mod: ModuleType
    if backend == "c":
        if _c is None:
            pytest.skip("C core not built")
        mod = _c
    else:
        mod = _python
    return lambda out_fd: mod.StreamPump(out_fd, wire.CHANNEL_OF["stdout"])


def _pump_child(path: Path, make: Callable[[int], Any], pipe_size: int | None
                ) -> tuple[int, float, float, float]:
    """Run ``cat path`` and pump its stdout; (payload bytes, wall s, thread CPU s, proc CPU s)."""
    drain = _Drain(pipe_size)
    pump = make(drain.wfd)
    proc = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    if pipe_size:
        fcntl.fcntl(fd, F_SETPIPE_SZ, pipe_size)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
    while True:
        poller.poll()
        if pump.read_from(fd, READ_SIZE) == 0:
            break
    pump.flush()
    t1, c1, p1 = time.perf_counter(), time.thread_time(), time.process_time()
    proc.stdout.close()
    proc.wait()
    return drain.close(), t1 - t0, c1 - c0, p1 - p0


@pytest.mark.parametrize("pipe", ["pipe64k", "pipe1m"])
@pytest.mark.parametrize("backend", ["c", "python", "raw-copy"])
def test_bench_pump_child_stdout(benchmark: Any, text_file: tuple[Path, int], quick: bool,
                                 backend: str, pipe: str) -> None:
    path, size = text_file
    make = _factory(backend)
    pipe_size = (1 << 20) if pipe == "pipe1m" else None
    benchmark.group = f"pump-{pipe}"
    benchmark.extra_info["MiB"] = size / 2**20
    best: dict[str, float] = {}

    def run() -> None:
        payload, wall, cpu, proc_cpu = _pump_child(path, make, pipe_size)
        assert payload == size  # the text has only \n line ends: the bytes pass unchanged
        gib = size / 2**30
        if not best or wall < best["wall"]:
            best.update(wall=wall, cpu=cpu)
        best["cpu_min"] = min(best.get("cpu_min", cpu), cpu)
        best["proc_min"] = min(best.get("proc_min", proc_cpu), proc_cpu)
        best["MiB/s"] = size / 2**20 / best["wall"]
        best["cpu_s_per_GiB"] = best["cpu_min"] / gib
        best["proc_cpu_s_per_GiB"] = best["proc_min"] / gib

    benchmark.pedantic(run, rounds=1 if quick else 3, iterations=1)
    info = {k: round(best[k], 3) for k in ("MiB/s", "cpu_s_per_GiB", "proc_cpu_s_per_GiB")}
    benchmark.extra_info.update(info)
    RESULTS[f"{backend}/{pipe}"] = info
