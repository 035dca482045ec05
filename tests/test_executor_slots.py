"""An executor serving many slots at once, as the front end runs it: commands in threads of
one process, each with its own rc, its own CPU figures, and kills that reach its processes
and no other command's.

Driven over a real unix socket and real pipes (:class:`executor_driver.SlottedExecutor`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from executor_driver import Result, SlotDriver, SlottedExecutor
from realmaster import alive, descendants

from pyworker import marks

if sys.platform != "linux":  # pragma: no cover
    pytest.skip("process handling is tested on Linux", allow_module_level=True)

MARK_BASE = "0123456789abcdef0123:4343-77"


@pytest.fixture
def host() -> Iterator[SlottedExecutor]:
    h = SlottedExecutor({**os.environ, marks.BASE_VAR: MARK_BASE})
    yield h
    h.close()


def start_shell(slot: SlotDriver, workdir: Path, command: object) -> None:
    slot.start("shell", {"workdir": str(workdir), "command": command, "logEnviron": False})


def finish(slot: SlotDriver, timeout: float = 60) -> Result:
    return Result(list(slot.frames(timeout)))


def alive_sleeps(root: int, token: int) -> list[int]:
    """Live processes below ``root`` running ``sleep <token>`` (daemonised ones included:
    the executor is their subreaper)."""
    return [p.pid for p in descendants(root) if p.cmdline == f"sleep {token}"
            and p.state != "Z"]


def wait_until(what: str, check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_concurrent_commands_each_get_their_own_rc(host: SlottedExecutor,
                                                   tmp_path: Path) -> None:
    # Each command also leaves an orphan that exits at about the same time: the orphans are
    # collected while the other commands' children exit, and no command's own exit status
    # may be taken by that (a stolen one reads as rc 0).
    slots = [host.slot() for _ in range(16)]
    for n, slot in enumerate(slots, start=1):
        start_shell(slot, tmp_path, f"(sleep 0.1 &) ; sleep 0.2; exit {n}")
    results = [finish(slot) for slot in slots]
    assert [r.rc for r in results] == list(range(1, 17))
    assert all(r.failure is None for r in results)
    wait_until("the orphans were collected",
               lambda: not [p for p in descendants(host.proc.pid) if p.state == "Z"])


def test_a_command_ending_meanwhile_never_takes_another_ones_exit_status(
    host: SlottedExecutor, tmp_path: Path
) -> None:
    # A's shell exits at once, but a child of it keeps its stdout open and writes 4 MB that
    # nobody reads yet: A's thread is blocked on its slot's pipe and has not reaped the shell,
    # a zombie child of the executor. B ends meanwhile and collects the executor's orphans:
    # it must leave A's zombie to A, whose rc is the shell's.
    a, b = host.slot(), host.slot()
    start_shell(a, tmp_path, "yes | head -c 4000000 & exit 7")
    wait_until("A's shell is a zombie", lambda: [
        p for p in descendants(host.proc.pid) if p.ppid == host.proc.pid and p.state == "Z"])
    start_shell(b, tmp_path, "(sleep 0.05 &); exit 3")
    assert finish(b).rc == 3
    ra = finish(a)
    assert ra.rc == 7
    assert len(ra.text("stdout")) == 4_000_000


def test_an_interrupt_kills_its_command_and_no_other(host: SlottedExecutor,
                                                     tmp_path: Path) -> None:
    a, b = host.slot(), host.slot()
    for slot, token in ((a, 3101), (b, 3102)):
        # a daemonised child and a double-forked one beside the shell's own
        start_shell(slot, tmp_path,
                    f"setsid sleep {token} </dev/null >/dev/null 2>&1 & "
                    f"(sleep {token} </dev/null >/dev/null 2>&1 &); exec sleep {token}")
    for token in (3101, 3102):
        wait_until(f"sleep {token} x3 running",
                   lambda t=token: len(alive_sleeps(host.proc.pid, t)) == 3)
    a.interrupt()
    ra = finish(a)
    assert ra.rc == -1 and "process killed by signal 9" in ra.text("header")
    assert alive_sleeps(host.proc.pid, 3101) == [], "the interrupted command's processes live"
    assert len(alive_sleeps(host.proc.pid, 3102)) == 3, "another command's were killed"
    b.interrupt()
    finish(b)
    assert alive_sleeps(host.proc.pid, 3102) == []


def test_a_command_is_charged_its_own_cpu_only(host: SlottedExecutor, tmp_path: Path) -> None:
    busy, idle = host.slot(), host.slot()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
    busy.start("shell", {"workdir": str(tmp_path), "command": [sys.executable, "-c", burn],
                         "logEnviron": False})
    idle.start("shell", {"workdir": str(tmp_path), "command": ["sleep", "1"],
                         "logEnviron": False})
    rb, ri = finish(busy), finish(idle)
    assert rb.rc == 0 and ri.rc == 0
    assert rb.usage["cpu_user"] + rb.usage["cpu_system"] >= 0.5
    assert ri.usage["cpu_user"] + ri.usage["cpu_system"] < 0.25, (
        "the sleeping command was charged another command's CPU")


def test_closing_a_slot_ends_its_command_only(host: SlottedExecutor, tmp_path: Path) -> None:
    a, b = host.slot(), host.slot()
    start_shell(a, tmp_path, "exec sleep 3201")
    start_shell(b, tmp_path, "sleep 0.5; echo done")
    wait_until("sleep 3201 running", lambda: alive_sleeps(host.proc.pid, 3201))
    a.close()
    wait_until("the closed slot's command killed", lambda: not alive_sleeps(host.proc.pid, 3201))
    rb = finish(b)
    assert rb.rc == 0 and rb.text("stdout") == "done\n"
    # the executor still serves new slots
    c = host.slot()
    start_shell(c, tmp_path, "echo again")
    assert finish(c).text("stdout") == "again\n"


def test_the_front_end_going_kills_every_command(host: SlottedExecutor, tmp_path: Path) -> None:
    slots = [host.slot() for _ in range(3)]
    for n, slot in enumerate(slots):
        start_shell(slot, tmp_path, f"setsid sleep {3300 + n} </dev/null >/dev/null 2>&1 & "
                                    f"exec sleep {3300 + n}")
    pid = host.proc.pid
    for n in range(3):
        wait_until("sleeps running", lambda n=n: len(alive_sleeps(pid, 3300 + n)) == 2)
    victims = [p for p in descendants(pid) if p.cmdline.startswith("sleep 33")]
    host.sock.close()
    assert host.proc.wait(30) == 0
    for v in victims:
        wait_until(f"{v.cmdline} ({v.pid}) killed", lambda v=v: not alive(v.pid), timeout=10)
    for slot in slots:  # every slot's pipe is closed: the executor is gone
        os.set_blocking(slot.events_fd, True)
        while os.read(slot.events_fd, 1 << 20):
            pass
