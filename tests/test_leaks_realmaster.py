"""A failing transfer leaks nothing, seen from a real Buildbot 4.3.0 master over PB: a
``FileDownload`` whose ``mode`` chmod cannot take (``2**40``) onto an existing file fails the
step, keeps the old file, leaves no temporary file, and the worker's executor processes hold
as many descriptors after several such builds as before (issue 12).
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
from realmaster import Builder, RealMaster, master_fixture

P_SRC = "util.Property('src')"
P_DST = "util.Property('dst')"

master = master_fixture(
    {
        "download_badmode": Builder(
            factory=f"[steps.FileDownload(mastersrc={P_SRC}, workerdest={P_DST}, mode=2**40)]",
            workers=["pyworker"]),
        "download_ok": Builder(
            factory=f"[steps.FileDownload(mastersrc={P_SRC}, workerdest={P_DST}, mode=0o640)]",
            workers=["pyworker"]),
    },
    workers=("pyworker",),
)


@pytest.fixture(scope="module")
def worker_pid(master: RealMaster, pyworker_executable: str) -> int:
    return master.start_worker(pyworker_executable, "pyworker").pid


def executor_fds(worker_pid: int) -> dict[int, int]:
    """Open descriptors of each executor process of the worker, by pid."""
    counts = {}
    for child in psutil.Process(worker_pid).children():
        try:
            if "pyworker.executor" in " ".join(child.cmdline()):
                counts[child.pid] = len(os.listdir(f"/proc/{child.pid}/fd"))
        except (psutil.Error, FileNotFoundError):
            pass
    return counts


def test_download_with_an_impossible_mode_keeps_the_file_and_leaks_nothing(
        master: RealMaster, worker_pid: int, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "f0"
    # a good download first: the executors that will run the bad ones exist and are warm
    ok = master.force_build("download_ok", {"src": str(src), "dst": str(out / "warm")})
    assert ok.result == "SUCCESS", ok.describe()
    (out / "warm").unlink()
    dst.write_bytes(b"old content")
    before = executor_fds(worker_pid)
    assert before, "no executor found"
    for _ in range(5):
        b = master.force_build("download_badmode", {"src": str(src), "dst": str(dst)})
        assert b.result in ("FAILURE", "EXCEPTION"), b.describe()
        assert "argument 'mode' is not a file mode: 1099511627776" in b.describe(), b.describe()
        assert dst.read_bytes() == b"old content"
        assert sorted(os.listdir(out)) == ["f0"]  # no .f0.*.pyworker-tmp
    after = executor_fds(worker_pid)
    # the same executors ran them (none replaced), each with the descriptors it had
    assert after == before
    # and the worker still works
    ok = master.force_build("download_ok", {"src": str(src), "dst": str(dst)})
    assert ok.result == "SUCCESS", ok.describe()
    assert dst.read_bytes() == src.read_bytes()
