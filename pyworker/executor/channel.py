"""The executor's end of its pipe pair, and the errors a command can end with.

:class:`Channel` carries a command's output to the front end in the frames of
:mod:`pyworker.frames` (text through line splitters or the I/O core's pumps) and reads the
front end's control frames (``INTERRUPT``, answers to the command's calls).
"""

from __future__ import annotations

import errno
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


#: The kind of an inbox entry for a ``DATA`` payload that went straight into the sink
#: (not a wire kind): :meth:`Channel.take_sunk` gives its size.
SUNK = -1


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
        #: A download's file: ``DATA`` payloads are spliced into it from the pipe, never
        #: read into memory (see :meth:`sink_data`).
        self._sink: int | None = None
        self._sunk: deque[int] = deque()
        #: The first error writing to the sink (the payloads after it are discarded).
        self.sink_error: str | None = None

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

    def sink_data(self, fd: int | None) -> None:
        """Splice the payloads of the ``DATA`` frames that come from now on into ``fd``
        (None: stop); each is an inbox entry of kind :data:`SUNK`. The pipe is then read
        frame by frame, so that a payload is still in the pipe when its header is read."""
        self._sink = fd

    def take_sunk(self) -> int:
        """The size of the oldest ``DATA`` payload written to the sink."""
        return self._sunk.popleft()

    def fill(self) -> None:
        """Read what is available on the control pipe (one read) and queue its frames."""
        decoder = self._decoder
        if self._sink is None:
            want = self.READ_SIZE
        elif decoder.needed:
            want = decoder.needed  # to the end of the frame begun, and no further
        elif decoder.pending:
            self._queue(b"")  # whole frames left by an early stop
            return
        else:
            want = frames.HEADER_SIZE
        try:
            data = os.read(self.rfd, want)
        except InterruptedError:
            return
        if not data:
            raise FrontEndGone.now()
        if want == frames.HEADER_SIZE and len(data) == want and self._sink is not None \
                and not decoder.pending and self._sink_payload(data):
            return
        self._queue(data)

    def _sink_payload(self, head: bytes) -> bool:
        """If ``head`` starts a ``DATA`` frame with a payload (and no interrupt came),
        move the payload into the sink and queue it as :data:`SUNK`."""
        length, kind, channel, _ = frames.HEADER.unpack(head)
        if (kind != frames.DATA or not length or length > frames.MAX_PAYLOAD
                or self._sink is None or self.interrupt_reason is not None):
            return False
        left = length
        while left and self.sink_error is None:
            try:
                left -= _splice(self.rfd, self._sink, left)
            except InterruptedError:
                continue
            except EOFError:
                raise FrontEndGone.now() from None
            except _SinkFailed as e:
                left -= e.consumed
                self.sink_error = f"{type(e.error).__name__}: {e.error}"
            except OSError as e:  # splice(2) failed: nothing was moved
                self.sink_error = f"{type(e).__name__}: {e}"
        while left:  # after a write error: the rest of the payload is dropped
            try:
                got = len(os.read(self.rfd, min(left, self.READ_SIZE)))
            except InterruptedError:
                continue
            if not got:
                raise FrontEndGone.now()
            left -= got
        self._sunk.append(length)
        self._inbox.append((SUNK, channel, b""))
        return True

    def _queue(self, data: bytes) -> None:
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
        self._sink = None
        self._sunk.clear()
        self.sink_error = None
        self.abandoned = False
        self.on_interrupt = None
        self.running = True
        for payload in queued:
            self._interrupt(marshal.loads(payload))


class _SinkFailed(Exception):
    """Writing to the sink failed after ``consumed`` bytes were read from the pipe."""

    def __init__(self, consumed: int, error: OSError) -> None:
        super().__init__(consumed, error)
        self.consumed = consumed
        self.error = error


def _splice(pipe: int, fd: int, count: int) -> int:
    """Move up to ``count`` bytes (at least one) from ``pipe`` to the file ``fd``:
    ``splice(2)``, or a read and a write where the file takes no splice."""
    try:
        n = os.splice(pipe, fd, count)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    else:
        if not n:
            raise EOFError
        return n
    data = os.read(pipe, min(count, Channel.READ_SIZE))
    if not data:
        raise EOFError
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as e:
        raise _SinkFailed(len(data), e) from None
    return len(data)
