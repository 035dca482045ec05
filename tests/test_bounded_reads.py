"""What an executor reads is bounded (issue 12, item 3), in a real executor process: a
logfile that is a FIFO or a link to ``/dev/zero`` is not read (the header says so) and the
command's timers and interrupts still work; ``uploadFile`` of a FIFO or a device fails at
once; ``glob`` ``**`` over link loops ends, and a huge walk stops when interrupted. After
each, the same executor serves the next command. With and without ``restrict_paths``.
"""

from __future__ import annotations

import io
import marshal
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from executor_driver import ExecutorDriver, FakeMaster, Result
from realmaster import wait_for_process

from pyworker import frames as wire
from pyworker import paths

#: The executor's RSS must stay below this while a logfile is a link to /dev/zero (it grew
#: by about 300 MB/s when such a link was read to its end).
RSS_LIMIT = 200 * 1024 * 1024
REFUSED = "(refused: the worker runs with restrict_paths)"


@pytest.fixture
def ex() -> Iterator[ExecutorDriver]:
    driver = ExecutorDriver()
    yield driver
    driver.close()


@pytest.fixture(params=["plain", "restrict"])
def restricted(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "restrict")


def start(ex: ExecutorDriver, root: Path, restricted: bool, name: str,
          args: dict[str, Any]) -> None:
    request: dict[str, Any] = {"name": name, "args": args, "command_id": "1",
                               "basedir": str(root), "io": {}}
    if restricted:
        request["restrict"] = {"root": str(root), "protected": list(paths.WORKER_FILES)}
    ex.send(wire.frame(wire.START, marshal.dumps(request)))


def run(ex: ExecutorDriver, root: Path, restricted: bool, name: str, args: dict[str, Any],
        master: FakeMaster | None = None, timeout: float = 120) -> Result:
    start(ex, root, restricted, name, args)
    got = []
    for item in ex.frames(timeout):
        got.append(item)
        for reply in (master.answer(item) if master is not None else []):
            assert reply is not None
            ex.send(reply)
    return Result(got)


def serves_the_next_command(ex: ExecutorDriver, root: Path, restricted: bool) -> None:
    r = run(ex, root, restricted, "shell", {"workdir": str(root), "command": ["echo", "next"],
                                            "logEnviron": False})
    assert r.rc == 0 and r.text("stdout") == "next\n", r.updates


class RssSampler:
    """The peak RSS of a process, sampled in a thread until :meth:`stop`."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._done.wait(0.05)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def _logs(r: Result, name: str) -> str:
    return "".join(text for log, text in r.values("log") if log == name)


# -- logfiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("timer", ["timeout", "maxTime"])
def test_a_logfile_that_becomes_a_link_to_dev_zero_is_not_read_and_timers_fire(
        ex: ExecutorDriver, tmp_path: Path, restricted: bool, timer: str) -> None:
    (tmp_path / "my.log").write_text("before\n")  # a regular file when the command starts
    script = "sleep 0.5; ln -sf /dev/zero my.log; sleep 300"
    sampler = RssSampler(ex.proc.pid)
    try:
        r = run(ex, tmp_path, restricted, "shell", {
            "workdir": str(tmp_path), "command": script, "logfiles": {"mylog": "my.log"},
            "logEnviron": False, timer: 5})
    finally:
        peak = sampler.stop()
    header = r.text("header")
    if timer == "timeout":
        assert "command timed out: 5 seconds without output" in header, header
    else:
        assert "command timed out: 5 seconds elapsed" in header, header
    if restricted:  # a link out of the basedir: refused before its type is looked at
        assert r.failure is not None and "logfile 'mylog' not read" in r.failure
        assert REFUSED in r.failure
    else:
        assert (f"logfile 'mylog' not read: '{tmp_path}/my.log' is not a regular file "
                "(a character device)\n") in header
    assert r.rc == -1 and _logs(r, "mylog") == ""
    assert peak < RSS_LIMIT, f"executor RSS reached {peak} bytes"
    serves_the_next_command(ex, tmp_path, restricted)


def test_a_fifo_logfile_is_not_read_and_the_command_ends_normally(
        ex: ExecutorDriver, tmp_path: Path, restricted: bool) -> None:
    # no writer ever opens it: an open for reading would wait for one
    r = run(ex, tmp_path, restricted, "shell", {
        "workdir": str(tmp_path), "command": "mkfifo my.log; sleep 3; echo done",
        "logfiles": {"mylog": "my.log"}, "logEnviron": False})
    assert r.rc == 0 and r.failure is None, r.updates
    assert r.text("stdout") == "done\n"
    assert (f"logfile 'mylog' not read: '{tmp_path}/my.log' is not a regular file "
            "(a FIFO)\n") in r.text("header")
    serves_the_next_command(ex, tmp_path, restricted)


def test_a_command_with_a_fifo_logfile_can_be_interrupted(
        ex: ExecutorDriver, tmp_path: Path, restricted: bool) -> None:
    start(ex, tmp_path, restricted, "shell", {
        "workdir": str(tmp_path), "command": "mkfifo my.log && exec sleep 301",
        "logfiles": {"mylog": "my.log"}, "logEnviron": False})
    got = []
    frames = ex.frames(120)
    for item in frames:  # until the watcher has found the FIFO
        got.append(item)
        if b"not read" in item[2]:
            break
    wait_for_process("sleep 301", timeout=60)
    ex.interrupt("stop it")
    got.extend(frames)
    r = Result(got)
    assert "\ncommand interrupted, attempting to kill\n" in r.text("header")
    assert "(a FIFO)" in r.text("header")
    assert r.rc == -1
    serves_the_next_command(ex, tmp_path, restricted)


def test_a_large_logfile_is_sent_whole_in_bounded_pieces(
        ex: ExecutorDriver, tmp_path: Path, restricted: bool) -> None:
    # written at once just before the end: read at the end, up to its size then
    script = ("sleep 2.5; head -c 3000000 /dev/urandom | base64 > part; mv part big.log; "
              "sleep 0.1")
    r = run(ex, tmp_path, restricted, "shell", {
        "workdir": str(tmp_path), "command": script, "logfiles": {"big": "big.log"},
        "logEnviron": False})
    assert r.rc == 0, r.updates
    assert _logs(r, "big") == (tmp_path / "big.log").read_text()
    pieces = [text for log, text in r.values("log") if log == "big"]
    # 1 MiB per read, plus the partial line the one before left (base64: 77 a line)
    assert len(pieces) > 1 and max(len(p) for p in pieces) <= 1024 * 1024 + 77


# -- uploadFile / uploadDirectory -------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_upload_of_a_fifo_or_a_device_fails_at_once(
        ex: ExecutorDriver, tmp_path: Path, restricted: bool, kind: str) -> None:
    src = tmp_path / "src"
    if kind == "fifo":
        os.mkfifo(src)
    else:
        os.symlink("/dev/zero", src)
    master = FakeMaster()
    r = run(ex, tmp_path, restricted, "uploadFile",
            {"path": str(src), "blocksize": 4096, "maxsize": None}, master)
    if restricted and kind == "device":  # a link out: refused before its type is looked at
        assert r.failure is not None and REFUSED in r.failure
        assert master.written == b""
        serves_the_next_command(ex, tmp_path, restricted)
        return
    what = "a FIFO" if kind == "fifo" else "a character device"
    assert r.text("stderr").rstrip("\n") == (
        f"Cannot open file '{src}' for upload: '{src}' is not a regular file ({what})")
    assert r.rc == 1 and master.written == b""
    assert [c[1] for c in master.calls] == ["close"]
    serves_the_next_command(ex, tmp_path, restricted)


def test_download_onto_a_fifo_fails_at_once_and_leaves_it(
        ex: ExecutorDriver, tmp_path: Path, restricted: bool) -> None:
    dst = tmp_path / "dst"
    os.mkfifo(dst)
    master = FakeMaster(b"data")
    r = run(ex, tmp_path, restricted, "downloadFile",
            {"path": str(dst), "blocksize": 4096, "maxsize": None, "mode": None}, master)
    assert r.text("stderr").rstrip("\n") == (
        f"Cannot open file '{dst}' for download: '{dst}' is not a regular file (a FIFO)")
    assert r.rc == 1
    assert stat.S_ISFIFO(os.lstat(dst).st_mode)  # not renamed over
    assert sorted(os.listdir(tmp_path)) == ["dst"]
    serves_the_next_command(ex, tmp_path, restricted)


def test_upload_directory_archives_a_fifo_without_reading_it(
        ex: ExecutorDriver, tmp_path: Path, restricted: bool) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("data")
    os.mkfifo(tree / "fifo")
    master = FakeMaster()
    r = run(ex, tmp_path, restricted, "uploadDirectory",
            {"path": str(tree), "blocksize": 4096, "maxsize": None, "compress": None}, master)
    assert r.rc == 0 and r.failure is None, r.updates
    with tarfile.open(fileobj=io.BytesIO(bytes(master.written))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["fifo"].isfifo()
        assert tar.extractfile("file").read() == b"data"  # type: ignore[union-attr]


# -- glob -------------------------------------------------------------------------------


def test_glob_over_two_link_loops_ends(ex: ExecutorDriver, tmp_path: Path,
                                       restricted: bool) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f.txt").write_text("x")
    os.symlink("..", tmp_path / "a" / "l1")
    os.symlink("..", tmp_path / "a" / "l2")
    r = run(ex, tmp_path, restricted, "glob", {"path": f"{tmp_path}/**"})
    assert r.rc == 0, r.updates
    assert sorted(r.values("files")[0]) == sorted(
        f"{tmp_path}/{p}" for p in ["", "a", "a/b", "a/b/f.txt", "a/l1", "a/l2"])
    r = run(ex, tmp_path, restricted, "glob", {"path": f"{tmp_path}/**/*.txt"})
    assert r.values("files") == [[f"{tmp_path}/a/b/f.txt"]]
    serves_the_next_command(ex, tmp_path, restricted)


def test_a_huge_glob_stops_when_interrupted(ex: ExecutorDriver, tmp_path: Path,
                                            restricted: bool) -> None:
    # no loop, but 2**40 paths: d0/{x,y} -> d1, d1/{x,y} -> d2, ...
    depth = 40
    for i in range(depth + 1):
        (tmp_path / f"d{i}").mkdir()
    for i in range(depth):
        os.symlink(f"../d{i + 1}", tmp_path / f"d{i}" / "x")
        os.symlink(f"../d{i + 1}", tmp_path / f"d{i}" / "y")
    start(ex, tmp_path, restricted, "glob", {"path": f"{tmp_path}/d0/**/nothing"})
    wait_for_cpu(ex.proc.pid)  # walking, not just started
    ex.interrupt("stop it")
    r = Result(list(ex.frames(120)))
    assert r.failure is not None and "interrupted while globbing" in r.failure
    assert "files" not in r.keys()
    serves_the_next_command(ex, tmp_path, restricted)


def wait_for_cpu(pid: int, seconds: float = 0.5) -> None:
    """Until the process has used ``seconds`` of CPU time since this was called."""
    from realmaster import wait_for

    proc = psutil.Process(pid)
    base = sum(proc.cpu_times()[:2])
    wait_for(lambda: sum(proc.cpu_times()[:2]) - base >= seconds or None, 120,
             f"process {pid} to use {seconds} s of CPU")
