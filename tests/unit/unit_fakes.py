"""Fakes the unit tests share: a master side, a pool and executors, a process reactor.

* :class:`FakeMaster` is a session's ``MasterSide`` whose ``send_updates`` returns Deferreds
  the test fires by hand, so "an update is in flight" is a state the test controls.
* :class:`FakePool` / :class:`FakeExecutor` stand in for the executor pool: the test decides
  when a waiting session gets its executor, and sees every frame, pause and resume.
* :class:`ProcessReactor` is a ``MemoryReactorClock`` that also "spawns" processes: the real
  :class:`~pyworker.frontend.pool.ExecutorPool` runs on it unchanged, with real pipes whose
  far ends a :class:`FakeChild` holds (it reads the control frames and writes event frames
  exactly as an executor process would).
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from pyworker import config as config_mod
from pyworker import frames

# -- the master's side of one command ---------------------------------------------------------


class FakeMaster:
    """A ``MasterSide`` that records every call; Deferreds are fired by the test."""

    def __init__(self) -> None:
        #: Every call in order: ("update", batch) / ("complete", failure) / ("call", ...).
        self.events: list[tuple[Any, ...]] = []
        self.update_deferreds: deque[defer.Deferred[Any]] = deque()
        self.calls: list[tuple[str, str, tuple[Any, ...], defer.Deferred[Any]]] = []
        self.finished_count = 0

    def send_updates(self, updates: list[tuple[str, Any]]) -> defer.Deferred[Any]:
        self.events.append(("update", list(updates)))
        d: defer.Deferred[Any] = defer.Deferred()
        self.update_deferreds.append(d)
        return d

    def complete(self, failure: str | None) -> defer.Deferred[Any]:
        self.events.append(("complete", failure))
        return defer.succeed(None)

    def call(self, target: str, method: str, args: tuple[Any, ...]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.events.append(("call", target, method, args))
        self.calls.append((target, method, args, d))
        return d

    def finished(self) -> None:
        self.finished_count += 1

    # -- for the tests -----------------------------------------------------------------------

    @property
    def updates(self) -> list[list[tuple[str, Any]]]:
        return [e[1] for e in self.events if e[0] == "update"]

    @property
    def completes(self) -> list[str | None]:
        return [e[1] for e in self.events if e[0] == "complete"]

    def ack_update(self) -> None:
        """The master takes the oldest update still in flight."""
        self.update_deferreds.popleft().callback(None)

    def ack_all(self) -> None:
        while self.update_deferreds:
            self.ack_update()


def text_of(batch: list[tuple[str, Any]], key: str = "stdout") -> str:
    return "".join(v for k, v in batch if k == key)


def batch_text_bytes(batch: list[tuple[str, Any]]) -> int:
    """Bytes of text (any stream, logs included) one update carries."""
    total = 0
    for key, value in batch:
        if key in frames.TEXT_CHANNELS:
            total += len(value.encode())
        elif key == "log":
            total += len(value[1].encode())
    return total


# -- executors and the pool, as a session sees them -----------------------------------------------


class FakeExecutor:
    """Records what the session does to its executor."""

    def __init__(self, name: str = "executor") -> None:
        self.name = name
        self.sent: list[tuple[int, Any]] = []
        self.paused = False
        #: "pause" / "resume" each time the state changes (repeats are not transitions).
        self.transitions: list[str] = []

    def send(self, *parts: bytes) -> None:
        for kind, _channel, payload in frames.FrameDecoder().feed(b"".join(parts)):
            self.sent.append((kind, payload if kind == frames.DATA else frames.load(payload)))

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.transitions.append("pause")

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.transitions.append("resume")

    @property
    def kinds(self) -> list[int]:
        return [k for k, _ in self.sent]


class FakePool:
    """Hands out executors only when the test says so (``serve``)."""

    def __init__(self) -> None:
        self.waiting: deque[tuple[Any, Callable[[Any], None]]] = deque()
        self.released: list[FakeExecutor] = []
        self.cancelled: list[Any] = []
        self.executors: list[FakeExecutor] = []

    def acquire(self, client: Any, start: Callable[[Any], None]) -> None:
        self.waiting.append((client, start))

    def serve(self) -> FakeExecutor:
        """Give the oldest waiting client a new executor."""
        client, start = self.waiting.popleft()
        executor = FakeExecutor(f"executor-{len(self.executors)}")
        self.executors.append(executor)
        start(executor)
        return executor

    def cancel_wait(self, client: Any) -> bool:
        for item in self.waiting:
            if item[0] is client:
                self.waiting.remove(item)
                self.cancelled.append(client)
                return True
        return False

    def release(self, executor: FakeExecutor) -> None:
        self.released.append(executor)


def text_frame(text: str, stream: str = "stdout") -> tuple[int, int, bytes]:
    return frames.TEXT, frames.CHANNEL_OF[stream], text.encode()


def value_frame(kind: int, value: Any) -> tuple[int, int, bytes]:
    (decoded,) = frames.FrameDecoder().feed(frames.value_frame(kind, value))
    return decoded


# -- executor processes, for the real pool ----------------------------------------------------


class FakeProcessTransport:
    """The ``IProcessTransport`` of a fake child: a pid and the signals it was sent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.ended = False

    def signalProcess(self, signal: str) -> None:  # noqa: N802 - Twisted
        if self.ended:
            raise error.ProcessExitedAlready()
        self.signals.append(signal)


class FakeSlot:
    """The far ends of one slot's pipes, held by the test as the executor's thread would."""

    def __init__(self, child: FakeChild, number: int, control_fd: int, events_fd: int) -> None:
        self.child = child
        self.number = number
        self.control_fd = control_fd  # we read the control frames the front end sends
        self.events_fd = events_fd  # we write event frames as an executor would
        self.decoder = frames.FrameDecoder()
        self.control_closed = False

    @property
    def front(self) -> Any:
        """The pool's :class:`ExecutorSlot` for this slot."""
        (slot,) = [s for s in self.child.opened if s.number == self.number]
        return slot

    def read_control(self) -> list[tuple[int, int, bytes]]:
        """The control frames the front end wrote so far (its buffers pumped first)."""
        self.child.reactor.pump_writers()
        os.set_blocking(self.control_fd, False)
        data = b""
        while True:
            try:
                chunk = os.read(self.control_fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                self.control_closed = True
                break
            data += chunk
        return list(self.decoder.feed(data))

    def emit(self, data: bytes) -> None:
        """Write event frames; the reactor reads them if the front end is reading us."""
        os.write(self.events_fd, data)
        self.deliver()

    def deliver(self) -> None:
        """What the reactor does when our event pipe is readable: read it, if watched."""
        reader = self.front.reader
        if reader in self.child.reactor.readers:
            reader.doRead()

    def close(self) -> None:
        for name in ("control_fd", "events_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def end(self) -> None:
        """The thread closes its pipes (the process lives on): the reactor reads to EOF."""
        self.close()
        reader = self.front.reader
        while reader in self.child.reactor.readers:
            why = reader.doRead()
            if why:
                self.child.reactor.removeReader(reader)
                reader.connectionLost(Failure(why))


class FakeChild:
    """The far end of one executor's socket, and its slots, held by the test instead of a
    process."""

    def __init__(self, reactor: ProcessReactor, protocol: Any, pid: int, argv: list[str],
                 env: dict[str, str], sock_fd: int) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.argv = argv
        self.env = env
        self.sock = socket.socket(fileno=sock_fd)
        self.sock.setblocking(False)
        self.transport = FakeProcessTransport(pid)
        self.slots: list[FakeSlot] = []
        #: every ExecutorSlot the pool opened on us (closed ones too)
        self.opened: list[Any] = []
        self.socket_closed = False

    def receive(self) -> list[FakeSlot]:
        """Take the slots the front end sent so far (as the executor's main thread does)."""
        while not self.socket_closed and self.sock.fileno() >= 0:
            try:
                msg, fds, _, _ = socket.recv_fds(self.sock, 16, 2)
            except BlockingIOError:
                break
            if not msg:
                self.socket_closed = True
                break
            self.slots.append(FakeSlot(self, int(msg[1:]), fds[0], fds[1]))
        self.opened = sorted({*self.opened, *self.protocol.slots}, key=lambda s: s.number)
        return self.slots

    def slot(self, front: Any) -> FakeSlot:
        """Our end of the pool's slot ``front``."""
        self.receive()
        if front not in self.opened:
            self.opened.append(front)
        (mine,) = [s for s in self.slots if s.number == front.number]
        return mine

    def ready(self) -> None:
        """The executor serves slots: it says so on its socket."""
        self.sock.send(b"R")
        reader = self.protocol.sock_reader
        if reader is not None and reader in self.reactor.readers:
            reader.doRead()

    def exit(self, code: int | None = 0, signal: int | None = None) -> None:
        """The process ends: its pipe ends close, then Twisted reports the exit."""
        self.receive()
        self.close()
        self.transport.ended = True
        if signal is not None:
            reason = Failure(error.ProcessTerminated(exitCode=None, signal=signal))
        elif code:
            reason = Failure(error.ProcessTerminated(exitCode=code))
        else:
            reason = Failure(error.ProcessDone(0))
        self.protocol.processEnded(reason)

    def close(self) -> None:
        for slot in self.slots:
            slot.close()
        if self.sock.fileno() >= 0:
            self.sock.close()


class ProcessReactor(MemoryReactorClock):
    """A ``MemoryReactorClock`` whose ``spawnProcess`` makes a :class:`FakeChild`."""

    def __init__(self) -> None:
        super().__init__()
        self.children: list[FakeChild] = []

    def spawnProcess(  # noqa: N802 - Twisted
        self, processProtocol: Any, executable: str, args: Any = (),  # noqa: N803
        env: Any = None, path: Any = None, uid: Any = None, gid: Any = None,
        usePTY: Any = False, childFDs: Any = None,  # noqa: N803
    ) -> FakeProcessTransport:
        # The front end closes its copy of the child's socket end right after this returns.
        child = FakeChild(self, processProtocol, 10_000 + len(self.children), list(args),
                          dict(env or {}), os.dup(childFDs[0]))
        assert childFDs[1] == "r" and childFDs[2] == "r"
        self.children.append(child)
        processProtocol.makeConnection(child.transport)
        return child.transport

    def pump_writers(self) -> None:
        """What the reactor's write loop does: flush writers, report the closed ones."""
        for writer in list(self.writers):
            why = writer.doWrite()
            if why:
                self.removeWriter(writer)
                writer.connectionLost(Failure(why))

    def close_all(self) -> None:
        """Close every pipe end left (test teardown)."""
        for child in self.children:
            child.receive()
            child.close()
            for slot in child.opened:
                slot.reader.close()
                if slot.writer.fd >= 0:
                    os.close(slot.writer.fd)
                    slot.writer.fd = -1
            child.protocol.close_socket()


# -- configuration ---------------------------------------------------------------------------


def make_config(basedir: str, **kwargs: Any) -> config_mod.WorkerConfig:
    kwargs.setdefault("master_host", "localhost")
    kwargs.setdefault("port", 9989)
    return config_mod.WorkerConfig(basedir=basedir, workername="w1", password="pw", **kwargs)


class StopRecorder:
    """The ``stop`` callable a ``WorkerCore`` gets: records the exit codes asked for."""

    def __init__(self) -> None:
        self.codes: list[int | None] = []

    def __call__(self, code: int | None) -> None:
        self.codes.append(code)
