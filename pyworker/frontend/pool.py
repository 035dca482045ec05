"""The executor pool: the front end's supervised set of executor processes.

Executors are started ahead of demand (``min_idle`` wait idle at all times, so a command never
pays for a Python start-up), the pool grows with concurrent commands up to ``max_size`` and
shrinks back when executors stay idle for ``idle_timeout`` seconds. A command that finds the
pool at its bound waits for the next free executor. An executor that dies is replaced, and the
command it ran is told (its session fails the step with a readable message).

Everything here runs in the reactor and never blocks: executors are Twisted child processes
whose pipes are read and written by the reactor.
"""

from __future__ import annotations

import fcntl
import os
import signal
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

#: Seconds an executor beyond ``min_idle`` may stay idle before it is ended. A new executor
#: costs about 0.1 s of one CPU to start, an idle one about 11 MiB for as long as it lives:
#: after a burst of 64 builds, 63 idle executors held 700 MiB for the minute the timeout
#: used to be. Ten seconds still keeps the pool across the gaps between the steps of a
#: build (the master starts the next step within milliseconds).
IDLE_TIMEOUT = 10.0

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


class _PipeReader(abstract.FileDescriptor):
    """Reads an executor's event pipe in large reads (Twisted's process pipes read 8 KiB)."""

    READ_SIZE = 1024 * 1024

    def __init__(self, reactor: Any, fd: int, on_data: Callable[[bytes], None]) -> None:
        super().__init__(reactor)
        self.fd = fd
        self.on_data = on_data
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:  # noqa: N802 - Twisted
        try:
            data = os.read(self.fd, self.READ_SIZE)
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
                data = os.read(self.fd, self.READ_SIZE)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self.on_data(data)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 - Twisted
        super().connectionLost(reason)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            self.stopReading()
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


class Executor(protocol.ProcessProtocol):
    """One executor process, seen from the front end.

    Its stdin (control frames) and stdout (event frames) are pipes the front end owns and
    reads in large chunks; Twisted only watches its stderr and its exit.
    """

    def __init__(self, pool: ExecutorPool) -> None:
        self.pool = pool
        self.decoder = frames.FrameDecoder()
        self.client: ExecutorClient | None = None
        self.alive = True
        self.started_at = 0.0
        self.idle_since = 0.0
        self._paused = False
        self._stderr_tail = b""
        self.reader: _PipeReader | None = None
        self.writer: _PipeWriter | None = None

    @property
    def pid(self) -> int | None:
        return self.transport.pid if self.transport is not None else None

    def attach_pipes(self, reactor: Any, control_fd: int, events_fd: int) -> None:
        self.writer = _PipeWriter(reactor, control_fd)
        self.reader = _PipeReader(reactor, events_fd, self._events_received)
        self.reader.startReading()

    def send(self, data: bytes) -> None:
        if self.alive and self.writer is not None and self.writer.fd >= 0:
            self.writer.write(data)

    def close_control(self) -> None:
        """Close the executor's stdin: it finishes (killing any command) and exits."""
        if self.writer is not None and self.writer.fd >= 0:
            self.writer.loseConnection()

    def pause(self) -> None:
        """Stop reading this executor's output: its writes block, and so does its command."""
        if not self._paused and self.alive and self.reader is not None:
            self._paused = True
            self.reader.stopReading()

    def resume(self) -> None:
        if self._paused and self.alive and self.reader is not None:
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
            self.kill()

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802 - Twisted
        # Only stderr is Twisted's: executors write there when something is badly wrong.
        text = (self._stderr_tail + data).decode("utf-8", "replace")
        lines = text.split("\n")
        self._stderr_tail = lines.pop().encode()
        for line in lines:
            log.info("executor {pid}: {line}", pid=self.pid, line=line)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted
        if self.reader is not None:
            self._paused = False
            self.reader.drain()  # frames written just before the exit (COMPLETE, ...)
            self.reader.close()
        if self.writer is not None and self.writer.fd >= 0:
            self.writer.connectionLost(Failure(error.ConnectionDone()))
        self.alive = False
        self.pool.executor_ended(self, reason)

    def kill(self) -> None:
        if self.alive and self.transport is not None:
            try:
                self.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass


class ExecutorPool:
    """Starts, hands out, takes back and supervises :class:`Executor` processes."""

    def __init__(
        self,
        reactor: Any,
        *,
        min_idle: int = 1,
        max_size: int = 64,
        idle_timeout: float = IDLE_TIMEOUT,
        executable: str = sys.executable,
        extra_env: dict[str, str] | None = None,
        adopt_orphans: bool = True,
    ) -> None:
        self.reactor = reactor
        self.min_idle = min_idle
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.executable = executable
        #: Given to executors only (e.g. ``PYWORKER_IO``), never to their commands.
        self.extra_env = dict(extra_env or {})
        #: Become the subreaper of the executors' commands and kill what a dead executor
        #: leaves behind. Off only in unit tests whose executors are fakes (the sweep kills
        #: every child of this process that is not an executor).
        self.adopt_orphans = adopt_orphans
        self.idle: list[Executor] = []
        self.busy: set[Executor] = set()
        self.waiting: deque[tuple[ExecutorClient, Callable[[Executor], None]]] = deque()
        self.stopping = False
        self._shrink_call: DelayedCall | None = None
        self._all_ended: list[defer.Deferred[None]] = []
        self.started_count = 0
        self.died_count = 0
        self._early_deaths = 0
        self._replenish_call: DelayedCall | None = None

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy)

    def start(self) -> None:
        # If an executor dies, its command's processes come back to us, to be swept.
        if self.adopt_orphans:
            prctl(PR_SET_CHILD_SUBREAPER, 1)
        self._replenish()

    def _spawn(self) -> Executor:
        executor = Executor(self)
        control_r, control_w = _pipe()
        events_r, events_w = _pipe()
        try:
            self.reactor.spawnProcess(
                executor,
                self.executable,
                [self.executable, "-c", _EXECUTOR_BOOT],
                env={**os.environ, **self.extra_env},
                childFDs={0: control_r, 1: events_w, 2: "r"},
            )
        except BaseException:
            for fd in (control_r, control_w, events_r, events_w):
                os.close(fd)
            raise
        os.close(control_r)
        os.close(events_w)
        executor.attach_pipes(self.reactor, control_w, events_r)
        self.started_count += 1
        executor.started_at = executor.idle_since = self.reactor.seconds()
        return executor

    def _replenish(self) -> None:
        if self._replenish_call is not None:
            return  # backing off after executors crashed at start-up
        while not self.stopping and len(self.idle) < self.min_idle and self.size < self.max_size:
            self.idle.append(self._spawn())

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

    def acquire(self, client: ExecutorClient, start: Callable[[Executor], None]) -> None:
        """Give ``client`` an executor: ``start(executor)`` runs now, or when one frees up."""
        if self.stopping:
            raise RuntimeError("the worker is shutting down")
        if self.idle:
            executor = self.idle.pop()
        elif self.size < self.max_size:
            executor = self._spawn()
        else:
            self.waiting.append((client, start))
            return
        self._hand_out(executor, client, start)
        self._replenish()

    def cancel_wait(self, client: ExecutorClient) -> bool:
        """Drop a client still waiting for an executor; True if it was waiting."""
        for item in self.waiting:
            if item[0] is client:
                self.waiting.remove(item)
                return True
        return False

    def _hand_out(
        self, executor: Executor, client: ExecutorClient, start: Callable[[Executor], None]
    ) -> None:
        executor.client = client
        self.busy.add(executor)
        start(executor)

    def release(self, executor: Executor) -> None:
        """A command finished: the executor is free for the next one."""
        executor.client = None
        executor.resume()
        self.busy.discard(executor)
        if not executor.alive:
            return
        if self.stopping:
            executor.close_control()
            return
        if self.waiting:
            client, start = self.waiting.popleft()
            self._hand_out(executor, client, start)
            return
        executor.idle_since = self.reactor.seconds()
        self.idle.append(executor)
        self._schedule_shrink()

    def _schedule_shrink(self) -> None:
        if self._shrink_call is None or not self._shrink_call.active():
            self._shrink_call = self.reactor.callLater(self.idle_timeout, self._shrink)

    def _shrink(self) -> None:
        self._shrink_call = None
        now = self.reactor.seconds()
        keep = []
        for i, executor in enumerate(sorted(self.idle, key=lambda e: e.idle_since, reverse=True)):
            if i < self.min_idle or now - executor.idle_since < self.idle_timeout:
                keep.append(executor)
            else:
                executor.close_control()
        self.idle = keep
        if len(self.idle) > self.min_idle:
            # Next when the oldest of those beyond min_idle has been idle the whole timeout,
            # not a whole timeout from now: a pool shrinks back within one timeout of its
            # last release, however the releases were spread.
            oldest = min(e.idle_since for e in keep[self.min_idle:])
            self._shrink_call = self.reactor.callLater(
                max(oldest + self.idle_timeout - now, 0.0), self._shrink)

    def _sweep_orphans(self) -> None:
        """Kill what a dead executor's command left running (re-parented to us) and reap it.

        The front end's own children are executors only; anything else came from a dead one.
        """
        import psutil

        executors = {e.pid for e in (*self.idle, *self.busy)}
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

    def executor_ended(self, executor: Executor, reason: Failure) -> None:
        if self.adopt_orphans:
            self._sweep_orphans()
        if executor in self.idle:
            self.idle.remove(executor)
        client = executor.client
        self.busy.discard(executor)
        executor.client = None
        if not self.stopping:
            status = reason.value
            signum = getattr(status, "signal", None)
            why = (
                f"killed by signal {signum} ({signal.Signals(signum).name})"
                if signum
                else f"exited with status {getattr(status, 'exitCode', '?')}"
            )
            if client is not None:
                self.died_count += 1
                log.error("executor {pid} {why} while running a command", pid=executor.pid,
                          why=why)
                client.executor_lost(f"the pyworker executor process {why}")
            else:
                log.warn("idle executor {why}", why=why)
            if self.reactor.seconds() - executor.started_at < 2.0:
                self._replenish_later()
            else:
                self._early_deaths = 0
                self._replenish()
        if self.stopping and self.size == 0:
            waiters, self._all_ended = self._all_ended, []
            for d in waiters:
                d.callback(None)

    def stop(self, grace: float = 5.0) -> defer.Deferred[None]:
        """End every executor (closing their stdin ends their commands); fires when all ended."""
        self.stopping = True
        for call in (self._shrink_call, self._replenish_call):
            if call is not None and call.active():
                call.cancel()
        while self.waiting:
            client, _ = self.waiting.popleft()
            client.executor_lost("the worker is shutting down")
        if self.size == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._all_ended.append(d)
        for executor in list(self.idle) + list(self.busy):
            try:
                executor.close_control()
                executor.transport.signalProcess("TERM")  # type: ignore[union-attr]
            except (error.ProcessExitedAlready, AttributeError):
                pass

        def kill_stragglers() -> None:
            for executor in list(self.idle) + list(self.busy):
                executor.kill()

        call = self.reactor.callLater(grace, kill_stragglers)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d
