"""The front-end process: a core, an executor pool and one wire's connection, run together.

:class:`Worker` builds the :class:`~pyworker.frontend.core.WorkerCore`, picks the wire
protocol's link and reconnecting service (PB or msgpack), and owns what belongs to the
process rather than to a protocol: the endpoint to the master, signals, the
``allow_shutdown`` triggers (SIGHUP, ``shutdown.stamp``), the drain
(:data:`~pyworker.config.DRAIN_SIGNAL`), the metrics endpoint and the orderly stop
(commands silenced, connection closed, executors ended).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger

from pyworker import config as config_mod
from pyworker import marks
from pyworker.config import DRAIN_SIGNAL
from pyworker.frontend import metrics
from pyworker.frontend.core import Link, WorkerCore
from pyworker.frontend.pool import ExecutorPool

log = Logger()


class Worker:
    """The whole front end: pool, core, connection service, shutdown handling."""

    def __init__(self, config: config_mod.WorkerConfig, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.config = config
        # The I/O backend choice is ours: builds must not see it (nor the master's info).
        io_choice = os.environ.pop("PYWORKER_IO", None)
        #: The first parts of every command's mark (:mod:`pyworker.marks`).
        self.instance = marks.instance_id()
        extra_env = {marks.BASE_VAR: f"{marks.basedir_id(config.basedir)}:{self.instance}"}
        if io_choice:
            extra_env["PYWORKER_IO"] = io_choice
        self.pool = ExecutorPool(reactor, extra_env=extra_env)
        self.core = WorkerCore(config, self.pool, reactor, self.stop)
        self.link: Link | None = None
        self.service: ClientService | None = None
        self.exit_code = 0
        self.stopping = False
        metrics.STATS.pool = self.pool
        self._shutdown_mtime = 0.0
        self._shutdown_loop: task.LoopingCall | None = None

    @property
    def shutdown_requested(self) -> bool:
        return self.core.shutdown_requested

    def endpoint(self) -> Any:
        cfg = self.config
        reactor = self.reactor
        if cfg.proxy_connection_string:
            from pyworker.frontend.tunnel import HTTPTunnelEndpoint

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

    def connect(self) -> None:
        """Make the link and the reconnecting service of the configured protocol."""
        if self.config.protocol not in config_mod.PROTOCOLS:
            raise ValueError(f"protocol {self.config.protocol!r} is not supported")

        def policy(attempt: int) -> float:
            delay = self.core.retry_delay(attempt)
            return 3600.0 if delay is None else delay

        if self.config.protocol == config_mod.PROTOCOL_MSGPACK:
            from pyworker.frontend.msgpack import msgpack_link

            self.link, self.service = msgpack_link(self.core, self.endpoint(), policy)
        else:
            from pyworker.frontend.pb import BotFactory

            factory = BotFactory(self.core)
            self.link = factory
            self.service = ClientService(self.endpoint(), factory, retryPolicy=policy,
                                         clock=self.reactor)

    def sweep_gone_instances(self) -> None:
        """Kill what the commands of a dead front end on this basedir left running (every
        pyworker process SIGKILLed at once leaves them to init, out of reach of any
        subreaper), before a new build can start; log each one."""
        for victim, what in marks.sweep_gone_instances(self.config.basedir, self.instance):
            log.warn("killed process {pid} ({what}) left by a gone worker: {mark}",
                     pid=victim.pid, what=what, mark=victim.mark)

    def start(self) -> None:
        self.sweep_gone_instances()
        self.connect()
        assert self.service is not None
        self.pool.start()
        self.service.startService()
        self.reactor.addSystemEventTrigger("before", "shutdown", self._before_shutdown)
        self.reactor.callWhenRunning(self._install_signal_handlers)
        if self.config.metrics_port:
            metrics.listen(self.reactor, self.config.metrics_port)
            log.info("serving /healthz and /metrics on 127.0.0.1:{port}",
                     port=self.config.metrics_port)
        if self.config.allow_shutdown == "signal":
            log.info("Setting up SIGHUP handler to initiate shutdown")
            signal.signal(signal.SIGHUP,
                          lambda *_: self.reactor.callFromThread(self.graceful_shutdown))
        elif self.config.allow_shutdown == "file":
            stamp = os.path.join(self.config.basedir, "shutdown.stamp")
            log.info("Watching {f}'s mtime to initiate shutdown", f=stamp)
            if os.path.exists(stamp):
                self._shutdown_mtime = os.path.getmtime(stamp)
            self._shutdown_loop = task.LoopingCall(self._check_shutdown_file, stamp)
            self._shutdown_loop.clock = self.reactor
            self._shutdown_loop.start(10, now=False)

    def _check_shutdown_file(self, stamp: str) -> None:
        if os.path.exists(stamp) and os.path.getmtime(stamp) > self._shutdown_mtime:
            log.info("Initiating shutdown because {f} was touched", f=stamp)
            self.graceful_shutdown()
            self._shutdown_mtime = os.path.getmtime(stamp)

    def graceful_shutdown(self) -> bool:
        """Ask the master to let running builds finish, then shut us down.

        With no master to ask (not connected, or msgpack: PROTOCOL.md appendix A) the
        worker stops now; False then.
        """
        d = self.link.ask_master_to_drain() if self.link is not None else None
        if d is None:
            log.info("No active connection, shutting down NOW")
            self.stop()
            return False
        log.info("Telling the master we want to shutdown after any running builds are finished")
        d.addErrback(lambda f: log.info('callRemote("shutdown") failed: {f}',
                                        f=f.getErrorMessage()))
        return True

    def _install_signal_handlers(self) -> None:
        """SIGTERM, SIGINT and SIGQUIT stop at once; ``DRAIN_SIGNAL`` (SIGUSR2) drains.

        Replaces the handlers the reactor installed (SIGTERM, SIGINT: the same stop).
        """
        call = self.reactor.callFromThread

        def on_signal(signum: int, frame: object) -> None:
            if signum == DRAIN_SIGNAL:
                call(self._drain)
            else:
                call(self._stop_now, signal.Signals(signum).name)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, DRAIN_SIGNAL):
            signal.signal(signum, on_signal)

    def _stop_now(self, why: str) -> None:
        log.info("received {why}: stopping now", why=why)
        self.stop()

    def _drain(self) -> None:
        """Take no new builds, let the running ones finish, then exit (the master's
        graceful shutdown of this worker); a drain already under way goes on."""
        if self.core.draining:
            log.info("received {sig} again: still draining", sig=DRAIN_SIGNAL.name)
            return
        log.info("received {sig}: draining (no new builds; running builds finish; "
                 "SIGTERM stops at once)", sig=DRAIN_SIGNAL.name)
        # while draining, losing the master stops the worker instead of reconnecting
        self.core.draining = self.graceful_shutdown()

    def stop(self, exit_code: int | None = None) -> None:
        if exit_code is not None:
            self.exit_code = exit_code
        if not self.stopping:
            self.stopping = True
            if self.reactor.running:
                self.reactor.stop()

    @defer.inlineCallbacks
    def _before_shutdown(self) -> Any:
        self.stopping = True
        if self._shutdown_loop is not None and self._shutdown_loop.running:
            self._shutdown_loop.stop()
        self.core.stop_commands()
        if self.service is not None:
            yield self.service.stopService()
        yield self.pool.stop()


def run_worker(config: config_mod.WorkerConfig) -> int:
    """Run the worker in this process until it is stopped; return the exit code."""
    from twisted.internet import reactor

    worker = Worker(config, reactor)
    try:
        worker.start()
    except ValueError as e:
        log.error("cannot start: {e}", e=e)
        return 1
    reactor.run()
    return worker.exit_code
