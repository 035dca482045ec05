"""Benchmark of ``StreamPump`` (both twins): a child's stdout -> TEXT frames into a drained pipe.

The child is ``cat`` of a text file in the page cache (lines of about 80 characters: ASCII
with ``\\n``, the same with ``\\r\\n`` as from a PTY, and Cyrillic UTF-8); the
pump runs the executor's loop (``poll`` then ``read_from``) in the benchmark process, and a
separate process drains the frame pipe, as the front end would.  ``raw-copy`` is the floor: the
same loop moving the bytes as frames without decoding or splitting.

Run:   .venv/bin/python -m pytest bench/bench_iocore_pump.py --benchmark-columns=min,mean,rounds
Quick: .venv/bin/python -m pytest bench/bench_iocore_pump.py --benchmark-disable  (2 MiB)
Size:  PUMP_BENCH_MIB=1024 (default 256).

``extra_info`` per case: ``MiB``, best ``MiB/s`` (wall), ``cpu_s_per_GiB`` (CPU time of the
pumping thread: ``time.thread_time``, i.e. what the executor spends) and
``proc_cpu_s_per_GiB`` (the whole benchmark process).  The drain is a Python process
parsing the frames (``python``, like the front end) or ``wc -c`` (``wc``, a fast reader: a
slow reader makes the pump block and wake more, which costs it CPU time).  Pipe sizes:
``pipe64k`` is what the executor has today, ``pipe1m`` raises both pipes to 1 MiB with
``F_SETPIPE_SZ`` (fewer, larger reads and frames).  A summary table is printed at the end.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pyworker import frames
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


def _block(kind: str) -> bytes:
    """1 MiB of build-log-like text: lines of words, about 80 characters each.

    ``text``: ASCII with ``\\n``; ``crlf``: the same with ``\\r\\n`` (PTY output); ``utf8``:
    Cyrillic words (2-byte characters) with ``\\n``.
    """
    rng = random.Random(7)
    if kind == "utf8":
        letters = "абвгдежзийклмнопрстуфхцчшщыэюя".encode()
        alphabet = [letters[i : i + 2] for i in range(0, len(letters), 2)]
        words = [b"".join(rng.choices(alphabet, k=rng.randint(2, 8))) for _ in range(5000)]
    else:
        alphabet = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz_./-0123456789"]
        words = [b"".join(rng.choices(alphabet, k=rng.randint(2, 12))) for _ in range(5000)]
    end = b"\r\n" if kind == "crlf" else b"\n"
    block = bytearray()
    while len(block) < 1 << 20:
        line = bytearray()
        while len(line) < rng.randint(40, 120):
            line += rng.choice(words) + b" "
        block += line[:-1] + end
    return bytes(block)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory: pytest.TempPathFactory, quick: bool
               ) -> dict[str, tuple[Path, int, int]]:
    """kind -> (path, size, expected payload bytes)."""
    mib = 2 if quick else int(os.environ.get("PUMP_BENCH_MIB", "256"))
    root = tmp_path_factory.mktemp("pump")
    files = {}
    for kind in ("text", "crlf", "utf8"):
        block = _block(kind)
        path = root / f"{kind}.log"
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(block)
        files[kind] = (path, mib * len(block), mib * (len(block) - block.count(b"\r\n")))
    return files


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    if RESULTS:
        print("\n\npump benchmark (best of the rounds)")
        print(f"{'case':<36}{'MiB/s':>10}{'CPU s/GiB':>12}{'proc CPU s/GiB':>16}")
        for name, r in sorted(RESULTS.items()):
            print(f"{name:<36}{r['MiB/s']:>10.0f}{r['cpu_s_per_GiB']:>12.3f}"
                  f"{r['proc_cpu_s_per_GiB']:>16.3f}")


_DRAIN_SCRIPT = """
import os, struct, sys
payload = frames = skip = 0
header = b""
while data := os.read(0, 1 << 20):
    off, end = 0, len(data)
    while off < end:
        if skip:
            step = min(skip, end - off)
            skip -= step
            off += step
            continue
        take = min(8 - len(header), end - off)
        header += data[off : off + take]
        off += take
        if len(header) == 8:
            skip = struct.unpack_from("<I", header)[0]
            payload += skip
            frames += 1
            header = b""
sys.stdout.write(f"{payload} {frames} {len(header) + skip}")
"""


class _Drain:
    """A separate process reading the frame pipe, so that its work does not show in the
    pump's process: ``python`` parses the frames and counts payload bytes (a Python reader,
    as the front end is); ``wc`` only counts bytes (a fast reader: ``wc -c``)."""

    def __init__(self, pipe_size: int | None, kind: str = "python") -> None:
        rfd, self.wfd = os.pipe()
        if pipe_size:
            fcntl.fcntl(self.wfd, F_SETPIPE_SZ, pipe_size)
        argv = [sys.executable, "-c", _DRAIN_SCRIPT] if kind == "python" else ["wc", "-c"]
        self.kind = kind
        self._proc = subprocess.Popen(argv, stdin=rfd, stdout=subprocess.PIPE)
        os.close(rfd)

    def close(self) -> int:
        """Payload bytes (``python``) or all bytes, headers included (``wc``)."""
        os.close(self.wfd)
        out, _ = self._proc.communicate(timeout=120)
        if self.kind != "python":
            return int(out.split()[0])
        payload, _frames, leftover = map(int, out.split())
        assert leftover == 0
        return payload


def _raw_copy(out_fd: int) -> Any:
    """The floor: frames of the raw bytes, no decoding or splitting."""

    class RawCopy:
        def read_from(self, fd: int, max_bytes: int = READ_SIZE) -> int:
            data = os.read(fd, max_bytes)
            if data:
                _python._write_all(out_fd, frames.frame(frames.TEXT, data, 1))
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
    return lambda out_fd: mod.StreamPump(out_fd, frames.CHANNEL_OF["stdout"])


def _pump_child(path: Path, make: Callable[[int], Any], pipe_size: int | None, drain_kind: str
                ) -> tuple[int, float, float, float]:
    """Run ``cat path`` and pump its stdout; (drained bytes, wall s, thread CPU s, proc CPU s)."""
    drain = _Drain(pipe_size, drain_kind)
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


CASES = [
    ("pipe64k", "text", "python"),
    ("pipe1m", "text", "python"),
    ("pipe1m", "crlf", "python"),
    ("pipe1m", "utf8", "python"),
    ("pipe1m", "text", "wc"),
]


@pytest.mark.parametrize(("pipe", "data", "drain"), CASES)
@pytest.mark.parametrize("backend", ["c", "python", "raw-copy"])
def test_bench_pump_child_stdout(benchmark: Any, text_files: dict[str, tuple[Path, int, int]],
                                 quick: bool, backend: str, pipe: str, data: str,
                                 drain: str) -> None:
    path, size, expected = text_files[data]
    if backend == "raw-copy":
        expected = size
    make = _factory(backend)
    pipe_size = (1 << 20) if pipe == "pipe1m" else None
    benchmark.group = f"pump-{pipe}-{data}-{drain}"
    benchmark.extra_info["MiB"] = size / 2**20
    best: dict[str, float] = {}

    def run() -> None:
        got, wall, cpu, proc_cpu = _pump_child(path, make, pipe_size, drain)
        # lines < 4096 characters: only \r\n -> \n changes bytes; wc counts the headers too
        if drain == "python":
            assert got == expected
        else:
            assert got > expected and (got - expected) % 8 == 0
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
    RESULTS[f"{backend}/{pipe}/{data}/{drain}"] = info
