"""An executor process: runs one command at a time for the front end.

The front end starts executors ahead of demand (``python -m pyworker.executor``) and talks to
each over its stdin (control frames in) and stdout (event frames out), in the format of
:mod:`pyworker.wire`. An executor is plain blocking Python with no Twisted reactor: it reads a
``START`` frame, runs the command to its end, writes ``COMPLETE`` and waits for the next one.
While a command runs, control frames (``INTERRUPT``, answers to its calls) are read by the
command's own poll loop through :class:`Channel`.

If the front end goes away (its end of our stdin closes, or it dies: we ask the kernel for
SIGTERM when the parent dies), the running command's process group is killed and we exit.
"""

from __future__ import annotations

import ctypes
import errno
import marshal
import os
import resource
import signal
import sys
import time
import traceback
from collections import deque
from typing import Any

from pyworker import wire
from pyworker.lines import LineSplitter


class FrontEndGone(Exception):
    """Our stdin reached EOF or the parent-death SIGTERM came: the front end is gone."""

    @classmethod
    def now(cls) -> FrontEndGone:
        # The other signal of the same event (EOF and SIGTERM both come) must not abort the
        # clean-up that this one starts.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return cls()


class CommandError(Exception):
    """A command failed in a way the master must see as a failed step (``complete(failure)``)."""


class Channel:
    """The executor's end of the pipe pair, plus the per-command output state.

    Output text goes through one :class:`LineSplitter` per stream so that the front end only
    ever receives whole lines; :meth:`finish` flushes the unfinished tails in the reference's
    order (sorted stream names) before ``COMPLETE``.
    """

    READ_SIZE = 256 * 1024

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self._decoder = wire.FrameDecoder()
        self._inbox: deque[tuple[int, int, bytes]] = deque()
        self._splitters: dict[str, LineSplitter] = {}
        #: Process output streams: decoded, split and framed by the I/O core, written
        #: straight to our event pipe.
        self._pumps: dict[str, Any] = {}
        self.interrupt_reason: str | None = None
        #: Set by :meth:`interrupted_hook` owners: called when an ``INTERRUPT`` arrives.
        self.on_interrupt: Any = None
        #: After an interrupt, status updates are suppressed except the shell runner's.
        self.running = True
        #: Largest RSS (bytes) seen of the current command's process tree, if measured.
        self.peak_rss = 0

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.wfd, view)
            except InterruptedError:
                continue
            view = view[n:]

    def update(self, pairs: list[tuple[str, Any]], force: bool = False) -> None:
        """Send non-text updates (``rc``, ``elapsed``, ``stat``, ...)."""
        if self.running or force:
            self.write(wire.value_frame(wire.UPDATE, pairs))

    def text(self, key: str, text: str, force: bool = False) -> None:
        """Send stream text (``header``, ``stdout``, ``stderr``) through its line splitter."""
        if not (self.running or force) or not text:
            return
        splitter = self._splitters.get(key)
        if splitter is None:
            splitter = self._splitters[key] = LineSplitter()
        lines = splitter.append(text)
        if lines:
            self.write(wire.frame(wire.TEXT, lines.encode("utf-8"), wire.CHANNEL_OF[key]))

    def pump(self, key: str, count_lines: bool = False) -> Any:
        """The :class:`pyworker.iocore.StreamPump` of stream ``key`` for this command."""
        pump = self._pumps.get(key)
        if pump is None:
            from pyworker import iocore

            pump = self._pumps[key] = iocore.StreamPump(
                self.wfd, wire.CHANNEL_OF[key], count_lines=count_lines
            )
        return pump

    def log(self, name: str, text: str, force: bool = False) -> None:
        """Send text of a watched logfile through the splitter for that log name."""
        if not (self.running or force) or not text:
            return
        splitter = self._splitters.get("log:" + name)
        if splitter is None:
            splitter = self._splitters["log:" + name] = LineSplitter()
        lines = splitter.append(text)
        if lines:
            self.write(wire.value_frame(wire.LOG, (name, lines)))

    def finish(self, failure: str | None) -> None:
        """Flush the unfinished lines of every stream (sorted by name, as the reference) and
        send ``COMPLETE``."""
        keys = set(self._splitters) | set(self._pumps)
        for key in sorted(keys, key=lambda k: k.removeprefix("log:")):
            splitter = self._splitters.get(key)
            tail = splitter.flush() if splitter is not None else ""
            if tail:  # flushed after an interrupt too, as the reference's completion does
                if key.startswith("log:"):
                    self.write(wire.value_frame(wire.LOG, (key[4:], tail)))
                else:
                    self.write(wire.frame(wire.TEXT, tail.encode("utf-8"), wire.CHANNEL_OF[key]))
            pump = self._pumps.get(key)
            if pump is not None:
                pump.flush()
                pump.close()
        self._splitters.clear()
        self._pumps.clear()
        self.write(wire.value_frame(wire.COMPLETE, failure))

    # -- reading -------------------------------------------------------------------------

    def fill(self) -> None:
        """Read what is available on the control pipe (one read) and queue its frames."""
        try:
            data = os.read(self.rfd, self.READ_SIZE)
        except InterruptedError:
            return
        if not data:
            raise FrontEndGone.now()
        for item in self._decoder.feed(data):
            if item[0] == wire.INTERRUPT:
                self._interrupt(marshal.loads(item[2]))
            else:
                self._inbox.append(item)

    def _interrupt(self, reason: str) -> None:
        if self.interrupt_reason is None:
            self.interrupt_reason = reason or "interrupted"
            self.running = False
            if self.on_interrupt is not None:
                self.on_interrupt()

    def next_frame(self) -> tuple[int, int, bytes]:
        """Block until a control frame other than ``INTERRUPT`` arrives and return it."""
        while not self._inbox:
            self.fill()
        return self._inbox.popleft()

    def has_frame(self) -> bool:
        return bool(self._inbox)

    def call(self, target: str, method: str, *args: Any) -> Any:
        """Call ``method`` on the master's ``target`` reference; wait for and return its result.

        Raises :class:`CommandError` with the master's message if the call failed.
        """
        self.write(wire.value_frame(wire.CALL, (target, method, args)))
        while True:
            kind, _, payload = self.next_frame()
            if kind == wire.RESULT:
                ok, value = wire.load(payload)
                if not ok:
                    raise CommandError(value)
                return value
            raise wire.WireError(f"unexpected frame kind {kind} while waiting for a result")

    def reset(self) -> None:
        self._inbox.clear()
        self._splitters.clear()
        for pump in self._pumps.values():
            pump.close()
        self._pumps.clear()
        self.interrupt_reason = None
        self.on_interrupt = None
        self.running = True


def prctl(option: int, value: int) -> bool:
    """Linux ``prctl(option, value)``; False where it is not available."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _set_process_options() -> None:
    """Die with the front end, and adopt the command's orphaned descendants.

    As a child subreaper, processes that a command daemonised come back to us instead of to
    init, so a kill can find and end every one of them.
    """
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def _on_sigterm(signum: int, frame: object) -> None:
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


def run_one(channel: Channel, request: dict[str, Any]) -> None:
    """Run the command described by a ``START`` request and report its completion."""
    from pyworker.commands import registry

    name = request["name"]
    started = time.time()
    usage_before = _cpu_times()
    channel.peak_rss = 0
    failure: str | None = None
    command = None
    try:
        command_class = registry.COMMANDS.get(name)
        if command_class is None:
            raise CommandError(f"unrecognized WorkerCommand '{name}'")
        command = command_class(channel, request)
        command.run()
    except FrontEndGone:
        raise
    except CommandError as e:
        failure = str(e)
    except Exception as e:  # a bug or bad input: the master gets a failed step, we go on
        failure = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    user, system = (after - before for after, before in zip(_cpu_times(), usage_before,
                                                             strict=True))
    usage = {"name": name, "cpu_user": user, "cpu_system": system,
             "peak_rss": channel.peak_rss}
    if command is not None and command.usage_note:
        usage["note"] = command.usage_note
    if request.get("io", {}).get("report_resources"):
        channel.text("header", describe_usage(usage) + "\n", force=True)
    channel.update([("elapsed", time.time() - started)])
    channel.write(wire.value_frame(wire.USAGE, usage))
    channel.finish(failure)


def _cpu_times() -> tuple[float, float]:
    """User and system CPU seconds of this executor plus every child it has waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + kids.ru_utime, own.ru_stime + kids.ru_stime


def describe_usage(usage: dict[str, Any]) -> str:
    """One line for a command's resource use (the worker log, ``report_resources``)."""
    cpu = usage["cpu_user"] + usage["cpu_system"]
    text = (f" resources: {cpu:.2f} CPU seconds (user {usage['cpu_user']:.2f}, "
            f"system {usage['cpu_system']:.2f})")
    if usage.get("peak_rss"):
        text += f", peak RSS {usage['peak_rss'] / 2**20:.1f} MiB"
    if usage.get("note"):
        text += f"; {usage['note']}"
    return text


def main() -> int:
    _set_process_options()
    # Load the I/O core now (PYWORKER_IO=c fails here, loudly), then hide the choice from
    # the commands' environment.
    import pyworker.iocore  # noqa: F401

    os.environ.pop("PYWORKER_IO", None)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C in the worker's terminal is not ours
    if os.getppid() == 1:
        return 1
    # Our stdout is the event pipe: nothing else may write to it.
    wfd = os.dup(1)
    rfd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # stray prints go to the front end's log
    os.close(devnull)
    os.set_inheritable(rfd, False)
    os.set_inheritable(wfd, False)
    channel = Channel(rfd, wfd)
    try:
        while True:
            kind, _, payload = channel.next_frame()
            if kind != wire.START:
                continue  # a late answer for an interrupted command: nothing waits for it
            request = wire.load(payload)
            channel.reset()
            run_one(channel, request)
    except FrontEndGone:
        kill_descendants()
        return 0
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
        FrontEndGone.now()
        kill_descendants()
        return 0


if __name__ == "__main__":
    sys.exit(main())
