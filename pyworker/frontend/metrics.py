"""The worker's counters, and the opt-in HTTP endpoint that shows them.

:data:`STATS` is updated by the front end as it works (connection, commands, bytes): plain
attributes and ``Counter`` dicts, so the hot path pays one increment. With ``metrics_port``
set, :func:`listen` serves on 127.0.0.1 only:

* ``/healthz``: ``200 ok`` while connected to the master, ``503`` otherwise;
* ``/metrics``: :func:`make_registry` through ``prometheus_client``: the counters (read by
  a collector at scrape time, label values escaped by the library), the front-end
  process's ``process_*`` metrics, text or OpenMetrics format as the scraper's ``Accept``
  asks. ``prometheus_client`` is imported only then (1.2 MiB of RSS a worker without
  ``metrics_port`` does not pay).

``twisted.web`` is imported only by :func:`listen` as well: the counters are on every start's
path, the web server only on that of a worker with ``metrics_port`` (it would add about 20 ms
to a start, the time to attached a latent worker waits for).

``/metrics`` is what ``prometheus_client.twisted.MetricsResource`` builds (the library's
WSGI app in a ``WSGIResource``), made on the reactor :func:`listen` is given rather than on
the global one that module imports at import time. It renders in the reactor's thread
pool, so the collector reads what the reactor thread changes through atomic copies
(``dict(...)``, ``len``).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric


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


#: The one set of counters of this process.
STATS = Stats()


class StatsCollector:
    """A :class:`Stats` as Prometheus metric families (a ``prometheus_client`` collector)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        def by_label(family: GaugeMetricFamily | CounterMetricFamily,
                     values: dict[str, int]) -> GaugeMetricFamily | CounterMetricFamily:
            for label, value in sorted(values.items()):
                family.add_metric([label], value)
            return family

        s = self.stats
        g, c = GaugeMetricFamily, CounterMetricFamily
        yield g("pyworker_connected", "1 while connected to the master.",
                value=int(s.connected))
        yield c("pyworker_reconnects_total", "Connections to the master after the first.",
                value=s.reconnects)
        yield g("pyworker_running_commands", "Commands running now.", value=s.running_commands)
        yield by_label(c("pyworker_commands_total", "Commands started, by command.",
                         labels=["command"]), dict(s.commands))
        yield c("pyworker_failed_commands_total",
                "Commands that completed with a failure (the master's EXCEPTION).",
                value=s.failed_commands)
        yield by_label(c("pyworker_bytes_total", "Bytes streamed to or from the master, by kind.",
                         labels=["kind"]), dict(s.bytes))
        pool = s.pool
        if pool is not None:
            yield by_label(g("pyworker_executors", "Executor processes, by state.",
                             labels=["state"]),
                           {"idle": len(pool.idle), "busy": len(pool.busy)})
            yield c("pyworker_executors_started_total", "Executor processes started.",
                    value=pool.started_count)
            yield c("pyworker_executors_died_total",
                    "Executor processes that died while running a command.",
                    value=pool.died_count)
        yield g("pyworker_uptime_seconds", "Seconds since the worker started.",
                value=round(time.time() - s.started_at, 3))


def make_registry(stats: Stats) -> CollectorRegistry:
    """A registry with ``stats`` and this process's ``process_*`` metrics."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))  # a collector is anything with collect()
    ProcessCollector(registry=registry)
    return registry


def listen(reactor: Any, port: int) -> Any:
    """Serve ``/healthz`` and ``/metrics`` on 127.0.0.1:``port``; returns the listening port."""
    from prometheus_client import make_wsgi_app
    from twisted.web import resource, server
    from twisted.web.wsgi import WSGIResource

    class Health(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            if STATS.connected:
                return b"ok\n"
            request.setResponseCode(503)
            return b"not connected to the master\n"

    root = resource.Resource()
    root.putChild(b"healthz", Health())
    app = make_wsgi_app(make_registry(STATS))
    root.putChild(b"metrics", WSGIResource(reactor, reactor.getThreadPool(), app))
    site = server.Site(root)
    site.noisy = False
    return reactor.listenTCP(port, site, interface="127.0.0.1")
