"""pyworker.paths: paths resolved beneath a root, by openat2 and by the fallback walk."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyworker import paths

METHODS = ["openat2", "walk"]


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    if request.param == "openat2" and not paths.openat2_available():
        pytest.skip("this kernel has no openat2")
    return str(request.param)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ with build/sub/file, the worker's own files, and outside/secret next to it."""
    root = tmp_path / "root"
    (root / "build" / "sub").mkdir(parents=True)
    (root / "build" / "sub" / "file").write_text("inside")
    (root / "other").mkdir()
    (root / "buildbot.tac").write_text("tac")
    (root / "twistd.log").write_text("log")
    (root / "info").mkdir()
    (root / "info" / "admin").write_text("me")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    return root


@pytest.fixture
def beneath(tree: Path, method: str) -> Iterator[paths.Beneath]:
    with paths.Beneath(str(tree), paths.WORKER_FILES, use_openat2=method == "openat2") as b:
        yield b


def read(b: paths.Beneath, path: str) -> str:
    fd = b.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 100).decode()
    finally:
        os.close(fd)


def test_plain_paths_relative_and_absolute(beneath: paths.Beneath, tree: Path) -> None:
    assert read(beneath, "build/sub/file") == "inside"
    assert read(beneath, str(tree / "build/sub/file")) == "inside"
    assert read(beneath, "build/sub/../sub/./file") == "inside"


@pytest.mark.parametrize("path", ["../outside/secret", "build/../../outside/secret", "..",
                                  "build/sub/../../../outside/secret"])
def test_dotdot_out_is_refused(beneath: paths.Beneath, path: str) -> None:
    with pytest.raises(paths.PathRefused, match="outside the worker's basedir"):
        beneath.open(path, os.O_RDONLY)


def test_absolute_path_outside_is_refused(beneath: paths.Beneath, tree: Path) -> None:
    with pytest.raises(paths.PathRefused, match=r"path '/etc/passwd' is outside the worker's "
                       r"basedir '.*' \(refused: the worker runs with restrict_paths\)"):
        beneath.open("/etc/passwd", os.O_RDONLY)
    with pytest.raises(paths.PathRefused):
        beneath.open(str(tree.parent / "outside" / "secret"), os.O_RDONLY)


@pytest.mark.parametrize("target", ["../../outside", "ABS_OUTSIDE", "/etc"])
def test_symlink_pointing_out_is_refused(beneath: paths.Beneath, tree: Path,
                                         target: str) -> None:
    if target == "ABS_OUTSIDE":
        target = str(tree.parent / "outside")
    os.symlink(target, tree / "build" / "out")
    for path in ("build/out/secret", "build/out", "build/out/nothere"):
        with pytest.raises(paths.PathRefused):
            beneath.locate(path)
    with pytest.raises(paths.PathRefused):
        beneath.makedirs("build/out/new")
    assert not (tree.parent / "outside" / "new").exists()
    # not following the last component: the link itself is inside (rmfile removes it)
    dir_fd, name = beneath.locate("build/out", follow_last=False)
    os.close(dir_fd)
    assert name == "out"


@pytest.mark.parametrize("target", ["../other", "ABS_INSIDE", "ABS_REAL_INSIDE", "sub"])
def test_links_staying_inside_are_followed(beneath: paths.Beneath, tree: Path,
                                           target: str) -> None:
    (tree / "other" / "f").write_text("other")
    (tree / "build" / "sub" / "f").write_text("sub")
    if target == "ABS_INSIDE":
        target = str(tree / "other")
    elif target == "ABS_REAL_INSIDE":
        target = os.path.realpath(tree / "other")
    os.symlink(target, tree / "build" / "ln")
    expected = "sub" if target == "sub" else "other"
    assert read(beneath, "build/ln/f") == expected
    os.symlink("ln/f", tree / "build" / "ln2")  # a final link, through another link
    assert read(beneath, "build/ln2") == expected


def test_link_loop_is_an_oserror(beneath: paths.Beneath, tree: Path) -> None:
    os.symlink("b", tree / "build" / "a")
    os.symlink("a", tree / "build" / "b")
    with pytest.raises(OSError) as e:
        beneath.open("build/a/x", os.O_RDONLY)
    assert e.value.errno == errno.ELOOP


def test_the_workers_own_files_are_refused(beneath: paths.Beneath, tree: Path) -> None:
    for path in ("buildbot.tac", "info", "info/admin", "twistd.log", "build/../buildbot.tac"):
        with pytest.raises(paths.PathRefused, match="worker's own files"):
            beneath.locate(path)
    os.symlink("../buildbot.tac", tree / "build" / "tac")
    os.symlink(str(tree / "info"), tree / "build" / "info")
    os.link(tree / "buildbot.tac", tree / "build" / "hard")
    for path in ("build/tac", "build/info/admin", "build/info/new", "build/hard"):
        with pytest.raises(paths.PathRefused, match="worker's own files"):
            beneath.locate(path)
    for new in ("shutdown.stamp", "twistd.log.3", "info/x"):
        with pytest.raises(paths.PathRefused):
            beneath.makedirs(new)
    assert not (tree / "shutdown.stamp").exists() and not (tree / "info" / "x").exists()
    # the root itself, and names that only look alike, are fine
    os.close(beneath.open_dir("."))
    os.close(beneath.makedirs("buildbot.tac.d"))


def test_makedirs_creates_beneath_and_returns_the_directory(beneath: paths.Beneath,
                                                           tree: Path) -> None:
    fd = beneath.makedirs("build/a/b/c")
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(tree / "build/a/b/c"))
    finally:
        os.close(fd)
    os.symlink("a", tree / "build" / "toa")
    fd = beneath.makedirs("build/toa/b/d")  # an inside link on the way
    os.close(fd)
    assert (tree / "build/a/b/d").is_dir()


def test_a_directory_swapped_for_a_link_after_the_check(beneath: paths.Beneath,
                                                        tree: Path) -> None:
    """What was resolved stays what is acted on; a new resolution sees the link, refuses."""
    dir_fd = beneath.open_dir("build/sub")
    os.rename(tree / "build" / "sub", tree / "build" / "sub.old")
    os.symlink(str(tree.parent / "outside"), tree / "build" / "sub")
    try:
        fd = os.open("new", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dir_fd)
        os.close(fd)
        os.unlink("file", dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    assert (tree / "build" / "sub.old" / "new").exists()
    assert not (tree / "build" / "sub.old" / "file").exists()
    assert sorted(os.listdir(tree.parent / "outside")) == ["secret"]
    with pytest.raises(paths.PathRefused):
        beneath.open("build/sub/secret", os.O_RDONLY)
    with pytest.raises(paths.PathRefused):
        beneath.makedirs("build/sub/x")


def test_last_component_swapped_for_a_link_between_locate_and_open(
        beneath: paths.Beneath, tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """open() opens the located name with O_NOFOLLOW: a link swapped in is resolved again."""
    real_locate = beneath.locate
    swapped = []

    def locate_then_swap(path: str, **kw: bool) -> tuple[int, str | None]:
        got = real_locate(path, **kw)
        if not swapped:
            swapped.append(path)
            os.unlink(tree / "build" / "sub" / "file")
            os.symlink(str(tree.parent / "outside" / "secret"), tree / "build" / "sub" / "file")
        return got

    monkeypatch.setattr(beneath, "locate", locate_then_swap)
    with pytest.raises(paths.PathRefused):
        beneath.open("build/sub/file", os.O_RDONLY)
    assert swapped


def test_walk_is_used_when_openat2_is_missing(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_openat2(*args: object) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(paths, "openat2", no_openat2)
    with paths.Beneath(str(tree), paths.WORKER_FILES, use_openat2=True) as b:
        assert read(b, "build/sub/file") == "inside"
        assert b.use_openat2 is False
        with pytest.raises(paths.PathRefused):
            b.open("../outside/secret", os.O_RDONLY)


def test_missing_paths_are_plain_oserrors(beneath: paths.Beneath) -> None:
    with pytest.raises(FileNotFoundError):
        beneath.open("build/nothere/x", os.O_RDONLY)
    with pytest.raises(NotADirectoryError):
        beneath.open("build/sub/file/x", os.O_RDONLY)
    dir_fd, name = beneath.locate("build/sub/nothere")
    os.close(dir_fd)
    assert name == "nothere"
