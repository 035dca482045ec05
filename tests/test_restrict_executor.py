"""``restrict_paths`` in a real executor process: commands still do their work inside the
basedir (as they do without the restriction), links out are never followed, and refusals
fail the command with the policy's message. Each test runs with ``openat2`` and with the
fallback walk (``PYWORKER_NO_OPENAT2``)."""

from __future__ import annotations

import marshal
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from executor_driver import ExecutorDriver, Result

from pyworker import frames as wire
from pyworker import paths

REFUSED = "(refused: the worker runs with restrict_paths)"


@pytest.fixture(scope="module", params=["openat2", "walk"])
def ex(request: pytest.FixtureRequest) -> Iterator[ExecutorDriver]:
    env = dict(os.environ)
    env.pop("PYWORKER_NO_OPENAT2", None)
    if request.param == "walk":
        env["PYWORKER_NO_OPENAT2"] = "1"
    elif not paths.openat2_available():
        pytest.skip("this kernel has no openat2")
    driver = ExecutorDriver(env)
    yield driver
    driver.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A basedir with the worker's own files, and ``outside/secret`` next to it."""
    base = tmp_path / "base"
    (base / "b" / "build").mkdir(parents=True)
    (base / "buildbot.tac").write_text("tac")
    (base / "info").mkdir()
    (tmp_path / "outside" / "dir").mkdir(parents=True)
    (tmp_path / "outside" / "secret").write_text("secret")
    return base


def run(ex: ExecutorDriver, root: Path, name: str, args: dict[str, Any]) -> Result:
    request = {"name": name, "args": args, "command_id": "1", "basedir": str(root), "io": {},
               "restrict": {"root": str(root), "protected": list(paths.WORKER_FILES)}}
    ex.send(wire.frame(wire.START, marshal.dumps(request)))
    return Result(list(ex.frames(60)))


def test_file_commands_work_inside(ex: ExecutorDriver, root: Path) -> None:
    b = root / "b"
    d = b / "a" / "b"
    assert run(ex, root, "mkdir", {"paths": [str(d)]}).rc == 0
    assert d.is_dir()
    st = run(ex, root, "stat", {"path": str(d)})
    assert st.rc == 0 and st.values("stat")[0][0] == os.stat(d).st_mode
    missing = run(ex, root, "stat", {"path": str(b / "nope")})
    assert missing.rc == 2
    assert missing.text("header") == f"stat: No such file or directory: {b / 'nope'}\n"
    (d / "f.txt").write_text("x")
    g = run(ex, root, "glob", {"path": str(b / "**" / "*.txt")})
    assert g.values("files") == [[str(d / "f.txt")]] and g.rc == 0
    assert run(ex, root, "listdir", {"path": str(d)}).values("files") == [["f.txt"]]
    assert run(ex, root, "rmfile", {"path": str(d / "f.txt")}).rc == 0
    assert run(ex, root, "rmfile", {"path": str(d / "f.txt")}).rc == 2
    (d / "ro").mkdir()
    (d / "ro" / "x").write_text("x")
    os.symlink("ro/x", d / "ln")
    os.chmod(d / "ro", 0o500)
    cp = run(ex, root, "cpdir", {"from_path": str(b / "a"), "to_path": str(b / "c")})
    assert cp.rc == 0, cp.updates
    assert (b / "c" / "b" / "ro" / "x").read_text() == "x"
    assert os.readlink(b / "c" / "b" / "ln") == "ro/x"  # -P: the link, not its target
    assert stat.S_IMODE(os.stat(b / "c" / "b" / "ro").st_mode) == 0o500  # -p
    assert f"'{b / 'a'}/b/ro/x' -> '{b / 'c'}/b/ro/x'\n" in cp.text("stdout")  # -v
    # into an existing directory: a copy of the source inside it, as cp does
    assert run(ex, root, "cpdir", {"from_path": str(b / "a"), "to_path": str(b / "c")}).rc == 0
    assert (b / "c" / "a" / "b" / "ro" / "x").read_text() == "x"
    r = run(ex, root, "rmdir", {"paths": [str(b / "a"), str(b / "c"), str(b / "none")]})
    assert r.rc == 0, r.updates
    assert not (b / "a").exists() and not (b / "c").exists()


def test_links_out_are_removed_or_copied_never_followed(ex: ExecutorDriver,
                                                        root: Path) -> None:
    b = root / "b"
    outside = root.parent / "outside"
    os.symlink(outside, b / "out")
    r = run(ex, root, "rmdir", {"paths": [str(b / "out")]})
    assert r.rc == 0 and not os.path.lexists(b / "out")
    assert sorted(os.listdir(outside)) == ["dir", "secret"]
    (b / "src").mkdir()
    os.symlink(outside / "secret", b / "src" / "s")
    assert run(ex, root, "cpdir", {"from_path": str(b / "src"), "to_path": str(b / "dst")}
               ).rc == 0
    assert os.readlink(b / "dst" / "s") == str(outside / "secret")
    os.symlink(outside, b / "gl")
    g = run(ex, root, "glob", {"path": str(b / "*")})
    assert sorted(g.values("files")[0]) == [str(b / "build"), str(b / "dst"), str(b / "src")]
    # a pattern whose directory part leads out is refused; "**" through a link out drops it
    g = run(ex, root, "glob", {"path": str(b / "gl" / "*")})
    assert g.failure is not None and REFUSED in g.failure
    assert str(b / "gl") not in run(ex, root, "glob", {"path": str(b / "**")}).values(
        "files")[0]
    os.symlink("src", b / "inlink")  # a link that stays inside is listed
    assert str(b / "inlink") in run(ex, root, "glob", {"path": str(b / "*")}).values(
        "files")[0]


def test_copy_into_itself_or_onto_itself_fails(ex: ExecutorDriver, root: Path) -> None:
    b = root / "b"
    (b / "t" / "x").mkdir(parents=True)
    (b / "t" / "f").write_text("keep")
    r = run(ex, root, "cpdir", {"from_path": str(b / "t"), "to_path": str(b / "t" / "x")})
    assert r.rc == 1 and "into itself" in r.text("stderr"), r.updates
    r = run(ex, root, "cpdir", {"from_path": str(b / "t"), "to_path": str(b)})
    assert r.rc == 1 and "the same file" in r.text("stderr"), r.updates
    assert (b / "t" / "f").read_text() == "keep"


@pytest.mark.parametrize("args", [
    ("mkdir", {"paths": ["OUT/new"]}),
    ("rmdir", {"paths": ["OUT/dir"]}),
    ("rmfile", {"path": "BASE/b/../../outside/secret"}),
    ("listdir", {"path": "BASE/.."}),
    ("stat", {"path": "OUT/secret"}),
    ("cpdir", {"from_path": "OUT", "to_path": "BASE/b/c"}),
    ("cpdir", {"from_path": "BASE/b/build", "to_path": "BASE/twistd.log.1"}),
    ("cpdir", {"from_path": "BASE", "to_path": "BASE/b/all"}),
    ("shell", {"workdir": "OUT", "command": ["touch", "x"]}),
    ("shell", {"workdir": "BASE/b", "command": ["true"], "logfiles": {"l": "../buildbot.tac"}}),
    ("glob", {"path": "OUT/*"}),
])
def test_refusals_fail_the_command_and_touch_nothing(
        ex: ExecutorDriver, root: Path, args: tuple[str, dict[str, Any]]) -> None:
    outside = root.parent / "outside"

    def fill(v: Any) -> Any:
        if isinstance(v, list):
            return [fill(x) for x in v]
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        if isinstance(v, str):
            return v.replace("OUT", str(outside)).replace("BASE", str(root))
        return v

    name, raw = args
    r = run(ex, root, name, fill(raw))
    assert r.failure is not None and REFUSED in r.failure, r.updates
    assert sorted(os.listdir(outside)) == ["dir", "secret"]
    assert os.listdir(outside / "dir") == []
    assert (outside / "secret").read_text() == "secret"
    assert sorted(os.listdir(root)) == ["b", "buildbot.tac", "info"]
    assert os.listdir(root / "b") == ["build"]
    # the executor goes on
    assert run(ex, root, "stat", {"path": str(root / "b")}).rc == 0


def test_shell_runs_in_the_opened_workdir(ex: ExecutorDriver, root: Path) -> None:
    w = root / "b" / "w" / "x"
    os.symlink("w", root / "b" / "lw")  # a link inside, on the way
    r = run(ex, root, "shell", {"workdir": str(root / "b" / "lw" / "x"), "logEnviron": False,
                                "command": 'pwd -P; echo "$PWD"; echo hi > l.txt',
                                "logfiles": {"l": "l.txt"}})
    assert r.rc == 0, r.updates
    assert r.text("stdout") == f"{os.path.realpath(w)}\n{root / 'b' / 'lw' / 'x'}\n"
    assert f" in dir {root / 'b' / 'lw' / 'x'}" in r.text("header")
    assert ("log", ("l", "hi\n")) in r.updates


def test_logfile_swapped_for_a_link_out_while_running(ex: ExecutorDriver, root: Path) -> None:
    outside = root.parent / "outside"
    w = root / "b" / "build"
    r = run(ex, root, "shell", {
        "workdir": str(w), "logEnviron": False,
        "command": f"mkdir lg && rm -rf lg && ln -s {outside} lg",
        "logfiles": {"leak": "lg/secret"}})
    assert r.failure is not None and "logfile 'leak' not read" in r.failure
    assert REFUSED in r.failure
    assert not any(k == "log" for k in r.keys())
