"""The executor pool: the front end's supervised set of executor processes and their slots.

A command runs in a *slot*: a pipe pair to one thread of an executor process (see
:mod:`pyworker.executor.main`). An executor serves many slots at once, so the processes
follow the CPUs, not the commands: a new slot goes to the executor with the fewest, and a new
executor is started only when every one has ``slots_per_executor`` or more and there are
fewer than ``max_executors``. A slot costs two pipes and a thread, not an interpreter: at 64
concurrent commands the pool is two processes, not 65.

``min_idle`` slots wait idle at all times (so a command never waits for a Python start-up),
the pool grows with concurrent commands up to ``max_size`` slots, and slots idle for
``idle_timeout`` seconds are closed, then executors left with none (all but one). A command
that finds the pool at its bound waits for the next free slot. An executor that dies is
replaced, and the commands it ran are told (their sessions fail the steps with a readable
message).

Everything here runs in the reactor and never blocks: executors are Twisted child processes;
their slots' pipes and their sockets are read and written by the reactor.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import abstract, defer, error, fdesc, main, protocol
from twisted.internet.base import DelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyworker import frames
from pyworker.linux import PR_SET_CHILD_SUBREAPER, prctl

log = Logger()

PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031

#: Seconds a slot beyond ``min_idle`` may stay idle before it is closed (and an executor
#: left without slots ended). An executor costs about 0.1 s of one CPU to start and about
#: 11 MiB while it lives; a slot, a thread. Ten seconds keeps both across the gaps between
#: the steps of a build (the master starts the next step within milliseconds).
IDLE_TIMEOUT = 10.0

#: Slots an executor takes before the pool starts another (while below ``max_executors``):
#: a few commands share one process's GIL well, as they mostly wait with it released.
SLOTS_PER_EXECUTOR = 8

#: What an executor writes on its socket once it serves slots (``executor.main.READY``).
READY = b"R"

#: How an executor starts: import pyworker from where this front end imported it.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_EXECUTOR_BOOT = (
    f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); "
    "from pyworker.executor.main import main; sys.exit(main())"
)


class ExecutorClient(Protocol):
    """What the pool needs from the owner of a running command (a ``CommandSession``)."""

    def executor_frame(self, kind: int, channel: int, payload: bytes) -> None: ...

    def executor_lost(self, reason: str) -> None: ...


#: The most one read of a slot's event pipe takes (Twisted's process pipes read 8 KiB).
READ_SIZE = 1024 * 1024
#: What one turn of the reactor may read from all busy slots together: with 64 busy slots a
#: read is 256 KiB, so a turn holds 16 MiB of fresh output, not 64 MiB (then as much again
#: decoded) before the sessions' backlog can stop the executors.
READ_BUDGET = 16 * 1024 * 1024
MIN_READ_SIZE = 64 * 1024


class _PipeReader(abstract.FileDescriptor):
    """Reads an executor's pipe or socket in large reads, of ``read_size()`` bytes;
    ``on_end`` is called once when the far end closes it."""

    def __init__(self, reactor: Any, fd: int, on_data: Callable[[bytes], None],
                 on_end: Callable[[], None] | None = None, owns_fd: bool = True,
                 read_size: Callable[[], int] = lambda: READ_SIZE) -> None:
        super().__init__(reactor)
        self.fd = fd
        self.on_data = on_data
        self.on_end = on_end
        self.owns_fd = owns_fd
        self.read_size = read_size
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:  # noqa: N802 - Twisted
        try:
            data = os.read(self.fd, self.read_size())
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.on_data(data)
        return None

    def drain(self) -> None:
        """Read everything left (the writer is gone): no frame is lost to a race."""
        while self.fd >= 0:
            try:
                data = os.read(self.fd, READ_SIZE)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self.on_data(data)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 - Twisted
        super().connectionLost(reason)
        self.close()
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end()

    def close(self) -> None:
        if self.fd >= 0:
            self.stopReading()
            if self.owns_fd:
                os.close(self.fd)
            self.fd = -1


class _PipeWriter(abstract.FileDescriptor):
    """The front end's end of an executor's control pipe (buffered, never blocking)."""

    def __init__(self, reactor: Any, fd: int) -> None:
        super().__init__(reactor)
        self.fd = fd
        fdesc.setNonBlocking(fd)
        self.connected = 1

    def fileno(self) -> int:
        return self.fd

    def write_now(self, *parts: bytes) -> None:
        """Write ``parts`` in order: straight to the pipe (one ``writev``) when nothing is
        queued before them, which spares a transfer block the reactor's buffering, copy
        and write-readiness round; what the pipe does not take is queued as by
        :meth:`write`."""
        if not self.connected or self._writeDisconnected:
            return
        if self._tempDataLen or self.offset < len(self.dataBuffer):
            for part in parts:
                self.write(part)
            return
        try:
            n = os.writev(self.fd, parts)
        except BlockingIOError:
            n = 0
        except OSError:
            n = 0  # queued: the failure comes back from the reactor's write, as for write()
        for part in parts:
            if n >= len(part):
                n -= len(part)
                continue
            self.write(part[n:] if n else part)
            n = 0

    def writeSomeData(self, data: bytes) -> Any:  # noqa: N802 - Twisted
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            return main.CONNECTION_LOST

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 - Twisted
        super().connectionLost(reason)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pipe(size: int = PIPE_SIZE) -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, size)
    except OSError:
        pass  # the default size works, only slower
    return r, w


class ExecutorSlot:
    """One slot of an executor, seen from the front end: what a command session owns.

    Its control pipe (frames to the executor's thread) and event pipe (frames from it) are
    read and written by the reactor in large chunks.
    """

    def __init__(self, executor: ExecutorProcess, reactor: Any, control_fd: int,
                 events_fd: int) -> None:
        self.executor = executor
        self.decoder = frames.FrameDecoder()
        self.client: ExecutorClient | None = None
        self.idle_since = 0.0
        self.closed = False
        #: The executor closed the slot's event pipe.
        self.ended = False
        #: 1 for the executor's first slot, and so on.
        self.number = 0
        self._paused = False
        self.writer = _PipeWriter(reactor, control_fd)
        self.reader = _PipeReader(reactor, events_fd, self._events_received,
                                  self._events_ended, read_size=executor.pool.read_size)
        self.reader.startReading()

    @property
    def pid(self) -> int | None:
        return self.executor.pid

    @property
    def alive(self) -> bool:
        return self.executor.alive and not self.closed

    def send(self, *parts: bytes) -> None:
        """Send ``parts`` (a frame, or a frame's header and payload) to the executor."""
        if self.alive and self.writer.fd >= 0:
            self.writer.write_now(*parts)

    def pause(self) -> None:
        """Stop reading this slot's output: its writes block, and so does its command."""
        if not self._paused and self.alive:
            self._paused = True
            self.reader.stopReading()

    def resume(self) -> None:
        if self._paused and self.alive:
            self._paused = False
            if self.reader.fd >= 0:
                self.reader.startReading()

    def _events_received(self, data: bytes) -> None:
        try:
            for kind, channel, payload in self.decoder.feed(data):
                if self.client is not None:
                    self.client.executor_frame(kind, channel, payload)
                elif kind != frames.COMPLETE:
                    log.warn("executor {pid} sent frame {kind} with no command", pid=self.pid,
                             kind=kind)
        except frames.WireError as e:
            log.error("executor {pid} broke the wire protocol: {e}", pid=self.pid, e=e)
            self.executor.pool.slot_failed(self, f"the pyworker executor broke the wire "
                                                 f"protocol: {e}")

    def _events_ended(self) -> None:
        """The executor closed this slot's event pipe: it is exiting (``processEnded`` tells
        the command why), or the slot's thread ended on a bug, after a ``COMPLETE`` that says
        so. Either way the slot is not used again."""
        self.ended = True
        if self.client is None and self.alive:
            self.executor.pool.slot_failed(self, "")

    def close(self) -> None:
        """Close both ends: the executor's thread ends (killing its command, if any)."""
        if self.closed:
            return
        self.closed = True
        self.executor.slots.discard(self)
        self._paused = False
        if self.writer.fd >= 0:
            self.writer.loseConnection()
        self.reader.close()

    def drain_and_close(self) -> None:
        """The executor is gone: read what it wrote before it went, then close."""
        self._paused = False
        self.reader.drain()
        self.closed = True
        self.reader.close()
        if self.writer.fd >= 0:
            self.writer.connectionLost(Failure(error.ConnectionDone()))


class ExecutorProcess(protocol.ProcessProtocol):
    """One executor process, seen from the front end: its socket, over which its slots'
    pipes go, its stderr (logged) and its exit."""

    def __init__(self, pool: ExecutorPool, sock: socket.socket) -> None:
        self.pool = pool
        self.sock = sock
        self.slots: set[ExecutorSlot] = set()
        self.alive = True
        self.ready = False
        self.socket_closed = False
        self.slots_opened = 0
        self.started_at = 0.0
        self._stderr_tail = b""
        self.sock_reader: _PipeReader | None = None

    @property
    def pid(self) -> int | None:
        return self.transport.pid if self.transport is not None else None

    def watch_socket(self, reactor: Any) -> None:
        self.sock_reader = _PipeReader(reactor, self.sock.fileno(), self._socket_data,
                                       self._socket_closed, owns_fd=False)
        self.sock_reader.startReading()

    def preference(self) -> tuple[bool, int]:
        """Sorts first the executor a slot should go to: ready ones, then the fewest slots."""
        return (not self.ready, len(self.slots))

    @property
    def usable(self) -> bool:
        """Alive, and its socket still takes slots (it closes first when the process dies)."""
        return self.alive and not self.socket_closed

    def _socket_closed(self) -> None:
        self.socket_closed = True

    def _socket_data(self, data: bytes) -> None:
        if READY in data:
            self.ready = True

    def open_slot(self, reactor: Any) -> ExecutorSlot:
        """A new slot: its far ends go to the executor, which starts a thread for it."""
        control_r, control_w = _pipe()
        events_r, events_w = _pipe()
        self.slots_opened += 1
        try:
            # the number is for the reader's logs (and tests): the executor needs only fds
            socket.send_fds(self.sock, [b"S%d" % self.slots_opened], [control_r, events_w])
        except BaseException:
            self.socket_closed = True  # dying, or too far behind to take a slot
            for fd in (control_w, events_r):
                os.close(fd)
            raise
        finally:
            os.close(control_r)
            os.close(events_w)
        slot = ExecutorSlot(self, reactor, control_w, events_r)
        slot.number = self.slots_opened
        self.slots.add(slot)
        return slot

    def close_socket(self) -> None:
        """Close the executor's stdin: it kills its commands and exits."""
        if self.sock_reader is not None:
            self.sock_reader.close()
            self.sock_reader = None
        if self.sock.fileno() >= 0:
            self.sock.close()

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802 - Twisted
        # Executors write to stderr (stdout is stderr too) when something is badly wrong.
        text = (self._stderr_tail + data).decode("utf-8", "replace")
        lines = text.split("\n")
        self._stderr_tail = lines.pop().encode()
        for line in lines:
            log.info("executor {pid}: {line}", pid=self.pid, line=line)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted
        self.alive = False
        slots = list(self.slots)
        for slot in slots:
            slot.drain_and_close()  # frames written just before the exit (COMPLETE, ...)
        self.slots.clear()
        self.close_socket()
        self.pool.executor_ended(self, slots, reason)

    def kill(self) -> None:
        if self.alive and self.transport is not None:
            try:
                self.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass


class ExecutorPool:
    """Starts, hands out, takes back and supervises executors and their slots."""

    def __init__(
        self,
        reactor: Any,
        *,
        min_idle: int = 1,
        max_size: int = 64,
        max_executors: int | None = None,
        slots_per_executor: int = SLOTS_PER_EXECUTOR,
        idle_timeout: float = IDLE_TIMEOUT,
        executable: str = sys.executable,
        extra_env: dict[str, str] | None = None,
        adopt_orphans: bool = True,
    ) -> None:
        self.reactor = reactor
        self.min_idle = min_idle
        self.max_size = max_size
        self.max_executors = max(1, max_executors or os.cpu_count() or 1)
        self.slots_per_executor = max(1, slots_per_executor)
        self.idle_timeout = idle_timeout
        self.executable = executable
        #: Given to executors only (e.g. ``PYWORKER_IO``), never to their commands.
        self.extra_env = dict(extra_env or {})
        #: Become the subreaper of the executors' commands and kill what a dead executor
        #: leaves behind. Off only in unit tests whose executors are fakes (the sweep kills
        #: every child of this process that is not an executor).
        self.adopt_orphans = adopt_orphans
        self.executors: list[ExecutorProcess] = []
        self.idle: list[ExecutorSlot] = []
        self.busy: set[ExecutorSlot] = set()
        self.waiting: deque[tuple[ExecutorClient, Callable[[ExecutorSlot], None]]] = deque()
        self.stopping = False
        self._shrink_call: DelayedCall | None = None
        self._all_ended: list[defer.Deferred[None]] = []
        self.started_count = 0
        self.died_count = 0
        self._early_deaths = 0
        self._replenish_call: DelayedCall | None = None

    @property
    def size(self) -> int:
        """Slots open (idle and busy)."""
        return len(self.idle) + len(self.busy)

    def read_size(self) -> int:
        """How much one read of a busy slot's event pipe takes: :data:`READ_BUDGET` shared
        by the busy slots, between :data:`MIN_READ_SIZE` and :data:`READ_SIZE`."""
        return max(MIN_READ_SIZE, min(READ_SIZE, READ_BUDGET // max(1, len(self.busy))))

    def start(self) -> None:
        # If an executor dies, its commands' processes come back to us, to be swept.
        if self.adopt_orphans:
            prctl(PR_SET_CHILD_SUBREAPER, 1)
        self._replenish()

    def _spawn(self) -> ExecutorProcess:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        executor = ExecutorProcess(self, ours)
        try:
            self.reactor.spawnProcess(
                executor,
                self.executable,
                [self.executable, "-c", _EXECUTOR_BOOT],
                env={**os.environ, **self.extra_env},
                childFDs={0: theirs.fileno(), 1: "r", 2: "r"},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        executor.watch_socket(self.reactor)
        self.executors.append(executor)
        self.started_count += 1
        executor.started_at = self.reactor.seconds()
        return executor

    def _executor_for_a_slot(self) -> ExecutorProcess:
        """Where a new slot goes: the live executor with the fewest slots (ready ones first:
        a command does not wait for a start-up another executor can spare it); a new one if
        all have ``slots_per_executor`` and the pool may grow."""
        live = [e for e in self.executors if e.usable]
        if not live:
            return self._spawn()
        best = min(live, key=ExecutorProcess.preference)
        if len(best.slots) >= self.slots_per_executor and len(live) < self.max_executors:
            if all(e.ready for e in live):
                self._spawn()  # for the slots after this one
        return best

    def _open_slot(self) -> ExecutorSlot:
        while True:
            executor = self._executor_for_a_slot()
            try:
                slot = executor.open_slot(self.reactor)
            except OSError as e:
                # it is dying (its processEnded will come) or wedged: another one, or a new
                # one (a fresh socket takes the slot at once)
                log.warn("executor {pid} cannot take a slot: {e}", pid=executor.pid, e=e)
                continue
            slot.idle_since = self.reactor.seconds()
            return slot

    def _replenish(self) -> None:
        if self._replenish_call is not None:
            return  # backing off after executors crashed at start-up
        while not self.stopping and len(self.idle) < self.min_idle and self.size < self.max_size:
            self.idle.append(self._open_slot())

    def _replenish_later(self) -> None:
        """Executors die right after start: retry with a growing delay, not in a tight loop."""
        self._early_deaths += 1
        delay = min(0.1 * 2**self._early_deaths, 30.0)
        log.error("executors die at start-up; retrying in {delay:.1f} s", delay=delay)

        def again() -> None:
            self._replenish_call = None
            self._replenish()

        if self._replenish_call is None:
            self._replenish_call = self.reactor.callLater(delay, again)

    def acquire(self, client: ExecutorClient, start: Callable[[ExecutorSlot], None]) -> None:
        """Give ``client`` a slot: ``start(slot)`` runs now, or when one frees up."""
        if self.stopping:
            raise RuntimeError("the worker is shutting down")
        if self.idle:
            # the idle slot on the least busy executor
            slot = min(self.idle, key=lambda s: s.executor.preference())
            self.idle.remove(slot)
        elif self.size < self.max_size:
            slot = self._open_slot()
        else:
            self.waiting.append((client, start))
            return
        self._hand_out(slot, client, start)
        self._replenish()

    def cancel_wait(self, client: ExecutorClient) -> bool:
        """Drop a client still waiting for a slot; True if it was waiting."""
        for item in self.waiting:
            if item[0] is client:
                self.waiting.remove(item)
                return True
        return False

    def _hand_out(
        self, slot: ExecutorSlot, client: ExecutorClient, start: Callable[[ExecutorSlot], None]
    ) -> None:
        slot.client = client
        self.busy.add(slot)
        start(slot)

    def release(self, slot: ExecutorSlot) -> None:
        """A command finished: the slot is free for the next one."""
        slot.client = None
        slot.resume()
        self.busy.discard(slot)
        if not slot.alive:
            return
        if self.stopping or slot.ended:
            slot.close()
            if not self.stopping:
                self._replenish()
            return
        if self.waiting:
            client, start = self.waiting.popleft()
            self._hand_out(slot, client, start)
            return
        slot.idle_since = self.reactor.seconds()
        self.idle.append(slot)
        self._schedule_shrink()

    def slot_failed(self, slot: ExecutorSlot, reason: str) -> None:
        """A slot broke (its thread ended, or it broke the wire): close it, fail its command."""
        client = slot.client
        slot.client = None
        self.busy.discard(slot)
        if slot in self.idle:
            self.idle.remove(slot)
        slot.close()
        if client is not None:
            self.died_count += 1
            client.executor_lost(reason)
        if not self.stopping:
            self._replenish()

    def _schedule_shrink(self) -> None:
        if self._shrink_call is None or not self._shrink_call.active():
            self._shrink_call = self.reactor.callLater(self.idle_timeout, self._shrink)

    def _shrink(self) -> None:
        self._shrink_call = None
        now = self.reactor.seconds()
        keep = []
        for i, slot in enumerate(sorted(self.idle, key=lambda s: s.idle_since, reverse=True)):
            if i < self.min_idle or now - slot.idle_since < self.idle_timeout:
                keep.append(slot)
            else:
                slot.close()
        self.idle = keep
        # executors left without slots end, but one stays
        live = [e for e in self.executors if e.alive]
        empty = [e for e in live if not e.slots]
        for executor in empty[1:] if len(empty) == len(live) else empty:
            executor.close_socket()
        if len(self.idle) > self.min_idle:
            # Next when the oldest of those beyond min_idle has been idle the whole timeout,
            # not a whole timeout from now: a pool shrinks back within one timeout of its
            # last release, however the releases were spread.
            oldest = min(s.idle_since for s in keep[self.min_idle:])
            self._shrink_call = self.reactor.callLater(
                max(oldest + self.idle_timeout - now, 0.0), self._shrink)

    def _sweep_orphans(self) -> None:
        """Kill what a dead executor's commands left running (re-parented to us) and reap it.

        The front end's own children are executors only; anything else came from a dead one.
        """
        import psutil

        executors = {e.pid for e in self.executors}
        try:
            orphans = [c for c in psutil.Process().children() if c.pid not in executors]
        except psutil.Error:
            return
        for orphan in orphans:
            try:
                victims = [orphan, *orphan.children(recursive=True)]
            except psutil.Error:
                continue
            for victim in victims:
                try:
                    victim.kill()
                except psutil.Error:
                    pass
        if orphans:
            log.warn("killed {n} process(es) left by a dead executor's command", n=len(orphans))
            self._reap([o.pid for o in orphans], tries=50)

    def _reap(self, pids: list[int], tries: int) -> None:
        """Collect our adopted children's exit status without blocking (Twisted won't)."""
        left = []
        for pid in pids:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done == 0:
                left.append(pid)
        if left and tries > 0:
            self.reactor.callLater(0.1, self._reap, left, tries - 1)

    def executor_ended(self, executor: ExecutorProcess, slots: list[ExecutorSlot],
                       reason: Failure) -> None:
        if executor in self.executors:
            self.executors.remove(executor)
        if self.adopt_orphans:
            self._sweep_orphans()
        clients = []
        for slot in slots:
            if slot in self.idle:
                self.idle.remove(slot)
            if slot.client is not None:
                clients.append(slot.client)
            self.busy.discard(slot)
            slot.client = None
        if not self.stopping:
            status = reason.value
            signum = getattr(status, "signal", None)
            why = (
                f"killed by signal {signum} ({signal.Signals(signum).name})"
                if signum
                else f"exited with status {getattr(status, 'exitCode', '?')}"
            )
            if clients:
                self.died_count += len(clients)
                log.error("executor {pid} {why} while running {n} command(s)",
                          pid=executor.pid, why=why, n=len(clients))
                for client in clients:
                    client.executor_lost(f"the pyworker executor process {why}")
            elif slots:
                log.warn("idle executor {why}", why=why)
            if not executor.ready or self.reactor.seconds() - executor.started_at < 2.0:
                self._replenish_later()
            else:
                self._early_deaths = 0
                self._replenish()
        if self.stopping and not self.executors:
            waiters, self._all_ended = self._all_ended, []
            for d in waiters:
                d.callback(None)

    def stop(self, grace: float = 5.0) -> defer.Deferred[None]:
        """End every executor (closing their sockets ends their commands); fires when all
        ended."""
        self.stopping = True
        for call in (self._shrink_call, self._replenish_call):
            if call is not None and call.active():
                call.cancel()
        while self.waiting:
            client, _ = self.waiting.popleft()
            client.executor_lost("the worker is shutting down")
        if not self.executors:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._all_ended.append(d)
        for executor in list(self.executors):
            try:
                executor.close_socket()
                executor.transport.signalProcess("TERM")  # type: ignore[union-attr]
            except (error.ProcessExitedAlready, AttributeError):
                pass

        def kill_stragglers() -> None:
            for executor in list(self.executors):
                executor.kill()

        call = self.reactor.callLater(grace, kill_stragglers)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d
