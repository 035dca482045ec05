"""The worker core: everything a Buildbot master can ask of a worker, whatever the wire.

The wire modules (:mod:`pyworker.frontend.pb`, :mod:`pyworker.frontend.msgpack`) only turn
their messages into calls on :class:`WorkerCore` and its answers back into messages. Every
rule that does not depend on the wire lives here, once: which commands exist, the argument
checks, the path policy the executors apply, the request an executor receives, session
start, interrupt and stop, builder directories, worker info, the master's shutdown request,
connection state and the reconnect backoff. A check written here holds for every protocol.

The core never imports executor code: commands run in executor processes, reached through
the :class:`~pyworker.frontend.pool.ExecutorPool`; :mod:`pyworker.commandset` tells the
core which names they answer to. The reactor is passed in (tests give a ``task.Clock``).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.application.internet import backoffPolicy
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pyworker import commandset, paths
from pyworker import config as config_mod
from pyworker.frontend import metrics
from pyworker.frontend.pool import ExecutorPool
from pyworker.frontend.session import Backlog, CommandSession, MasterSide
from pyworker.linux import release_free_memory

#: Seconds without a command after which the front end returns freed heap memory to the
#: kernel (64 streams of output leave about 130 MiB of it resident otherwise).
TRIM_DELAY = 2.0

log = Logger()

WORKER_COMMANDS = commandset.WORKER_COMMANDS

#: Files and folders of the worker's own in its basedir: never a command's target under
#: ``restrict_paths`` (``fnmatch`` patterns).
WORKER_FILES = paths.WORKER_FILES


class CommandRefused(ValueError):
    """The master's ``startCommand`` cannot be run as asked; the text says why."""


class UnknownCommand(CommandRefused):
    """The master asked for a command we do not have."""


class Link(Protocol):
    """What the core and the worker need from a wire protocol's connection."""

    @property
    def connected(self) -> bool:
        """Whether a master is logged in now."""

    def ask_master_to_drain(self) -> defer.Deferred[Any] | None:
        """Ask the master for a graceful shutdown; None if this protocol cannot."""


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


class Builder:
    """The worker side of one builder: a name and its directory under the basedir."""

    def __init__(self, core: WorkerCore, name: str, builddir: str) -> None:
        self.core = core
        self.name = name
        self.builddir = ""
        self.path = ""
        self.set_builddir(builddir)

    def set_builddir(self, builddir: str) -> None:
        """Make the builder's directory; under ``restrict_paths`` beneath the basedir only,
        created by :mod:`pyworker.paths` (no link followed out, not one of the worker's
        own files)."""
        path = os.path.join(self.core.basedir, builddir)
        if self.core.config.restrict_paths:
            try:
                with paths.Beneath(self.core.basedir, WORKER_FILES) as beneath:
                    os.close(beneath.makedirs(path))
            except paths.PathRefused as e:
                raise CommandRefused(f"builder {self.name!r}: directory {builddir!r}: {e}"
                                     ) from None
        else:
            os.makedirs(path, exist_ok=True)
        self.builddir = builddir
        self.path = path


class WorkerCore:
    """The protocol-independent worker: builders, command sessions, info, life cycle."""

    def __init__(
        self,
        config: config_mod.WorkerConfig,
        pool: ExecutorPool,
        reactor: IReactorTime,
        stop: Callable[[int | None], None],
    ) -> None:
        self.config = config
        self.pool = pool
        self.reactor = reactor
        self.basedir = config.basedir
        self._stop = stop
        self.builders: dict[str, Builder] = {}
        #: Running commands by (builder name or None, command id).
        self.sessions: dict[tuple[str | None, str], CommandSession] = {}
        self._trim_call: Any = None
        #: The output of all commands waiting for the master (bounded together).
        self.backlog = Backlog()
        self.io_settings: dict[str, Any] = io_settings(config)
        self.restrict: dict[str, Any] | None = (
            {"root": self.basedir, "protected": list(WORKER_FILES)}
            if config.restrict_paths else None
        )
        self.shutdown_requested = False
        #: We asked the master for a graceful shutdown: losing it now stops the worker.
        self.draining = False
        self.connected_since: float | None = None

    # -- what the master asks of the whole worker -------------------------------------------

    def print_message(self, message: object, builder: str | None = None) -> None:
        if builder is None:
            log.info("message from master: {message}", message=message)
        else:
            log.info("WorkerForBuilder.remote_print({name}): message from master: {message}",
                     name=builder, message=message)

    def version(self) -> str:
        return config_mod.REFERENCE_VERSION

    def commands(self) -> dict[str, str]:
        return dict(WORKER_COMMANDS)

    def worker_info(self) -> dict[str, Any]:
        """The ``getWorkerInfo`` dict, built as the reference builds it (PROTOCOL.md 2.2)."""
        basedir = self.basedir
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
        info["delete_leftover_dirs"] = self.config.delete_leftover_dirs
        return info

    @defer.inlineCallbacks
    def set_builder_list(self, wanted: Iterable[Any]) -> Any:
        """Make the builders (and their directories) the master wants, forget the others,
        and report or delete leftover directories (PROTOCOL.md 2.3)."""
        pairs = []
        for entry in wanted:
            if (not isinstance(entry, list | tuple) or len(entry) != 2
                    or not all(isinstance(v, str) for v in entry)):
                raise CommandRefused(
                    f"setBuilderList: each entry must be (name, builddir), not {entry!r:.80}")
            pairs.append((entry[0], entry[1]))
        result: dict[str, Builder] = {}
        wanted_names = {name for name, _ in pairs}
        wanted_dirs = {builddir for _, builddir in pairs} | {"info"}
        for name, builddir in pairs:
            builder = self.builders.get(name)
            if builder is None:
                builder = self.builders[name] = Builder(self, name, builddir)
            elif builder.builddir != builddir:
                log.info("changing builddir for builder {name} from {old} to {new}", name=name,
                         old=builder.builddir, new=builddir)
                builder.set_builddir(builddir)
            result[name] = builder
        for name in set(self.builders) - wanted_names:
            del self.builders[name]
            self.stop_commands(builder=name)
        for entry in os.listdir(self.basedir):
            path = os.path.join(self.basedir, entry)
            if not os.path.isdir(path) or entry in wanted_dirs:
                continue
            if self.config.delete_leftover_dirs:
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

    def shutdown(self) -> None:
        """The master told us to shut down: exit 0.2 s later, as the reference does."""
        log.info("worker shutting down on command from master")
        self.shutdown_requested = True
        self.reactor.callLater(0.2, self._stop, None)

    # -- commands ------------------------------------------------------------------------

    def start_command(
        self,
        master: MasterSide,
        builder: str | None,
        command_id: str,
        name: object,
        args: object,
        connection: object = None,
    ) -> CommandSession:
        """Start one command for the master; raise :class:`CommandRefused` if it cannot run.

        ``args`` are in the core's form: paths absolute (the PB front end has joined the
        master's relative paths onto the builder directory), references to master objects
        left out or ignored. ``connection`` tags the session so that losing that connection
        stops it.
        """
        if not isinstance(name, str) or name not in WORKER_COMMANDS:
            raise UnknownCommand(f"(command {command_id}): unrecognized WorkerCommand '{name}'")
        if not isinstance(args, dict):
            raise CommandRefused(f"{name}: args must be a dictionary, not {type(args).__name__}")
        plain = {k: v for k, v in args.items() if k not in commandset.REFERENCE_ARGS}
        key = (builder, command_id)
        if key in self.sessions:
            # The running one goes on to its own 'complete', which the master waits for.
            # (The reference interrupts it and starts the new one: the master never asked
            # for that interrupt.)
            raise CommandRefused(f"{name}: command id {command_id} is already running"
                                 + (f" on builder {builder}" if builder is not None else ""))
        request = {
            "name": name,
            "args": plain,
            "command_id": command_id,
            "basedir": self.basedir,
            "io": self.io_settings,
            # restrict_paths: the executor resolves every path the command opens beneath
            # the root, when it opens it (pyworker.paths), and never touches these names
            "restrict": self.restrict,
        }
        session = CommandSession(self.pool, master, name, command_id, request,
                                 on_done=self._command_done, backlog=self.backlog)
        session.builder = builder
        session.connection = connection
        log.info("(command {id}): startCommand:{command} (builder {b})", id=command_id,
                 command=name, b=builder if builder is not None else "<setup>")
        try:
            session.start()
        except ValueError as e:
            raise CommandRefused(f"{name}: an argument cannot be carried: {e}") from None
        self.sessions[key] = session
        return session

    def _command_done(self, session: CommandSession) -> None:
        key = (session.builder, session.command_id)
        if self.sessions.get(key) is session:
            del self.sessions[key]
        session.master.finished()
        if not self.sessions and self._trim_call is None:
            self._trim_call = self.reactor.callLater(TRIM_DELAY, self._trim)

    def _trim(self) -> None:
        """No command has run for TRIM_DELAY: return the memory a load left in the heap."""
        self._trim_call = None
        if not self.sessions:
            release_free_memory()

    def interrupt_command(self, builder: str | None, command_id: str, why: object) -> None:
        """Interrupt a command; with no command of that id, every command of the builder
        (the reference has one command per builder and ignores the id)."""
        log.info("(command {id}): asked to interrupt: reason {why}", id=command_id, why=why)
        session = self.sessions.get((builder, command_id))
        if session is not None:
            targets = [session]
        elif builder is not None:
            targets = [s for (b, _), s in self.sessions.items() if b == builder]
        else:
            targets = []
        if not targets:
            log.info(" .. but none was running")
        for target in targets:
            target.interrupt(str(why))

    def forget_command(self, session: CommandSession) -> None:
        """The master's side of a running command went away: stop it, send nothing more."""
        key = (session.builder, session.command_id)
        if self.sessions.get(key) is session:
            log.info("(command {id}): lost remote step", id=session.command_id)
            del self.sessions[key]
            session.silence()

    def stop_commands(self, builder: str | None = None, connection: object = None) -> None:
        """Stop running commands with no further output: all of them, or those of one
        builder or one connection (connection lost, builder removed, worker stopping)."""
        for key, session in list(self.sessions.items()):
            if builder is not None and key[0] != builder:
                continue
            if connection is not None and session.connection is not connection:
                continue
            log.info("stopCommand: halting current command {id}", id=session.command_id)
            del self.sessions[key]
            session.silence()

    # -- connection state ----------------------------------------------------------------

    def connection_made(self) -> None:
        """A master logged in."""
        metrics.STATS.connected = True
        if self.connected_since is not None:
            metrics.STATS.reconnects += 1
        self.connected_since = metrics.STATS.connected_since = self.reactor.seconds()

    def connection_lost(self, connection: object = None) -> None:
        """The master was lost: its commands stop (all, or those of ``connection``)."""
        log.info("lost connection to the master")
        metrics.STATS.connected = False
        if self.draining:
            log.info("lost the master while draining: stopping now")
            self._stop(None)
        self.stop_commands(connection=connection)

    def retry_delay(self, attempt: int) -> float | None:
        """The reference's backoff; None (and the worker stops) past ``maxretries``."""
        maxretries = self.config.maxretries
        if maxretries and attempt >= maxretries:
            log.info("giving up after {n} attempts (maxretries)", n=attempt)
            self._stop(1)
            return None
        return float(backoffPolicy()(attempt))

    def stop(self, exit_code: int | None = None) -> None:
        """Stop the worker (``exit_code`` for the process, if given)."""
        self._stop(exit_code)
