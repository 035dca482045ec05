"""A minimal pipelining worker: what a real Buildbot 4.3.0 master allows for file transfers.

The baseline of ``bench_transfer.py`` (issue 14 item 5): the least a worker can do to move a
file through the master's ``FileWriter``/``FileReader`` objects over PB, with a window of
:data:`WINDOW` calls of :data:`CHUNK` bytes in flight (PROTOCOL.md §6: PB delivers calls in
order and the master serves each ``write``/``read`` in order, so a window is safe):

* ``uploadFile``: ``os.read`` the file, keep 4 ``writer.write(512 KiB)`` in flight, then
  ``close`` (and ``utime`` for ``keepstamp``);
* ``uploadDirectory`` (``compress=None`` only): ``tarfile`` in stream mode ``'w|'`` in a
  thread, its 512 KiB blocks written the same way, then ``unpack``;
* ``downloadFile``: keep 4 ``reader.read(512 KiB)`` in flight, ``os.write`` each reply in
  order, ``close`` the reader at EOF.

Nothing else: no shell, no other command, no reconnection (a lost connection ends the
process), no application keepalives (the 4.3.0 master never asks for them, PROTOCOL.md
§1.6), one update message with ``rc`` and ``elapsed`` per command. It is not a worker to
run builds on, only the yardstick pyworker's transfer paths are measured against.

It runs with the master venv's Python (Twisted comes with it) and takes the command line
the benchmark harness (``tests/realmaster.py``) gives every worker::

    python minimal_worker.py create-worker -q BASEDIR HOST:PORT NAME PASSWORD
    python minimal_worker.py start --nodaemon BASEDIR      # logs to BASEDIR/twistd.log

``create-worker`` writes ``BASEDIR/minimal_worker.json``; ``start`` reads it.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import tarfile
import threading
import time
from typing import Any

from twisted.cred import credentials
from twisted.internet import defer, reactor, threads
from twisted.python import failure, log
from twisted.spread import pb

CHUNK = 512 * 1024  # under Banana's 640 KiB limit on one string
WINDOW = 4  # calls in flight per transfer
CONFIG = "minimal_worker.json"
VERSION = "4.3.0"
COMMANDS = {"uploadFile": "3.3", "uploadDirectory": "3.3", "downloadFile": "3.3"}


class Transfer:
    """One transfer command: a window of calls on the master's writer/reader, then rc."""

    def __init__(self, command_ref: Any, path: str, args: dict[str, Any]) -> None:
        self.command_ref = command_ref
        self.path = path
        self.args = args
        self.maxsize: int | None = args.get("maxsize")
        self.moved = 0  # bytes sent or asked for
        self.inflight = 0
        self.done = False  # no more calls to issue (EOF, limit, error or interrupt)
        self.rc = 0
        self.stderr = ""
        self.failure: failure.Failure | None = None
        self.started = time.monotonic()
        self.finished = defer.Deferred()  # fires once, when the window has drained

    # ---- what the commands share ---------------------------------------------------------

    def next_size(self) -> int:
        """Bytes for the next call; 0 (and rc 1) once ``maxsize`` is reached."""
        if self.maxsize is None:
            return CHUNK
        n = min(CHUNK, self.maxsize - self.moved)
        if n <= 0:
            self.stop(f"Maximum filesize reached, truncating file '{self.path}'")
        return max(n, 0)

    def stop(self, stderr: str = "") -> None:
        self.done = True
        if stderr and not self.stderr:
            self.stderr = stderr
            self.rc = 1

    def interrupt(self) -> None:
        self.done = True
        self.rc = 1

    def call_failed(self, f: failure.Failure) -> None:
        self.inflight -= 1
        if self.failure is None:
            self.failure = f
        self.done = True
        self.rc = 1
        self.pump()

    def pump(self) -> None:
        while not self.done and self.inflight < WINDOW and self.issue():
            pass
        if self.done and self.inflight == 0 and not self.finished.called:
            self.finished.callback(None)

    def issue(self) -> bool:
        """Start one more call (or stop); False: nothing to send yet, pump() comes again."""
        raise NotImplementedError

    def update(self, updates: list[dict[str, Any]]) -> defer.Deferred[Any]:
        return self.command_ref.callRemote("update", [[u, 0] for u in updates])

    @defer.inlineCallbacks
    def complete(self) -> Any:
        updates: list[dict[str, Any]] = []
        if self.stderr:
            updates.append({"stderr": self.stderr + "\n"})
        updates += [{"rc": self.rc}, {"elapsed": time.monotonic() - self.started}]
        yield self.update(updates)
        yield self.command_ref.callRemote("complete", self.failure)


class UploadFile(Transfer):
    """``uploadFile``: ``os.read`` blocks and keep ``WINDOW`` writes in flight."""

    def __init__(self, command_ref: Any, path: str, args: dict[str, Any]) -> None:
        super().__init__(command_ref, path, args)
        self.writer = args["writer"]
        self.fd = -1

    @defer.inlineCallbacks
    def run(self) -> Any:
        stamp = None
        try:
            if self.args.get("keepstamp"):
                st = os.stat(self.path)
                stamp = (st.st_atime, st.st_mtime)
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            self.stop(f"Cannot open file '{self.path}' for upload")
        yield self.update([{"header": f"sending {self.path}\n"}])
        self.pump()
        yield self.finished
        if self.fd >= 0:
            os.close(self.fd)
        try:
            yield self.writer.callRemote("close")
            if stamp is not None and self.failure is None:
                yield self.writer.callRemote("utime", stamp)
        except Exception:
            if self.failure is None:
                self.failure = failure.Failure()
                self.rc = 1
        yield self.complete()

    def issue(self) -> bool:
        n = self.next_size()
        if n == 0:
            return True
        data = os.read(self.fd, n)
        if not data:
            self.stop()
            return True
        self.moved += len(data)
        self.inflight += 1
        self.writer.callRemote("write", data).addCallbacks(self.written, self.call_failed)
        return True

    def written(self, _: object) -> None:
        self.inflight -= 1
        self.pump()


class UploadDirectory(UploadFile):
    """``uploadDirectory`` without compression: a ``'w|'`` tar stream made in a thread."""

    def __init__(self, command_ref: Any, path: str, args: dict[str, Any]) -> None:
        super().__init__(command_ref, path, args)
        self.blocks: queue.Queue[bytes | BaseException | None] = queue.Queue(WINDOW * 2)
        self.waiting = False  # a pool thread waits for the tar thread's next block
        self.abandoned = threading.Event()  # tells the tar thread to give up

    @defer.inlineCallbacks
    def run(self) -> Any:
        if self.args.get("compress") is not None or not os.path.isdir(self.path):
            why = "compression" if self.args.get("compress") else "not a directory"
            self.stop(f"Cannot read directory '{self.path}' for upload: {why}")
            yield self.complete()
            return
        threading.Thread(target=self.make_tar, daemon=True).start()
        yield self.update([{"header": f"sending {self.path}\n"}])
        self.pump()
        yield self.finished
        self.abandoned.set()
        if self.failure is None and not self.rc:
            try:
                yield self.writer.callRemote("unpack")
            except Exception:
                self.failure = failure.Failure()
                self.rc = 1
        yield self.complete()

    def make_tar(self) -> None:
        """The tar thread: the archive in CHUNK-sized blocks, then None (or the error)."""
        blocks, abandoned = self.blocks, self.abandoned

        def put(item: bytes | BaseException | None) -> None:
            while not abandoned.is_set():
                try:
                    blocks.put(item, timeout=0.5)
                    return
                except queue.Full:
                    pass
            raise EOFError("transfer abandoned")

        class Sink:
            def write(self, data: bytes) -> int:
                put(bytes(data))
                return len(data)

        try:
            with tarfile.open(fileobj=Sink(), mode="w|", bufsize=CHUNK) as tar:  # type: ignore[call-overload]
                tar.add(self.path, arcname="")
            put(None)
        except Exception as e:
            if not abandoned.is_set():
                put(e)

    def issue(self) -> bool:
        if self.waiting:  # the pool thread takes the next block: blocks must keep their order
            return False
        try:
            block = self.blocks.get_nowait()
        except queue.Empty:
            self.waiting = True
            threads.deferToThread(self.blocks.get).addCallback(self.got_block)
            return False
        self.send(block)
        return True

    def got_block(self, block: bytes | BaseException | None) -> None:
        self.waiting = False
        self.send(block)
        self.pump()

    def send(self, block: bytes | BaseException | None) -> None:
        if block is None:
            self.stop()
        elif isinstance(block, BaseException):
            self.stop(f"Cannot read directory '{self.path}' for upload: {block}")
        elif not self.done:
            self.moved += len(block)
            self.inflight += 1
            self.writer.callRemote("write", block).addCallbacks(self.written, self.call_failed)


class DownloadFile(Transfer):
    """``downloadFile``: keep ``WINDOW`` reads in flight, ``os.write`` the replies in order."""

    def __init__(self, command_ref: Any, path: str, args: dict[str, Any]) -> None:
        super().__init__(command_ref, path, args)
        self.reader = args["reader"]
        self.fd = -1

    @defer.inlineCallbacks
    def run(self) -> Any:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            if self.args.get("mode") is not None:
                os.chmod(self.path, self.args["mode"])
        except OSError:
            self.stop(f"Cannot open file '{self.path}' for download")
        self.pump()
        yield self.finished
        try:
            yield self.reader.callRemote("close")
        except Exception as e:
            log.msg(f"reader.close failed: {e}")
        if self.fd >= 0:
            os.close(self.fd)
        yield self.complete()

    def issue(self) -> bool:
        n = self.next_size()
        if n == 0:
            return True
        self.moved += n
        self.inflight += 1
        self.reader.callRemote("read", n).addCallbacks(self.got, self.call_failed)
        return True

    def got(self, data: bytes) -> None:
        self.inflight -= 1
        if not data:
            self.stop()
        elif self.fd >= 0 and self.failure is None:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        self.pump()


KINDS = {"uploadFile": UploadFile, "uploadDirectory": UploadDirectory, "downloadFile": DownloadFile}
PATH_ARG = {"uploadFile": "workersrc", "uploadDirectory": "workersrc", "downloadFile": "workerdest"}


class WorkerForBuilder(pb.Referenceable):
    def __init__(self, builddir: str) -> None:
        self.builddir = builddir
        self.command: Transfer | None = None

    def remote_print(self, message: str) -> None:
        log.msg(f"message from master: {message}")

    def remote_startBuild(self) -> None:
        pass

    def remote_startCommand(
        self, command_ref: Any, command_id: str, command: str, args: dict[str, Any]
    ) -> None:
        if command not in KINDS:
            raise pb.Error(f"unrecognized WorkerCommand '{command}'")
        path = os.path.join(
            self.builddir, args["workdir"], os.path.expanduser(args[PATH_ARG[command]])
        )
        cmd = KINDS[command](command_ref, path, args)
        self.command = cmd
        cmd.run().addErrback(log.err, f"command {command} {command_id}")

    def remote_interruptCommand(self, command_id: str, why: str) -> None:
        if self.command is not None:
            self.command.interrupt()


class Bot(pb.Referenceable):
    def __init__(self, basedir: str) -> None:
        self.basedir = basedir
        self.builders: dict[str, WorkerForBuilder] = {}
        self.perspective: Any = None  # the master's avatar (its keepalive/shutdown)

    def remote_print(self, message: str) -> None:
        log.msg(f"message from master: {message}")

    def remote_getCommands(self) -> dict[str, str]:
        return dict(COMMANDS)

    def remote_getVersion(self) -> str:
        return VERSION

    def remote_getWorkerInfo(self) -> dict[str, Any]:
        return {
            "environ": dict(os.environ),
            "system": os.name,
            "basedir": self.basedir,
            "numcpus": os.cpu_count() or 1,
            "version": VERSION,
            "worker_commands": dict(COMMANDS),
            "delete_leftover_dirs": 0,
        }

    def remote_setBuilderList(self, wanted: list[tuple[str, str]]) -> dict[str, Any]:
        builders = {}
        for name, builddir in wanted:
            path = os.path.join(self.basedir, builddir)
            os.makedirs(path, exist_ok=True)
            wfb = self.builders.get(name) or WorkerForBuilder(path)
            wfb.builddir = path
            builders[name] = wfb
        self.builders = builders
        return dict(builders)

    def remote_shutdown(self) -> None:
        reactor.callLater(0.2, reactor.stop)  # type: ignore[attr-defined]


def create_worker(argv: list[str]) -> int:
    """``create-worker [options] [-q] BASEDIR HOST:PORT NAME PASSWORD``.

    Options of its own: ``--chunk=BYTES``, ``--window=CALLS`` (default :data:`CHUNK`,
    :data:`WINDOW`) and ``--nodelay`` (TCP_NODELAY on the connection); others are ignored.
    """
    basedir, master, name, password = [a for a in argv if not a.startswith("-")][-4:]
    host, port = master.rsplit(":", 1)
    config: dict[str, Any] = {"host": host, "port": int(port), "name": name}
    config.update(password=password, chunk=CHUNK, window=WINDOW, nodelay=False)
    for a in argv:
        key, _, value = a.partition("=")
        if key in ("--chunk", "--window"):
            config[key[2:]] = int(value)
        elif key == "--nodelay":
            config["nodelay"] = True
    os.makedirs(basedir, exist_ok=True)
    with open(os.path.join(basedir, CONFIG), "w") as f:
        json.dump(config, f)
    return 0


def start(argv: list[str]) -> int:
    """``start --nodaemon BASEDIR``: connect, log in, serve until the connection ends."""
    basedir = os.path.abspath([a for a in argv if not a.startswith("-")][-1])
    with open(os.path.join(basedir, CONFIG)) as f:
        config = json.load(f)
    global CHUNK, WINDOW
    CHUNK, WINDOW = config["chunk"], config["window"]
    log.startLogging(open(os.path.join(basedir, "twistd.log"), "a"), setStdout=False)
    log.msg(f"{WINDOW} calls of {CHUNK} bytes in flight, TCP_NODELAY {config['nodelay']}")
    bot = Bot(basedir)
    factory = pb.PBClientFactory()

    def lost(reason: object) -> None:
        log.msg(f"connection ended: {reason}")
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]

    factory.clientConnectionLost = lambda connector, reason, *a: lost(reason)  # type: ignore[method-assign]
    factory.clientConnectionFailed = lambda connector, reason: lost(reason)  # type: ignore[method-assign]
    reactor.connectTCP(config["host"], config["port"], factory)  # type: ignore[attr-defined]
    creds = credentials.UsernamePassword(config["name"].encode(), config["password"].encode())
    d = factory.login(creds, client=bot)

    def connected(perspective: Any) -> None:
        # hold the reference: once it is garbage, PB decrefs it and the master logs us out
        bot.perspective = perspective
        if config["nodelay"]:
            perspective.broker.transport.setTcpNoDelay(True)
        log.msg("Connected to buildmaster; worker is ready")

    d.addCallback(connected)
    d.addErrback(lost)
    reactor.run()  # type: ignore[attr-defined]
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["create-worker"]:
        return create_worker(argv[1:])
    if argv[:1] == ["start"]:
        return start(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
