"""Drives a real executor process over its pipes, as the front end does, for tests."""

from __future__ import annotations

import marshal
import os
import select
import socket
import subprocess
import sys
import time
from typing import Any

import pyworker
from pyworker import frames as wire

#: Where this test process imported pyworker from (the installed package in CI): the
#: executor must run the same code.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(pyworker.__file__)))


class ExecutorDriver:
    """A real ``pyworker.executor`` child; send it commands and collect what it reports."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        environ = dict(os.environ if env is None else env)
        environ["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + environ.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            # -P: `-m` would put the cwd first on sys.path, so from the repo root the executor
            # ran the source tree (no compiled C core) instead of PACKAGE_PARENT's package
            [sys.executable, "-P", "-m", "pyworker.executor"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=environ,
        )
        self.decoder = wire.FrameDecoder()
        self.env = environ
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.control_fd = self.proc.stdin.fileno()
        self.events_fd = self.proc.stdout.fileno()

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.control_fd, view):]

    def start(
        self, name: str, args: dict[str, Any], basedir: str = "/tmp",
        io: dict[str, Any] | None = None,
    ) -> None:
        request = {"name": name, "args": args, "command_id": "1", "basedir": basedir,
                   "io": io or {}}
        self.send(wire.frame(wire.START, marshal.dumps(request)))

    def interrupt(self, why: str = "test") -> None:
        self.send(wire.value_frame(wire.INTERRUPT, why))

    def frames(self, timeout: float = 30.0):  # type: ignore[no-untyped-def]
        """Yield ``(kind, channel, payload)`` until ``COMPLETE`` (inclusive)."""
        fd = self.events_fd
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("executor did not complete in time")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            data = os.read(fd, 1 << 20)
            if not data:
                raise EOFError("executor exited")
            for item in self.decoder.feed(data):
                yield item
                if item[0] == wire.COMPLETE:
                    return

    def run(self, name: str, args: dict[str, Any], timeout: float = 30.0, **kw: Any) -> Result:
        self.start(name, args, **kw)
        return Result(list(self.frames(timeout)))

    def open_fds(self) -> list[str]:
        """What the executor process has open (``/proc/<pid>/fd`` link targets, sorted)."""
        base = f"/proc/{self.proc.pid}/fd"
        found = []
        for entry in os.listdir(base):
            try:
                found.append(os.readlink(f"{base}/{entry}"))
            except FileNotFoundError:
                pass  # closed while we listed
        return sorted(found)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


class SlottedExecutor:
    """A real executor in the mode the front end uses: its stdin is a unix socket, and each
    :meth:`slot` sends it a pipe pair (``SCM_RIGHTS``) that one of its threads serves."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        environ = dict(os.environ if env is None else env)
        environ["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + environ.get("PYTHONPATH", "")
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "pyworker.executor"],
                                     stdin=theirs.fileno(), env=environ)
        theirs.close()
        self.sock.settimeout(30)
        assert self.sock.recv(16) == b"R", "the executor did not say it was ready"
        self.slots: list[SlotDriver] = []

    def slot(self) -> SlotDriver:
        control_r, control_w = os.pipe2(os.O_CLOEXEC)
        events_r, events_w = os.pipe2(os.O_CLOEXEC)
        socket.send_fds(self.sock, [b"S"], [control_r, events_w])
        os.close(control_r)
        os.close(events_w)
        slot = SlotDriver(self.proc, control_w, events_r)
        self.slots.append(slot)
        return slot

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for slot in self.slots:
            slot.close()


class SlotDriver(ExecutorDriver):
    """One slot of a :class:`SlottedExecutor`: the same calls as an :class:`ExecutorDriver`."""

    def __init__(self, proc: subprocess.Popen[bytes], control_fd: int, events_fd: int) -> None:
        self.proc = proc
        self.control_fd = control_fd
        self.events_fd = events_fd
        self.decoder = wire.FrameDecoder()

    def close(self) -> None:
        """Close the slot: its thread ends (killing a command it runs)."""
        for name in ("control_fd", "events_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class Result:
    """The updates of one command, in order, as ``(key, value)`` pairs."""

    def __init__(self, frames: list[tuple[int, int, bytes]]) -> None:
        #: the size of each text frame's payload (``TEXT`` and ``LOG``)
        self.text_frame_sizes = [len(p) for k, _, p in frames if k in (wire.TEXT, wire.LOG)]
        self.updates: list[tuple[str, Any]] = []
        self.failure: str | None = None
        self.usage: dict[str, Any] = {}
        for kind, channel, payload in frames:
            if kind == wire.TEXT:
                self.updates.append((wire.TEXT_CHANNELS[channel], payload.decode()))
            elif kind == wire.UPDATE:
                self.updates.extend(marshal.loads(payload))
            elif kind == wire.LOG:
                logname, data = marshal.loads(payload)
                self.updates.append(("log", (logname, data.decode())))
            elif kind == wire.COMPLETE:
                self.failure = marshal.loads(payload)
            elif kind == wire.USAGE:
                self.usage = marshal.loads(payload)

    def text(self, key: str) -> str:
        return "".join(v for k, v in self.updates if k == key)

    def values(self, key: str) -> list[Any]:
        return [v for k, v in self.updates if k == key]

    @property
    def rc(self) -> Any:
        rcs = self.values("rc")
        assert len(rcs) <= 1, rcs
        return rcs[0] if rcs else None

    def keys(self) -> list[str]:
        return [k for k, _ in self.updates]


class FakeMaster:
    """The master's side of a transfer as the front end relays it (``pyworker.frontend.session``).

    ``data`` is what the master's reader returns; ``fail_read_after``: the reader fails
    (``RESULT (False, ...)``) once that many bytes were read; ``fail_write_after``: the
    writer fails once that many bytes were written; ``failing_calls``: methods (``close``,
    ``utime``, ``unpack``) that fail; ``interrupt_after``: an ``INTERRUPT`` is sent once that
    many ``WRITE``/``READ`` frames were answered.
    """

    def __init__(self, data: bytes = b"", *, fail_read_after: int | None = None,
                 fail_write_after: int | None = None, failing_calls: tuple[str, ...] = (),
                 interrupt_after: int | None = None) -> None:
        self.data = data
        self.read_pos = 0
        self.fail_read_after = fail_read_after
        self.fail_write_after = fail_write_after
        self.failing_calls = failing_calls
        self.interrupt_after = interrupt_after
        self.written = bytearray()
        self.calls: list[tuple[str, str, tuple[Any, ...]]] = []
        self.blocks = 0

    def answer(self, item: tuple[int, int, bytes]) -> list[bytes | None]:
        """The frames to send back for ``item`` (None: send ``INTERRUPT`` first)."""
        kind, _, payload = item
        replies: list[bytes | None] = []
        if kind == wire.CALL:
            target, method, args = marshal.loads(payload)
            self.calls.append((target, method, tuple(args)))
            if method in self.failing_calls:
                replies.append(wire.value_frame(wire.RESULT, (False, f"{method} failed")))
            else:
                replies.append(wire.value_frame(wire.RESULT, (True, None)))
        elif kind == wire.WRITE:
            self.blocks += 1
            if self.fail_write_after is not None and len(self.written) >= self.fail_write_after:
                replies.append(wire.value_frame(wire.ACK, (len(payload), "write failed")))
            else:
                self.written += payload
                replies.append(wire.value_frame(wire.ACK, (len(payload), None)))
        elif kind == wire.READ:
            self.blocks += 1
            n = marshal.loads(payload)
            if self.fail_read_after is not None and self.read_pos >= self.fail_read_after:
                replies.append(wire.value_frame(wire.RESULT, (False, "read failed")))
            else:
                block = self.data[self.read_pos:self.read_pos + n]
                self.read_pos += len(block)
                replies.append(wire.frame(wire.DATA, block))
        else:
            return replies
        if self.interrupt_after is not None and self.blocks == self.interrupt_after:
            replies.insert(0, None)
        return replies
