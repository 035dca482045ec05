"""Fault injection and load against a real Buildbot 4.3.0 master (issue 6, items 1-3).

* Nothing survives a stopped command: timeout, ``maxTime``, ``max_lines``, interrupt, lost
  connection, worker stop, the front end SIGKILLed (daemonised and double-forked
  grandchildren included), every pyworker process SIGKILLed at once and the worker started
  again (what the build left is killed by its mark; another basedir's worker is untouched).
* Faults survived: the master SIGKILLed and restarted, the TCP connection cut or stalled
  mid-stream and cut mid-transfer (through :mod:`tcpproxy`), an executor SIGKILLed, the
  worker restarted during a build, the disk full during a download (``RLIMIT_FSIZE``).
* Bounded memory: an output flood through a slow (throttled) connection, 50 concurrent
  commands, N builds in a row with flat fd count and RSS (N=200; 1000 with
  ``PYWORKER_BIG_TESTS=1``).

Most tests share one master and one worker ``wp`` that reaches the master through a
:class:`tcpproxy.TcpProxy`; a test that breaks the worker leaves it to the next test's
:func:`ready` to start it again. Faults that take the master or the front end down get a
master of their own.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import MasterFactory
from realmaster import (
    RESULT_NAMES,
    Builder,
    BuildRequest,
    HarnessError,
    RealMaster,
    WorkerProcess,
    descendants,
    master_fixture,
    reap_zombies,
    wait_for,
)
from tcpproxy import TcpProxy

MiB = 1024 * 1024
BIG = os.environ.get("PYWORKER_BIG_TESTS") == "1"
#: front end + executors, while a flood goes through a slow connection
RSS_BOUND = 150 * MiB
CONCURRENT = 50
#: Builds in a row for the flat-fds/RSS check: a leak of one fd or of 160 KiB per build fails
#: in 64 of them (the 1,000-build soak with transfers, interrupts and timeouts is ``pyworker
#: bench --only soak``; a short form runs in CI's bench stage).
MANY_BUILDS = 1000 if BIG else 64

# -- build definitions ----------------------------------------------------------------------

#: Runs once: a retry of the same build request (same ``token`` property) finds the marker
#: and succeeds at once. Never contains '%' outside Interpolate's own placeholders.
ONCE = (
    "if [ -e done-%(prop:token)s ]; then echo retried-ok; exit 0; fi; "
    "touch done-%(prop:token)s; "
)

#: Five processes ``sleep <token>``: daemonised (setsid), double-forked, both, a plain
#: background child and the foreground one; four lines of output after one second.
TREE = (
    ONCE
    + "setsid sleep %(prop:token)s </dev/null >/dev/null 2>&1 & "
    "(sleep %(prop:token)s </dev/null >/dev/null 2>&1 &); "
    "(setsid sh -c 'sleep %(prop:token)s </dev/null >/dev/null 2>&1 &' &); "
    "sleep %(prop:token)s & "
    "sleep 1; echo 1; echo 2; echo 3; echo 4; "
    "sleep %(prop:token)s"
)
TREE_PROCS = 5

#: How each kind of stop is made, and the result the master gives the stopped build.
STOPS: dict[str, tuple[str, str]] = {
    "timeout": ("timeout=2", "FAILURE"),
    "maxtime": ("maxTime=2", "FAILURE"),
    "maxlines": ("max_lines=2", "FAILURE"),
    "interrupt": ("", "CANCELLED"),
    "lost-connection": ("", "RETRY"),
    "worker-stop": ("", "RETRY"),
}

#: Streams lines until it is stopped (first run only).
STREAM = ONCE + "i=0; while :; do i=$((i+1)); echo line $i; sleep 0.005; done"
#: 40,000 numbered lines over about four seconds.
PACED = "for i in $(seq 1 40); do seq $((i*1000-999)) $((i*1000)); sleep 0.1; done"
#: As fast as it can: 100-character lines.
FLOOD = "yes " + "x" * 99
UPLOAD_SIZE = 48 * MiB
#: Each command checks in, then waits (90 s at most) until all CONCURRENT have checked in.
#: (The count is a shell glob, not `ls | wc`: 50 waiters must not fork much on a small box.)
BARRIER = (
    "touch %(prop:barrier)s/$$; n=0; set -- %(prop:barrier)s/*; "
    f"while [ $# -lt {CONCURRENT} ] && [ $n -lt 300 ]; do "
    "sleep 0.3; n=$((n+1)); set -- %(prop:barrier)s/*; done; "
    f"[ $# -ge {CONCURRENT} ] && echo all-here"
)
#: builders for the N-builds test, run side by side
PARALLEL = 8


def _shell(command: str, extra: str = "", interpolate: bool = True) -> str:
    cmd = f"util.Interpolate({command!r})" if interpolate else repr(command)
    sep = ", " if extra else ""
    return f"[steps.ShellCommand(command={cmd}, logEnviron=False{sep}{extra})]"


def _builders() -> dict[str, Builder]:
    out: dict[str, Builder] = {}
    for kind, (extra, _) in STOPS.items():
        out[f"tree-{kind}"] = Builder(_shell(TREE, extra), workers=["wp"])
    out["stream"] = Builder(_shell(STREAM), workers=["wp"])
    out["paced"] = Builder(_shell(PACED, interpolate=False), workers=["wp"])
    out["quick"] = Builder(_shell("echo ok", interpolate=False), workers=["wp"])
    out["exec-kill"] = Builder(_shell(ONCE + "sleep %(prop:token)s"), workers=["wp"])
    out["flood"] = Builder(_shell(FLOOD, "maxTime=8", interpolate=False), workers=["wp"])
    out["upload"] = Builder(
        "[steps.ShellCommand(command=util.Interpolate("
        f"'[ -e big.bin ] || head -c {UPLOAD_SIZE} /dev/urandom > big.bin'), logEnviron=False),"
        " steps.FileUpload(workersrc='big.bin',"
        " masterdest=util.Interpolate('%(prop:dest)s'))]",
        workers=["wp"],
    )
    out["download"] = Builder(
        "[steps.FileDownload(mastersrc=util.Interpolate('%(prop:src)s'),"
        " workerdest='fetched.bin')]",
        workers=["wp"],
    )
    for i in range(CONCURRENT):
        out[f"par{i}"] = Builder(_shell(BARRIER), workers=["wd"])
    for i in range(PARALLEL):
        out[f"many{i}"] = Builder(_shell("echo ok", interpolate=False), workers=["wm"])
    return out


master = master_fixture(_builders(), workers=("wp", "wd", "wm"))


@pytest.fixture(scope="module")
def proxy(master: RealMaster) -> Iterator[TcpProxy]:
    with TcpProxy(master.pb_port) as p:
        yield p


class Workers:
    """The module's workers: ``wp`` through the proxy, ``wd`` direct; restarted on demand."""

    def __init__(self, master: RealMaster, exe: str, proxy: TcpProxy) -> None:
        self.master = master
        self.exe = exe
        self.proxy = proxy
        self.wp: WorkerProcess | None = None
        self.direct_workers: dict[str, WorkerProcess] = {}

    def proxied(self) -> WorkerProcess:
        """``wp``, running and connected (started again, same basedir, if it is not)."""
        self.proxy.resume()
        self.proxy.throttle(None)
        if self.wp is None:
            self.wp = _proxied_worker(self.master, self.exe, self.proxy, "wp")
        elif not self.wp.running():
            self.wp.start()
        self.master.wait_worker_connected("wp", timeout=60)
        return self.wp

    def direct(self, name: str = "wd") -> WorkerProcess:
        """``wd`` (or ``name``), connected straight to the master."""
        w = self.direct_workers.get(name)
        if w is None:
            w = self.direct_workers[name] = self.master.start_worker(self.exe, name)
        elif not w.running():
            w.start()
        self.master.wait_worker_connected(name, timeout=60)
        return w


def _proxied_worker(
    master: RealMaster, exe: str, proxy: TcpProxy, name: str, create_args: tuple[str, ...] = ()
) -> WorkerProcess:
    w = WorkerProcess(exe, master.workers_dir / name, name, master.password,
                      f"127.0.0.1:{proxy.port}", create_args=create_args)
    w.create()
    w.start()
    master.worker_procs.append(w)
    master.wait_worker_connected(name, timeout=60)
    return w


@pytest.fixture(scope="module")
def workers(master: RealMaster, pyworker_executable: str, proxy: TcpProxy) -> Workers:
    return Workers(master, pyworker_executable, proxy)


# -- helpers --------------------------------------------------------------------------------


def _token() -> str:
    """A number no other process uses as its ``sleep`` argument (about 11 days)."""
    return str(random.SystemRandom().randint(900_000, 999_999))


def procs_with_cmdline(cmdline: str) -> list[int]:
    """Live processes anywhere on the machine whose command line is exactly ``cmdline``."""
    found = []
    zombies = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") == cmdline:
            (zombies if state == "Z" else found).append(int(entry))
    reap_zombies(zombies)  # orphans re-parented to pytest (a subreaper) end as our zombies
    return sorted(found)


def wait_gone(cmdline: str, timeout: float = 10.0) -> list[int]:
    """Wait until no process runs ``cmdline``; the pids still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = procs_with_cmdline(cmdline)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def describe(pids: list[int]) -> str:
    """ppid, session and process group of each pid (for assertion messages)."""
    out = []
    for pid in pids:
        try:
            ppid = psutil.Process(pid).ppid()
            out.append(f"pid {pid} ppid {ppid} sid {os.getsid(pid)} pgid {os.getpgid(pid)}")
        except (OSError, psutil.Error):
            out.append(f"pid {pid} (gone)")
    return "; ".join(out)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Watcher:
    """Collects, in a thread, every pid that runs ``cmdline`` while the test goes on."""

    def __init__(self, cmdline: str) -> None:
        self.cmdline = cmdline
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.update(procs_with_cmdline(self.cmdline))
            self._stop.wait(0.05)

    def stop(self) -> set[int]:
        self._stop.set()
        self._thread.join(5)
        return self.seen


def executors(worker_pid: int) -> list[psutil.Process]:
    """The front end's executor processes."""
    try:
        children = psutil.Process(worker_pid).children()
    except psutil.Error:
        return []
    out = []
    for c in children:
        try:
            if "pyworker.executor" in " ".join(c.cmdline()):
                out.append(c)
        except psutil.Error:
            pass
    return out


def worker_rss(worker_pid: int) -> int:
    """RSS of the front end plus its executors (not the commands they run)."""
    total = 0
    for p in [psutil.Process(worker_pid), *executors(worker_pid)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def wait_done(master: RealMaster, request: BuildRequest, timeout: float = 60) -> tuple[int, str]:
    """Wait for a build request without fetching logs; (buildid of its last build, result)."""

    def complete() -> bool | None:
        reqs = master.get(f"buildrequests/{request.brid}")["buildrequests"]
        return bool(reqs and reqs[0]["complete"]) or None

    wait_for(complete, timeout, f"build request {request.brid}", master.logs, interval=0.05)
    builds = master.get("builds", buildrequestid=request.brid)["builds"]
    last = max(builds, key=lambda b: b["buildid"])
    return last["buildid"], RESULT_NAMES.get(last["results"], str(last["results"]))


def wait_all(master: RealMaster, requests: list[BuildRequest], timeout: float) -> list[str]:
    """Wait for many build requests (few REST calls: the master's CPU is for the builds);
    the result of each one's last build, in order."""
    lo, hi = min(r.brid for r in requests), max(r.brid for r in requests)
    span = {"buildrequestid__ge": lo, "buildrequestid__le": hi}

    def all_complete() -> bool | None:
        pending = master.get("buildrequests", complete="false", **span)["buildrequests"]
        return not pending or None

    wait_for(all_complete, timeout, f"build requests {lo}..{hi}", master.logs, interval=0.2)
    last: dict[int, dict[str, Any]] = {}
    for b in master.get("builds", **span)["builds"]:
        if b["buildrequestid"] not in last or b["buildid"] > last[b["buildrequestid"]]["buildid"]:
            last[b["buildrequestid"]] = b
    return [RESULT_NAMES.get(last[r.brid]["results"], "?") if r.brid in last else "none"
            for r in requests]


def build_results(master: RealMaster, request: BuildRequest) -> list[str]:
    """The results of every build of a request, oldest first (e.g. ['RETRY', 'SUCCESS'])."""
    builds = master.get("builds", buildrequestid=request.brid)["builds"]
    builds.sort(key=lambda b: b["buildid"])
    return [RESULT_NAMES.get(b["results"], str(b["results"])) for b in builds]


def _all_text(build: Any) -> str:
    return "".join(text for s in build.steps for text in s.logs.values()) + build.state_string


# -- 1. nothing survives a stopped command --------------------------------------------------


@pytest.mark.parametrize("kind", list(STOPS))
def test_nothing_survives_a_stopped_command(
    master: RealMaster, workers: Workers, proxy: TcpProxy, kind: str
) -> None:
    worker = workers.proxied()
    token = _token()
    sleeper = f"sleep {token}"
    watcher = Watcher(sleeper)
    try:
        request = master.request_build(f"tree-{kind}", {"token": token})
        if kind in ("interrupt", "lost-connection", "worker-stop"):
            wait_for(lambda: len(watcher.seen) >= TREE_PROCS or None, 30,
                     f"{TREE_PROCS} processes {sleeper!r}", master.logs)
            if kind == "interrupt":
                master.stop_build(master.wait_build_started(request))
            elif kind == "lost-connection":
                assert proxy.cut() >= 1
            else:
                # stop now: SIGTERM, as `pyworker stop`; to the front end alone, not its group
                assert worker.proc is not None
                os.kill(worker.pid, signal.SIGTERM)
                assert worker.proc.wait(20) == 0
                assert wait_gone(sleeper) == [], "the worker stop left the command running"
                worker.start()
        build = master.wait_build(request, timeout=90)
    finally:
        seen = watcher.stop()
    left = wait_gone(sleeper)
    kill_all(left)
    assert len(seen) >= 4, f"the command did not start its processes: {sorted(seen)}"
    assert left == [], f"{len(left)} of {len(seen)} processes {sleeper!r} survived the {kind}"
    expected = STOPS[kind][1]
    if expected == "RETRY":
        assert build_results(master, request)[0] == "RETRY", master.logs()
        assert build.result == "SUCCESS", build.describe()
        assert "retried-ok" in build.step("shell").logs["stdio"]
    else:
        assert build.result == expected, build.describe()
    assert worker.running()


def test_frontend_sigkill_kills_executors_and_commands_and_restart_works(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    master = make_master({"tree": _shell(TREE)})
    worker = master.start_worker(pyworker_executable)
    token = _token()
    sleeper = f"sleep {token}"
    watcher = Watcher(sleeper)
    request = master.request_build("tree", {"token": token})
    try:
        wait_for(lambda: len(watcher.seen) >= TREE_PROCS or None, 30,
                 f"{TREE_PROCS} processes {sleeper!r}", master.logs)
    finally:
        seen = watcher.stop()
    execs = [p.pid for p in executors(worker.pid)]
    assert execs, "no executor found"
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.proc is not None
    worker.proc.wait(10)
    left = wait_gone(sleeper)
    where = describe(left)
    kill_all(left)

    def alive_executors() -> list[int]:
        alive = []
        for pid in execs:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        return alive

    # they end their commands' processes first, then exit (a moment later)
    try:
        wait_for(lambda: not alive_executors() or None, 5, "the executors to exit")
    except HarnessError:
        pass
    alive_execs = alive_executors()
    reap_zombies(execs)
    assert alive_execs == [], "executors outlived their front end"
    # the same basedir starts again (a twistd.pid from the killed process is stale)
    worker.start()
    master.wait_worker_connected("w1", timeout=60)
    build = master.wait_build(request, timeout=90)
    assert build_results(master, request)[0] == "RETRY"
    assert build.result == "SUCCESS", build.describe()
    worker.stop()
    assert not left, f"{len(left)} of {len(seen)} command processes survived: {where}"


#: A setsid'd child and a double-forked grandchild beside the shell's own child (three
#: processes ``sleep <token>``), on the first run only.
ESCAPERS = (
    ONCE
    + "setsid sleep %(prop:token)s </dev/null >/dev/null 2>&1 & "
    "(sleep %(prop:token)s </dev/null >/dev/null 2>&1 &); "
    "sleep %(prop:token)s"
)
ESCAPER_PROCS = 3


def _sigkill_all_at_once(pids: list[int]) -> None:
    """SIGKILL every one of ``pids`` as one event (an OOM kill of the group, ``kill -9`` of
    all): stopped first, so none of them acts (a sweep, a parent-death signal's handler)
    before all are dead."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_sigkill_of_every_worker_process_then_restart_kills_what_the_build_left(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    master = make_master(
        {"escape": Builder(_shell(ESCAPERS), workers=["w1"]),
         "other": Builder(_shell("setsid sleep %(prop:token)s </dev/null >/dev/null 2>&1 &"
                                 " sleep %(prop:token)s"), workers=["w2"])},
        workers=("w1", "w2"))
    # another worker, on another basedir of this machine, runs a long command all along
    other = master.start_worker(pyworker_executable, "w2")
    other_token = _token()
    master.request_build("other", {"token": other_token})
    worker = master.start_worker(pyworker_executable, "w1")
    token = _token()
    sleeper, other_sleeper = f"sleep {token}", f"sleep {other_token}"
    request = master.request_build("escape", {"token": token})
    wait_for(lambda: len(procs_with_cmdline(sleeper)) >= ESCAPER_PROCS or None, 30,
             f"{ESCAPER_PROCS} processes {sleeper!r}", master.logs)
    wait_for(lambda: len(procs_with_cmdline(other_sleeper)) >= 2 or None, 30,
             f"2 processes {other_sleeper!r}", master.logs)
    others = procs_with_cmdline(other_sleeper)
    pyworker_pids = [worker.pid, *(p.pid for p in executors(worker.pid))]
    assert len(pyworker_pids) >= 2, "no executor found"
    _sigkill_all_at_once(pyworker_pids)
    assert worker.proc is not None
    worker.proc.wait(10)
    reap_zombies(pyworker_pids)
    try:
        # what this is about: with no pyworker process left, nothing kills them
        left = procs_with_cmdline(sleeper)
        assert len(left) == ESCAPER_PROCS, f"survivors: {describe(left)}"
        log_size = worker.twistd_log.stat().st_size
        worker.start()
        wait_for(lambda: not procs_with_cmdline(sleeper) or None, 10,
                 f"every process {sleeper!r} to be killed", worker.logs)
        master.wait_worker_connected("w1", timeout=60)
        build = master.wait_build(request, timeout=90)
        assert build_results(master, request)[0] == "RETRY"
        assert build.result == "SUCCESS", build.describe()
        with open(worker.twistd_log, "rb") as f:
            f.seek(log_size)
            restart_log = f.read().decode("utf-8", "replace")
        for pid in left:
            assert f"killed process {pid} (sleep {token}) left by a gone worker:" in \
                restart_log, restart_log
        # the other basedir's command is untouched
        assert sorted(procs_with_cmdline(other_sleeper)) == sorted(others)
        assert "left by a gone worker" not in other.twistd_log.read_text()
    finally:
        kill_all(procs_with_cmdline(sleeper))
        worker.stop()
        other.stop()
        kill_all(procs_with_cmdline(other_sleeper))


# -- 2. faults survived ---------------------------------------------------------------------


def test_master_sigkilled_and_restarted_mid_build(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    master = make_master({"stream": _shell(STREAM)})
    worker = master.start_worker(pyworker_executable)
    token = _token()
    request = master.request_build("stream", {"token": token})
    buildid = master.wait_build_started(request, step="shell")
    master.wait_for_log(buildid, "shell", "stdio", "line 20")
    assert master.proc is not None
    os.killpg(master.proc.pid, signal.SIGKILL)
    master.proc.wait(10)
    # the command is stopped as soon as the worker sees the connection go
    wait_for(lambda: not any("while :" in p.cmdline for p in descendants(worker.pid)) or None,
             15, "the command to stop")
    assert worker.running()
    started = time.monotonic()
    master.restart()  # on the same ports: the worker knows only the old address
    up = time.monotonic()
    master.wait_worker_connected("w1", timeout=60)
    reconnect = time.monotonic() - up
    print(f"\nmaster restart: {up - started:.1f} s to start, worker reconnected "
          f"{reconnect:.1f} s after the master was up")
    build = master.wait_build(request, timeout=90)
    assert build_results(master, request)[0] == "RETRY"
    assert build.result == "SUCCESS", build.describe()
    assert "retried-ok" in build.step("shell").logs["stdio"]
    assert worker.running()
    worker.stop()


@pytest.mark.parametrize("how", ["cut", "stall-then-cut"])
def test_connection_lost_mid_stream(
    master: RealMaster, workers: Workers, proxy: TcpProxy, how: str
) -> None:
    worker = workers.proxied()
    request = master.request_build("stream", {"token": _token()})
    buildid = master.wait_build_started(request, step="shell")
    master.wait_for_log(buildid, "shell", "stdio", "line 50")
    if how == "stall-then-cut":
        proxy.stall()
        time.sleep(3)  # the worker keeps producing into a connection that moves nothing
    assert proxy.cut() == 1
    proxy.resume()
    build = master.wait_build(request, timeout=90)
    assert build_results(master, request)[0] == "RETRY", master.logs()
    assert build.result == "SUCCESS", build.describe()
    assert worker.running()
    assert leftover_loops(worker) == []
    quick = master.force_build("quick")
    assert quick.result == "SUCCESS", quick.describe()


def leftover_loops(worker: WorkerProcess) -> list[str]:
    return [p.cmdline for p in descendants(worker.pid) if "while :" in p.cmdline]


def test_connection_stalled_then_resumed_loses_no_output(
    master: RealMaster, workers: Workers, proxy: TcpProxy
) -> None:
    worker = workers.proxied()
    request = master.request_build("paced")
    buildid = master.wait_build_started(request, step="shell")
    master.wait_for_log(buildid, "shell", "stdio", "\no1000\n")
    proxy.stall()
    time.sleep(3)
    proxy.resume()
    build = master.wait_build(request, timeout=90)
    assert build.result == "SUCCESS", build.describe()
    assert build.step("shell").stream("stdio", "o") == "".join(f"{i}\n" for i in range(1, 40001))
    assert worker.running()


def test_connection_cut_mid_transfer(
    master: RealMaster, workers: Workers, proxy: TcpProxy, tmp_path: Path
) -> None:
    worker = workers.proxied()
    dest = tmp_path / "uploaded.bin"
    request = master.request_build("upload", {"dest": str(dest)})
    master.wait_build_started(request, step="upload")
    proxy.throttle(4 * MiB)
    before = proxy.bytes_up
    wait_for(lambda: proxy.bytes_up - before > 8 * MiB or None, 30, "8 MiB of the upload")
    assert proxy.cut() == 1
    proxy.throttle(None)
    build = master.wait_build(request, timeout=120)
    assert build_results(master, request)[0] == "RETRY", master.logs()
    assert build.result == "SUCCESS", build.describe()
    src = worker.basedir / "upload" / "build" / "big.bin"
    assert dest.read_bytes() == src.read_bytes()
    assert worker.running()


def test_connection_cut_mid_download(
    master: RealMaster, workers: Workers, proxy: TcpProxy, tmp_path: Path
) -> None:
    """The cut download leaves the old file and no temporary file; the retry lands the new."""
    worker = workers.proxied()
    src = tmp_path / "source.bin"
    src.write_bytes(os.urandom(UPLOAD_SIZE))
    dest = worker.basedir / "download" / "build" / "fetched.bin"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(b"the old file\n")
    finished = "downloadFile resources:"  # logged when an executor ends the command
    done_before = worker.twistd_log.read_text().count(finished)
    proxy.throttle(4 * MiB, down=True)
    request = master.request_build("download", {"src": str(src)})
    master.wait_build_started(request, step="download")
    before = proxy.bytes_down
    wait_for(lambda: proxy.bytes_down - before > 8 * MiB or None, 30, "8 MiB of the download")
    proxy.stall()  # and stays stalled: no reconnection (and retry) before the checks
    assert proxy.cut() == 1
    # the worker sees the reset: the executor gives up and removes its temporary file
    wait_for(lambda: not [p for p in dest.parent.iterdir() if "pyworker-tmp" in p.name] or None,
             30, "the temporary file to go")
    assert dest.read_bytes() == b"the old file\n"
    # and its executor is free again: the command ended, it did not wait for a reply forever
    wait_for(lambda: worker.twistd_log.read_text().count(finished) > done_before or None,
             30, "the download's executor to finish the command")
    proxy.throttle(None)
    proxy.resume()
    build = master.wait_build(request, timeout=120)
    assert build_results(master, request)[0] == "RETRY", master.logs()
    assert build.result == "SUCCESS", build.describe()
    assert dest.read_bytes() == src.read_bytes()
    assert not [p.name for p in dest.parent.iterdir() if "pyworker-tmp" in p.name]
    assert worker.running()


def _kill_executor_mid_command(master: RealMaster, worker: WorkerProcess, sleeper: str,
                               token: str) -> Any:
    request = master.request_build("exec-kill", {"token": token})
    pid = wait_for(lambda: (procs_with_cmdline(sleeper) or [None])[0], 30, sleeper, master.logs)
    running = [e for e in executors(worker.pid)
               if pid in {c.pid for c in e.children(recursive=True)}]
    assert len(running) == 1, f"no executor runs {sleeper!r}"
    running[0].kill()
    return master.wait_build(request, timeout=60)


def test_executor_killed_mid_command(master: RealMaster, workers: Workers) -> None:
    worker = workers.proxied()
    token = _token()
    sleeper = f"sleep {token}"
    try:
        build = _kill_executor_mid_command(master, worker, sleeper, token)
    finally:
        kill_all(procs_with_cmdline(sleeper))
    assert build.result == "EXCEPTION", build.describe()
    assert "the pyworker executor process killed by signal 9" in _all_text(build), build.describe()
    assert worker.running()
    # the pool heals: an idle executor again, and the next builds pass
    wait_for(lambda: executors(worker.pid) or None, 15, "a new executor")
    for _ in range(2):
        quick = master.force_build("quick")
        assert quick.result == "SUCCESS", quick.describe()


def test_executor_killed_leaves_no_command_process(master: RealMaster, workers: Workers) -> None:
    worker = workers.proxied()
    token = _token()
    sleeper = f"sleep {token}"
    _kill_executor_mid_command(master, worker, sleeper, token)
    left = wait_gone(sleeper, timeout=5)
    kill_all(left)
    assert left == [], f"the command of the killed executor survived it: {left}"


def test_worker_restarted_during_a_build(
    master: RealMaster, workers: Workers
) -> None:
    worker = workers.proxied()
    request = master.request_build("stream", {"token": _token()})
    buildid = master.wait_build_started(request, step="shell")
    master.wait_for_log(buildid, "shell", "stdio", "line 20")
    assert worker.proc is not None
    pid = worker.pid
    os.kill(pid, signal.SIGTERM)
    assert worker.proc.wait(20) == 0
    assert [p.cmdline for p in descendants() if "while :" in p.cmdline] == []
    worker.start()
    build = master.wait_build(request, timeout=90)
    assert build_results(master, request)[0] == "RETRY"
    assert build.result == "SUCCESS", build.describe()


FSIZE_WRAPPER = """#!{python}
import os, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
os.execv({exe!r}, [{exe!r}] + sys.argv[1:])
"""


def test_disk_full_during_a_download(
    make_master: MasterFactory, pyworker_executable: str, tmp_path: Path
) -> None:
    limit = 4 * MiB
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * limit))
    small = tmp_path / "small.bin"
    small.write_bytes(b"small\n" * 1000)
    master = make_master(builders={
        "dl-big": f"[steps.FileDownload(mastersrc={str(big)!r}, workerdest='big.bin')]",
        "dl-small": f"[steps.FileDownload(mastersrc={str(small)!r}, workerdest='small.bin')]",
    })
    # the name starts with 'pyworker': the harness gives it PYWORKER_IO as to pyworker
    wrapper = tmp_path / "pyworker-fsize"
    wrapper.write_text(FSIZE_WRAPPER.format(python=sys.executable, limit=limit,
                                            exe=pyworker_executable))
    wrapper.chmod(0o755)
    worker = master.start_worker(str(wrapper))
    build = master.force_build("dl-big")
    # as the reference: the write error fails the command (EXCEPTION), with the errno text
    assert build.result in ("FAILURE", "EXCEPTION"), build.describe()
    assert "File too large" in _all_text(build), build.describe()
    builddir = worker.basedir / "dl-big" / "build"
    assert sorted(p.name for p in builddir.iterdir()) == [], "a partial download was left"
    assert worker.running()
    ok = master.force_build("dl-small")
    assert ok.result == "SUCCESS", ok.describe()
    assert (worker.basedir / "dl-small" / "build" / "small.bin").read_bytes() == small.read_bytes()
    worker.stop()


# -- 3. bounded memory, fair sharing, no leaks -----------------------------------------------


def _sample(stop: threading.Event, fn: Callable[[], int], out: list[int]) -> None:
    while not stop.is_set():
        try:
            out.append(fn())
        except psutil.Error:
            pass
        stop.wait(0.05)


def test_output_flood_through_a_slow_connection_keeps_rss_bounded(
    master: RealMaster, workers: Workers, proxy: TcpProxy
) -> None:
    worker = workers.proxied()
    base = worker_rss(worker.pid)
    proxy.throttle(2 * MiB)  # the master takes 2 MiB/s; `yes` writes GiB/s
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(stop, lambda: worker_rss(worker.pid),
                                                     samples))
    sampler.start()
    try:
        request = master.request_build("flood")
        master.wait_build_started(request, step="shell")
        time.sleep(9)  # maxTime=8 ends the command; what waits goes out at 2 MiB/s
        proxy.throttle(None)
        buildid, result = wait_done(master, request, timeout=90)
    finally:
        stop.set()
        sampler.join(5)
        proxy.throttle(None)
    peak = max(samples)
    print(f"\nflood: worker RSS before {base / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB "
          f"({len(samples)} samples), {proxy.bytes_up / MiB:.0f} MiB through the proxy so far")
    assert result == "FAILURE"  # maxTime
    steps = master.get(f"builds/{buildid}/steps")["steps"]
    shell = [s for s in steps if s["name"] == "shell"][0]
    assert shell["results"] == 2, shell  # FAILURE: maxTime
    assert peak < RSS_BOUND, f"peak RSS {peak / MiB:.1f} MiB"
    assert worker.running()


def test_fifty_concurrent_commands_on_one_worker(
    master: RealMaster, workers: Workers, tmp_path: Path
) -> None:
    worker = workers.direct()
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    started = time.monotonic()
    requests = [master.request_build(f"par{i}", {"barrier": str(barrier)})
                for i in range(CONCURRENT)]
    results = wait_all(master, requests, timeout=150)
    print(f"\n{CONCURRENT} concurrent commands: all done in {time.monotonic() - started:.1f} s")
    # every command waited for all the others: they ran at the same time, and all finished
    assert results == ["SUCCESS"] * CONCURRENT
    assert len(list(barrier.iterdir())) == CONCURRENT
    assert worker.running()


def _frontend(pid: int) -> tuple[int, int, int]:
    """(fd count, RSS) of the front end alone, and its number of executors."""
    p = psutil.Process(pid)
    return p.num_fds(), p.memory_info().rss, len(executors(pid))


def test_many_builds_leave_fds_and_rss_flat(master: RealMaster, workers: Workers) -> None:
    worker = workers.direct("wm")

    def run(n: int) -> None:
        for _ in range(n // PARALLEL):
            reqs = [master.request_build(f"many{i}") for i in range(PARALLEL)]
            assert wait_all(master, reqs, timeout=60) == ["SUCCESS"] * PARALLEL

    run(2 * PARALLEL)  # warm-up: imports, caches, the pool at its working size
    fd0, rss0, ex0 = _frontend(worker.pid)
    all0 = worker_rss(worker.pid)
    started = time.monotonic()
    run(MANY_BUILDS)
    took = time.monotonic() - started
    fd1, rss1, ex1 = _frontend(worker.pid)
    all1 = worker_rss(worker.pid)
    print(f"\n{MANY_BUILDS} builds in {took:.0f} s: front end fds {fd0} -> {fd1}, "
          f"front end RSS {rss0 / MiB:.1f} -> {rss1 / MiB:.1f} MiB, executors {ex0} -> {ex1}, "
          f"RSS front end + executors {all0 / MiB:.1f} -> {all1 / MiB:.1f} MiB")
    assert fd1 - fd0 <= 4 * max(0, ex1 - ex0) + 4, f"fd count grew {fd0} -> {fd1}"
    assert rss1 - rss0 < (20 if BIG else 10) * MiB, f"front end RSS grew {rss0} -> {rss1}"
    assert all1 - all0 < (40 if BIG else 20) * MiB + 60 * MiB * max(0, ex1 - ex0), (all0, all1)
