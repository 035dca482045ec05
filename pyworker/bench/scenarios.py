"""``pyworker bench`` scenarios of issue 14: memory at rest, bursts, 64 builds, start and stop.

* ``idle`` (first) and ``idle-after`` (last): the worker's own memory at rest, before any
  command and after all of them;
* ``burst-8``, ``burst-64``: N trivial commands, one per builder, started at once, against the
  same N commands one after the other (target: the burst's p50 within 2x the serial p50);
* ``concurrent-streams``: 64 builders each streaming stdout at once, every stream checked
  byte for byte (CRC-32);
* ``concurrent-steps``: 64 builders each running a burst of trivial steps, the builders at
  once, every step's stdout checked;
* ``start-stop``: from ``start --nodaemon`` to attached and a first trivial command answered
  (target: < 300 ms), and from the master's ``shutdown`` to the process's exit.

After every command scenario the worker must have nothing left over: no descendant of its
front end but its executors. The memory columns are :mod:`pyworker.bench.memory`'s.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import time
import zlib
from typing import Any

import psutil
from twisted.internet import defer

from pyworker.bench.memory import OwnMemory, leftovers, own_memory, own_processes
from pyworker.bench.profiler import (
    BLOCK,
    SCENARIOS,
    STREAM_CHILD,
    Bench,
    BenchFailure,
    MiB,
    Run,
    Scenario,
    Worker,
    check_result,
    check_stream,
    check_tree,
    file_crc,
    shell_args,
    stream_crc,
    tree_cpu,
    tree_rss,
    write_file,
)
from pyworker.bench.profiler import main as profiler_main
from pyworker.frontend.pool import IDLE_TIMEOUT

#: How many builders the concurrent scenarios use at once.
CONCURRENT = 64


def check_nothing_left(worker: Worker, what: str, grace: float = 5.0) -> None:
    """Raise :class:`BenchFailure` if a command process outlives its ``complete`` by more than
    ``grace`` seconds (a process that exits as the command completes is not counted)."""
    assert worker.ps is not None
    deadline = time.monotonic() + grace
    while True:
        left = leftovers(worker.ps)
        if not left:
            return
        if time.monotonic() > deadline:
            raise BenchFailure(f"{what}: {len(left)} process(es) left over: {left[:5]}")
        time.sleep(0.05)


# -- memory at rest ---------------------------------------------------------------------------


#: The number of its own processes each worker had at rest before any command (by label).
_IDLE_PROCESSES: dict[str, int] = {}


def sc_idle(bench: Bench, worker: Worker, r: Run) -> None:
    """No command: the worker's own memory, sampled for a second (half a second --quick)."""
    assert worker.ps is not None
    _IDLE_PROCESSES.setdefault(worker.label, own_memory(worker.ps).processes)
    _sample_at_rest(bench, worker, r)


def sc_idle_after(bench: Bench, worker: Worker, r: Run) -> None:
    """The same after the loads, once the worker is back to the processes it had at rest
    (pyworker's pool ends the executors it grew :data:`pool.IDLE_TIMEOUT` seconds after
    their last command); the wait is ``r.extra['settle_s']``."""
    assert worker.ps is not None
    target = _IDLE_PROCESSES.get(worker.label, 1)
    start = time.perf_counter()
    deadline = start + IDLE_TIMEOUT + 10.0
    while own_memory(worker.ps).processes > target and time.perf_counter() < deadline:
        time.sleep(0.2)
    r.extra["settle_s"] = time.perf_counter() - start
    _sample_at_rest(bench, worker, r)


def _sample_at_rest(bench: Bench, worker: Worker, r: Run) -> None:
    assert worker.ps is not None
    mem = OwnMemory(worker.ps, interval=0.1)
    before = tree_cpu(worker.ps)
    start = time.perf_counter()
    while time.perf_counter() - start < (0.5 if bench.quick else 1.0):
        time.sleep(0.1)
        mem.sample()
        front, tree = tree_rss(worker.ps)
        r.peak_rss = max(r.peak_rss, tree)
        r.peak_rss_frontend = max(r.peak_rss_frontend, front)
    mem.finish()
    r.wall = time.perf_counter() - start
    r.cpu = tree_cpu(worker.ps).total - before.total
    r.take_memory(mem)


# -- bursts -----------------------------------------------------------------------------------


def _burst(n: int) -> Any:
    def run(bench: Bench, worker: Worker, r: Run) -> None:
        what = f"burst-{n} on {worker.label}"
        serial: list[float] = []
        at_once: list[float] = []
        for _ in range(bench.count("big_burst_rounds")):
            sub = Run(worker.label, True)
            results = bench.measure(
                worker, sub, 0, [("b0", "shell", shell_args(["true"]))] * n, sequential=True
            )
            for res in results:
                check_result(res, what + " (serial)")
            serial += [res.wall for res in results]
            r.take_peaks(sub)
            sub = Run(worker.label, True)
            results = bench.measure(
                worker, sub, 0, [(f"b{i}", "shell", shell_args(["true"])) for i in range(n)]
            )
            for res in results:
                check_result(res, what)
            at_once += [res.wall for res in results]
            r.wall += sub.wall
            r.cpu += sub.cpu
            r.cpu_frontend += sub.cpu_frontend
            r.master_cpu += sub.master_cpu
            r.take_peaks(sub)
        check_nothing_left(worker, what)
        r.latencies = at_once
        r.commands = len(at_once)
        r.extra["serial"] = serial

    return run


def burst_note(s: dict[str, Any]) -> str:
    ratio = s["p50_ms"] / s["serial_p50_ms"] if s.get("serial_p50_ms") else float("inf")
    return (
        f"serial p50 {s['serial_p50_ms']:.1f} ms; at once p50 {s['p50_ms']:.1f} ms, "
        f"p95 {s['p95_ms']:.1f} ms: p50 {ratio:.1f}x serial (target <= 2x)"
    )


# -- 64 concurrent builds ---------------------------------------------------------------------


def sc_concurrent_streams(bench: Bench, worker: Worker, r: Run) -> None:
    size = bench.size("concurrent_stream_mib") // BLOCK * BLOCK
    args = shell_args([sys.executable, "-c", STREAM_CHILD, str(size)])
    stream_crc(size)
    jobs = [(f"b{i}", "shell", args) for i in range(CONCURRENT)]
    results = bench.measure(worker, r, size * CONCURRENT, jobs)
    for i, res in enumerate(results):
        what = f"concurrent-streams (builder b{i}) on {worker.label}"
        check_result(res, what)
        check_stream(res, "stdout", size, what)
    check_nothing_left(worker, f"concurrent-streams on {worker.label}")


def sc_concurrent_steps(bench: Bench, worker: Worker, r: Run) -> None:
    steps = bench.count("concurrent_steps")
    jobs = [
        (f"b{i}", "shell", shell_args(["echo", f"b{i}-{k}"]))
        for i in range(CONCURRENT) for k in range(steps)
    ]
    results = bench.measure(worker, r, 0, jobs, per_builder=True)
    for (b, _, args), res in zip(jobs, results, strict=True):
        tag = args["command"][1]
        what = f"concurrent-steps ({b}, step {tag}) on {worker.label}"
        check_result(res, what)
        want = (tag + "\n").encode()
        got = res.stream("stdout")
        if got.chars != len(want) or got.crc != zlib.crc32(want):
            raise BenchFailure(
                f"{what}: stdout is not {want!r} ({got.chars} chars, crc32 {got.crc:08x})"
            )
    check_nothing_left(worker, f"concurrent-steps on {worker.label}")
    r.latencies = [res.wall for res in results]


# -- start and stop ---------------------------------------------------------------------------


def sc_start_stop(bench: Bench, worker: Worker, r: Run) -> None:
    """A second worker (``<name>-start``) in its own base directory, started and stopped
    ``start_runs`` times; ``latencies`` are the start times, ``extra['stop']`` the stops."""
    name = f"{worker.name}-start"
    basedir = worker.basedir + "-start"
    master = bench.master
    assert master is not None and master.port is not None
    port = master.port.getHost().port
    if not os.path.exists(basedir):
        create = subprocess.run(
            worker.argv + ["create-worker", "-q", basedir, f"127.0.0.1:{port}", name, "benchpw"],
            env=worker.env, capture_output=True, text=True, timeout=60,
        )
        if create.returncode != 0:
            raise BenchFailure(f"{worker.label}: create-worker failed:\n{create.stderr}")
    what = f"start-stop on {worker.label}"

    @defer.inlineCallbacks
    def ready() -> Any:
        yield master.wait_for_worker(name)
        attached = time.perf_counter()
        res = yield master.run_command(name, "b0", "shell", shell_args(["true"]))
        return attached, time.perf_counter(), res

    starts: list[float] = []
    attaches: list[float] = []
    stops: list[float] = []
    for _ in range(bench.count("start_runs")):
        log = open(os.path.join(basedir, "bench-console.log"), "wb")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            worker.argv + ["start", "--nodaemon", basedir], env=worker.env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=basedir,
        )
        log.close()
        try:
            fut = bench.reactor.call(ready)
            deadline = t0 + 60
            while True:
                try:
                    attached, answered, res = fut.result(0.01)
                    break
                except concurrent.futures.TimeoutError:
                    pass
                except Exception as e:
                    raise BenchFailure(f"{what}: {e}") from None
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise BenchFailure(f"{what}: the worker exited ({proc.returncode}) or did "
                                       "not attach within 60 s")
            check_result(res, what)
            starts.append(answered - t0)
            attaches.append(attached - t0)
            ps = psutil.Process(proc.pid)
            r.cpu += tree_cpu(ps).total
            mem = OwnMemory(ps)
            r.take_memory(mem)
            front, tree = tree_rss(ps)
            r.peak_rss = max(r.peak_rss, tree)
            r.peak_rss_frontend = max(r.peak_rss_frontend, front)
            t1 = time.perf_counter()
            bench.reactor.wait(master.shutdown_worker, name, timeout=10)
            proc.wait(30)
            stops.append(time.perf_counter() - t1)
            deadline = time.monotonic() + 10
            while bench.reactor.wait(lambda: name in master.workers):
                if time.monotonic() > deadline:
                    raise BenchFailure(f"{what}: the master still sees {name} after it exited")
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    r.latencies = starts
    r.commands = len(starts)
    r.wall = sum(starts)
    r.extra["attach"] = attaches
    r.extra["stop"] = stops


def start_note(s: dict[str, Any]) -> str:
    return (
        f"start --nodaemon to attached p50 {s['attach_p50_ms']:.0f} ms, to a first command "
        f"answered p50 {s['p50_ms']:.0f} ms (target < 300 ms); shutdown to exit p50 "
        f"{s['stop_p50_ms']:.0f} ms"
    )


# -- soak -------------------------------------------------------------------------------------

#: PSS may grow by this much from after the warm-up to the end of a soak: a few MiB of
#: allocator noise (pymalloc arenas and glibc heaps of the front end and each executor are
#: not returned at once, and their high-water mark moves with what the last builds did),
#: well below what a per-build leak would give over 1,000 builds (even 4 KiB a build is 4 MiB).
SOAK_PSS_TOLERANCE = 8 * MiB


def soak_state(worker: Worker) -> dict[str, int]:
    """Open fds of the front end and of the executors, the worker's own PSS, its own process
    count and the leftover command processes."""
    assert worker.ps is not None
    fds_front = fds_exec = 0
    for p in own_processes(worker.ps):
        try:
            n = p.num_fds()
        except psutil.Error:
            continue
        if p.pid == worker.ps.pid:
            fds_front = n
        else:
            fds_exec += n
    mem = own_memory(worker.ps)
    return {
        "fds_frontend": fds_front, "fds_executors": fds_exec, "pss": mem.pss,
        "processes": mem.processes, "leftovers": len(leftovers(worker.ps)),
    }


def _soak_line(when: str, st: dict[str, int]) -> str:
    return (
        f"soak {when}: fds front end {st['fds_frontend']}, executors {st['fds_executors']}; "
        f"PSS {st['pss'] / MiB:.1f} MiB; processes {st['processes']} own + "
        f"{st['leftovers']} left over"
    )


def _soak_builds(bench: Bench, worker: Worker) -> list[tuple[str, Any]]:
    """The cycle of builds: (kind, a function of the build number that runs and checks it)."""
    from pyworker.bench.embedded_master import FileReader, FileWriter

    master = bench.master
    build = os.path.join(worker.basedir, "b0", "build")
    os.makedirs(os.path.join(build, "tree"), exist_ok=True)
    src = os.path.join(build, "soak-up.bin")
    up_crc = write_file(src, 300_000, seed=3, text=False)
    manifest = {f"f{i}.txt": ("file", 20_000 + i, write_file(
        os.path.join(build, "tree", f"f{i}.txt"), 20_000 + i, seed=i, text=True))
        for i in range(3)}
    down_src = os.path.join(bench.master_dir, "soak-down.bin")
    down_crc = write_file(down_src, 200_000, seed=5, text=False)

    def run(cmd: str, args: dict[str, Any], **kw: Any) -> Any:
        try:
            return bench.reactor.wait(master.run_command, worker.name, "b0", cmd, args,
                                      timeout=120, **kw)
        except Exception as e:
            raise BenchFailure(f"{worker.label}: {e}") from None

    def shell(n: int) -> None:
        res = run("shell", shell_args(["echo", f"soak-{n}"], log_environ=False),
                  keep_text=("header", "stdout", "stderr"))
        check_result(res, f"soak build {n} (shell)")
        want = f"soak-{n}\n".encode()
        got = res.stream("stdout")
        if got.chars != len(want) or got.crc != zlib.crc32(want):
            raise BenchFailure(f"soak build {n} (shell): stdout is not {want!r}")

    def upload(n: int) -> None:
        dest = os.path.join(bench.master_dir, "soak-up.bin")
        writer = bench.reactor.wait(FileWriter, dest)
        try:
            res = run("uploadFile", {"workdir": "build", "workersrc": "soak-up.bin",
                                     "writer": writer, "maxsize": None, "blocksize": 65536,
                                     "keepstamp": False})
            check_result(res, f"soak build {n} (uploadFile)")
            if writer.bytes != 300_000 or writer.crc != up_crc or not writer.closed:
                raise BenchFailure(f"soak build {n} (uploadFile): the master got "
                                   f"{writer.bytes} bytes, crc32 {writer.crc:08x}")
        finally:
            bench.reactor.wait(writer.cancel)
            if os.path.exists(dest):
                os.unlink(dest)

    def download(n: int) -> None:
        dest = os.path.join(build, "soak-down.bin")
        reader = bench.reactor.wait(FileReader, down_src)
        res = run("downloadFile", {"workdir": "build", "workerdest": "soak-down.bin",
                                   "reader": reader, "maxsize": None, "blocksize": 16384,
                                   "mode": None})
        check_result(res, f"soak build {n} (downloadFile)")
        got = file_crc(dest) if os.path.exists(dest) else (0, 0)
        if got != (200_000, down_crc) or reader.fp is not None:
            raise BenchFailure(f"soak build {n} (downloadFile): found {got} on the worker")
        os.unlink(dest)

    def updir(n: int) -> None:
        unpack = os.path.join(bench.master_dir, "soak-unpacked")
        shutil.rmtree(unpack, ignore_errors=True)
        writer = bench.reactor.wait(FileWriter, os.path.join(bench.master_dir, "soak.tar"),
                                    unpack_to=unpack, compress="gz")
        try:
            res = run("uploadDirectory", {"workdir": "build", "workersrc": "tree",
                                          "writer": writer, "maxsize": None,
                                          "blocksize": 16384, "compress": "gz"})
            check_result(res, f"soak build {n} (uploadDirectory)")
            if not writer.unpacked:
                raise BenchFailure(f"soak build {n} (uploadDirectory): never unpacked")
            check_tree(unpack, manifest, f"soak build {n} (uploadDirectory)")
        finally:
            bench.reactor.wait(writer.cancel)
            shutil.rmtree(unpack, ignore_errors=True)

    def stopped(n: int, kind: str, args: dict[str, Any], **kw: Any) -> None:
        """A ``sleep 60`` that must be stopped early and end with a failing rc."""
        res = run("shell", {**shell_args(["sleep", "60"], log_environ=False), **args}, **kw)
        check_result(res, f"soak build {n} ({kind})", rc=None)
        if res.rc in (0, None):
            raise BenchFailure(f"soak build {n} ({kind}): rc {res.rc}, expected a failure")

    def interrupted(n: int) -> None:
        stopped(n, "interrupt", {}, interrupt_after=0.2)

    def timed_out(n: int) -> None:
        stopped(n, "timeout", {"timeout" if n % 2 else "maxTime": 0.3})

    return [("shell", shell), ("uploadFile", upload), ("downloadFile", download),
            ("uploadDirectory", updir), ("interrupt", interrupted), ("timeout", timed_out)]


def sc_soak(bench: Bench, worker: Worker, r: Run) -> None:
    """``soak_builds`` builds in a row cycling through the kinds of :func:`_soak_builds`;
    fds, processes and PSS after a warm-up (two cycles) against the end."""
    assert worker.ps is not None
    n = bench.opts.builds or bench.count("soak_builds")
    cycle = _soak_builds(bench, worker)
    warm = len(cycle) * 2
    for i in range(warm):
        cycle[i % len(cycle)][1](i)
    check_nothing_left(worker, "soak warm-up")
    start = soak_state(worker)
    print(_soak_line(f"start (after {warm} warm-up builds)", start), flush=True)
    t0 = time.perf_counter()
    lat: list[float] = []
    for i in range(n):
        t = time.perf_counter()
        cycle[i % len(cycle)][1](i)
        lat.append(time.perf_counter() - t)
        if i % 50 == 0:
            bench.progress.update(f"{bench.status}  build {i}/{n}")
    r.wall = time.perf_counter() - t0
    check_nothing_left(worker, "soak")
    end = soak_state(worker)
    print(_soak_line(f"end (after {n} builds)", end), flush=True)
    print(f"soak: {n} builds in {r.wall:.1f} s, {n / r.wall:.1f} builds/s", flush=True)
    r.latencies, r.commands = lat, n
    r.extra.update({"start": start, "end": end})
    growth = soak_growth(start, end, n)
    if growth is not None:
        raise BenchFailure(growth)


def soak_growth(start: dict[str, int], end: dict[str, int], builds: int) -> str | None:
    """What grew from the start of a soak to its end (:func:`soak_state` of each), or None:
    any fd, process or leftover more, or PSS beyond :data:`SOAK_PSS_TOLERANCE`."""
    grew = [k for k in ("fds_frontend", "fds_executors", "processes", "leftovers")
            if end[k] > start[k]]
    if grew:
        return "soak: grew from start to end: " + ", ".join(
            f"{k} {start[k]} -> {end[k]}" for k in grew)
    if end["pss"] - start["pss"] > SOAK_PSS_TOLERANCE:
        return (f"soak: PSS grew {start['pss'] / MiB:.1f} -> {end['pss'] / MiB:.1f} MiB "
                f"({(end['pss'] - start['pss']) / builds / 1024:.1f} KiB a build; tolerance "
                f"{SOAK_PSS_TOLERANCE / MiB:g} MiB)")
    return None


# -- registration -----------------------------------------------------------------------------


def _burst_detail(n: int) -> Any:
    return lambda b: f"{n} at once and serially x {b.count('big_burst_rounds')} round(s)"


BEFORE: list[Scenario] = [
    Scenario("idle", "the worker at rest, before any command", "latency", sc_idle,
             detail=lambda b: "no command"),
]
AFTER: list[Scenario] = [
    Scenario("burst-8", "8 trivial commands at once vs one after the other", "latency",
             _burst(8), burst_note, _burst_detail(8)),
    Scenario("burst-64", "64 trivial commands at once vs one after the other", "latency",
             _burst(64), burst_note, _burst_detail(64)),
    Scenario("concurrent-streams", f"{CONCURRENT} builders streaming stdout at once",
             "throughput", sc_concurrent_streams,
             detail=lambda b: f"{CONCURRENT} x {b.size('concurrent_stream_mib') / MiB:g} MiB"),
    Scenario("concurrent-steps", f"{CONCURRENT} builders each running trivial steps, at once",
             "latency", sc_concurrent_steps,
             detail=lambda b: f"{CONCURRENT} builders x {b.count('concurrent_steps')} steps"),
    Scenario("start-stop", "start --nodaemon to ready, shutdown to exit", "latency",
             sc_start_stop, start_note, lambda b: f"{b.count('start_runs')} starts"),
    Scenario("soak", "builds in a row: shell, transfers, interrupts, timeouts", "latency",
             sc_soak, detail=lambda b: f"{b.opts.builds or b.count('soak_builds')} builds"),
    Scenario("idle-after", "the worker at rest, after every scenario", "latency",
             sc_idle_after, detail=lambda b: "no command, once back to its idle processes"),
]


def all_scenarios() -> list[Scenario]:
    """Every scenario of ``pyworker bench``, in the order they run: the worker at rest,
    :mod:`profiler <pyworker.bench.profiler>`'s, then this module's."""
    return BEFORE + SCENARIOS + AFTER


def main(argv: list[str]) -> int:
    """``pyworker bench`` with every scenario."""
    return profiler_main(argv, all_scenarios())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
