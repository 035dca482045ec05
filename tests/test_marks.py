"""pyworker.marks: which real processes a sweep kills, and which it leaves alone."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from realmaster import alive

from pyworker import marks


class Marked:
    """``sleep``s started with a given mark, outside this process's tree (their parent
    shell exits at once), killed at the end whatever the test did."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def start(self, mark: str) -> int:
        token = random.SystemRandom().randint(800_000, 899_999)
        out = subprocess.run(["sh", "-c", f"sleep {token} >/dev/null 2>&1 & echo $!"],
                             env={**os.environ, marks.MARK_VAR: mark}, check=True,
                             capture_output=True, text=True).stdout
        self.pids.append(int(out))
        return int(out)

    def close(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def marked() -> Iterator[Marked]:
    m = Marked()
    yield m
    m.close()


def test_basedir_id_is_of_the_real_path_and_shows_no_path(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    a = marks.basedir_id(str(tmp_path / "a"))
    assert a == marks.basedir_id(str(tmp_path / "link")) == marks.basedir_id(
        str(tmp_path / "b" / ".." / "a"))
    assert a != marks.basedir_id(str(tmp_path / "b"))
    assert ":" not in a and "/" not in a and tmp_path.name not in a


def test_instance_alive_checks_pid_and_start_time() -> None:
    own = marks.instance_id()
    assert marks.instance_alive(own)
    pid, _, started = own.partition("-")
    assert not marks.instance_alive(f"{pid}-{int(started) + 1}")  # a reused pid
    child = subprocess.Popen(["true"])
    child_instance = marks.instance_id(child.pid)
    child.wait()
    assert not marks.instance_alive(child_instance)
    assert not marks.instance_alive("garbage")


def test_the_start_up_sweep_kills_only_its_basedir_of_gone_instances(
    marked: Marked, tmp_path: Path
) -> None:
    here, elsewhere = str(tmp_path / "here"), str(tmp_path / "elsewhere")
    child = subprocess.Popen(["true"])
    gone = marks.instance_id(child.pid)
    child.wait()
    live = marks.instance_id()  # this test process plays a live front end
    ours = "999-1"
    dead = [marked.start(f"{marks.basedir_id(here)}:{gone}:1.1"),
            marked.start(f"{marks.basedir_id(here)}:{gone}:1.2")]
    kept = [marked.start(f"{marks.basedir_id(elsewhere)}:{gone}:1.1"),
            marked.start(f"{marks.basedir_id(here)}:{live}:1.1"),
            marked.start(f"{marks.basedir_id(here)}:{ours}:1.1")]
    killed = marks.sweep_gone_instances(here, ours)
    assert sorted(v.pid for v, _ in killed) == sorted(dead)
    assert all(what.startswith("sleep 8") for _, what in killed)
    assert not any(alive(pid) for pid in dead)  # killed and waited for
    assert all(alive(pid) for pid in kept)


def test_the_command_sweep_matches_its_mark_exactly(marked: Marked) -> None:
    mark = "0123:1-1:7.1"
    victim = marked.start(mark)
    kept = [marked.start(mark + "0"), marked.start("0123:1-1:7.2")]
    assert [m.pid for m in marks.sweep_command(mark)] == [victim]
    assert not alive(victim)
    assert all(alive(pid) for pid in kept)
    assert marks.sweep_command(mark) == []
