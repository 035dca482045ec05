"""The Perspective Broker wire: Buildbot's PB protocol translated to the worker core.

It logs in with newcred (the :class:`Bot` is the mind, so the master's calls are served while
``respond`` is still pending), sends the application-level keepalive, and turns every remote
method of the Bot and of each :class:`WorkerForBuilder` into a call on
:class:`~pyworker.frontend.core.WorkerCore`. The one thing only PB needs is the master's
relative paths joined onto the builder directory (PROTOCOL.md section 3.2), done by
:func:`translate_pb_args` before the core sees the arguments.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.cred import error as cred_error
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import banana, pb

from pyworker.frontend import core as core_mod
from pyworker.frontend.core import Builder, CommandRefused, WorkerCore

log = Logger()


class UnknownCommand(pb.Error):
    """The master asked for a command we do not have (the error type the master sees)."""


# -- argument translation (the msgpack master sends absolute paths itself) -------------------

#: Keys each command needs from a PB master, before translation.
PB_REQUIRED_ARGS: dict[str, tuple[str, ...]] = {
    "shell": ("workdir", "command"),
    "mkdir": ("dir",),
    "rmdir": ("dir",),
    "cpdir": ("fromdir", "todir"),
    "stat": ("file",),
    "glob": ("path",),
    "listdir": ("dir",),
    "rmfile": ("path",),
    "uploadFile": ("workdir", "workersrc", "writer", "blocksize", "maxsize"),
    "uploadDirectory": ("workdir", "workersrc", "writer", "blocksize", "maxsize", "compress"),
    "downloadFile": ("workdir", "workerdest", "reader", "blocksize", "maxsize", "mode"),
}


#: The master object each transfer calls, by command name (both spellings of each).
PB_REFERENCES: dict[str, str] = {
    "uploadFile": "writer", "upload_file": "writer",
    "uploadDirectory": "writer", "upload_directory": "writer",
    "downloadFile": "reader", "download_file": "reader",
}


def check_pb_references(command: str, args: dict[str, Any]) -> None:
    """Refuse a transfer whose ``writer``/``reader`` is not a master object we can call.

    A master with a bug may send a string, a number or a list there; the command would
    fail only at its first call, so it is refused before it starts, with a readable reason.
    """
    key = PB_REFERENCES.get(command)
    if key is None:
        return
    ref = args.get(key)
    if not isinstance(ref, pb.RemoteReference):
        raise CommandRefused(f"{command}: argument '{key}' must be a remote reference to the "
                             f"master's {key}, not {type(ref).__name__} {ref!r:.60}")


def translate_pb_args(command: str, args: dict[str, Any], builder_dir: str) -> dict[str, Any]:
    """The command's arguments with the master's relative paths joined onto ``builder_dir``.

    Raises :class:`CommandRefused` for missing or mistyped path arguments.
    """
    missing = [k for k in PB_REQUIRED_ARGS.get(command, ()) if k not in args]
    if missing:
        raise CommandRefused(f"{command} is missing args: {', '.join(missing)}")
    args = dict(args)
    join = os.path.join
    xu = os.path.expanduser
    try:
        if command in ("mkdir", "rmdir"):
            d = args.pop("dir")
            args["paths"] = [join(builder_dir, p) for p in d] if isinstance(d, list) else [
                join(builder_dir, d)
            ]
        elif command == "cpdir":
            args["from_path"] = join(builder_dir, args.pop("fromdir"))
            args["to_path"] = join(builder_dir, args.pop("todir"))
        elif command == "stat":
            args["path"] = join(builder_dir, args.get("workdir") or "", args.pop("file"))
        elif command == "glob":
            args["path"] = join(builder_dir, args["path"])
        elif command == "listdir":
            args["path"] = join(builder_dir, args.pop("dir"))
        elif command == "rmfile":
            args["path"] = join(builder_dir, xu(args["path"]))
        elif command == "shell":
            args["workdir"] = join(builder_dir, args["workdir"])
        elif command in ("uploadFile", "uploadDirectory"):
            args["path"] = join(builder_dir, args.pop("workdir"), xu(args.pop("workersrc")))
        elif command == "downloadFile":
            args["path"] = join(builder_dir, args.pop("workdir"), xu(args.pop("workerdest")))
    except TypeError as e:
        raise CommandRefused(f"{command}: a path argument has the wrong type ({e})") from None
    return args


# -- the master side of one command, over PB ----------------------------------------------


class PBMasterSide:
    """Implements :class:`pyworker.frontend.session.MasterSide` on a master ``RemoteCommand``."""

    def __init__(self, command_ref: Any, refs: dict[str, Any]) -> None:
        self.command_ref = command_ref
        self.refs = refs
        self._on_lost: Any = None

    def send_updates(self, updates: list[tuple[str, Any]]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = self.command_ref.callRemote(
            "update", [[{k: v}, 0] for k, v in updates]
        )
        return d

    def complete(self, failure: str | None) -> defer.Deferred[Any]:
        value = None
        if failure is not None:
            value = pb.failure2Copyable(Failure(RuntimeError(failure)))
        d: defer.Deferred[Any] = self.command_ref.callRemote("complete", value)
        return d

    def call(self, target: str, method: str, args: tuple[Any, ...]) -> defer.Deferred[Any]:
        ref = self.refs.get(target)
        if ref is None:
            return defer.fail(RuntimeError(f"this command has no {target}"))
        if not isinstance(ref, pb.RemoteReference):
            return defer.fail(TypeError(
                f"this command's {target} is not a remote reference: {type(ref).__name__}"))
        d: defer.Deferred[Any] = ref.callRemote(method, *args)
        return d

    def watch(self, on_lost: Any) -> None:
        """Call ``on_lost`` if the master's ``RemoteCommand`` goes away."""
        self._on_lost = on_lost
        self.command_ref.notifyOnDisconnect(on_lost)

    def finished(self) -> None:
        if self._on_lost is not None:
            try:
                self.command_ref.dontNotifyOnDisconnect(self._on_lost)
            except (ValueError, AttributeError):
                pass
            self._on_lost = None


# -- the remote objects ---------------------------------------------------------------------


class WorkerForBuilder(pb.Referenceable):
    """The PB face of one builder of the core.

    The reference runs each quick command (``glob``, ``stat``) to its end inside
    ``startCommand``, and masters rely on that: ``MultipleFileUpload`` sends several at once
    on one builder. Here every command runs in an executor, so they may overlap.
    """

    def __init__(self, core: WorkerCore, builder: Builder) -> None:
        self.core = core
        self.builder = builder

    def remote_setMaster(self, remote: Any) -> None:  # noqa: N802 - protocol name
        pass

    def remote_print(self, message: str) -> None:
        self.core.print_message(message, builder=self.builder.name)

    def remote_startBuild(self) -> None:  # noqa: N802 - protocol name
        pass

    def remote_startCommand(  # noqa: N802 - protocol name
        self, command_ref: Any, command_id: str, command: str, args: Any
    ) -> None:
        refs: dict[str, Any] = {}
        plain: object = args
        if isinstance(args, dict):
            refs = {k: args[k] for k in ("writer", "reader") if k in args}
            if isinstance(command, str) and command in core_mod.WORKER_COMMANDS:
                plain = translate_pb_args(command, args, self.builder.path)
                check_pb_references(command, args)
        master = PBMasterSide(command_ref, refs)
        try:
            session = self.core.start_command(master, self.builder.name, str(command_id),
                                              command, plain, connection=command_ref.broker)
        except core_mod.UnknownCommand as e:
            raise UnknownCommand(str(e)) from None
        master.watch(lambda _: self.core.forget_command(session))

    def remote_interruptCommand(self, command_id: str, why: str) -> None:  # noqa: N802
        self.core.interrupt_command(self.builder.name, str(command_id), why)


class Bot(pb.Referenceable):
    """The mind given at login: the master's handle on the whole worker."""

    def __init__(self, core: WorkerCore) -> None:
        self.core = core
        self.builders: dict[str, WorkerForBuilder] = {}

    def remote_print(self, message: str) -> None:
        self.core.print_message(message)

    def remote_getVersion(self) -> str:  # noqa: N802 - protocol name
        return self.core.version()

    def remote_getCommands(self) -> dict[str, str]:  # noqa: N802 - protocol name
        return self.core.commands()

    def remote_getWorkerInfo(self) -> dict[str, Any]:  # noqa: N802 - protocol name
        return self.core.worker_info()

    @defer.inlineCallbacks
    def remote_setBuilderList(self, wanted: Any) -> Any:  # noqa: N802 - protocol name
        if not isinstance(wanted, list | tuple):
            raise CommandRefused(f"setBuilderList: wanted must be a list, not {wanted!r:.80}")
        builders = yield self.core.set_builder_list(wanted)
        result = {}
        for name, builder in builders.items():
            face = self.builders.get(name)
            if face is None or face.builder is not builder:
                face = self.builders[name] = WorkerForBuilder(self.core, builder)
            result[name] = face
        for name in set(self.builders) - set(builders):
            del self.builders[name]
        return result

    def remote_shutdown(self) -> None:
        self.core.shutdown()


# -- the connection ------------------------------------------------------------------------


class Broker(pb.Broker):
    """Twisted's broker, with the encoding of large byte strings (transfer blocks) made
    cheap; the bytes on the wire are the same.

    Banana looks every byte string up in its symbol table (hashing all of it: a third of
    the front end's CPU in an upload) and copies it into a ``BytesIO`` before the
    transport copies it again. Strings longer than every symbol are not looked up, and a
    message goes to the transport as its pieces, joined once there.
    """

    #: No PB symbol is longer (``pb.Broker.knownDialects`` symbols are short words).
    LONG_STRING = 256
    #: Bytes per socket read (Twisted reads 64 KiB): Banana copies a string still being
    #: received once per read, so a 512 KiB download block costs 9 copies in 64 KiB reads.
    READ_SIZE = 1024 * 1024

    def connectionMade(self) -> None:  # noqa: N802 - Twisted
        tcp = self.transport
        if tcp is not None and not hasattr(tcp, "bufferSize"):
            tcp = getattr(tcp, "transport", None)  # TLS: the TCP connection under it
        if tcp is not None and getattr(tcp, "bufferSize", 0) < self.READ_SIZE:
            tcp.bufferSize = self.READ_SIZE
        super().connectionMade()

    def _encode(self, obj: Any, write: Any) -> None:
        if type(obj) is bytes and len(obj) > self.LONG_STRING:
            if len(obj) > banana.SIZE_LIMIT:
                raise banana.BananaError(f"byte string is too long to send ({len(obj)})")
            banana.int2b128(len(obj), write)
            write(banana.STRING)
            write(obj)
        else:
            super()._encode(obj, write)

    def sendEncoded(self, obj: Any) -> None:  # noqa: N802 - Twisted
        pieces: list[bytes] = []
        self._encode(obj, pieces.append)
        self.transport.writeSequence(pieces)  # type: ignore[union-attr]


class BotFactory(pb.PBClientFactory):
    """Logs in on every new connection and keeps the application-level keepalive going.

    It is also the PB :class:`~pyworker.frontend.core.Link` of the worker.
    """

    protocol = Broker

    def __init__(self, core: WorkerCore) -> None:
        super().__init__()
        self.core = core
        self.bot = Bot(core)
        self.perspective: Any = None
        self._failed_logins = 0
        self._keepalive: task.LoopingCall | None = None

    # -- Link --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.perspective is not None

    def ask_master_to_drain(self) -> defer.Deferred[Any] | None:
        if self.perspective is None:
            return None
        d: defer.Deferred[Any] = self.perspective.callRemote("shutdown")
        return d

    # -- logging in --------------------------------------------------------------------

    def buildProtocol(self, addr: Any) -> pb.Broker:  # noqa: N802 - Twisted
        broker: pb.Broker = super().buildProtocol(addr)
        lost = broker.connectionLost

        def connection_lost(reason: Failure) -> None:
            # e.g. a TLS certificate the trust roots refuse: say why, not just "retrying"
            if self.perspective is None or self.perspective.broker is not broker:
                log.info("connection to the master lost before login: {why}",
                         why=reason.getErrorMessage())
            lost(reason)

        broker.connectionLost = connection_lost  # type: ignore[method-assign]
        return broker

    def clientConnectionMade(self, broker: pb.Broker) -> None:  # noqa: N802 - Twisted
        super().clientConnectionMade(broker)
        self._login(broker)

    @defer.inlineCallbacks
    def _login(self, broker: pb.Broker) -> Any:
        cfg = self.core.config
        try:
            root = yield self.getRootObject()
            challenge, challenger = yield root.callRemote("login", cfg.workername.encode())
            response = pb.respond(challenge, cfg.password.encode())
            perspective = yield challenger.callRemote("respond", response, self.bot)
        except Exception:
            yield self._login_failed(Failure(), broker)
            return
        self._failed_logins = 0
        self._got_perspective(perspective, broker)

    def _got_perspective(self, perspective: Any, broker: pb.Broker) -> None:
        log.info("Connected to buildmaster; worker is ready")
        self.perspective = perspective
        self.core.connection_made()
        # TCP, TLS over TCP or the proxy tunnel's: the TCP options are tried, not assumed.
        transport: Any = broker.transport
        try:
            transport.setTcpKeepAlive(1)
        except Exception:
            log.info("unable to set SO_KEEPALIVE")
        try:
            # Small replies (startCommand's, a lone rc) must not wait ~40 ms for the
            # master's delayed ACK: Nagle would hold every next small update back.
            transport.setTcpNoDelay(True)
        except Exception:
            log.info("unable to set TCP_NODELAY")
        interval = self.core.config.keepalive
        if interval:
            log.info("sending application-level keepalives every {n} seconds", n=interval)
            self._keepalive = task.LoopingCall(self._send_keepalive)
            self._keepalive.clock = self.core.reactor
            self._keepalive.start(interval, now=False)
        perspective.notifyOnDisconnect(lambda _: self._lost_perspective(broker))

    def _send_keepalive(self) -> Any:
        if self.perspective is None:
            return None
        d = self.perspective.callRemote("keepalive")
        d.addErrback(lambda f: log.info("keepalive failed: {f}", f=f.getErrorMessage()))
        return d

    def _lost_perspective(self, broker: pb.Broker) -> None:
        self.perspective = None
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        self.core.connection_lost(broker)

    @defer.inlineCallbacks
    def _login_failed(self, why: Failure, broker: pb.Broker) -> Any:
        if why.check(pb.PBConnectionLost):
            log.info("we lost the brand-new connection")
        elif why.check(cred_error.UnauthorizedLogin) or (
            isinstance(why.value, pb.RemoteError)
            and _text(why.value.remoteType) == "twisted.cred.error.UnauthorizedLogin"
        ):
            log.info("unauthorized login; check worker name and password")
        else:
            log.failure("While trying to connect:", why)
            self.core.stop(1)
            return
        self._failed_logins += 1
        delay = self.core.retry_delay(self._failed_logins)
        if delay is None:
            return
        log.info("Scheduling retry {n} to getPerspective in {delay} seconds.",
                 n=self._failed_logins, delay=delay)
        yield task.deferLater(self.core.reactor, delay, lambda: None)
        if broker.transport is not None:
            broker.transport.loseConnection()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

