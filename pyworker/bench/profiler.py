"""``pyworker bench``: how fast a worker moves bytes, and what it costs in CPU.

The bench starts an :mod:`embedded master <pyworker.bench.embedded_master>` in this process (the
Twisted reactor runs in a background thread) and one or more real worker processes
(``pyworker start --nodaemon`` in a temporary base directory, or any executable with the
``buildbot-worker`` command line via ``--against``). Each scenario sends the worker the
commands a Buildbot master would send, validates what arrives on the master side (byte
counts and CRC-32 of every stream, file and tree: a worker that drops or corrupts data fails
the run) and measures:

* ``MiB/s``: payload bytes divided by wall time, from ``startCommand`` to ``complete``;
* ``CPU s/GiB``: CPU seconds of the whole worker process tree (front end, executors and the
  commands they run, from psutil) per GiB of payload; ``fe`` is the front end alone;
* ``master s/GiB``: CPU of the embedded master's reactor thread, to show it is not the
  bottleneck;
* ``RSS``: peak resident memory of the worker tree, commands included (sampled every 50 ms);
* ``PSS``/``USS``: the :mod:`worker's own memory <pyworker.bench.memory>` (front end and
  executors, without the commands), peak and at the end of the scenario;
* latency scenarios: per-command latency percentiles and CPU milliseconds per command.

Workers given with ``--against`` or ``--compare-backends`` run interleaved (scenario by
scenario, repetition by repetition) and the output ends each scenario with their ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from pyworker.bench.memory import OwnMemory

MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = 64 * 1024
LINE = 64
#: The directory that holds the ``pyworker`` package these sources belong to.
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class BenchFailure(Exception):
    """A scenario's validation failed: the worker lost, added or corrupted data."""


# -- deterministic payloads ---------------------------------------------------------------

#: The text block of the streaming scenarios: 1024 lines of 64 bytes (ASCII, no byte the
#: line splitter rewrites). Shared as source so that the child and the master agree.
BASE_SRC = (
    'pat = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"\n'
    'base = bytearray(b"".join(b"%05d " % j + (pat[j % 64:] + pat[:j % 64])[:57] + b"\\n"'
    " for j in range(1024)))\n"
)

#: The child command of the streaming scenarios. It writes ``size`` bytes of text lines to
#: stdout, 64 KiB per write; every block starts with its block number so that a dropped,
#: repeated or reordered block changes the CRC. The master computes the same content with
#: :func:`stream_crc`.
STREAM_CHILD = (
    "import os, sys\n"
    + BASE_SRC
    + "size = int(sys.argv[1]); i = 0\n"
    "while size > 0:\n"
    "    base[0:12] = b'%012d' % i\n"
    "    view = memoryview(base)[: min(65536, size)]\n"
    "    size -= len(view); i += 1\n"
    "    while view:\n"
    "        view = view[os.write(1, view):]\n"
)


def _stream_base() -> bytearray:
    ns: dict[str, Any] = {}
    exec(BASE_SRC, ns)
    base: bytearray = ns["base"]
    assert len(base) == BLOCK
    return base


_CRC_CACHE: dict[int, int] = {}


def stream_crc(size: int) -> int:
    """CRC-32 of what :data:`STREAM_CHILD` writes for ``size`` bytes."""
    if size in _CRC_CACHE:
        return _CRC_CACHE[size]
    base = _stream_base()
    crc, i, left = 0, 0, size
    while left > 0:
        base[0:12] = b"%012d" % i
        n = min(BLOCK, left)
        crc = zlib.crc32(memoryview(base)[:n], crc)
        left -= n
        i += 1
    _CRC_CACHE[size] = crc
    return crc


def write_file(path: str, size: int, seed: int, text: bool) -> int:
    """Write ``size`` deterministic bytes (text lines or random-looking); return the CRC-32."""
    rng = random.Random(seed)
    if text:
        block = bytearray(_stream_base())
    else:
        block = bytearray(rng.randbytes(BLOCK))
    crc, i = 0, 0
    with open(path, "wb") as f:
        left = size
        while left > 0:
            block[0:12] = b"%012d" % (i + seed)
            n = min(BLOCK, left)
            piece = memoryview(block)[:n]
            f.write(piece)
            crc = zlib.crc32(piece, crc)
            left -= n
            i += 1
    return crc


def file_crc(path: str) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


Manifest = dict[str, tuple[str, int, int]]  # relpath -> (kind, size, crc) / ("link", 0, 0)


def make_tree(root: str, total: int) -> Manifest:
    """A source tree of about ``total`` bytes: text and binary files of mixed sizes in a few
    subdirectories, one empty directory and one relative symlink."""
    sizes = [4096, 65536, 1000, 300_000, 2 * MiB, 12_345, 700_000, 128]
    manifest: Manifest = {}
    os.makedirs(root)
    os.makedirs(os.path.join(root, "empty"))
    manifest["empty"] = ("dir", 0, 0)
    done, n = 0, 0
    while done < total or n < 4:
        sub = f"d{n % 5}"
        if sub not in manifest:
            os.makedirs(os.path.join(root, sub))
            manifest[sub] = ("dir", 0, 0)
        size = min(sizes[n % len(sizes)], max(total - done, 1))
        rel = f"{sub}/f{n:04d}.{'txt' if n % 2 == 0 else 'bin'}"
        crc = write_file(os.path.join(root, rel), size, seed=n + 1, text=n % 2 == 0)
        manifest[rel] = ("file", size, crc)
        done += size
        n += 1
    os.symlink("d0/f0000.txt", os.path.join(root, "link.txt"))
    manifest["link.txt"] = ("link", 0, 0)
    return manifest


def check_tree(root: str, expected: Manifest, what: str) -> None:
    """Raise :class:`BenchFailure` unless ``root`` holds exactly ``expected``."""
    found: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                found[rel] = ("link", 0, 0)
            elif os.path.isdir(full):
                found[rel] = ("dir", 0, 0)
            else:
                size, crc = file_crc(full)
                found[rel] = ("file", size, crc)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in expected if k in found and found[k] != expected[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if extra:
            parts.append(f"unexpected {extra[:5]}")
        for k in wrong[:5]:
            parts.append(f"{k}: expected {expected[k]}, got {found[k]}")
        raise BenchFailure(f"{what}: the tree differs from the source: " + "; ".join(parts))


# -- the reactor thread -------------------------------------------------------------------


class ReactorThread:
    """Runs the Twisted reactor in a daemon thread; ``call`` runs a function in it."""

    def __init__(self, profile: str | None = None) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.profile = profile

        def run() -> None:
            if profile is None:
                self.reactor.run(installSignalHandlers=False)
                return
            import cProfile

            prof = cProfile.Profile()
            prof.runcall(self.reactor.run, installSignalHandlers=False)
            prof.dump_stats(profile)

        self.thread = threading.Thread(target=run, daemon=True, name="reactor")
        self.thread.start()

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> concurrent.futures.Future[Any]:
        from twisted.internet import defer

        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            d = defer.maybeDeferred(fn, *args, **kw)
            d.addCallbacks(fut.set_result, lambda f: fut.set_exception(f.value))

        self.reactor.callFromThread(run)
        return fut

    def wait(self, fn: Callable[..., Any], *args: Any, timeout: float = 60, **kw: Any) -> Any:
        return self.call(fn, *args, **kw).result(timeout)

    def stop(self) -> None:
        if self.reactor.running:
            self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(5)


# -- the worker processes -----------------------------------------------------------------


@dataclass
class Usage:
    """CPU and memory of a worker process tree at one moment."""

    frontend: float
    total: float


def tree_cpu(proc: psutil.Process) -> Usage:
    """CPU seconds of a process and all its descendants, reaped ones included."""
    total = 0.0
    front = 0.0
    try:
        t = proc.cpu_times()
        front = t.user + t.system
        total = front + t.children_user + t.children_system
        children = proc.children(recursive=True)
    except psutil.Error:
        return Usage(front, total)
    for child in children:
        try:
            t = child.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return Usage(front, total)


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(front end RSS, RSS of the whole tree) in bytes."""
    try:
        front = proc.memory_info().rss
        total = front
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return front, total
    except psutil.Error:
        return 0, 0


@dataclass
class Worker:
    """One worker under test: its command line, environment, base directory and process."""

    label: str
    argv: list[str]
    env: dict[str, str]
    name: str
    basedir: str
    backend: str = "-"
    proc: subprocess.Popen[bytes] | None = None
    ps: psutil.Process | None = None

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for fname in ("bench-console.log", "twistd.log"):
            path = os.path.join(self.basedir, fname)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    tail = f.read().splitlines()[-lines:]
                if tail:
                    out.append(f"--- {path} ---\n" + "\n".join(tail))
        return "\n".join(out)


def pyworker_argv() -> list[str]:
    """The pyworker CLI from these sources, with this interpreter."""
    boot = (
        f"import sys; sys.path.insert(0, {PKG_PARENT!r}); "
        "from pyworker.cli.main import main; sys.exit(main())"
    )
    return [sys.executable, "-c", boot]


def detect_backend(env: dict[str, str]) -> str:
    """The I/O backend pyworker selects in ``env`` (imported in a subprocess, defensively)."""
    code = (
        f"import sys; sys.path.insert(0, {PKG_PARENT!r})\n"
        "try:\n    import pyworker.iocore as io; print(io.BACKEND)\n"
        "except Exception as e:\n    print('unavailable (%s)' % (e,))\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip() or f"unavailable ({out.stderr.strip()[-200:]})"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


# -- scenarios ----------------------------------------------------------------------------


@dataclass
class Run:
    """One measured run of one scenario on one worker."""

    worker: str
    ok: bool
    payload: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    cpu_frontend: float = 0.0
    master_cpu: float = 0.0
    peak_rss: int = 0
    peak_rss_frontend: int = 0
    own_pss_peak: int = 0
    own_uss_peak: int = 0
    own_pss_end: int = 0
    own_uss_end: int = 0
    peak_processes: int = 0
    commands: int = 0
    latencies: list[float] = field(default_factory=list)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mib_s(self) -> float:
        return self.payload / MiB / self.wall if self.wall > 0 else 0.0

    def per_gib(self, cpu: float) -> float:
        return cpu / (self.payload / GiB) if self.payload else 0.0

    def take_memory(self, mem: OwnMemory) -> None:
        """Peaks from ``mem`` (kept if higher), end values replaced."""
        self.own_pss_peak = max(self.own_pss_peak, mem.peak.pss)
        self.own_uss_peak = max(self.own_uss_peak, mem.peak.uss)
        self.own_pss_end, self.own_uss_end = mem.end.pss, mem.end.uss
        self.peak_processes = max(self.peak_processes, mem.peak_tree_processes)

    def take_peaks(self, sub: Run) -> None:
        """Memory of a sub-run (one round of a scenario): peaks kept, end values replaced."""
        self.peak_rss = max(self.peak_rss, sub.peak_rss)
        self.peak_rss_frontend = max(self.peak_rss_frontend, sub.peak_rss_frontend)
        self.own_pss_peak = max(self.own_pss_peak, sub.own_pss_peak)
        self.own_uss_peak = max(self.own_uss_peak, sub.own_uss_peak)
        self.own_pss_end, self.own_uss_end = sub.own_pss_end, sub.own_uss_end
        self.peak_processes = max(self.peak_processes, sub.peak_processes)


@dataclass
class Scenario:
    name: str
    title: str
    kind: str  # "throughput" or "latency"
    func: Callable[[Bench, Worker, Run], None]
    #: An extra line per worker under the table, from its summary (e.g. a target's ratio).
    note: Callable[[dict[str, Any]], str] | None = None
    #: The table's detail (sizes, counts), when :func:`detail_of` does not know the scenario.
    detail: Callable[[Bench], str] | None = None


def shell_args(
    command: list[str], *, pty: bool = False, log_environ: bool = True
) -> dict[str, Any]:
    """A ``shell`` command's arguments as the 4.3.0 master's ShellCommand sends them."""
    return {
        "workdir": "build",
        "command": command,
        "env": {},
        "want_stdout": True,
        "want_stderr": True,
        "logfiles": {},
        "timeout": 1200,
        "maxTime": None,
        "max_lines": None,
        "sigtermTime": None,
        "usePTY": pty,
        "logEnviron": log_environ,
        "initial_stdin": None,
        "interruptSignal": "KILL",
    }


def check_result(res: Any, what: str, rc: int | None = 0) -> None:
    """The generic checks: no failure, one ``rc`` with the wanted value, no protocol errors."""
    if res.failure:
        raise BenchFailure(f"{what}: the command failed: {res.failure.splitlines()[0]}")
    errs = res.other.get("protocol_errors")
    if errs:
        raise BenchFailure(f"{what}: protocol errors: {errs[:3]}")
    if rc is not None and res.rc != rc:
        stderr = "".join(res.stream("stderr").text)[-300:]
        raise BenchFailure(f"{what}: rc {res.rc}, expected {rc} (stderr: {stderr!r})")
    if res.rc_count > 1:
        raise BenchFailure(f"{what}: {res.rc_count} rc updates, expected one")


def check_stream(res: Any, key: str, size: int, what: str) -> None:
    stats = res.stream(key)
    want = stream_crc(size)
    if stats.chars != size or stats.crc != want:
        raise BenchFailure(
            f"{what}: {key}: expected {size} bytes (crc32 {want:08x}), the master got "
            f"{stats.chars} bytes (crc32 {stats.crc:08x}) in {stats.lines} lines: "
            + ("data was lost" if stats.chars < size else
               "data was added" if stats.chars > size else "data was corrupted")
        )


def _stream_scenario(pty: bool, key: str = "size_pipe") -> Callable[[Bench, Worker, Run], None]:
    def run(bench: Bench, worker: Worker, r: Run) -> None:
        size = bench.size(key)
        args = shell_args([sys.executable, "-c", STREAM_CHILD, str(size)], pty=pty)
        stream_crc(size)
        res = bench.measure(worker, r, size, [("b0", "shell", args)])[0]
        what = f"stdout-{'pty' if pty else 'pipe'} on {worker.label}"
        check_result(res, what)
        check_stream(res, "stdout", size, what)
        r.extra["update_calls"] = res.update_calls

    return run


def sc_streams(bench: Bench, worker: Worker, r: Run) -> None:
    n = bench.streams
    size = bench.size("size_streams") // n // BLOCK * BLOCK
    args = shell_args([sys.executable, "-c", STREAM_CHILD, str(size)])
    stream_crc(size)
    results = bench.measure(
        worker, r, size * n, [(f"b{i}", "shell", args) for i in range(n)]
    )
    for i, res in enumerate(results):
        what = f"streams (builder b{i}) on {worker.label}"
        check_result(res, what)
        check_stream(res, "stdout", size, what)


def sc_upload_file(bench: Bench, worker: Worker, r: Run) -> None:
    from pyworker.bench.embedded_master import FileWriter

    size = bench.size("size_upload")
    src = os.path.join(worker.basedir, "b0", "build", f"upload-{size}.bin")
    key = ("upload", worker.name, size)
    if key not in bench.cache:
        os.makedirs(os.path.dirname(src), exist_ok=True)
        bench.cache[key] = write_file(src, size, seed=7, text=False)
    crc = bench.cache[key]
    dest = os.path.join(bench.master_dir, f"upload-{worker.name}.bin")
    writer = bench.reactor.wait(FileWriter, dest)
    args = {
        "workdir": "build",
        "workersrc": os.path.basename(src),
        "writer": writer,
        "maxsize": None,
        "blocksize": 262144,
        "keepstamp": True,
    }
    try:
        res = bench.measure(worker, r, size, [("b0", "uploadFile", args)])[0]
        what = f"upload-file on {worker.label}"
        check_result(res, what)
        if not writer.closed:
            raise BenchFailure(f"{what}: the worker never called close() on the writer")
        if writer.bytes != size or writer.crc != crc:
            raise BenchFailure(
                f"{what}: expected {size} bytes (crc32 {crc:08x}), the master got "
                f"{writer.bytes} bytes (crc32 {writer.crc:08x}) in {writer.writes} writes"
            )
        if writer.utime_args is None:
            raise BenchFailure(f"{what}: keepstamp=True but the worker never called utime()")
        r.extra["writes"] = writer.writes
    finally:
        bench.reactor.wait(writer.cancel)
        if os.path.exists(dest):
            os.unlink(dest)


def sc_download_file(bench: Bench, worker: Worker, r: Run) -> None:
    from pyworker.bench.embedded_master import FileReader

    size = bench.size("size_download")
    src = os.path.join(bench.master_dir, f"download-{size}.bin")
    if ("download", size) not in bench.cache:
        bench.cache[("download", size)] = write_file(src, size, seed=11, text=False)
    crc = bench.cache[("download", size)]
    dest = os.path.join(worker.basedir, "b0", "build", "download.bin")
    if os.path.exists(dest):
        os.unlink(dest)
    reader = bench.reactor.wait(FileReader, src)
    args = {
        "workdir": "build",
        "workerdest": "download.bin",
        "reader": reader,
        "maxsize": None,
        "blocksize": 16384,
        "mode": None,
    }
    res = bench.measure(worker, r, size, [("b0", "downloadFile", args)])[0]
    what = f"download-file on {worker.label}"
    check_result(res, what)
    if reader.fp is not None:
        raise BenchFailure(f"{what}: the worker never called close() on the reader")
    got = file_crc(dest) if os.path.exists(dest) else (0, 0)
    if got != (size, crc):
        raise BenchFailure(
            f"{what}: expected {size} bytes (crc32 {crc:08x}) on the worker, found "
            f"{got[0]} bytes (crc32 {got[1]:08x})"
        )
    r.extra["reads"] = reader.reads
    os.unlink(dest)


def _tree(bench: Bench, worker: Worker, key: str) -> tuple[str, Manifest, int]:
    size = bench.size(key)
    rel = f"tree-{size}"
    root = os.path.join(worker.basedir, "b0", "build", rel)
    ck = ("tree", worker.name, size)
    if ck not in bench.cache:
        if os.path.exists(root):
            shutil.rmtree(root)
        manifest = make_tree(root, size)
        total = sum(v[1] for v in manifest.values())
        bench.cache[ck] = (manifest, total)
    manifest, total = bench.cache[ck]
    return rel, manifest, total


def _upload_dir_scenario(compress: str | None) -> Callable[[Bench, Worker, Run], None]:
    def run(bench: Bench, worker: Worker, r: Run) -> None:
        from pyworker.bench.embedded_master import FileWriter

        rel, manifest, total = _tree(bench, worker, f"size_dir_{compress or 'none'}")
        unpack_to = os.path.join(bench.master_dir, f"unpacked-{worker.name}")
        if os.path.exists(unpack_to):
            shutil.rmtree(unpack_to)
        tarname = os.path.join(bench.master_dir, f"dir-{worker.name}.tar")
        writer = bench.reactor.wait(FileWriter, tarname, unpack_to=unpack_to, compress=compress)
        args = {
            "workdir": "build",
            "workersrc": rel,
            "writer": writer,
            "maxsize": None,
            "blocksize": 16384,
            "compress": compress,
        }
        what = f"upload-dir-{compress or 'none'} on {worker.label}"
        try:
            res = bench.measure(worker, r, total, [("b0", "uploadDirectory", args)])[0]
            check_result(res, what)
            if not writer.unpacked:
                raise BenchFailure(f"{what}: the worker never called unpack() on the writer")
            check_tree(unpack_to, manifest, what)
            r.extra["archive_bytes"] = writer.bytes
            r.extra["writes"] = writer.writes
        finally:
            bench.reactor.wait(writer.cancel)
            shutil.rmtree(unpack_to, ignore_errors=True)

    return run


def sc_cpdir(bench: Bench, worker: Worker, r: Run) -> None:
    rel, manifest, total = _tree(bench, worker, "size_cpdir")
    to = os.path.join(worker.basedir, "b0", "build", "tree-copy")
    if os.path.exists(to):
        shutil.rmtree(to)
    args = {
        "fromdir": f"build/{rel}",
        "todir": "build/tree-copy",
        "logEnviron": False,
        "timeout": 120,
        "maxTime": None,
    }
    res = bench.measure(worker, r, total, [("b0", "cpdir", args)])[0]
    what = f"cpdir on {worker.label}"
    check_result(res, what)
    check_tree(to, manifest, what)
    shutil.rmtree(to)


def _latency(bench: Bench, worker: Worker, r: Run, command: str, args: dict[str, Any]) -> None:
    n = bench.count("latency_n")
    jobs = [("b0", command, args)] * n
    results = bench.measure(worker, r, 0, jobs, sequential=True)
    for res in results:
        check_result(res, f"latency ({command}) on {worker.label}")
    r.latencies = [res.wall for res in results]


def sc_latency(bench: Bench, worker: Worker, r: Run) -> None:
    _latency(bench, worker, r, "shell", shell_args(["true"]))


def sc_latency_stat(bench: Bench, worker: Worker, r: Run) -> None:
    _latency(bench, worker, r, "stat", {"file": ".", "logEnviron": False})


def sc_latency_burst(bench: Bench, worker: Worker, r: Run) -> None:
    n = bench.streams
    rounds = bench.count("burst_rounds")
    lat: list[float] = []
    total_wall = 0.0
    cpu = fe = mcpu = 0.0
    for _ in range(rounds):
        sub = Run(worker.label, True)
        results = bench.measure(
            worker, sub, 0, [(f"b{i}", "shell", shell_args(["true"])) for i in range(n)]
        )
        for res in results:
            check_result(res, f"latency-burst on {worker.label}")
        lat += [res.wall for res in results]
        total_wall += sub.wall
        cpu += sub.cpu
        fe += sub.cpu_frontend
        mcpu += sub.master_cpu
        r.take_peaks(sub)
    r.latencies, r.wall, r.cpu, r.cpu_frontend, r.master_cpu = lat, total_wall, cpu, fe, mcpu
    r.commands = len(lat)
    r.extra["round_wall_mean"] = total_wall / rounds


SCENARIOS: list[Scenario] = [
    Scenario("stdout-pipe", "stdout of one child through a pipe", "throughput",
             _stream_scenario(False)),
    Scenario("stdout-pty", "stdout of one child through a PTY", "throughput",
             _stream_scenario(True, "size_pty")),
    Scenario("streams", "concurrent stdout streams, one per builder", "throughput", sc_streams),
    Scenario("upload-file", "uploadFile, 256 KiB blocks, keepstamp", "throughput",
             sc_upload_file),
    Scenario("download-file", "downloadFile, 16 KiB blocks", "throughput", sc_download_file),
    Scenario("upload-dir-none", "uploadDirectory, no compression, 16 KiB blocks",
             "throughput", _upload_dir_scenario(None)),
    Scenario("upload-dir-gz", "uploadDirectory, gzip", "throughput", _upload_dir_scenario("gz")),
    Scenario("upload-dir-bz2", "uploadDirectory, bzip2", "throughput",
             _upload_dir_scenario("bz2")),
    Scenario("cpdir", "cpdir of a tree (cp -R -P -p -v)", "throughput", sc_cpdir),
    Scenario("latency", "trivial shell commands (true) back to back", "latency", sc_latency),
    Scenario("latency-stat", "stat commands back to back", "latency", sc_latency_stat),
    Scenario("latency-burst", "trivial shell commands, one per builder at once", "latency",
             sc_latency_burst),
]
SCENARIO_NAMES = [s.name for s in SCENARIOS]

#: Sizes in MiB (payloads) and counts, at --scale 1; --quick uses the second value.
SIZES: dict[str, tuple[float, float]] = {
    "size_pipe": (256, 48),
    "size_pty": (128, 24),
    "size_streams": (256, 32),
    "size_upload": (256, 48),
    "size_download": (128, 24),
    "size_dir_none": (64, 12),
    "size_dir_gz": (32, 8),
    "size_dir_bz2": (8, 2),
    "size_cpdir": (128, 24),
    "latency_n": (200, 40),
    "burst_rounds": (10, 3),
    # pyworker.bench.scenarios
    "big_burst_rounds": (5, 1),
    "concurrent_stream_mib": (2, 0.25),
    "concurrent_steps": (10, 3),
    "start_runs": (10, 3),
    "soak_builds": (1000, 60),
}

#: Builders on the embedded master: the concurrent scenarios use up to this many at once.
MAX_BUILDERS = 64


# -- the bench ------------------------------------------------------------------------------


class Progress:
    """One status line on a terminal (rewritten in place), plain lines otherwise."""

    def __init__(self, stream: Any, enabled: bool) -> None:
        self.stream = stream
        self.tty = enabled and stream.isatty()
        self.enabled = enabled
        self.last = ""

    def update(self, text: str) -> None:
        if self.tty:
            line = text[:110]
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            self.last = line

    def event(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self.last:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.last = ""


class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.scale = opts.scale
        self.quick = opts.quick
        self.streams = opts.streams
        self.reactor = ReactorThread(opts.profile_master)
        self.tmp = tempfile.mkdtemp(prefix="pyworker-bench-")
        self.master_dir = os.path.join(self.tmp, "master")
        os.makedirs(self.master_dir)
        self.cache: dict[Any, Any] = {}
        self.workers: list[Worker] = []
        self.progress = Progress(sys.stderr, not opts.no_progress)
        self.status = ""
        self.master: Any = None

    # sizes

    def size(self, key: str) -> int:
        mib = SIZES[key][1 if self.quick else 0] * self.scale
        return max(BLOCK, int(mib * MiB) // BLOCK * BLOCK)

    def count(self, key: str) -> int:
        return max(1, int(SIZES[key][1 if self.quick else 0] * self.scale))

    # set up

    def start_master(self, names: list[str]) -> int:
        from pyworker.bench.embedded_master import EmbeddedMaster

        builders = [f"b{i}" for i in range(max(self.streams, MAX_BUILDERS))]
        # ``<name>-start``: the workers the start-stop scenario starts and stops.
        every = names + [f"{n}-start" for n in names]
        self.master = EmbeddedMaster({n: "benchpw" for n in every}, builders)
        port: int = self.reactor.wait(self.master.start)
        return port

    def start_worker(self, w: Worker, port: int) -> None:
        self.progress.update(f"starting {w.label} ...")
        os.makedirs(os.path.dirname(w.basedir), exist_ok=True)
        create = subprocess.run(
            w.argv + ["create-worker", "-q", w.basedir, f"127.0.0.1:{port}", w.name, "benchpw"],
            env=w.env, capture_output=True, text=True, timeout=60,
        )
        if create.returncode != 0:
            raise BenchFailure(
                f"{w.label}: create-worker failed (exit {create.returncode}):\n"
                f"{create.stdout}{create.stderr}"
            )
        console = open(os.path.join(w.basedir, "bench-console.log"), "wb")
        w.proc = subprocess.Popen(
            w.argv + ["start", "--nodaemon", w.basedir],
            env=w.env, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=w.basedir,
        )
        console.close()
        w.ps = psutil.Process(w.proc.pid)
        fut = self.reactor.call(self.master.wait_for_worker, w.name)
        deadline = time.monotonic() + 60
        while not fut.done():
            if w.proc.poll() is not None:
                raise BenchFailure(
                    f"{w.label}: the worker exited with {w.proc.returncode} before attaching\n"
                    + w.log_tail()
                )
            if time.monotonic() > deadline:
                raise BenchFailure(f"{w.label}: did not attach within 60 s\n" + w.log_tail())
            time.sleep(0.05)
        conn = fut.result()
        version = conn.info.get("version", "?")
        self.progress.event(f"{w.label}: attached (version {version}, backend {w.backend})")

    def stop_workers(self) -> None:
        for w in self.workers:
            if w.proc is None or w.proc.poll() is not None:
                continue
            try:
                self.reactor.wait(self.master.shutdown_worker, w.name, timeout=5)
            except Exception:
                pass
            try:
                w.proc.wait(10)
            except subprocess.TimeoutExpired:
                w.proc.terminate()
                try:
                    w.proc.wait(5)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait()

    def close(self) -> None:
        self.stop_workers()
        if self.master is not None:
            try:
                self.reactor.wait(self.master.stop, timeout=5)
            except Exception:
                pass
        self.reactor.stop()
        if not self.opts.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # measurement

    def measure(
        self,
        w: Worker,
        r: Run,
        payload: int,
        jobs: list[tuple[str, str, dict[str, Any]]],
        *,
        sequential: bool = False,
        per_builder: bool = False,
    ) -> list[Any]:
        """Run ``jobs`` (builder, command, args) on ``w`` — all at once, one after the
        other, or (``per_builder``) one after the other on each builder and the builders at
        once — and fill ``r`` with wall time, CPU and peak memory. Returns the results in the
        order of ``jobs``."""
        from twisted.internet import defer

        assert w.ps is not None and w.proc is not None
        master = self.master
        results: list[Any] = []
        if w.proc.poll() is not None:
            raise BenchFailure(f"{w.label}: the worker process is gone\n" + w.log_tail())

        def thread_cpu() -> float:
            return time.thread_time()

        @defer.inlineCallbacks
        def go() -> Any:
            t0 = time.thread_time()
            if sequential:
                for b, c, a in jobs:
                    res = yield master.run_command(w.name, b, c, a)
                    results.append(res)
            elif per_builder:
                chains: dict[str, list[int]] = {}
                for i, (b, _, _) in enumerate(jobs):
                    chains.setdefault(b, []).append(i)
                got_at: dict[int, Any] = {}

                @defer.inlineCallbacks
                def chain(indexes: list[int]) -> Any:
                    for i in indexes:
                        b, c, a = jobs[i]
                        got_at[i] = yield master.run_command(w.name, b, c, a)

                yield defer.gatherResults(
                    [chain(ix) for ix in chains.values()], consumeErrors=True
                )
                results.extend(got_at[i] for i in range(len(jobs)))
            else:
                got = yield defer.gatherResults(
                    [master.run_command(w.name, b, c, a) for b, c, a in jobs], consumeErrors=True
                )
                results.extend(got)
            return time.thread_time() - t0

        before = tree_cpu(w.ps)
        peak_f, peak_t = tree_rss(w.ps)
        mem = OwnMemory(w.ps)
        with mem.sampling():  # in a thread: reading smaps of many processes is slow
            start = time.perf_counter()
            fut = self.reactor.call(go)
            timeout = 120 + payload / MiB + 5 * len(jobs)
            while True:
                try:
                    master_cpu = fut.result(0.05)
                    break
                except concurrent.futures.TimeoutError:
                    pass
                except defer.FirstError as e:
                    raise BenchFailure(f"{w.label}: {e.subFailure.value}") from None
                except Exception as e:
                    raise BenchFailure(f"{w.label}: {e}") from None
                f, t = tree_rss(w.ps)
                peak_f, peak_t = max(peak_f, f), max(peak_t, t)
                elapsed = time.perf_counter() - start
                done = f"{len(results)}/{len(jobs)} commands" if sequential else ""
                self.progress.update(f"{self.status}  {elapsed:5.1f} s {done}")
                if elapsed > timeout:
                    raise BenchFailure(
                        f"{w.label}: no complete after {timeout:.0f} s "
                        f"({len(results)}/{len(jobs)} commands done)"
                    )
                if w.proc.poll() is not None:
                    raise BenchFailure(
                        f"{w.label}: the worker exited ({w.proc.returncode}) during the scenario\n"
                        + w.log_tail()
                    )
            r.wall = time.perf_counter() - start  # before the sampling thread is joined
        after = tree_cpu(w.ps)
        mem.sample(force=True)  # the end: every command has completed
        r.take_memory(mem)
        r.payload = payload
        r.cpu = after.total - before.total
        r.cpu_frontend = after.frontend - before.frontend
        r.master_cpu = master_cpu
        r.peak_rss, r.peak_rss_frontend = peak_t, peak_f
        r.commands = len(jobs)
        return results


# -- reporting ------------------------------------------------------------------------------


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def own_memory_summary(ok: list[Run]) -> dict[str, Any]:
    """The worker's own PSS/USS: peak over the runs, and the end of the last run."""
    return {
        "own_pss_peak_mib": max(r.own_pss_peak for r in ok) / MiB,
        "own_uss_peak_mib": max(r.own_uss_peak for r in ok) / MiB,
        "own_pss_end_mib": ok[-1].own_pss_end / MiB,
        "own_uss_end_mib": ok[-1].own_uss_end / MiB,
        "peak_processes": max(r.peak_processes for r in ok),
    }


def summarize(kind: str, runs: list[Run]) -> dict[str, Any]:
    ok = [r for r in runs if r.ok]
    if not ok:
        return {"ok": False, "error": next((r.error for r in runs if r.error), "failed")}
    extra: dict[str, Any] = {}
    for r in ok:
        for k, v in r.extra.items():
            if isinstance(v, list) and all(isinstance(x, float) for x in v):
                extra.setdefault(k, []).extend(v)
    if kind == "throughput":
        med = sorted(ok, key=lambda r: r.mib_s)[len(ok) // 2]
        return own_memory_summary(ok) | {
            "ok": len(ok) == len(runs),
            "mib_s": statistics.median(r.mib_s for r in ok),
            "mib_s_best": max(r.mib_s for r in ok),
            "cpu_s_per_gib": statistics.median(r.per_gib(r.cpu) for r in ok),
            "frontend_cpu_s_per_gib": statistics.median(r.per_gib(r.cpu_frontend) for r in ok),
            "master_cpu_s_per_gib": statistics.median(r.per_gib(r.master_cpu) for r in ok),
            "peak_rss_mib": max(r.peak_rss for r in ok) / MiB,
            "peak_rss_frontend_mib": max(r.peak_rss_frontend for r in ok) / MiB,
            "wall_s": med.wall,
            "payload_mib": med.payload / MiB,
        }
    lat = [x for r in ok for x in r.latencies]
    ncmd = sum(r.commands for r in ok) or 1
    # Other samples a scenario keeps in ``extra`` (e.g. the serial latencies of a burst):
    # their p50 and p95, as ``<key>_p50_ms``.
    pcts = {
        f"{k}_p{p}_ms": _pct(v, p) * 1000 for k, v in extra.items() for p in (50, 95)
    }
    return own_memory_summary(ok) | pcts | {
        "ok": len(ok) == len(runs),
        "commands": ncmd,
        "p50_ms": _pct(lat, 50) * 1000,
        "p90_ms": _pct(lat, 90) * 1000,
        "p95_ms": _pct(lat, 95) * 1000,
        "p99_ms": _pct(lat, 99) * 1000,
        "max_ms": max(lat) * 1000 if lat else 0.0,
        "mean_ms": statistics.fmean(lat) * 1000 if lat else 0.0,
        "cmds_per_s": ncmd / sum(r.wall for r in ok),
        "cpu_ms_per_cmd": sum(r.cpu for r in ok) / ncmd * 1000,
        "frontend_cpu_ms_per_cmd": sum(r.cpu_frontend for r in ok) / ncmd * 1000,
        "master_cpu_ms_per_cmd": sum(r.master_cpu for r in ok) / ncmd * 1000,
        "peak_rss_mib": max(r.peak_rss for r in ok) / MiB,
    }


#: The worker's own memory (front end and executors; RSS is the whole tree): PSS and USS at
#: the peak, PSS at the end, and the peak number of processes in the tree.
OWN_HEAD = f"{'PSS pk':>6}  {'USS pk':>6}  {'PSS end':>7}  {'procs':>5}"


def own_cells(s: dict[str, Any]) -> str:
    return (
        f"{s['own_pss_peak_mib']:6.1f}  {s['own_uss_peak_mib']:6.1f}  "
        f"{s['own_pss_end_mib']:7.1f}  {s['peak_processes']:5d}"
    )


def format_table(sc: Scenario, detail: str, summaries: dict[str, dict[str, Any]]) -> str:
    out = [f"{sc.name}: {sc.title} ({detail})"]
    width = max([len(k) for k in summaries] + [6])
    if sc.kind == "throughput":
        out.append(
            f"  {'worker':<{width}}  {'MiB/s':>8}  {'CPU s/GiB':>9}  {'(fe)':>6}  "
            f"{'master s/GiB':>12}  {'RSS MiB':>7}  {OWN_HEAD}  {'wall s':>6}"
        )
        for label, s in summaries.items():
            if "mib_s" not in s:
                out.append(f"  {label:<{width}}  FAILED: {s.get('error')}")
                continue
            out.append(
                f"  {label:<{width}}  {s['mib_s']:8.1f}  {s['cpu_s_per_gib']:9.2f}  "
                f"{s['frontend_cpu_s_per_gib']:6.2f}  {s['master_cpu_s_per_gib']:12.2f}  "
                f"{s['peak_rss_mib']:7.1f}  {own_cells(s)}  {s['wall_s']:6.2f}"
            )
    else:
        out.append(
            f"  {'worker':<{width}}  {'p50 ms':>7}  {'p90 ms':>7}  {'p99 ms':>7}  {'max ms':>7}  "
            f"{'cmds/s':>7}  {'CPU ms/cmd':>10}  {'(fe)':>6}  {'master ms/cmd':>13}  "
            f"{'RSS MiB':>7}  {OWN_HEAD}"
        )
        for label, s in summaries.items():
            if "p50_ms" not in s:
                out.append(f"  {label:<{width}}  FAILED: {s.get('error')}")
                continue
            out.append(
                f"  {label:<{width}}  {s['p50_ms']:7.1f}  {s['p90_ms']:7.1f}  {s['p99_ms']:7.1f}"
                f"  {s['max_ms']:7.1f}  {s['cmds_per_s']:7.1f}  {s['cpu_ms_per_cmd']:10.1f}  "
                f"{s['frontend_cpu_ms_per_cmd']:6.1f}  {s['master_cpu_ms_per_cmd']:13.2f}  "
                f"{s['peak_rss_mib']:7.1f}  {own_cells(s)}"
            )
    if sc.note is not None:
        for label, s in summaries.items():
            if "p50_ms" in s or "mib_s" in s:
                out.append(f"  {label:<{width}}  {sc.note(s)}")
    return "\n".join(out)


def ratios(kind: str, base: dict[str, Any], other: dict[str, Any]) -> dict[str, float] | None:
    """``base`` relative to ``other``: >1 means base is faster / cheaper."""
    def div(a: float, b: float) -> float:
        return a / b if b else float("inf")

    if kind == "throughput":
        if "mib_s" not in base or "mib_s" not in other:
            return None
        return {
            "speed": div(base["mib_s"], other["mib_s"]),
            "cpu": div(other["cpu_s_per_gib"], base["cpu_s_per_gib"]),
        }
    if "p50_ms" not in base or "p50_ms" not in other:
        return None
    if not base["p50_ms"] or not other["p50_ms"]:
        return None  # no command (the worker at rest): only the memory columns mean much
    return {
        "speed": div(other["p50_ms"], base["p50_ms"]),
        "cpu": div(other["cpu_ms_per_cmd"], base["cpu_ms_per_cmd"]),
    }


def detail_of(bench: Bench, sc: Scenario) -> str:
    keys = {
        "stdout-pipe": "size_pipe", "stdout-pty": "size_pty", "streams": "size_streams",
        "upload-file": "size_upload", "download-file": "size_download",
        "upload-dir-none": "size_dir_none", "upload-dir-gz": "size_dir_gz",
        "upload-dir-bz2": "size_dir_bz2", "cpdir": "size_cpdir",
    }
    if sc.name in keys:
        d = f"{bench.size(keys[sc.name]) / MiB:g} MiB"
        if sc.name == "streams":
            d += f" in {bench.streams} streams"
        return d
    if sc.name == "latency-burst":
        return f"{bench.streams} at once x {bench.count('burst_rounds')} rounds"
    if sc.detail is not None:
        return sc.detail(bench)
    return f"{bench.count('latency_n')} commands"


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str], names: list[str] | None = None) -> argparse.Namespace:
    """The bench's options; ``names``: the scenarios ``--only`` accepts (default: this
    module's)."""
    if names is None:
        names = SCENARIO_NAMES
    p = argparse.ArgumentParser(
        prog="pyworker bench",
        description="Measure a worker's throughput, CPU cost and latency on an embedded "
        "loopback master (no Buildbot master needed).",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one run (< 60 s)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply sizes and counts by F")
    p.add_argument("--only", action="append", metavar="SCENARIO", choices=names,
                   help="run only this scenario (repeatable): " + ", ".join(names))
    p.add_argument("--runs", type=int, default=None,
                   help="repetitions per scenario and worker (default 3, 1 with --quick)")
    p.add_argument("--streams", type=int, default=8,
                   help="builders for the concurrent scenarios (default 8)")
    p.add_argument("--builds", type=int, default=None,
                   help="builds of the soak scenario (default 1000, 60 with --quick)")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON to FILE")
    p.add_argument("--compare-backends", action="store_true",
                   help="run pyworker with PYWORKER_IO=c and =python, interleaved")
    p.add_argument("--against", metavar="EXECUTABLE", action="append", default=[],
                   help="also run this buildbot-worker compatible executable, interleaved")
    p.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--profile-master", metavar="FILE",
                   help="cProfile the embedded master (reactor thread) into FILE")
    opts = p.parse_args(argv)
    if opts.runs is None:
        opts.runs = 1 if opts.quick else 3
    if opts.scale <= 0 or opts.runs < 1 or opts.streams < 1:
        p.error("--scale, --runs and --streams must be positive")
    return opts


def make_workers(opts: argparse.Namespace, tmp: str) -> list[Worker]:
    env = dict(os.environ)
    workers: list[Worker] = []
    if opts.compare_backends:
        variants = [("pyworker[c]", "c"), ("pyworker[python]", "python")]
    else:
        variants = [("pyworker", env.get("PYWORKER_IO", ""))]
    for i, (label, io) in enumerate(variants):
        wenv = dict(env)
        if io:
            wenv["PYWORKER_IO"] = io
        name = f"pyw{i}"
        workers.append(Worker(label, pyworker_argv(), wenv, name, os.path.join(tmp, name)))
    for i, exe in enumerate(opts.against):
        path = shutil.which(exe) or exe
        label = os.path.basename(path)
        if label in ("buildbot-worker",):
            label = "buildbot-worker"
        if any(w.label == label for w in workers):
            label = f"{label}#{i + 1}"
        wenv = {k: v for k, v in env.items() if k != "PYWORKER_IO"}
        name = f"other{i}"
        workers.append(Worker(label, [path], wenv, name, os.path.join(tmp, name)))
    return workers


def main(argv: list[str], every: list[Scenario] | None = None) -> int:
    """``pyworker bench``: run ``every`` scenario (default: this module's; the command line
    gives :func:`pyworker.bench.scenarios.all_scenarios`) or those ``--only`` names."""
    if every is None:
        every = SCENARIOS
    opts = parse_args(argv, [s.name for s in every])
    bench = Bench(opts)
    scenarios = [s for s in every if not opts.only or s.name in opts.only]
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "options": {k: v for k, v in vars(opts).items() if k != "json"},
        "workers": [],
        "scenarios": {},
    }
    failures: list[str] = []
    out = sys.stdout
    try:
        bench.workers = make_workers(opts, bench.tmp)
        for w in bench.workers:
            if w.label.startswith("pyworker"):
                w.backend = detect_backend(w.env)
        out.write(
            f"pyworker bench: {platform.node()}, {os.cpu_count()} CPUs, Python "
            f"{report['python']}, {'quick' if opts.quick else 'full'} run, scale {opts.scale:g},"
            f" {opts.runs} run(s) per scenario\n"
        )
        for w in bench.workers:
            where = f"{PKG_PARENT}/pyworker" if w.argv == pyworker_argv() else w.argv[0]
            out.write(f"  worker {w.label}: {where}"
                      + (f" (I/O backend: {w.backend})" if w.backend != "-" else "") + "\n")
        out.flush()
        port = bench.start_master([w.name for w in bench.workers])
        for w in bench.workers:
            bench.start_worker(w, port)
            report["workers"].append(
                {"label": w.label, "argv": w.argv, "backend": w.backend,
                 "io_env": w.env.get("PYWORKER_IO")}
            )
        out.write("\n")
        for si, sc in enumerate(scenarios):
            runs: dict[str, list[Run]] = {w.label: [] for w in bench.workers}
            for rep in range(opts.runs):
                for w in bench.workers:
                    bench.status = (
                        f"[{si + 1}/{len(scenarios)}] {sc.name} on {w.label} "
                        f"(run {rep + 1}/{opts.runs})"
                    )
                    bench.progress.update(bench.status)
                    r = Run(w.label, True)
                    try:
                        sc.func(bench, w, r)
                    except BenchFailure as e:
                        r.ok, r.error = False, str(e)
                        failures.append(f"{sc.name}: {e}")
                        bench.progress.event(f"FAIL {sc.name} on {w.label}: {e}")
                    runs[w.label].append(r)
            bench.progress.clear()
            summaries = {label: summarize(sc.kind, rs) for label, rs in runs.items()}
            entry: dict[str, Any] = {
                "kind": sc.kind,
                "detail": detail_of(bench, sc),
                "summary": summaries,
                "runs": {label: [vars(r) for r in rs] for label, rs in runs.items()},
            }
            out.write(format_table(sc, entry["detail"], summaries) + "\n")
            labels = list(summaries)
            if len(labels) > 1:
                entry["ratios"] = {}
                for other in labels[1:]:
                    rt = ratios(sc.kind, summaries[labels[0]], summaries[other])
                    if rt is None:
                        continue
                    entry["ratios"][f"{labels[0]} vs {other}"] = rt
                    what = "MiB/s" if sc.kind == "throughput" else "latency (p50)"
                    cpu = "CPU/GiB" if sc.kind == "throughput" else "CPU/cmd"
                    out.write(
                        f"  {labels[0]} vs {other}: {rt['speed']:.2f}x {what}, "
                        f"{rt['cpu']:.2f}x less {cpu}\n"
                    )
            out.write("\n")
            out.flush()
            report["scenarios"][sc.name] = entry
    except BenchFailure as e:
        failures.append(str(e))
        bench.progress.event(f"FAIL: {e}")
    except KeyboardInterrupt:
        failures.append("interrupted")
    finally:
        bench.progress.clear()
        bench.close()
    report["failures"] = failures
    report["ok"] = not failures
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if failures:
        out.write(f"FAILED: {len(failures)} problem(s):\n")
        for msg in failures:
            out.write(f"  - {msg}\n")
        return 1
    out.write("all scenarios validated: every byte arrived intact\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
