"""One running command, seen from the front end: the bridge between an executor and the master.

A :class:`CommandSession` owns the executor while the command runs. It turns the executor's
frames into the master's calls through a :class:`MasterSide` (one per wire protocol), and
answers the executor's transfer requests. Output is never held back on a timer: text goes to
the master as soon as it arrives, and while an ``update`` call is in flight the next text is
batched (up to ``BATCH_BYTES`` per call), because the master's cost is per call, not per
byte. If the master falls far behind, the session stops reading the executor, whose pipe
then fills and pauses the command itself: memory stays bounded.
"""

from __future__ import annotations

import marshal
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyworker import frames
from pyworker.frontend.metrics import STATS
from pyworker.frontend.pool import ExecutorPool, ExecutorSlot

log = Logger()

#: Upper bound of the text carried by one ``update`` call (Twisted refuses strings > 640 KiB).
BATCH_BYTES = 512 * 1024
#: Stop reading the executor when this much output waits for the master; resume below LOW.
HIGH_WATER = 8 * 1024 * 1024
LOW_WATER = 2 * 1024 * 1024
#: The same for all sessions together: 64 streams at HIGH_WATER each would hold 512 MiB (one
#: run of 64 x 2 MiB streams peaked at 268 MiB in the front end). Past GLOBAL_HIGH_WATER the
#: session whose output adds to it stops reading its executor; below GLOBAL_LOW_WATER every
#: session stopped so resumes (if its own backlog is below LOW_WATER).
GLOBAL_HIGH_WATER = 32 * 1024 * 1024
GLOBAL_LOW_WATER = 16 * 1024 * 1024
#: Text of all sessions' ``update`` calls sent and not yet answered. Each session has one
#: update in flight at a time; with 64 of them that is 32 MiB in the connection's buffer
#: (and copies of it as Twisted joins its buffer), while the master takes updates one at a
#: time: 16 batches in flight keep it as busy (64 x 2 MiB streams: the same MiB/s within the
#: noise of three runs, at 8 MiB or 16; it is the read budget of the pool that takes the
#: front end's peak from 200 to 137 MiB).
IN_FLIGHT_BUDGET = 8 * 1024 * 1024


class Backlog:
    """Output of all sessions waiting for the master, the sessions it paused, the text in
    flight and the sessions waiting for room to send."""

    def __init__(self) -> None:
        self.total = 0
        self.paused: set[CommandSession] = set()
        self.in_flight = 0
        self.waiting: deque[CommandSession] = deque()

    def may_send(self, session: CommandSession) -> bool:
        """Whether ``session`` may send an update now; if not, it is woken when it may."""
        if self.in_flight == 0 or self.in_flight + BATCH_BYTES <= IN_FLIGHT_BUDGET:
            return True
        if session not in self.waiting:
            self.waiting.append(session)
        return False

    def answered(self, size: int) -> None:
        self.in_flight -= size
        while self.waiting and (
                self.in_flight == 0 or self.in_flight + BATCH_BYTES <= IN_FLIGHT_BUDGET):
            self.waiting.popleft().try_send()

    def grew(self, session: CommandSession, size: int) -> None:
        self.total += size
        if self.total > GLOBAL_HIGH_WATER and session.executor is not None:
            self.paused.add(session)
            session.executor.pause()

    def shrank(self, size: int) -> None:
        self.total -= size
        if self.paused and self.total < GLOBAL_LOW_WATER:
            paused, self.paused = self.paused, set()
            for session in paused:
                session.resume_if_below()
TEXT_KEYS = frozenset(frames.TEXT_CHANNELS)


class MasterSide(Protocol):
    """How a session talks to the master's side of one command (PB or msgpack)."""

    def send_updates(self, updates: list[tuple[str, Any]]) -> defer.Deferred[Any]:
        """Send updates in order as one message; fires when the master has taken them."""

    def complete(self, failure: str | None) -> defer.Deferred[Any]: ...

    def call(self, target: str, method: str, args: tuple[Any, ...]) -> defer.Deferred[Any]:
        """Call ``method`` on the master's ``writer`` or ``reader`` for this command."""

    def finished(self) -> None:
        """The session is over (completed or stopped): drop what watches the master."""


class CommandSession:
    """The front end's state for one command, from ``startCommand`` to ``complete``."""

    def __init__(
        self,
        pool: ExecutorPool,
        master: MasterSide,
        name: str,
        command_id: str,
        request: dict[str, Any],
        on_done: Any = None,
        backlog: Backlog | None = None,
    ) -> None:
        self.pool = pool
        #: Shared by the worker's sessions (the core's); a session of its own by default.
        self.backlog = backlog if backlog is not None else Backlog()
        self.master = master
        self.name = name
        self.command_id = command_id
        self.request = request
        self.on_done = on_done
        self.executor: ExecutorSlot | None = None
        self.pending: deque[list[Any]] = deque()
        self.pending_bytes = 0
        self.in_flight = 0
        self.silenced = False
        self.done = False
        self.interrupted = False
        self._writes_failed: str | None = None
        self.bytes_out = 0
        #: The builder the command runs for (None: a setup command), and the connection
        #: whose loss stops it; set by the core.
        self.builder: str | None = None
        self.connection: object = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        payload = marshal.dumps(self.request)  # ValueError for values we cannot carry
        if len(payload) > frames.MAX_PAYLOAD:
            raise ValueError(f"the command's arguments take {len(payload)} bytes, more than "
                             f"the {frames.MAX_PAYLOAD} an executor takes")
        self.pool.acquire(self, lambda ex: self._started(ex, payload))
        STATS.command_started(self.name)

    def _started(self, executor: ExecutorSlot, payload: bytes) -> None:
        self.executor = executor
        executor.send(frames.frame(frames.START, payload))
        if self.interrupted:
            executor.send(frames.value_frame(frames.INTERRUPT, "interrupted"))

    def interrupt(self, why: str) -> None:
        """The master asked to stop the command (it still expects ``complete``)."""
        if self.done or self.interrupted:
            return
        self.interrupted = True
        if self.executor is not None:
            self.executor.send(frames.value_frame(frames.INTERRUPT, why or "interrupted"))
        elif self.pool.cancel_wait(self):
            # Never started: finish as an interrupted command would, with no rc.
            self._finish(None)

    def silence(self) -> None:
        """Stop the command and send nothing more to the master (connection lost, builder
        removed, worker stopping)."""
        if self.done:
            return
        self.silenced = True
        self.pending.clear()
        self.backlog.shrank(self.pending_bytes)
        self.pending_bytes = 0
        if self.executor is not None:
            self.executor.resume()
        self.interrupt("silenced")
        if self.executor is None and not self.done:
            self.pool.cancel_wait(self)
            self._finish(None)

    # -- executor frames -----------------------------------------------------------------

    def executor_frame(self, kind: int, channel: int, payload: bytes) -> None:
        if kind == frames.TEXT:
            if not self.silenced:
                self._queue_text(frames.TEXT_CHANNELS[channel], None, payload)
        elif kind == frames.UPDATE:
            if not self.silenced:
                for key, value in frames.load(payload):
                    self._queue(key, value, 20)
        elif kind == frames.LOG:
            if not self.silenced:
                logname, data = frames.load(payload)
                self._queue_text("log", logname, data)
        elif kind == frames.COMPLETE:
            self._finish(frames.load(payload))
        elif kind == frames.USAGE:
            log.info("(command {id}): {name}{usage}", id=self.command_id, name=self.name,
                     usage=frames.describe_usage(frames.load(payload)))
        elif kind == frames.CALL:
            target, method, args = frames.load(payload)
            self._relay_call(target, method, tuple(args))
        elif kind == frames.WRITE:
            self._relay_write(payload)
        elif kind == frames.READ:
            self._relay_read(frames.load(payload))
        else:
            log.warn("unexpected frame kind {kind} from executor", kind=kind)

    def executor_lost(self, reason: str) -> None:
        self.executor = None
        if self.done:
            return
        if not self.silenced:
            self._queue("header", f"\n{reason}; the command was abandoned\n", 0)
        self._finish(f"{reason} while running command {self.command_id} ({self.name})")

    # -- updates -------------------------------------------------------------------------

    def _queue_text(self, key: str, logname: str | None, data: bytes) -> None:
        """Queue UTF-8 text of a stream (``logname`` for ``log``), in pieces of at most
        ``BATCH_BYTES``: no text reaches the wire above Twisted's 640 KiB string limit,
        whatever its source (a pump's read of invalid bytes triples in size)."""
        for piece in frames.split_text(data, BATCH_BYTES):
            text = piece.decode("utf-8")
            self._queue(key, text if logname is None else (logname, text), len(piece))

    def _queue(self, key: str, value: Any, size: int) -> None:
        """Queue one update; text joins the previous entry of the same stream (up to a batch).

        Text entries hold a list of parts, joined once when sent (no quadratic appends).
        """
        pending = self.pending
        if key in TEXT_KEYS or key == "log":
            STATS.bytes[key] += size
        if pending and (key in TEXT_KEYS or key == "log"):
            last = pending[-1]
            if last[0] == key and last[2] + size <= BATCH_BYTES and (
                key != "log" or last[3] == value[0]
            ):
                last[1].append(value if key != "log" else value[1])
                last[2] += size
                self._account(size)
                return
        if key in TEXT_KEYS:
            pending.append([key, [value], size, None])
        elif key == "log":
            pending.append([key, [value[1]], size, value[0]])
        else:
            pending.append([key, value, size, None])
        self._account(size)
        self.try_send()

    def _account(self, size: int) -> None:
        self.pending_bytes += size
        if self.pending_bytes > HIGH_WATER and self.executor is not None:
            self.executor.pause()
        self.backlog.grew(self, size)

    def resume_if_below(self) -> None:
        """Read the executor again unless this session's own backlog is still high, or all
        sessions' is (the session is then paused by the backlog again)."""
        if self.executor is None or self.pending_bytes >= LOW_WATER:
            return
        if self.backlog.total < GLOBAL_LOW_WATER:
            self.executor.resume()
        else:
            self.backlog.paused.add(self)

    def try_send(self) -> None:
        """Send the next batch if none of ours is in flight and all sessions' in-flight
        text leaves room (else :class:`Backlog` wakes us when it does)."""
        if self.in_flight == 0 and self.pending and not self.done and self.backlog.may_send(self):
            self._send_batch()

    def _send_batch(self) -> None:
        """Send what is pending, at most BATCH_BYTES of it, as one ``update`` call."""
        if not self.pending:
            return
        batch: list[tuple[str, Any]] = []
        size = 0
        while self.pending and (not batch or size + self.pending[0][2] <= BATCH_BYTES):
            key, value, n, logname = self.pending.popleft()
            if key in TEXT_KEYS:
                value = "".join(value)
            elif key == "log":
                value = (logname, "".join(value))
            batch.append((key, value))
            size += n
        self.pending_bytes -= size
        self.bytes_out += size
        self.backlog.shrank(size)
        self.resume_if_below()
        self.in_flight += 1
        self.backlog.in_flight += size
        d = _guarded(self.master.send_updates, batch)
        d.addErrback(self._update_failed)
        d.addBoth(self._update_done, size)

    def _update_failed(self, failure: Failure) -> None:
        log.warn("update for command {id} failed: {f}", id=self.command_id,
                 f=failure.getErrorMessage())

    def _update_done(self, _: Any, size: int) -> None:
        self.in_flight -= 1
        self.backlog.answered(size)
        self.try_send()

    # -- completion ----------------------------------------------------------------------

    def _finish(self, failure: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.backlog.paused.discard(self)
        if self in self.backlog.waiting:
            self.backlog.waiting.remove(self)
        STATS.command_finished(failed=failure is not None)
        executor, self.executor = self.executor, None
        if executor is not None:
            self.pool.release(executor)
        if not self.silenced:
            while self.pending:
                self._send_batch()
            d = _guarded(self.master.complete, failure)
            d.addErrback(lambda f: log.warn("complete for command {id} failed: {f}",
                                            id=self.command_id, f=f.getErrorMessage()))
        if self.on_done is not None:
            self.on_done(self)

    # -- transfers -----------------------------------------------------------------------

    def _answer(self, kind: int, value: Any) -> None:
        if self.executor is not None:
            self.executor.send(frames.value_frame(kind, value))

    def _relay_call(self, target: str, method: str, args: tuple[Any, ...]) -> None:
        if self.silenced:
            self._answer(frames.RESULT, (False, "the connection to the master was lost"))
            return
        d = _guarded(self.master.call, target, method, args)
        d.addCallbacks(
            lambda value: self._answer(frames.RESULT, (True, _plain(value))),
            lambda f: self._answer(frames.RESULT, (False, _failure_text(f))),
        )

    def _relay_write(self, data: bytes) -> None:
        n = len(data)
        if self.silenced or self._writes_failed is not None:
            self._answer(frames.ACK, (n, self._writes_failed or "the connection was lost"))
            return

        def failed(f: Failure) -> None:
            if self._writes_failed is None:
                self._writes_failed = _failure_text(f)
            self._answer(frames.ACK, (n, self._writes_failed))

        def written(_: Any) -> None:
            STATS.bytes["upload"] += n
            self._answer(frames.ACK, (n, None))

        d = _guarded(self.master.call, "writer", "write", (data,))
        d.addCallbacks(written, failed)

    def _relay_read(self, length: int) -> None:
        if self.silenced:
            self._answer(frames.RESULT, (False, "the connection to the master was lost"))
            return

        def got(data: Any) -> None:
            if self.executor is None:
                return
            if isinstance(data, str):
                data = data.encode("utf-8")
            STATS.bytes["download"] += len(data or b"")
            data = data or b""
            self.executor.send(frames.header(frames.DATA, len(data)), data)

        d = _guarded(self.master.call, "reader", "read", (length,))
        d.addCallbacks(got, lambda f: self._answer(frames.RESULT, (False, _failure_text(f))))


def _guarded(call: Callable[..., defer.Deferred[Any]], *args: Any) -> defer.Deferred[Any]:
    """``call(*args)``, with what it raises at once (a stale PB broker, a master object that
    cannot be called) turned into a failed Deferred: every executor request gets its answer
    and every session its end, whatever the master side does."""
    try:
        return call(*args)
    except Exception:
        return defer.fail(Failure())


def _failure_text(f: Failure) -> str:
    value = f.value
    text = f.getErrorMessage()
    kind = getattr(value, "type", None) or type(value).__name__
    if isinstance(kind, bytes):
        kind = kind.decode("utf-8", "replace")
    return f"{kind}: {text}"


def _plain(value: Any) -> Any:
    """A master result in a form marshal can carry (references become None)."""
    try:
        marshal.dumps(value)
    except ValueError:
        return None
    return value
