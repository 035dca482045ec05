"""The PB front end: the one process that holds the connection to the Buildbot master.

It logs in with newcred (the :class:`Bot` is the mind, so the master's calls are served while
``respond`` is still pending), reconnects with the reference's backoff, sends keepalives, and
answers every remote method of the Bot and of each :class:`WorkerForBuilder`. Commands do not
run here: each ``startCommand`` becomes a :class:`~pyworker.session.CommandSession` on an
executor from the :class:`~pyworker.pool.ExecutorPool`. The master's argument dicts are
translated here (PROTOCOL.md section 3.2) into the absolute paths the commands take.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.cred import error as cred_error
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb

from pyworker import config as config_mod
from pyworker import metrics
from pyworker.commands.registry import COMMAND_VERSION, REFERENCE_COMMANDS
from pyworker.pool import ExecutorPool
from pyworker.session import CommandSession

log = Logger()

#: ``worker_commands`` as the reference reports it: every name at version 3.3.
WORKER_COMMANDS = {name: COMMAND_VERSION for name in REFERENCE_COMMANDS}


class UnknownCommand(pb.Error):
    """The master asked for a command we do not have."""


# -- argument translation (PB only; the msgpack master sends absolute paths itself) --------

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


def translate_pb_args(command: str, args: dict[str, Any], builder_dir: str) -> dict[str, Any]:
    """The command's arguments with the master's relative paths joined onto ``builder_dir``.

    Raises ``ValueError`` with a readable message for mistyped path arguments (the caller
    has checked that ``PB_REQUIRED_ARGS`` are present).
    """
    args = dict(args)
    join = os.path.join
    xu = os.path.expanduser
    try:
        if command == "mkdir":
            d = args.pop("dir")
            args["paths"] = [join(builder_dir, p) for p in d] if isinstance(d, list) else [
                join(builder_dir, d)
            ]
        elif command == "rmdir":
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
        raise ValueError(f"{command}: a path argument has the wrong type ({e})") from None
    return args


#: The translated arguments that name paths on the worker.
PATH_ARGS = ("path", "paths", "from_path", "to_path", "workdir")


def check_paths_inside(command: str, args: dict[str, Any], basedir: str) -> None:
    """``restrict_paths``: refuse (ValueError) any path argument outside ``basedir``.

    Paths are resolved (symlinks included) before the check, so a link inside the basedir
    that points outside is refused too.
    """
    root = os.path.realpath(basedir)
    for key in PATH_ARGS:
        value = args.get(key)
        for path in value if isinstance(value, list) else [value]:
            if not isinstance(path, str):
                continue
            real = os.path.realpath(os.path.join(basedir, path))
            if real != root and not real.startswith(root + os.sep):
                raise ValueError(
                    f"{command}: path {path!r} is outside the worker's basedir {basedir!r} "
                    f"(refused: the worker runs with restrict_paths)"
                )


# -- the master side of one command, over PB ----------------------------------------------


class PBMasterSide:
    """Implements :class:`pyworker.session.MasterSide` on a master ``RemoteCommand``."""

    def __init__(self, command_ref: Any, refs: dict[str, Any]) -> None:
        self.command_ref = command_ref
        self.refs = refs

    def send_updates(self, updates: list[tuple[str, Any]]) -> defer.Deferred[Any]:
        return self.command_ref.callRemote("update", [[{k: v}, 0] for k, v in updates])

    def complete(self, failure: str | None) -> defer.Deferred[Any]:
        value = None
        if failure is not None:
            value = pb.failure2Copyable(Failure(RuntimeError(failure)))
        return self.command_ref.callRemote("complete", value)

    def call(self, target: str, method: str, args: tuple[Any, ...]) -> defer.Deferred[Any]:
        ref = self.refs.get(target)
        if ref is None:
            return defer.fail(RuntimeError(f"this command has no {target}"))
        return ref.callRemote(method, *args)


# -- the remote objects ---------------------------------------------------------------------


class WorkerForBuilder(pb.Referenceable):
    """The worker side of one builder: runs the master's commands for it.

    Commands are tracked by id. The reference runs each quick command (``glob``, ``stat``)
    to its end inside ``startCommand``, and masters rely on that: ``MultipleFileUpload``
    sends several at once on one builder. Here every command runs in an executor, so they
    are allowed to overlap instead of one silencing the other.
    """

    def __init__(self, bot: Bot, name: str, builddir: str) -> None:
        self.bot = bot
        self.name = name
        self.sessions: dict[str, CommandSession] = {}
        self.set_builddir(builddir)

    def set_builddir(self, builddir: str) -> None:
        self.builddir = builddir
        self.path = os.path.join(self.bot.basedir, builddir)
        os.makedirs(self.path, exist_ok=True)

    def remote_setMaster(self, remote: Any) -> None:  # noqa: N802 - protocol name
        pass

    def remote_print(self, message: str) -> None:
        log.info("WorkerForBuilder.remote_print({name}): message from master: {message}",
                 name=self.name, message=message)

    def remote_startBuild(self) -> None:  # noqa: N802 - protocol name
        pass

    def remote_startCommand(  # noqa: N802 - protocol name
        self, command_ref: Any, command_id: str, command: str, args: dict[str, Any]
    ) -> None:
        if command_id in self.sessions:
            log.info("(command {id}): id reused while running: dropping the old one",
                     id=command_id)
            self.sessions.pop(command_id).silence()
        if command not in WORKER_COMMANDS:
            raise UnknownCommand(f"(command {command_id}): unrecognized WorkerCommand '{command}'")
        if not isinstance(args, dict):
            raise ValueError(f"{command}: args must be a dictionary, not {type(args).__name__}")
        missing = [k for k in PB_REQUIRED_ARGS.get(command, ()) if k not in args]
        if missing:
            raise ValueError(f"{command} is missing args: {', '.join(missing)}")
        refs = {k: args[k] for k in ("writer", "reader") if k in args}
        plain = {k: v for k, v in args.items() if k not in refs}
        plain = translate_pb_args(command, plain, self.path)
        if self.bot.worker.config.restrict_paths:
            check_paths_inside(command, plain, self.bot.basedir)
        request = {
            "name": command,
            "args": plain,
            "command_id": command_id,
            "basedir": self.bot.basedir,
            "io": self.bot.io_settings,
        }
        session = CommandSession(
            self.bot.pool, PBMasterSide(command_ref, refs), command, command_id, request,
            on_done=self._command_done,
        )
        log.info("(command {id}): startCommand:{command}", id=command_id, command=command)
        try:
            session.start()
        except ValueError as e:
            raise ValueError(f"{command}: an argument cannot be carried: {e}") from None
        self.sessions[command_id] = session

        def lost(_: Any) -> None:
            log.info("(command {id}): lost remote step", id=command_id)
            if self.sessions.get(command_id) is session:
                del self.sessions[command_id]
                session.silence()

        session.lost_cb = lost  # type: ignore[attr-defined]
        command_ref.notifyOnDisconnect(lost)

    def _command_done(self, session: CommandSession) -> None:
        if self.sessions.get(session.command_id) is session:
            del self.sessions[session.command_id]
        ref = session.master.command_ref  # type: ignore[attr-defined]
        try:
            ref.dontNotifyOnDisconnect(session.lost_cb)  # type: ignore[attr-defined]
        except (ValueError, AttributeError):
            pass

    def remote_interruptCommand(self, command_id: str, why: str) -> None:  # noqa: N802
        log.info("(command {id}): asked to interrupt: reason {why}", id=command_id, why=why)
        session = self.sessions.get(command_id)
        targets = [session] if session is not None else list(self.sessions.values())
        if not targets:
            log.info(" .. but none was running")
        for target in targets:
            target.interrupt(str(why))

    def stop_command(self) -> None:
        """Stop every running command with no further output (disconnect, removal)."""
        sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            log.info("stopCommand: halting current command {id}", id=session.command_id)
            session.silence()


class Bot(pb.Referenceable):
    """The mind given at login: the master's handle on the whole worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.basedir = worker.config.basedir
        self.pool = worker.pool
        self.builders: dict[str, WorkerForBuilder] = {}
        self.io_settings: dict[str, Any] = io_settings(worker.config)

    def remote_print(self, message: str) -> None:
        log.info("message from master: {message}", message=message)

    def remote_getVersion(self) -> str:  # noqa: N802 - protocol name
        return config_mod.REFERENCE_VERSION

    def remote_getCommands(self) -> dict[str, str]:  # noqa: N802 - protocol name
        return dict(WORKER_COMMANDS)

    def remote_getWorkerInfo(self) -> dict[str, Any]:  # noqa: N802 - protocol name
        return worker_info(self.basedir, self.worker.config.delete_leftover_dirs)

    @defer.inlineCallbacks
    def remote_setBuilderList(self, wanted: list[Any]) -> Any:  # noqa: N802 - protocol name
        result = {}
        wanted_names = {name for name, _ in wanted}
        wanted_dirs = {builddir for _, builddir in wanted} | {"info"}
        for name, builddir in wanted:
            builder = self.builders.get(name)
            if builder is None:
                builder = self.builders[name] = WorkerForBuilder(self, name, builddir)
            elif builder.builddir != builddir:
                log.info("changing builddir for builder {name} from {old} to {new}", name=name,
                         old=builder.builddir, new=builddir)
                builder.set_builddir(builddir)
            result[name] = builder
        for name in set(self.builders) - wanted_names:
            self.builders.pop(name).stop_command()
        for entry in os.listdir(self.basedir):
            path = os.path.join(self.basedir, entry)
            if not os.path.isdir(path) or entry in wanted_dirs:
                continue
            if self.worker.config.delete_leftover_dirs:
                log.info("Deleting directory '{dir}' that is not being used by the buildmaster",
                         dir=entry)
                try:
                    yield threads.deferToThread(shutil.rmtree, path)
                except OSError as e:
                    log.info("Cannot remove directory '{dir}': {e}", dir=entry, e=e)
            else:
                log.info("I have a leftover directory '{dir}' that is not being used by the "
                         "buildmaster: you can delete it now", dir=entry)
        return result

    def remote_shutdown(self) -> None:
        log.info("worker shutting down on command from master")
        self.worker.shutdown_requested = True
        reactor.callLater(0.2, self.worker.stop)

    def stop_all(self) -> None:
        for builder in self.builders.values():
            builder.stop_command()


def io_settings(config: config_mod.WorkerConfig) -> dict[str, Any]:
    """What the executors need from the configuration, sent with every command."""
    settings: dict[str, Any] = {
        "report_resources": config.report_resources,
        "gzip_level": config.gzip_level,
        "bz2_level": config.bz2_level,
    }
    if config.compress_threads is not None:
        settings["compress_threads"] = config.compress_threads
    return settings


def worker_info(basedir: str, delete_leftover_dirs: bool) -> dict[str, Any]:
    """The ``getWorkerInfo`` dict, built as the reference builds it (PROTOCOL.md 2.2)."""
    info: dict[str, Any] = {}
    info_dir = os.path.join(basedir, "info")
    if os.path.isdir(info_dir):
        for name in os.listdir(info_dir):
            path = os.path.join(info_dir, name)
            if os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        info[name] = f.read()
                except (OSError, UnicodeDecodeError):
                    pass
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                line = line.strip("\r\n")
                if not line or line.startswith("#") or "=" not in line:
                    continue
                key, value = line.split("=", 1)
                if value:
                    info["os_" + key.lower()] = value.strip('"')
    except OSError:
        pass
    info["environ"] = dict(os.environ)
    info["system"] = os.name
    info["basedir"] = basedir
    try:
        info["numcpus"] = multiprocessing.cpu_count()
    except NotImplementedError:
        info["numcpus"] = 1
    info["version"] = config_mod.REFERENCE_VERSION
    info["worker_commands"] = dict(WORKER_COMMANDS)
    info["delete_leftover_dirs"] = delete_leftover_dirs
    return info


# -- the connection ------------------------------------------------------------------------


class BotFactory(pb.PBClientFactory):
    """Logs in on every new connection and keeps the application-level keepalive going."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker
        self.perspective: Any = None
        self._failed_logins = 0
        self._keepalive: task.LoopingCall | None = None

    def buildProtocol(self, addr: Any) -> pb.Broker:  # noqa: N802 - Twisted
        broker = super().buildProtocol(addr)
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
        cfg = self.worker.config
        try:
            root = yield self.getRootObject()
            challenge, challenger = yield root.callRemote("login", cfg.workername.encode())
            response = pb.respond(challenge, cfg.password.encode())
            perspective = yield challenger.callRemote("respond", response, self.worker.bot)
        except Exception:
            yield self._login_failed(Failure(), broker)
            return
        self._failed_logins = 0
        self._got_perspective(perspective, broker)

    def _got_perspective(self, perspective: Any, broker: pb.Broker) -> None:
        log.info("Connected to buildmaster; worker is ready")
        self.perspective = perspective
        self.worker.mark_connected(True)
        try:
            broker.transport.setTcpKeepAlive(1)
        except Exception:
            log.info("unable to set SO_KEEPALIVE")
        try:
            # Small replies (startCommand's, a lone rc) must not wait ~40 ms for the
            # master's delayed ACK: Nagle would hold every next small update back.
            broker.transport.setTcpNoDelay(True)
        except Exception:
            log.info("unable to set TCP_NODELAY")
        interval = self.worker.config.keepalive
        if interval:
            log.info("sending application-level keepalives every {n} seconds", n=interval)
            self._keepalive = task.LoopingCall(self._send_keepalive)
            self._keepalive.start(interval, now=False)
        perspective.notifyOnDisconnect(self._lost_perspective)

    def _send_keepalive(self) -> Any:
        if self.perspective is None:
            return None
        d = self.perspective.callRemote("keepalive")
        d.addErrback(lambda f: log.info("keepalive failed: {f}", f=f.getErrorMessage()))
        return d

    def _lost_perspective(self, _: Any) -> None:
        log.info("lost connection to the master")
        self.perspective = None
        self.worker.mark_connected(False)
        if self.worker.draining:
            log.info("lost the master while draining: stopping now")
            self.worker.stop()
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        self.worker.bot.stop_all()

    @defer.inlineCallbacks
    def _login_failed(self, why: Failure, broker: pb.Broker) -> Any:
        if why.check(pb.PBConnectionLost):
            log.info("we lost the brand-new connection")
        elif why.check(cred_error.UnauthorizedLogin) or (
            why.check(pb.RemoteError)
            and _text(why.value.remoteType) == "twisted.cred.error.UnauthorizedLogin"
        ):
            log.info("unauthorized login; check worker name and password")
        else:
            log.failure("While trying to connect:", why)
            self.worker.stop(exit_code=1)
            return
        self._failed_logins += 1
        delay = self.worker.retry_delay(self._failed_logins)
        if delay is None:
            return
        log.info("Scheduling retry {n} to getPerspective in {delay} seconds.",
                 n=self._failed_logins, delay=delay)
        yield task.deferLater(reactor, delay, lambda: None)
        broker.transport.loseConnection()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Worker:
    """The whole front end: pool, bot, connection service, shutdown handling."""

    def __init__(self, config: config_mod.WorkerConfig) -> None:
        self.config = config
        # The I/O backend choice is ours: builds must not see it (nor the master's info).
        io_choice = os.environ.pop("PYWORKER_IO", None)
        self.pool = ExecutorPool(
            reactor, extra_env={"PYWORKER_IO": io_choice} if io_choice else None
        )
        self.bot = Bot(self)
        self.factory = BotFactory(self)
        self.service: ClientService | None = None
        self.exit_code = 0
        self.stopping = False
        self.draining = False
        self.shutdown_requested = False
        metrics.STATS.pool = self.pool
        self.connected_since: float | None = None
        self._shutdown_mtime = 0.0
        self._shutdown_loop: task.LoopingCall | None = None

    def mark_connected(self, connected: bool) -> None:
        """Record that a front end logged in to the master (or lost it), for the metrics."""
        metrics.STATS.connected = connected
        if not connected:
            return
        if self.connected_since is not None:
            metrics.STATS.reconnects += 1
        self.connected_since = metrics.STATS.connected_since = reactor.seconds()

    def retry_delay(self, attempt: int) -> float | None:
        """The reference's backoff; None (and the worker stops) past ``maxretries``."""
        maxretries = self.config.maxretries
        if maxretries and attempt >= maxretries:
            log.info("giving up after {n} attempts (maxretries)", n=attempt)
            self.stop(exit_code=1)
            return None
        return float(backoffPolicy()(attempt))

    def endpoint(self) -> Any:
        cfg = self.config
        if cfg.proxy_connection_string:
            from pyworker.tunnel import HTTPTunnelEndpoint

            if cfg.master_host is None or cfg.port is None:
                raise ValueError("an HTTP proxy needs the master's host and port")
            proxy = clientFromString(reactor, cfg.proxy_connection_string)
            endpoint: Any = HTTPTunnelEndpoint(cfg.master_host, cfg.port, proxy)
            if cfg.use_tls:
                from twisted.internet.endpoints import wrapClientTLS
                from twisted.internet.ssl import optionsForClientTLS

                endpoint = wrapClientTLS(optionsForClientTLS(hostname=cfg.master_host), endpoint)
            return endpoint
        if cfg.connection_string:
            return clientFromString(reactor, cfg.connection_string)
        kind = "tls" if cfg.use_tls else "tcp"
        host = (cfg.master_host or "localhost").replace(":", r"\:")
        return clientFromString(reactor, f"{kind}:host={host}:port={cfg.port}")

    def start(self) -> None:
        if self.config.protocol not in config_mod.PROTOCOLS:
            raise ValueError(f"protocol {self.config.protocol!r} is not supported")

        def policy(attempt: int) -> float:
            delay = self.retry_delay(attempt)
            return 3600.0 if delay is None else delay

        if self.config.protocol == config_mod.PROTOCOL_MSGPACK:
            from pyworker.frontend_msgpack import msgpack_service

            self.service = msgpack_service(self, policy)
        else:
            self.service = ClientService(self.endpoint(), self.factory, retryPolicy=policy)
        self.pool.start()
        self.service.startService()
        reactor.addSystemEventTrigger("before", "shutdown", self._before_shutdown)
        reactor.callWhenRunning(self._install_signal_handlers)
        if self.config.metrics_port:
            metrics.listen(reactor, self.config.metrics_port)
            log.info("serving /healthz and /metrics on 127.0.0.1:{port}",
                     port=self.config.metrics_port)
        if self.config.allow_shutdown == "signal":
            log.info("Setting up SIGHUP handler to initiate shutdown")
            signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.graceful_shutdown))
        elif self.config.allow_shutdown == "file":
            stamp = os.path.join(self.config.basedir, "shutdown.stamp")
            log.info("Watching {f}'s mtime to initiate shutdown", f=stamp)
            if os.path.exists(stamp):
                self._shutdown_mtime = os.path.getmtime(stamp)
            self._shutdown_loop = task.LoopingCall(self._check_shutdown_file, stamp)
            self._shutdown_loop.start(10, now=False)

    def _check_shutdown_file(self, stamp: str) -> None:
        if os.path.exists(stamp) and os.path.getmtime(stamp) > self._shutdown_mtime:
            log.info("Initiating shutdown because {f} was touched", f=stamp)
            self.graceful_shutdown()
            self._shutdown_mtime = os.path.getmtime(stamp)

    def graceful_shutdown(self) -> Any:
        """Ask the master to let running builds finish, then shut us down."""
        if self.factory.perspective is None:
            log.info("No active connection, shutting down NOW")
            self.stop()
            return None
        log.info("Telling the master we want to shutdown after any running builds are finished")
        d = self.factory.perspective.callRemote("shutdown")
        d.addErrback(lambda f: log.info('callRemote("shutdown") failed: {f}',
                                        f=f.getErrorMessage()))
        return d

    def _install_signal_handlers(self) -> None:
        """SIGTERM drains (running builds finish, no new ones start); a second SIGTERM,
        SIGQUIT or SIGINT stops at once. Replaces the handlers the reactor installed."""
        signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(self._on_sigterm))
        signal.signal(signal.SIGQUIT, lambda *_: reactor.callFromThread(self._stop_now, "SIGQUIT"))
        signal.signal(signal.SIGINT, lambda *_: reactor.callFromThread(self._stop_now, "SIGINT"))

    def _stop_now(self, why: str) -> None:
        log.info("received {why}: stopping now", why=why)
        self.stop()

    def _on_sigterm(self) -> None:
        if self.draining:
            self._stop_now("a second SIGTERM")
            return
        connected = self.factory.perspective is not None
        if self.config.protocol != config_mod.PROTOCOL_PB or not connected:
            # msgpack masters cannot be asked to drain a worker (PROTOCOL.md appendix A)
            self._stop_now("SIGTERM")
            return
        log.info("received SIGTERM: draining (no new builds; running builds finish; "
                 "SIGQUIT or a second SIGTERM stops at once)")
        self.draining = True
        self.graceful_shutdown()

    def stop(self, exit_code: int | None = None) -> None:
        if exit_code is not None:
            self.exit_code = exit_code
        if not self.stopping:
            self.stopping = True
            if reactor.running:
                reactor.stop()

    @defer.inlineCallbacks
    def _before_shutdown(self) -> Any:
        self.stopping = True
        if self._shutdown_loop is not None and self._shutdown_loop.running:
            self._shutdown_loop.stop()
        self.bot.stop_all()
        if self.service is not None:
            yield self.service.stopService()
        yield self.pool.stop()


def run_worker(config: config_mod.WorkerConfig) -> int:
    """Run the worker in this process until it is stopped; return the exit code."""
    worker = Worker(config)
    try:
        worker.start()
    except ValueError as e:
        log.error("cannot start: {e}", e=e)
        return 1
    reactor.run()
    return worker.exit_code
