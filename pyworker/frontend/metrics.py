"""The worker's counters, and the opt-in HTTP endpoint that shows them.

:data:`STATS` is updated by the front end as it works (connection, commands, bytes). With
``metrics_port`` set, :func:`listen` serves on 127.0.0.1 only:

* ``/healthz``: ``200 ok`` while connected to the master, ``503`` otherwise;
* ``/metrics``: the counters in Prometheus' text exposition format.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any

from twisted.web import resource, server


@dataclasses.dataclass
class Stats:
    connected: bool = False
    connected_since: float | None = None
    reconnects: int = 0
    running_commands: int = 0
    commands: Counter[str] = dataclasses.field(default_factory=Counter)
    failed_commands: int = 0
    #: bytes sent to or received from the master, by kind (stdout, stderr, header, log,
    #: upload, download)
    bytes: Counter[str] = dataclasses.field(default_factory=Counter)
    pool: Any = None
    started_at: float = dataclasses.field(default_factory=time.time)

    def command_started(self, name: str) -> None:
        self.commands[name] += 1
        self.running_commands += 1

    def command_finished(self, failed: bool) -> None:
        self.running_commands -= 1
        if failed:
            self.failed_commands += 1

    def render(self) -> str:
        """Prometheus text exposition of every counter."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
            lines.append(f"# HELP pyworker_{name} {help_text}")
            lines.append(f"# TYPE pyworker_{name} {kind}")
            for labels, value in samples:
                lines.append(f"pyworker_{name}{labels} {value}")

        metric("connected", "gauge", "1 while connected to the master.",
               [("", int(self.connected))])
        metric("reconnects_total", "counter", "Connections to the master after the first.",
               [("", self.reconnects)])
        metric("running_commands", "gauge", "Commands running now.",
               [("", self.running_commands)])
        metric("commands_total", "counter", "Commands started, by command.",
               [(f'{{command="{k}"}}', v) for k, v in sorted(self.commands.items())])
        metric("failed_commands_total", "counter",
               "Commands that completed with a failure (the master's EXCEPTION).",
               [("", self.failed_commands)])
        metric("bytes_total", "counter", "Bytes streamed to or from the master, by kind.",
               [(f'{{kind="{k}"}}', v) for k, v in sorted(self.bytes.items())])
        pool = self.pool
        if pool is not None:
            metric("executors", "gauge", "Executor processes, by state.",
                   [('{state="idle"}', len(pool.idle)), ('{state="busy"}', len(pool.busy))])
            metric("executors_started_total", "counter", "Executor processes started.",
                   [("", pool.started_count)])
            metric("executors_died_total", "counter",
                   "Executor processes that died while running a command.",
                   [("", pool.died_count)])
        metric("uptime_seconds", "gauge", "Seconds since the worker started.",
               [("", round(time.time() - self.started_at, 3))])
        return "\n".join(lines) + "\n"


#: The one set of counters of this process.
STATS = Stats()


class _Health(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if STATS.connected:
            return b"ok\n"
        request.setResponseCode(503)
        return b"not connected to the master\n"


class _Metrics(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return STATS.render().encode()


def listen(reactor: Any, port: int) -> Any:
    """Serve ``/healthz`` and ``/metrics`` on 127.0.0.1:``port``; returns the listening port."""
    root = resource.Resource()
    root.putChild(b"healthz", _Health())
    root.putChild(b"metrics", _Metrics())
    site = server.Site(root)
    site.noisy = False
    return reactor.listenTCP(port, site, interface="127.0.0.1")
