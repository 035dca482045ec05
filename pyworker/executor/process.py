"""What an executor does to processes: its own options, and killing and reaping the
processes of its commands (the executor is their child subreaper).

An executor may run many commands at once, one per thread (:mod:`pyworker.executor.main`), so
nothing here may act on *every* child: a command's processes are found by its process group,
its own descendants and its mark (:mod:`pyworker.marks`). Reaping is split the same way: the
thread that started a command's process reaps it (``wait4``), and :func:`reap_unowned`
collects only the children nobody waits for (orphans re-parented to us), under the lock that
:func:`spawning` holds from fork to registration.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pyworker import marks
from pyworker.config import DRAIN_SIGNAL
from pyworker.executor.channel import FrontEndGone
from pyworker.linux import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, prctl

#: ``<basedir id>:<instance id>`` from the front end (:data:`marks.BASE_VAR`); None when
#: this executor was started without one (a test driving it directly).
_mark_base: str | None = None
_command_numbers = itertools.count(1)

#: Held from a command's fork until its pid is in :data:`_owned`, and while unowned children
#: are reaped: an orphan reaper must never collect a command's own child (its thread's wait
#: would find nothing, and report rc 0).
_children_lock = threading.Lock()
_owned: set[int] = set()
#: One command at a time in this process (driven over stdin/stdout): a kill may take every
#: descendant, as no other command's can be among them.
single_command = True


def set_process_options() -> None:
    """Die with the front end, and adopt the command's orphaned descendants.

    As a child subreaper, processes that a command daemonised come back to us instead of to
    init, so a kill can find and end every one of them.
    """
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def reset_signal_dispositions() -> None:
    """Give the commands the signal dispositions the reference worker gives its commands: none
    ignored. Called once at start-up, before anything of ours is installed.

    The reference starts commands with Twisted's ``spawnProcess``, which resets every ignored
    signal to its default (``posix_spawn`` with ``setsigdef``): a worker started with SIGHUP
    ignored (``nohup``) or SIGINT ignored (``cmd &`` in a script) still gives its commands
    the default. Our commands are started by this executor with ``subprocess``, which only
    restores SIGPIPE and SIGXFSZ (Python's own), and ignored stays ignored across fork and
    exec; we are started by the front end through Twisted's *fork* path, which resets the
    signals Python knows but leaves glibc's reserved ones (32 and 33) ignored. So: read the
    kernel's set (``SigIgn``), and set each back to default here, once, instead of a
    ``preexec_fn`` in every spawn (which would cost ``subprocess`` its vfork fast path). The
    signal mask needs nothing: nothing of pyworker blocks a signal.
    """
    for signum in _ignored_signals():
        if signum in (signal.SIGPIPE, signal.SIGXFSZ):
            continue  # Python's own; subprocess restores them in the child
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):  # reserved by the C library: only the system call can
            _set_default_disposition(signum)


def _ignored_signals() -> list[int]:
    try:
        with open("/proc/self/status") as status:
            mask = next(int(line.split()[1], 16) for line in status
                        if line.startswith("SigIgn:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return []
    return [bit + 1 for bit in range(64) if mask >> bit & 1]


#: ``rt_sigaction`` by machine (the generic number is 134)
_SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134, "riscv64": 134}


def _set_default_disposition(signum: int) -> None:
    """``rt_sigaction(signum, SIG_DFL)`` directly, as CPython's ``_posixsubprocess`` does for
    the signals the C library will not let ``sigaction`` touch. All zeros is SIG_DFL, no
    flags, an empty mask, whatever the kernel's layout of ``struct sigaction``."""
    import ctypes
    import platform

    number = _SYS_RT_SIGACTION.get(platform.machine())
    if number is None:
        return
    action = (ctypes.c_ulong * 4)()
    ctypes.CDLL(None, use_errno=True).syscall(number, signum, ctypes.byref(action), None, 8)


def shield_from_group_signals() -> None:
    """Let a ^C in the worker's terminal, or a drain signal sent to the worker's whole
    process group, pass this executor by, without changing what the commands we start
    inherit.

    The executors share the front end's process group, so the terminal's SIGINT under
    ``pyworker start --nodaemon`` reaches them too, and so does :data:`DRAIN_SIGNAL` when an
    init (``tini -g``) or an operator (``kill -USR2 -- -PGID``) signals the group. The front
    end handles both (SIGINT: it stops at once, and stopping kills the executors, which kill
    their commands; the drain: the running commands must finish), so an executor must not
    die of either first. Commands run in their own process group or session and never get
    a group's signal.

    The obvious ``SIG_IGN`` is wrong: an ignored signal stays ignored across fork and exec, so
    every command would start with SIGINT ignored (``trap ... INT`` and ``KeyboardInterrupt``
    dead, ``interruptSignal='INT'`` unable to stop a step). A caught signal is reset to its
    default by exec, so a do-nothing handler keeps the executor alive and leaves the commands
    the default, with no ``preexec_fn`` in the spawn path. Leaving the terminal's foreground
    process group instead would also work, but would take the executors out of the group an
    operator (or a harness) kills as a whole. ``SA_RESTART``: system calls the signal lands
    in are resumed, not failed with EINTR.
    """
    for signum in (signal.SIGINT, DRAIN_SIGNAL):
        signal.signal(signum, _front_end_handles_it)
        signal.siginterrupt(signum, False)


def _front_end_handles_it(signum: int, frame: object) -> None:
    """The front end acts on this signal (and stops us if it stops); nothing to do here."""


def take_mark_base() -> None:
    """Keep the front end's mark base and take it out of the commands' environment."""
    global _mark_base
    _mark_base = os.environ.pop(marks.BASE_VAR, None) or None


def ensure_mark_base() -> None:
    """Commands that share a process must each be marked, or one command's kill cannot find
    its orphans without taking the others': a base of our own if the front end gave none."""
    global _mark_base
    if _mark_base is None:
        _mark_base = f"{'0' * 20}:{marks.instance_id()}"


def next_command_mark() -> str | None:
    """A new command's mark (:mod:`pyworker.marks`); the command id is ``<our pid>.<n>``."""
    if _mark_base is None:
        return None
    return f"{_mark_base}:{os.getpid()}.{next(_command_numbers)}"


def own_mark_prefix() -> str | None:
    """What the marks of every command of this executor start with."""
    return None if _mark_base is None else f"{_mark_base}:{os.getpid()}."


def sweep_marked(mark: str | None) -> None:
    """Kill every process still carrying ``mark``: those that left the command's process
    group and our subtree (the subreaper never sees them) are found by their environment."""
    if mark is not None:
        marks.sweep_command(mark)


def on_sigterm(signum: int, frame: object) -> None:
    raise FrontEndGone.now()


def kill_all_commands() -> None:
    """The executor is going away: SIGKILL every process below it and every process with
    one of its commands' marks, and collect them."""
    prefix = own_mark_prefix()
    if prefix is not None:
        marks.kill(list(marks.find(prefix)))
    kill_descendants()


def kill_descendants(timeout: float = 2.0) -> None:
    """SIGKILL every process below this executor, and collect them (as a subreaper, every
    one of them ends up our child)."""
    import psutil  # imported late: most executors never need it

    try:
        victims = psutil.Process().children(recursive=True)
    except psutil.Error:
        victims = []
    for victim in victims:
        try:
            victim.kill()
        except psutil.Error:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no child left
        if pid == 0:
            time.sleep(0.005)


def kill_command(group: int, mark: str | None) -> None:
    """SIGKILL one command's processes: its process group (``group``, its first process's
    pid), and anything anywhere carrying its mark (orphans re-parented to us included); then
    collect the orphans. Another command's processes are never touched. With one command in
    this process, every descendant is the command's and is killed too (a process that left
    the group and cleared its environment is still below us)."""
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
    if single_command:
        kill_descendants()
    sweep_marked(mark)
    reap_unowned()


@contextmanager
def spawning() -> Iterator[set[int]]:
    """Around a fork: the caller adds the new child's pid to the set it is given before the
    block ends, so that :func:`reap_unowned` leaves the child to its owner."""
    with _children_lock:
        yield _owned


def disown(pid: int) -> None:
    """The owner has reaped ``pid`` (or given up on it)."""
    with _children_lock:
        _owned.discard(pid)


def reap_unowned() -> None:
    """Collect every exited child that no command waits for (orphans re-parented to us)."""
    with _children_lock:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            if info.si_pid in _owned:
                # the first zombie the kernel shows is a command's, reaped by its thread soon;
                # the orphans behind it are collected at the next call
                return
            try:
                os.waitpid(info.si_pid, os.WNOHANG)
            except ChildProcessError:
                pass


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(pid: int) -> int:
    """RSS in bytes of ``pid`` and its descendants, found through each thread's
    ``/proc/<pid>/task/<tid>/children``: only the command's own processes are read, where a
    scan of ``/proc`` reads every process of the machine (and, 64 commands at once, keeps
    their transient objects alive in as many threads)."""
    total = 0
    todo = [pid]
    seen = set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * _PAGE_SIZE
            tasks = os.listdir(f"/proc/{current}/task")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children", "rb") as children:
                    todo.extend(int(c) for c in children.read().split())
            except (OSError, ValueError):
                pass
    return total


_umask: int | None = None


def process_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets while it reads,
    and a command in another thread would create its files in between)."""
    global _umask
    if _umask is None:
        try:
            with open("/proc/self/status") as status:
                _umask = next(int(line.split()[1], 8) for line in status
                              if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            with _children_lock:  # before any thread runs (main() calls us first)
                _umask = os.umask(0)
                os.umask(_umask)
    return _umask
