"""The executor's end of its pipe pair, and the errors a command can end with.

:class:`Channel` carries a command's output to the front end in the frames of
:mod:`pyworker.frames` (text through line splitters or the I/O core's pumps) and reads the
front end's control frames (``INTERRUPT``, answers to the command's calls).
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import threading
from collections import deque
from typing import Any

from pyworker import frames
from pyworker.iocore.api import StreamPumpAPI
from pyworker.iocore.lines import LineSplitter


class FrontEndGone(Exception):
    """Our stdin reached EOF or the parent-death SIGTERM came: the front end is gone."""

    @classmethod
    def now(cls) -> FrontEndGone:
        # The other signal of the same event (EOF and SIGTERM both come) must not abort the
        # clean-up that this one starts. Only the main thread can (and needs to): SIGTERM is
        # handled there; a command's thread that sees its pipe close ends that command only.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return cls()


class CommandError(Exception):
    """A command failed in a way the master must see as a failed step (``complete(failure)``)."""


class Interrupted(CommandError):
    """An interrupt ended a wait for the master's answer: the answer is abandoned."""


class Channel:
    """The executor's end of the pipe pair, plus the per-command output state.

    Output text goes through one :class:`LineSplitter` per stream so that the front end only
    ever receives whole lines; :meth:`finish` flushes the unfinished tails in the reference's
    order (sorted stream names) before ``COMPLETE``.
    """

    READ_SIZE = 1024 * 1024

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self._decoder = frames.FrameDecoder()
        self._inbox: deque[tuple[int, int, bytes]] = deque()
        self._splitters: dict[str, LineSplitter] = {}
        #: Process output streams: decoded, split and framed by the I/O core, written
        #: straight to our event pipe.
        self._pumps: dict[str, StreamPumpAPI] = {}
        self.interrupt_reason: str | None = None
        #: An answer was abandoned after an interrupt: later answers cannot be matched to
        #: their requests, so no wait of this command takes one any more.
        self.abandoned = False
        #: Set by :meth:`interrupted_hook` owners: called when an ``INTERRUPT`` arrives.
        self.on_interrupt: Any = None
        #: After an interrupt, status updates are suppressed except the shell runner's.
        self.running = True
        #: Largest RSS (bytes) seen of the current command's process tree, if measured.
        self.peak_rss = 0
        #: User and system CPU seconds of the command's processes that were waited for.
        self.children_cpu = (0.0, 0.0)
        self._poll: select.poll | None = None

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.wfd, view)
            except InterruptedError:
                continue
            view = view[n:]

    def write_frame(self, kind: int, payload: bytes | memoryview) -> None:
        """One frame, its header and payload written together (no concatenated copy)."""
        head = frames.header(kind, len(payload))
        try:
            n = os.writev(self.wfd, (head, payload))
        except InterruptedError:
            n = 0
        if n < len(head):
            self.write(head[n:])
            n = len(head)
        if n - len(head) < len(payload):
            self.write(memoryview(payload)[n - len(head) :])

    def update(self, pairs: list[tuple[str, Any]], force: bool = False) -> None:
        """Send non-text updates (``rc``, ``elapsed``, ``stat``, ...)."""
        if self.running or force:
            self.write(frames.value_frame(frames.UPDATE, pairs))

    def text(self, key: str, text: str, force: bool = False) -> None:
        """Send stream text (``header``, ``stdout``, ``stderr``) through its line splitter."""
        if not (self.running or force) or not text:
            return
        splitter = self._splitters.get(key)
        if splitter is None:
            splitter = self._splitters[key] = LineSplitter()
        self._send_lines(key, splitter.append(text))

    def pump(self, key: str, count_lines: bool = False) -> StreamPumpAPI:
        """The :class:`pyworker.iocore.StreamPump` of stream ``key`` for this command."""
        pump = self._pumps.get(key)
        if pump is None:
            from pyworker import iocore

            pump = self._pumps[key] = iocore.StreamPump(
                self.wfd, frames.CHANNEL_OF[key], count_lines=count_lines
            )
        return pump

    def log(self, name: str, text: str, force: bool = False) -> None:
        """Send text of a watched logfile through the splitter for that log name."""
        if not (self.running or force) or not text:
            return
        key = "log:" + name
        splitter = self._splitters.get(key)
        if splitter is None:
            splitter = self._splitters[key] = LineSplitter()
        self._send_lines(key, splitter.append(text))

    def _send_lines(self, key: str, lines: str) -> None:
        """Frame the text of stream ``key`` (``log:<name>`` for a logfile), in frames of at
        most ``TEXT_FRAME_BYTES``: a header or a logfile write of any size fits the pipe's
        frames and, later, the master's wire."""
        if not lines:
            return
        for piece in frames.split_text(lines.encode("utf-8"), frames.TEXT_FRAME_BYTES):
            if key.startswith("log:"):
                self.write(frames.value_frame(frames.LOG, (key[4:], piece)))
            else:
                self.write(frames.frame(frames.TEXT, piece, frames.CHANNEL_OF[key]))

    def finish(self, failure: str | None) -> None:
        """Flush the unfinished lines of every stream (sorted by name, as the reference) and
        send ``COMPLETE``."""
        keys = set(self._splitters) | set(self._pumps)
        for key in sorted(keys, key=lambda k: k.removeprefix("log:")):
            splitter = self._splitters.get(key)
            if splitter is not None:
                # flushed after an interrupt too, as the reference's completion does
                self._send_lines(key, splitter.flush())
            pump = self._pumps.get(key)
            if pump is not None:
                pump.flush()
                pump.close()
        self._splitters.clear()
        self._pumps.clear()
        self.write(frames.value_frame(frames.COMPLETE, failure))

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
            if item[0] == frames.INTERRUPT and not self._start_queued():
                self._interrupt(marshal.loads(item[2]))
            else:
                # an INTERRUPT behind a START is for that new command: :meth:`reset` applies it
                self._inbox.append(item)

    def absorb_available(self) -> None:
        """Read the control frames already waiting, without blocking."""
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.rfd, select.POLLIN)
        while self._poll.poll(0):
            self.fill()

    def check_interrupt(self, doing: str) -> None:
        """For long work that does not wait on the pipe: raise :class:`Interrupted` if an
        ``INTERRUPT`` has come (``doing`` says what it ended)."""
        self.absorb_available()
        if self.interrupt_reason is not None:
            raise Interrupted(f"interrupted while {doing}")

    def _start_queued(self) -> bool:
        return any(kind == frames.START for kind, _, _ in self._inbox)

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

    def next_answer(self, waiting_for: str) -> tuple[int, int, bytes]:
        """The front end's next answer to one of the command's requests.

        Once the command is interrupted only an answer already received is taken: a wait
        never outlasts an interrupt (the master may never answer), and raises
        :class:`Interrupted`. Its answer, when it comes, is left for the executor's idle
        loop to drop: nothing in this command waits for an answer any more.
        """
        while not self._inbox or self.abandoned:
            if self.interrupt_reason is not None:
                self.abandoned = True
                raise Interrupted(f"interrupted while waiting for {waiting_for}")
            self.fill()
        return self._inbox.popleft()

    def call(self, target: str, method: str, *args: Any) -> Any:
        """Call ``method`` on the master's ``target`` reference; wait for and return its result.

        Raises :class:`CommandError` with the master's message if the call failed, and
        :class:`Interrupted` if an interrupt ended the wait.
        """
        self.write(frames.value_frame(frames.CALL, (target, method, args)))
        kind, _, payload = self.next_answer(f"{target}.{method}()")
        if kind == frames.RESULT:
            ok, value = frames.load(payload)
            if not ok:
                raise CommandError(value)
            return value
        raise frames.WireError(f"unexpected frame kind {kind} while waiting for a result")

    def reset(self) -> None:
        """Forget the last command's state, as a new ``START`` has just been taken: what came
        with it is kept only if it is an ``INTERRUPT`` of the new command."""
        queued = [payload for kind, _, payload in self._inbox if kind == frames.INTERRUPT]
        self._inbox.clear()
        self._splitters.clear()
        for pump in self._pumps.values():
            pump.close()
        self._pumps.clear()
        self.interrupt_reason = None
        self.abandoned = False
        self.on_interrupt = None
        self.running = True
        for payload in queued:
            self._interrupt(marshal.loads(payload))
