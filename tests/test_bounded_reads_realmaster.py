"""Bounded reads (issue 12, item 3) against a real Buildbot 4.3.0 master, pyworker only (the
reference worker hangs in each of these): a logfile that becomes a link to ``/dev/zero``
or is a FIFO, ``FileUpload`` of a FIFO, and a ``MultipleFileUpload`` glob over two link
loops. Each build ends the way its step's own rules say, and the worker goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from realmaster import Builder, RealMaster, WorkerProcess, master_fixture

#: No process of the worker may grow past this (a link to /dev/zero read to its end grew
#: an executor by about 300 MB/s).
RSS_LIMIT = 200 * 1024 * 1024
DEST = "util.Property('dst')"

BUILDERS = {
    "devzero": "[steps.ShellCommand(command='ln -sf /dev/zero my.log; sleep 300',"
    " logfiles={'mylog': 'my.log'}, maxTime=5)]",
    "fifo-log": "[steps.ShellCommand(command='mkfifo my.log; sleep 3; echo done',"
    " logfiles={'mylog': 'my.log'})]",
    "fifo-log-stop": "[steps.ShellCommand(command='mkfifo my.log; sleep 300',"
    " logfiles={'mylog': 'my.log'})]",
    "upload-fifo": "[steps.ShellCommand(command='rm -f src; mkfifo src'),"
    f" steps.FileUpload(workersrc='src', masterdest={DEST})]",
    "glob-loops": "[steps.ShellCommand(command='rm -rf a; mkdir -p a/b; echo x > a/b/f.txt;"
    " ln -s .. a/l1; ln -s .. a/l2'),"
    f" steps.MultipleFileUpload(workersrcs=['**/*.txt'], glob=True, masterdest={DEST})]",
    "echo": "[steps.ShellCommand(command=['echo', 'hello'])]",
}

master = master_fixture({name: Builder(factory=steps, workers=["py"])
                         for name, steps in BUILDERS.items()}, workers=("py",))


@pytest.fixture(scope="module")
def worker(master: RealMaster, pyworker_executable: str) -> Iterator[WorkerProcess]:
    w = master.start_worker(pyworker_executable, "py")
    yield w
    w.stop()


class PeakRss:
    """The largest RSS any one process of a tree reaches, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.top = psutil.Process(pid)
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                procs = [self.top, *self.top.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    self.peak = max(self.peak, p.memory_info().rss)
                except psutil.Error:
                    pass
            self._done.wait(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def _goes_on(master: RealMaster, worker: WorkerProcess) -> None:
    assert worker.running()
    assert master.force_build("echo").result == "SUCCESS"


def test_a_logfile_linked_to_dev_zero_is_not_read_and_max_time_fires(
        master: RealMaster, worker: WorkerProcess) -> None:
    assert worker.proc is not None
    with PeakRss(worker.proc.pid) as rss:
        build = master.force_build("devzero", timeout=120)
    assert build.result == "FAILURE", build.describe()
    stdio = build.step("shell").logs["stdio"]
    assert "command timed out: 5 seconds elapsed" in stdio
    assert "logfile 'mylog' not read: " in stdio and "(a character device)" in stdio
    assert rss.peak < RSS_LIMIT, f"a worker process reached {rss.peak} bytes"
    _goes_on(master, worker)


def test_a_fifo_logfile_is_not_read_and_the_step_succeeds(
        master: RealMaster, worker: WorkerProcess) -> None:
    build = master.force_build("fifo-log", timeout=120)
    assert build.result == "SUCCESS", build.describe()
    stdio = build.step("shell").logs["stdio"]
    assert "logfile 'mylog' not read: " in stdio and "(a FIFO)" in stdio
    assert "done" in stdio
    _goes_on(master, worker)


def test_a_step_with_a_fifo_logfile_can_be_stopped(
        master: RealMaster, worker: WorkerProcess) -> None:
    request = master.request_build("fifo-log-stop")
    buildid = master.wait_build_started(request)
    master.wait_for_log(buildid, "shell", "stdio", "(a FIFO)", timeout=120)
    master.stop_build(buildid)
    build = master.wait_build(request, timeout=120)
    assert build.result == "CANCELLED", build.describe()
    assert "command interrupted, attempting to kill" in build.step("shell").logs["stdio"]
    _goes_on(master, worker)


def test_upload_of_a_fifo_fails_readably(master: RealMaster, worker: WorkerProcess,
                                         tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    build = master.force_build("upload-fifo", {"dst": str(dst)}, timeout=120)
    assert build.result == "FAILURE", build.describe()
    stdio = build.steps[-1].logs["stdio"]
    assert "is not a regular file (a FIFO)" in stdio, build.describe()
    _goes_on(master, worker)


def test_a_glob_over_two_link_loops_ends(master: RealMaster, worker: WorkerProcess,
                                         tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    build = master.force_build("glob-loops", {"dst": str(dst)}, timeout=120)
    assert build.result == "SUCCESS", build.describe()
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == ["f.txt"]
    assert (dst / "f.txt").read_text() == "x\n"
    _goes_on(master, worker)
