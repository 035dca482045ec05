"""Nothing leaks on a failure path: after every failing transfer or file-system command, a
real executor process has exactly the descriptors it had before, and the directories it
worked in hold exactly the entries they held (no ``.pyworker-tmp`` left), with and without
``restrict_paths``. The master's side is answered as the front end relays it
(:class:`executor_driver.FakeMaster`).
"""

from __future__ import annotations

import marshal
import os
import random
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from executor_driver import ExecutorDriver, FakeMaster, Result

from pyworker import frames as wire
from pyworker import paths

IO = {"block_size": 4096, "window": 8192}  # several blocks in flight, many per transfer
DATA = random.Random(12).randbytes(51200)  # 13 blocks, the same compressed


@pytest.fixture(scope="module")
def ex() -> Iterator[ExecutorDriver]:
    driver = ExecutorDriver()
    yield driver
    driver.close()


@pytest.fixture(params=["plain", "restrict"])
def restrict(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "restrict")


def start(ex: ExecutorDriver, root: Path, restricted: bool, name: str,
          args: dict[str, Any]) -> None:
    request: dict[str, Any] = {"name": name, "args": args, "command_id": "1",
                               "basedir": str(root), "io": IO}
    if restricted:
        request["restrict"] = {"root": str(root), "protected": list(paths.WORKER_FILES)}
    ex.send(wire.frame(wire.START, marshal.dumps(request)))


def transfer(ex: ExecutorDriver, root: Path, restricted: bool, name: str,
             args: dict[str, Any], master: FakeMaster) -> Result:
    start(ex, root, restricted, name, args)
    got = []
    for item in ex.frames(60):
        got.append(item)
        for reply in master.answer(item):
            if reply is None:
                ex.interrupt("interrupted by the test")
            else:
                ex.send(reply)
    return Result(got)


def command(ex: ExecutorDriver, root: Path, restricted: bool, name: str,
            args: dict[str, Any]) -> Result:
    start(ex, root, restricted, name, args)
    return Result(list(ex.frames(60)))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def no_leak(ex: ExecutorDriver, root: Path, run: Callable[[], Result],
            changed: bool = False) -> Result:
    """Run a command; assert the executor's fds (and, unless ``changed``, the tree) are as
    they were. The executor ran one command of each kind already (lazy set-up is not a leak)."""
    fds = ex.open_fds()
    entries = tree(root)
    result = run()
    assert ex.open_fds() == fds, result.updates
    after = tree(root)
    assert not [e for e in after if e.endswith(".pyworker-tmp")], after
    if not changed:
        assert after == entries, result.updates
    return result


@pytest.fixture
def root(tmp_path: Path, ex: ExecutorDriver) -> Path:
    base = tmp_path / "base"
    (base / "b").mkdir(parents=True)
    (base / "b" / "f0").write_bytes(b"old")
    (base / "b" / "dir").mkdir()
    (base / "b" / "dir" / "one").write_bytes(DATA)
    (base / "b" / "dir" / "two").write_bytes(DATA)
    (base / "b" / "dir" / "sub").mkdir()
    (base / "b" / "dir" / "sub" / "three").write_bytes(DATA)
    (tmp_path / "outside").write_text("secret")
    # warm-up: one successful command of each kind, both ways
    for restricted in (False, True):
        dl = {"path": str(base / "b" / "warm"), "blocksize": 4096, "maxsize": None,
              "mode": None}
        assert transfer(ex, base, restricted, "downloadFile", dl, FakeMaster(DATA)).rc == 0
        os.unlink(base / "b" / "warm")
        up = {"path": str(base / "b" / "f0"), "blocksize": 4096, "maxsize": None,
              "keepstamp": True}
        assert transfer(ex, base, restricted, "uploadFile", up, FakeMaster()).rc == 0
        for compress in (None, "gz", "bz2"):
            ud = {"path": str(base / "b" / "dir"), "blocksize": 4096, "maxsize": None,
                  "compress": compress}
            assert transfer(ex, base, restricted, "uploadDirectory", ud, FakeMaster()).rc == 0
    return base


# ---- downloadFile --------------------------------------------------------------------------


def download(path: Path, mode: Any = None, maxsize: int | None = None) -> dict[str, Any]:
    return {"path": str(path), "blocksize": 4096, "maxsize": maxsize, "mode": mode}


@pytest.mark.parametrize("mode", [2**40, 2**31, -(2**31) - 1, 1.5, "644", True, [0o644]])
def test_download_with_a_bad_mode_keeps_the_file_and_leaks_nothing(
        ex: ExecutorDriver, root: Path, restrict: bool, mode: Any) -> None:
    target = root / "b" / "f0"
    for _ in range(3):
        r = no_leak(ex, root, lambda: transfer(ex, root, restrict, "downloadFile",
                                               download(target, mode), FakeMaster(DATA)))
        assert r.failure is not None and "argument 'mode'" in r.failure, r.updates
        assert "Traceback" not in r.failure
        assert target.read_bytes() == b"old"


def test_download_mode_minus_one_is_chmod_minus_one(ex: ExecutorDriver, root: Path,
                                                    restrict: bool) -> None:
    # as the reference's os.chmod(path, -1): the kernel keeps the low 12 bits
    target = root / "b" / "f0"
    r = no_leak(ex, root, lambda: transfer(ex, root, restrict, "downloadFile",
                                           download(target, -1), FakeMaster(DATA)))
    assert r.rc == 0 and r.failure is None, r.updates
    assert target.read_bytes() == DATA
    assert stat.S_IMODE(target.stat().st_mode) & 0o777 == 0o777


@pytest.mark.parametrize("master", [
    pytest.param(lambda: FakeMaster(DATA, fail_read_after=3 * 4096), id="reader-fails"),
    pytest.param(lambda: FakeMaster(DATA, fail_read_after=0), id="reader-fails-at-once"),
    pytest.param(lambda: FakeMaster(DATA, interrupt_after=3), id="interrupted"),
    pytest.param(lambda: FakeMaster(DATA, interrupt_after=1), id="interrupted-at-once"),
])
def test_download_failing_mid_way_keeps_the_old_file(
        ex: ExecutorDriver, root: Path, restrict: bool,
        master: Callable[[], FakeMaster]) -> None:
    target = root / "b" / "f0"
    for _ in range(3):
        fake = master()
        r = no_leak(ex, root, lambda fake=fake: transfer(
            ex, root, restrict, "downloadFile", download(target, 0o640), fake))
        assert r.failure is not None or r.rc == 1, r.updates
        assert target.read_bytes() == b"old"
        assert ("reader", "close", ()) in fake.calls


def test_download_rename_failing_removes_the_temporary_file(
        ex: ExecutorDriver, root: Path, restrict: bool) -> None:
    target = root / "b" / "f0"

    def swap() -> Result:
        fake = FakeMaster(DATA)
        answer = fake.answer

        def answer_and_swap(item: tuple[int, int, bytes]) -> list[bytes | None]:
            if item[0] == wire.READ and fake.blocks == 2:  # mid-way: the target becomes
                target.unlink()                           # a non-empty directory
                target.mkdir()
                (target / "x").write_text("x")
            return answer(item)

        fake.answer = answer_and_swap  # type: ignore[method-assign]
        return transfer(ex, root, restrict, "downloadFile", download(target), fake)

    r = no_leak(ex, root, swap, changed=True)
    assert r.failure is not None, r.updates
    assert (target / "x").read_text() == "x"


@pytest.mark.parametrize("where", ["b/f0/sub/new", "b/dir", "b/f0/new"])
def test_download_to_an_impossible_place_fails_and_leaks_nothing(
        ex: ExecutorDriver, root: Path, restrict: bool, where: str) -> None:
    r = no_leak(ex, root, lambda: transfer(ex, root, restrict, "downloadFile",
                                           download(root / where, 0o644), FakeMaster(DATA)))
    assert r.rc == 1 and "Cannot open file" in r.text("stderr"), r.updates


def test_download_truncated_by_maxsize_leaves_no_temporary_file(
        ex: ExecutorDriver, root: Path, restrict: bool) -> None:
    target = root / "b" / "f0"
    r = no_leak(ex, root, lambda: transfer(ex, root, restrict, "downloadFile",
                                           download(target, None, maxsize=5000),
                                           FakeMaster(DATA)))
    assert r.rc == 1 and "Maximum filesize reached" in r.text("stderr"), r.updates
    assert target.read_bytes() == DATA[:5000]  # as the reference


def test_download_refused_outside_leaks_nothing(ex: ExecutorDriver, root: Path) -> None:
    r = no_leak(ex, root.parent, lambda: transfer(
        ex, root, True, "downloadFile", download(root / ".." / "outside"), FakeMaster(DATA)))
    assert r.failure is not None and "restrict_paths" in r.failure
    assert (root.parent / "outside").read_text() == "secret"


@pytest.fixture
def read_only(root: Path) -> Iterator[Callable[[Path], None]]:
    """Make a file or directory unwritable (as root, which writes through modes: immutable)."""
    made: list[Path] = []

    def make(p: Path) -> None:
        if os.geteuid() == 0:
            if subprocess.run(["chattr", "+i", str(p)], capture_output=True).returncode:
                pytest.skip("cannot make a file immutable here (chattr +i)")
        else:
            os.chmod(p, 0o555 if p.is_dir() else 0o444)
        made.append(p)

    yield make
    for p in reversed(made):
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(p)], check=True)
        else:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)


def test_download_into_an_unwritable_directory(ex: ExecutorDriver, root: Path, restrict: bool,
                                               read_only: Callable[[Path], None]) -> None:
    ro = root / "b" / "ro"
    ro.mkdir()
    (ro / "writable").write_bytes(b"old")
    (ro / "locked").write_bytes(b"old")
    read_only(ro / "locked")
    read_only(ro)
    for where in ("new", "locked", "sub/new"):
        r = no_leak(ex, root, lambda where=where: transfer(
            ex, root, restrict, "downloadFile", download(ro / where, 0o644), FakeMaster(DATA)))
        assert r.rc == 1 and "Cannot open file" in r.text("stderr"), (where, r.updates)
    assert (ro / "locked").read_bytes() == b"old"
    # a writable file in it is written in place, as the reference's open(path, 'wb')
    r = no_leak(ex, root, lambda: transfer(ex, root, restrict, "downloadFile",
                                           download(ro / "writable"), FakeMaster(DATA)))
    assert r.rc == 0 and r.failure is None, r.updates
    assert (ro / "writable").read_bytes() == DATA
    # and when the reader fails mid-way, what was written stays (the reference's too)
    r = no_leak(ex, root, lambda: transfer(
        ex, root, restrict, "downloadFile", download(ro / "writable"),
        FakeMaster(DATA[::-1], fail_read_after=2 * 4096)))
    assert r.failure is not None and "read failed" in r.failure, r.updates


def test_fs_commands_in_an_unwritable_directory(ex: ExecutorDriver, root: Path, restrict: bool,
                                                read_only: Callable[[Path], None]) -> None:
    ro = root / "b" / "ro"
    (ro / "t" / "u").mkdir(parents=True)
    (ro / "t" / "u" / "f").write_text("x")
    (ro / "f").write_text("x")
    read_only(ro / "t" / "u")
    read_only(ro)
    for name, args in [("rmdir", {"paths": [str(ro / "t")]}),
                       ("rmfile", {"path": str(ro / "f")}),
                       ("mkdir", {"paths": [str(ro / "new")]}),
                       ("cpdir", {"from_path": str(root / "b" / "dir"),
                                  "to_path": str(ro / "copy")})]:
        r = no_leak(ex, root, lambda name=name, args=args: command(
            ex, root, restrict, name, {**args, "logEnviron": False}))
        assert r.rc not in (0, None) or r.failure is not None, (name, r.updates)
    assert (ro / "t" / "u" / "f").read_text() == "x" and (ro / "f").read_text() == "x"


# ---- uploadFile / uploadDirectory ----------------------------------------------------------


def upload(path: Path, maxsize: int | None = None, **more: Any) -> dict[str, Any]:
    return {"path": str(path), "blocksize": 4096, "maxsize": maxsize, **more}


UPLOAD_MASTERS = [
    pytest.param(lambda: FakeMaster(fail_write_after=2 * 4096), id="writer-fails"),
    pytest.param(lambda: FakeMaster(fail_write_after=0), id="writer-fails-at-once"),
    pytest.param(lambda: FakeMaster(interrupt_after=2), id="interrupted"),
    pytest.param(lambda: FakeMaster(interrupt_after=1), id="interrupted-at-once"),
    pytest.param(lambda: FakeMaster(failing_calls=("close", "utime", "unpack")),
                 id="closing-call-fails"),
]


@pytest.mark.parametrize("master", UPLOAD_MASTERS)
def test_upload_file_failing_leaks_nothing(ex: ExecutorDriver, root: Path, restrict: bool,
                                           master: Callable[[], FakeMaster]) -> None:
    (root / "b" / "big").write_bytes(DATA)
    for _ in range(3):
        r = no_leak(ex, root, lambda: transfer(ex, root, restrict, "uploadFile",
                                               upload(root / "b" / "big", keepstamp=True),
                                               master()))
        assert r.failure is not None or r.rc == 1, r.updates


@pytest.mark.parametrize("where", ["b/missing", "b/dir", "b/f0/x"])
def test_upload_file_that_cannot_be_opened(ex: ExecutorDriver, root: Path, restrict: bool,
                                           where: str) -> None:
    r = no_leak(ex, root, lambda: transfer(ex, root, restrict, "uploadFile",
                                           upload(root / where, keepstamp=True),
                                           FakeMaster()))
    assert r.rc == 1 and "Cannot open file" in r.text("stderr"), r.updates


@pytest.mark.parametrize("compress", [None, "gz", "bz2"])
@pytest.mark.parametrize("master", UPLOAD_MASTERS)
def test_upload_directory_failing_leaks_nothing(
        ex: ExecutorDriver, root: Path, restrict: bool, compress: str | None,
        master: Callable[[], FakeMaster]) -> None:
    for _ in range(3):
        r = no_leak(ex, root, lambda: transfer(ex, root, restrict, "uploadDirectory",
                                               upload(root / "b" / "dir", compress=compress),
                                               master()))
        assert r.failure is not None or r.rc == 1, r.updates


@pytest.mark.parametrize("where", ["b/missing", "b/f0"])  # b/f0: a file, interrupted
def test_upload_directory_that_cannot_be_read(ex: ExecutorDriver, root: Path, restrict: bool,
                                              where: str) -> None:
    r = no_leak(ex, root, lambda: transfer(ex, root, restrict, "uploadDirectory",
                                           upload(root / where, compress=None),
                                           FakeMaster(interrupt_after=1)))
    assert r.rc == 1 or r.failure is not None, r.updates


def test_upload_directory_truncated_at_every_offset_leaks_nothing(
        ex: ExecutorDriver, root: Path, restrict: bool) -> None:
    """``maxsize`` ends the archive at every block boundary: wherever the tar writer stands
    (a file's header sent, its data not yet: the file is open), closing releases it."""
    full = FakeMaster()
    assert transfer(ex, root, restrict, "uploadDirectory",
                    upload(root / "b" / "dir", compress=None), full).rc == 0
    for maxsize in range(512, len(full.written), 512):
        args = upload(root / "b" / "dir", maxsize=maxsize, compress=None)
        r = no_leak(ex, root, lambda args=args: transfer(
            ex, root, restrict, "uploadDirectory", args, FakeMaster()))
        assert r.rc == 1 and "Maximum filesize reached" in r.text("stderr"), (maxsize,
                                                                             r.updates)


# ---- file-system commands ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "args"), [
    ("rmdir", {"paths": ["b/f0/x"]}),
    ("rmdir", {"paths": ["b/missing/x"]}),
    ("cpdir", {"from_path": "b/missing", "to_path": "b/new"}),
    ("cpdir", {"from_path": "b/dir", "to_path": "b/f0/x"}),
    ("cpdir", {"from_path": "b/dir", "to_path": "b/dir/sub"}),
    ("stat", {"path": "b/missing"}),
    ("stat", {"path": "b/f0/x"}),
    ("listdir", {"path": "b/missing"}),
    ("listdir", {"path": "b/f0"}),
    ("rmfile", {"path": "b/missing"}),
    ("rmfile", {"path": "b/dir"}),
    ("rmfile", {"path": "b/f0/x"}),
    ("glob", {"path": "b/f0/*/x"}),
    ("glob", {"path": "../outside/*"}),
    ("stat", {"path": "../outside"}),
    ("cpdir", {"from_path": "../outside", "to_path": "b/new"}),
    ("mkdir", {"paths": ["b/f0/x"]}),
])
def test_failing_fs_commands_leak_nothing(ex: ExecutorDriver, root: Path, restrict: bool,
                                          name: str, args: dict[str, Any]) -> None:
    def absolute(v: Any) -> Any:
        return [absolute(p) for p in v] if isinstance(v, list) else str(root / v)

    full = {k: absolute(v) for k, v in args.items()}
    full["logEnviron"] = False
    for _ in range(2):
        r = no_leak(ex, root.parent, lambda: command(ex, root, restrict, name, full),
                    changed=name == "cpdir")
        if name == "rmdir":  # rm -rf: a missing parent (or a file as one) is nothing to do
            assert r.failure is None and r.rc == 0, r.updates
        elif restrict or "outside" not in repr(args):  # plain: outside is allowed
            assert r.failure is not None or r.rc not in (0, None) or name == "glob", \
                r.updates
