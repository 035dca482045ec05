"""A small Buildbot master for benchmarks: just enough of the master's PB side to drive a worker.

``pyworker bench`` needs no Buildbot installation: this module plays the master's part of
the protocol (PROTOCOL.md sections 1-4 and 6) on a loopback port, so that a real worker
process (pyworker, or any ``buildbot-worker`` compatible executable) can be driven end to
end and every byte it sends can be counted and checked.

What it does, in the master's order (PROTOCOL.md section 2.8):

* a PB server on ``127.0.0.1:<random port>`` with a newcred portal; the checker knows the
  configured worker names and passwords (username/hashed-password, as the real master);
* at login, before ``respond`` returns, it calls the worker's Bot (the mind):
  ``print(message='attached')``, ``getWorkerInfo()``, ``setBuilderList([(name, dir), ...])``
  and one ``print(message='attached')`` per builder;
* the avatar answers ``perspective_keepalive`` and ``perspective_shutdown``;
* :meth:`EmbeddedMaster.run_command` sends ``startCommand`` with a
  :class:`CommandReceiver` (the master's ``RemoteCommand``): ``remote_update`` counts and
  checksums (CRC-32) the text of every stream after splitting it into whole lines with the
  master's own line splitter, records ``rc``/``elapsed``/other keys and returns 0;
  ``remote_complete`` ends the command;
* :class:`FileWriter` (``write``, ``close``, ``utime``, ``unpack`` extracting with
  ``tarfile`` and ``filter='data'``) and :class:`FileReader` (``read(n)``, ``close``) are
  the transfer objects passed inside ``args``, like the master's ``remotetransfer`` ones;
* :meth:`EmbeddedMaster.shutdown_worker` calls the Bot's ``shutdown``.

Everything runs in the Twisted reactor. The master's own cost per byte is one regular
expression pass (the master's line splitter), one CRC-32 and, for uploads, one file write:
``pyworker bench`` reports the CPU this process spends next to the worker's.
"""

from __future__ import annotations

import os
import re
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any

from twisted.cred import checkers, portal
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory
from twisted.python.failure import Failure
from twisted.spread import banana, pb
from zope.interface import implementer

#: Keys whose values are log text (the master re-splits them into lines).
TEXT_KEYS = ("stdout", "stderr", "header")


class LineSplitter:
    """The master's ``LineBoundaryFinder`` (buildbot 4.3.0 ``util/lineboundaries.py``).

    ``append`` returns the whole lines now complete (or ``None``); ``flush`` the rest. The
    output is the master's; only the regular expression is skipped when it cannot match.
    """

    MAX_LINELENGTH = 4096
    newline_re = re.compile(r"(\r\n|\r(?=.)|\033\[u|\033\[[0-9]+;[0-9]+[Hf]|\033\[2J|\x08+)")

    __slots__ = ("partial",)

    def __init__(self) -> None:
        self.partial: str | None = None

    def append(self, text: str) -> str | None:
        if self.partial:
            if len(self.partial) > self.MAX_LINELENGTH:
                self.partial, text = text, self.partial
                pieces = []
                while len(text) > self.MAX_LINELENGTH:
                    pieces.append(text[: self.MAX_LINELENGTH])
                    text = text[self.MAX_LINELENGTH :]
                pieces.append(text)
                return "\n".join(pieces) + "\n"
            text = self.partial + text
            self.partial = None
        # Same result as the master's unconditional ``sub``, without the regex pass over text
        # that holds none of the characters the pattern can start with (the common case).
        if "\r" in text or "\x1b" in text or "\x08" in text:
            text = self.newline_re.sub("\n", text)
        if not text:
            return None
        if text[-1] != "\n":
            i = text.rfind("\n")
            if i < 0:
                self.partial = text
                return None
            self.partial = text[i + 1 :]
            text = text[: i + 1]
        return text

    def flush(self) -> str | None:
        if self.partial is not None:
            return self.append("\n")
        return None


@dataclass
class StreamStats:
    """What the master stored for one log stream: characters, lines and a CRC-32 of the text
    (UTF-8), optionally the text itself."""

    chars: int = 0
    lines: int = 0
    crc: int = 0
    keep: bool = False
    text: list[str] = field(default_factory=list)

    def add(self, whole_lines: str) -> None:
        self.chars += len(whole_lines)
        self.lines += whole_lines.count("\n")
        self.crc = zlib.crc32(whole_lines.encode("utf-8", "surrogatepass"), self.crc)
        if self.keep:
            self.text.append(whole_lines)


@dataclass
class CommandResult:
    """Everything the master learnt about one command."""

    command: str
    streams: dict[str, StreamStats]
    rc: int | None
    rc_count: int
    elapsed: float | None
    other: dict[str, list[Any]]
    failure: str | None
    updates: int
    update_calls: int
    started: float
    finished: float

    @property
    def wall(self) -> float:
        return self.finished - self.started

    def stream(self, key: str) -> StreamStats:
        return self.streams.get(key) or StreamStats()


class CommandReceiver(pb.Referenceable):
    """The master's ``RemoteCommand`` as the worker sees it: ``update`` and ``complete``."""

    def __init__(self, command: str, keep_text: tuple[str, ...] = ("header", "stderr")) -> None:
        self.command = command
        self.keep_text = keep_text
        self.splitters: dict[str, LineSplitter] = {}
        self.streams: dict[str, StreamStats] = {}
        self.rc: int | None = None
        self.rc_count = 0
        self.elapsed: float | None = None
        self.other: dict[str, list[Any]] = {}
        self.updates = 0
        self.update_calls = 0
        self.protocol_errors: list[str] = []
        self.started = reactor.seconds()
        self.done: defer.Deferred[CommandResult] = defer.Deferred()
        self.finished = False

    def _stats(self, key: str) -> StreamStats:
        stats = self.streams.get(key)
        if stats is None:
            stats = self.streams[key] = StreamStats(keep=key in self.keep_text)
        return stats

    def _text(self, key: str, text: Any) -> None:
        if not isinstance(text, str):
            self.protocol_errors.append(f"{key} update carries {type(text).__name__}, not str")
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        splitter = self.splitters.get(key)
        if splitter is None:
            splitter = self.splitters[key] = LineSplitter()
        whole = splitter.append(text)
        if whole is not None:
            self._stats(key).add(whole)

    def remote_update(self, updates: list[Any]) -> int:
        self.update_calls += 1
        if self.finished:
            self.protocol_errors.append("update after complete")
            return 0
        for element in updates:
            if not isinstance(element, list | tuple) or len(element) != 2:
                self.protocol_errors.append(f"update element is not [dict, 0]: {element!r:.80}")
                continue
            update = element[0]
            self.updates += 1
            for key, value in update.items():
                if isinstance(key, bytes):
                    key = key.decode()
                if key in TEXT_KEYS:
                    self._text(key, value)
                elif key == "log":
                    logname, text = value
                    self._text("log:" + str(logname), text)
                elif key == "rc":
                    self.rc = value
                    self.rc_count += 1
                elif key == "elapsed":
                    self.elapsed = value
                else:
                    self.other.setdefault(key, []).append(value)
        return 0

    def remote_complete(self, failure: Any = None) -> None:
        if self.finished:
            self.protocol_errors.append("complete called twice")
            return
        self.finished = True
        for key, splitter in self.splitters.items():
            rest = splitter.flush()
            if rest is not None:
                self._stats(key).add(rest)
        failure_text = None
        if failure is not None:
            failure_text = str(getattr(failure, "value", None) or failure)
            tb = getattr(failure, "traceback", None)
            if isinstance(tb, str):
                failure_text += "\n" + tb
        result = CommandResult(
            command=self.command,
            streams=self.streams,
            rc=self.rc,
            rc_count=self.rc_count,
            elapsed=self.elapsed,
            other=self.other,
            failure=failure_text,
            updates=self.updates,
            update_calls=self.update_calls,
            started=self.started,
            finished=reactor.seconds(),
        )
        if self.protocol_errors:
            result.other["protocol_errors"] = self.protocol_errors
        reactor.callLater(0, self.done.callback, result)

    def fail(self, reason: str) -> None:
        """The command could not even start, or the connection went away."""
        if not self.finished:
            self.finished = True
            self.done.errback(Failure(RuntimeError(reason)))


class FileWriter(pb.Referenceable):
    """The master's ``FileWriter``/``DirectoryWriter``: a temporary file, renamed on close.

    Counts bytes and write calls and keeps a CRC-32 of everything received. With
    ``unpack_to`` set it is a directory writer: ``unpack`` extracts the archive there with
    ``tarfile`` and the ``data`` filter (``compress`` as the master's ``'gz'``/``'bz2'``/None).
    """

    def __init__(
        self, destfile: str, *, unpack_to: str | None = None, compress: str | None = None
    ) -> None:
        self.destfile = os.path.abspath(destfile)
        os.makedirs(os.path.dirname(self.destfile), exist_ok=True)
        fd, self.tmpname = tempfile.mkstemp(
            dir=os.path.dirname(self.destfile), prefix="buildbot-transfer-"
        )
        self.fp: Any = os.fdopen(fd, "wb")
        self.unpack_to = unpack_to
        self.compress = compress
        self.bytes = 0
        self.writes = 0
        self.crc = 0
        self.closed = False
        self.unpacked = False
        self.utime_args: Any = None
        self.errors: list[str] = []

    def remote_write(self, data: Any) -> None:
        if self.fp is None:
            self.errors.append("write after close")
            raise RuntimeError("write after close")
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.fp.write(data)
        self.bytes += len(data)
        self.writes += 1
        self.crc = zlib.crc32(data, self.crc)

    def remote_close(self) -> None:
        if self.fp is None:
            return
        self.fp.close()
        self.fp = None
        os.replace(self.tmpname, self.destfile)
        self.closed = True

    def remote_utime(self, accessed_modified: Any) -> None:
        self.utime_args = accessed_modified
        os.utime(self.destfile, tuple(accessed_modified))

    def remote_unpack(self) -> None:
        if self.unpack_to is None:
            raise RuntimeError("unpack called on a file writer")
        self.remote_close()
        mode = {"bz2": "r|bz2", "gz": "r|gz"}.get(self.compress or "", "r")
        with tarfile.open(name=self.destfile, mode=mode) as archive:  # type: ignore[call-overload]
            archive.extractall(path=self.unpack_to, filter="data")
        os.remove(self.destfile)
        self.unpacked = True

    def cancel(self) -> None:
        if self.fp is not None:
            self.fp.close()
            self.fp = None
        if os.path.exists(self.tmpname):
            os.unlink(self.tmpname)


class FileReader(pb.Referenceable):
    """The master's ``FileReader``: ``read(n)`` returns the next ``n`` bytes (``b''`` at EOF)."""

    def __init__(self, path: str) -> None:
        self.fp: Any = open(path, "rb")
        self.bytes = 0
        self.reads = 0

    def remote_read(self, maxlength: int) -> bytes | str:
        if self.fp is None:
            return ""
        self.reads += 1
        data: bytes = self.fp.read(maxlength)
        self.bytes += len(data)
        return data

    def remote_close(self) -> None:
        if self.fp is not None:
            self.fp.close()
            self.fp = None


class FastBroker(pb.Broker):
    """``pb.Broker`` with a Banana decoder that does not copy its buffer once per item.

    Twisted's ``Banana.dataReceived`` re-slices the whole remaining buffer for every item it
    decodes and re-joins it for every chunk read while a long string is incomplete: decoding
    one 512 KiB ``update`` costs several megabytes of copies, enough to make the master the
    bottleneck of a streaming benchmark. This decoder walks the buffer with an offset, slices
    only the strings it hands on, and collects the chunks of an incomplete string until it is
    whole. Same items, same errors, same limits.
    """

    _chunks: list[bytes]
    _have = 0
    _need = 0

    def dataReceived(self, chunk: bytes) -> None:
        if self._need:
            self._chunks.append(chunk)
            self._have += len(chunk)
            if self._have < self._need:
                return
            buf = b"".join(self._chunks)
            self._chunks, self._need = [], 0
        else:
            buf = self.buffer + chunk if self.buffer else chunk
        self.buffer = b""
        n = len(buf)
        pos = 0
        stack = self.listStack
        got = self.gotItem
        limit = self.prefixLimit
        if limit is None:  # set by connectionMade, which Twisted calls before any data
            raise banana.BananaError("data received before the connection was made")
        while pos < n:
            start = pos
            while pos < n and buf[pos] < 0x80:
                pos += 1
            if pos - start > limit:
                raise banana.BananaError(
                    f"Security precaution: more than {limit} bytes of prefix"
                )
            if pos == n:
                self.buffer = buf[start:]
                return
            num = banana.b1282int(buf[start:pos])
            kind = buf[pos]
            pos += 1
            if kind == 0x82:  # STRING
                if num > banana.SIZE_LIMIT:
                    raise banana.BananaError("Security precaution: String too long.")
                if n - pos < num:
                    rest = buf[start:]
                    self._chunks, self._have = [rest], len(rest)
                    self._need = pos - start + num
                    return
                got(buf[pos : pos + num])
                pos += num
            elif kind == 0x80:  # LIST
                if num > banana.SIZE_LIMIT:
                    raise banana.BananaError("Security precaution: List too long.")
                stack.append((num, []))
            elif kind in (0x81, 0x85):  # INT, LONGINT
                got(num)
            elif kind in (0x83, 0x86):  # NEG, LONGNEG
                got(-num)
            elif kind == 0x87:  # VOCAB
                item = self.incomingVocabulary[num]
                if self.currentDialect != b"pb":
                    raise NotImplementedError(f"Invalid item for pb protocol {item!r}")
                got(item)
            elif kind == 0x84:  # FLOAT
                if n - pos < 8:
                    self.buffer = buf[start:]
                    return
                got(struct.unpack("!d", buf[pos : pos + 8])[0])
                pos += 8
            else:
                raise NotImplementedError(f"Invalid Type Byte {bytes([kind])!r}")
            while stack and len(stack[-1][1]) == stack[-1][0]:
                got(stack.pop()[1])


class WorkerConnection(pb.Avatar):
    """The master-side avatar of one connected worker (``keepalive``, ``shutdown``)."""

    def __init__(self, master: EmbeddedMaster, name: str, bot: pb.RemoteReference) -> None:
        self.master = master
        self.name = name
        self.bot = bot
        self.info: dict[str, Any] = {}
        self.builders: dict[str, pb.RemoteReference] = {}
        self.keepalives = 0
        self.shutdown_requested = False
        self.connected = True
        self.detached: defer.Deferred[None] = defer.Deferred()

    def perspective_keepalive(self) -> None:
        self.keepalives += 1

    def perspective_shutdown(self) -> None:
        self.shutdown_requested = True

    def logout(self) -> None:
        self.connected = False
        if self.master.workers.get(self.name) is self:
            del self.master.workers[self.name]
        if not self.detached.called:
            self.detached.callback(None)


@implementer(portal.IRealm)
class _Realm:
    def __init__(self, master: EmbeddedMaster) -> None:
        self.master = master

    @defer.inlineCallbacks
    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        assert pb.IPerspective in interfaces
        name = avatar_id.decode() if isinstance(avatar_id, bytes) else str(avatar_id)
        conn = WorkerConnection(self.master, name, mind)
        # The master's attach sequence, all before ``respond`` returns (PROTOCOL.md 2.8).
        yield mind.callRemote("print", message="attached")
        conn.info = yield mind.callRemote("getWorkerInfo")
        wanted = [(b, b) for b in self.master.builders]
        conn.builders = yield mind.callRemote("setBuilderList", wanted)
        for _ in wanted:
            yield mind.callRemote("print", message="attached")
        self.master.workers[name] = conn
        waiter = self.master._waiters.pop(name, None)
        if waiter is not None:
            waiter.callback(conn)
        return (pb.IPerspective, conn, conn.logout)


class EmbeddedMaster:
    """A loopback PB master for the given workers (name → password) and builder names.

    Use from the reactor thread: ``start()``, ``wait_for_worker(name)``,
    ``run_command(name, builder, command, args)``, ``shutdown_worker(name)``, ``stop()``.
    """

    def __init__(self, workers: dict[str, str], builders: list[str]) -> None:
        self.passwords = workers
        self.builders = list(builders)
        self.workers: dict[str, WorkerConnection] = {}
        self._waiters: dict[str, defer.Deferred[WorkerConnection]] = {}
        self._next_id = 1
        self.port: IListeningPort | None = None

    def start(self) -> int:
        """Listen on a random loopback port and return it."""
        checker = checkers.InMemoryUsernamePasswordDatabaseDontUse(
            **{name: pw.encode() for name, pw in self.passwords.items()}
        )
        p = portal.Portal(_Realm(self), [checker])
        # ServerFactory is invariant in its protocol: listenTCP's plain ServerFactory does not
        # accept the ServerFactory[Broker] it is, unless widened to Any.
        factory: ServerFactory[Any] = pb.PBServerFactory(p)
        factory.protocol = FastBroker
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        host = self.port.getHost()
        assert isinstance(host, IPv4Address)
        return host.port

    def stop(self) -> defer.Deferred[Any]:
        if self.port is None:
            return defer.succeed(None)
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening)

    def wait_for_worker(self, name: str) -> defer.Deferred[WorkerConnection]:
        """Fires with the connection once ``name`` has attached (at once if it is already)."""
        if name in self.workers:
            return defer.succeed(self.workers[name])
        d = self._waiters.get(name)
        if d is None:
            d = self._waiters[name] = defer.Deferred()
        # Every caller gets its own Deferred chained on the shared one.
        mine: defer.Deferred[WorkerConnection] = defer.Deferred()

        def relay(conn: WorkerConnection) -> WorkerConnection:
            mine.callback(conn)
            return conn

        d.addCallback(relay)
        return mine

    def run_command(
        self,
        worker: str,
        builder: str,
        command: str,
        args: dict[str, Any],
        *,
        keep_text: tuple[str, ...] = ("header", "stderr"),
        interrupt_after: float | None = None,
    ) -> defer.Deferred[CommandResult]:
        """``startCommand`` on the builder; fires with the :class:`CommandResult` at
        ``complete`` (errback if the worker refuses the command or disconnects).
        ``interrupt_after``: send ``interruptCommand`` that many seconds after the start."""
        conn = self.workers.get(worker)
        receiver = CommandReceiver(command, keep_text)
        if conn is None:
            receiver.fail(f"worker {worker!r} is not connected")
            return receiver.done
        wfb = conn.builders[builder]
        command_id = str(self._next_id)
        self._next_id += 1

        def lost(*_: Any) -> None:
            receiver.fail(f"worker {worker!r} disconnected during {command}")

        conn.detached.addCallback(lambda _: lost())
        d = wfb.callRemote("startCommand", receiver, command_id, command, args)
        d.addErrback(lambda f: receiver.fail(f"startCommand {command} refused: {f.value}"))
        if interrupt_after is not None:
            def interrupt() -> None:
                if not receiver.done.called:
                    wfb.callRemote("interruptCommand", command_id, "bench").addErrback(
                        lambda _: None)

            call = reactor.callLater(interrupt_after, interrupt)

            def cancel(result: Any) -> Any:
                if call.active():
                    call.cancel()
                return result

            receiver.done.addBoth(cancel)
        return receiver.done

    def shutdown_worker(self, worker: str) -> defer.Deferred[Any]:
        """Call the Bot's ``shutdown`` (the worker exits; the call may or may not return)."""
        conn = self.workers.get(worker)
        if conn is None:
            return defer.succeed(None)
        d: defer.Deferred[Any] = conn.bot.callRemote("shutdown")
        d.addErrback(lambda _: None)
        return d
