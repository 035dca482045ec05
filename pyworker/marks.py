"""The mark every command's processes carry, and the sweeps that find them by it.

Each command runs with ``PYWORKER_COMMAND_MARK=<basedir id>:<instance id>:<command id>`` in
its environment, and every process it starts inherits it, whatever it does to its process
group, session or parent. ``/proc/<pid>/environ`` keeps it for the life of the process, so a
process is found by its mark even when the worker that started it is gone (the way the
process sweeps of Jenkins and the GitHub Actions runner work). The basedir id is a hash of
the basedir's real path (two basedirs never match, and no path shows); the instance id is
the front end's pid and start time (``<pid>-<starttime>``), so whether that front end is
still alive can be checked.

Shared by both sides: it imports nothing of pyworker.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

#: The variable in every command's environment.
MARK_VAR = "PYWORKER_COMMAND_MARK"
#: Given by the front end to its executors only (never to commands): the first two parts of
#: the mark, ``<basedir id>:<instance id>``.
BASE_VAR = "PYWORKER_MARK_BASE"

_NEEDLE = b"\0" + MARK_VAR.encode() + b"="


def basedir_id(basedir: str) -> str:
    """The basedir part of the mark: a hash of the basedir's real path."""
    import hashlib  # the executors never need it

    real = os.path.realpath(basedir).encode("utf-8", "surrogateescape")
    return hashlib.sha256(real).hexdigest()[:20]


def _start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks since boot)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    try:
        return fields[19].decode() if fields[0] != b"Z" else None
    except IndexError:
        return None


def instance_id(pid: int | None = None) -> str:
    """This front end's instance part of the mark: ``<pid>-<start time>``."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{_start_time(pid) or 0}"


def instance_alive(instance: str) -> bool:
    """Whether the front end that ``instance`` names is still running."""
    pid, _, started = instance.partition("-")
    try:
        return _start_time(int(pid)) == started
    except ValueError:
        return False


@dataclass
class Marked:
    """A process found carrying a mark, held by a pidfd (the pid cannot be reused under it)."""

    pid: int
    mark: str
    pidfd: int

    def describe(self) -> str:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").strip()
        except OSError:
            cmdline = b"?"
        text = cmdline.decode("utf-8", "replace")
        return text if len(text) <= 80 else text[:77] + "..."


def _mark_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            block = b"\0" + f.read()
    except OSError:  # gone, or another user's
        return None
    at = block.find(_NEEDLE)
    if at < 0:
        return None
    start = at + len(_NEEDLE)
    end = block.find(b"\0", start)
    return block[start:end if end >= 0 else len(block)].decode("ascii", "replace")


def find(prefix: str) -> Iterator[Marked]:
    """Every process but this one whose mark starts with ``prefix`` (``/proc`` read once).

    The caller owns each :attr:`Marked.pidfd` (:func:`kill` closes them).
    """
    own = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for name in entries:
        if not name.isdigit() or int(name) == own:
            continue
        pid = int(name)
        mark = _mark_of(pid)
        if mark is None or not mark.startswith(prefix):
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        again = _mark_of(pid)  # the pidfd holds the process we read, not a later one
        if again != mark:
            os.close(pidfd)
            continue
        yield Marked(pid, mark, pidfd)


def kill(victims: list[Marked], timeout: float = 5.0) -> list[Marked]:
    """SIGKILL every victim and wait until each has exited; return those still running."""
    for victim in victims:
        try:
            signal.pidfd_send_signal(victim.pidfd, signal.SIGKILL)
        except OSError:
            pass
    poller = select.poll()
    waiting = {v.pidfd: v for v in victims}
    for fd in waiting:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while waiting:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            break
        for fd, _ in poller.poll(left_ms):
            poller.unregister(fd)
            os.close(fd)
            del waiting[fd]
    for fd in waiting:
        os.close(fd)
    return list(waiting.values())


def sweep_command(mark: str) -> list[Marked]:
    """Kill every process carrying exactly ``mark``; return them (killed and waited for)."""
    found = [m for m in find(mark) if m.mark == mark]
    if found:
        kill(found)
    return found


def sweep_gone_instances(basedir: str, own_instance: str) -> list[tuple[Marked, str]]:
    """Kill every process marked with ``basedir`` by a front end that is gone.

    Returns each victim with its description (taken before the kill).
    """
    prefix = basedir_id(basedir) + ":"
    victims: list[tuple[Marked, str]] = []
    alive: dict[str, bool] = {}
    for marked in find(prefix):
        instance = marked.mark[len(prefix):].split(":", 1)[0]
        if instance == own_instance or alive.setdefault(instance, instance_alive(instance)):
            os.close(marked.pidfd)
            continue
        victims.append((marked, marked.describe()))
    if victims:
        kill([m for m, _ in victims])
    return victims
