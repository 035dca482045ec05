"""What an executor does to processes: its own options, and killing and reaping the
descendants of its command (the executor is their child subreaper)."""

from __future__ import annotations

import os
import signal
import time

from pyworker import marks
from pyworker.config import DRAIN_SIGNAL
from pyworker.executor.channel import FrontEndGone
from pyworker.linux import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, prctl

#: ``<basedir id>:<instance id>`` from the front end (:data:`marks.BASE_VAR`); None when
#: this executor was started without one (a test driving it directly).
_mark_base: str | None = None
_commands_marked = 0


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


def next_command_mark() -> str | None:
    """A new command's mark (:mod:`pyworker.marks`); the command id is ``<our pid>.<n>``."""
    global _commands_marked
    if _mark_base is None:
        return None
    _commands_marked += 1
    return f"{_mark_base}:{os.getpid()}.{_commands_marked}"


def sweep_marked(mark: str | None) -> None:
    """Kill every process still carrying ``mark``: those that left the command's process
    group and our subtree (the subreaper never sees them) are found by their environment."""
    if mark is not None:
        marks.sweep_command(mark)


def on_sigterm(signum: int, frame: object) -> None:
    raise FrontEndGone.now()


def kill_descendants(timeout: float = 2.0) -> None:
    """SIGKILL every process below this executor (they can only belong to its command), and
    collect them: as a subreaper, every one of them ends up our child."""
    import psutil  # imported late: most executors never need it

    try:
        victims = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
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


def reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
