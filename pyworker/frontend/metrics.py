"""The worker's counters, and the opt-in HTTP endpoint that shows them.

:data:`STATS` is updated by the front end as it works (connection, commands, bytes): plain
attributes and ``Counter`` dicts, so the hot path pays one increment. With ``metrics_port``
set, :func:`listen` serves on 127.0.0.1 only:

* ``/healthz``: ``200 ok`` while connected to the master, ``503`` otherwise;
* ``/metrics``: :data:`REGISTRY` through ``prometheus_client``: the counters (read by a
  collector at scrape time, label values escaped by the library), the front-end process's
  ``process_*`` metrics, text or OpenMetrics format as the scraper's ``Accept`` asks.

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
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.web import resource, server
from twisted.web.wsgi import WSGIResource


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


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"pyworker_{name}", help_text, value=value)


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"pyworker_{name}", help_text, value=value)


def _by_label(family: GaugeMetricFamily | CounterMetricFamily,
              values: dict[str, int]) -> GaugeMetricFamily | CounterMetricFamily:
    for label, value in sorted(values.items()):
        family.add_metric([label], value)
    return family


class StatsCollector(Collector):
    """:data:`STATS` (or another :class:`Stats`) as Prometheus metric families."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield _gauge("connected", "1 while connected to the master.", int(s.connected))
        yield _counter("reconnects_total", "Connections to the master after the first.",
                       s.reconnects)
        yield _gauge("running_commands", "Commands running now.", s.running_commands)
        yield _by_label(CounterMetricFamily("pyworker_commands_total",
                                            "Commands started, by command.", labels=["command"]),
                        dict(s.commands))
        yield _counter("failed_commands_total",
                       "Commands that completed with a failure (the master's EXCEPTION).",
                       s.failed_commands)
        yield _by_label(CounterMetricFamily("pyworker_bytes_total",
                                            "Bytes streamed to or from the master, by kind.",
                                            labels=["kind"]),
                        dict(s.bytes))
        pool = s.pool
        if pool is not None:
            yield _by_label(GaugeMetricFamily("pyworker_executors",
                                              "Executor processes, by state.", labels=["state"]),
                            {"idle": len(pool.idle), "busy": len(pool.busy)})
            yield _counter("executors_started_total", "Executor processes started.",
                           pool.started_count)
            yield _counter("executors_died_total",
                           "Executor processes that died while running a command.",
                           pool.died_count)
        yield _gauge("uptime_seconds", "Seconds since the worker started.",
                     round(time.time() - s.started_at, 3))


def make_registry(stats: Stats) -> CollectorRegistry:
    """A registry with ``stats`` and this process's ``process_*`` metrics."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    ProcessCollector(registry=registry)
    return registry


#: What ``/metrics`` shows.
REGISTRY = make_registry(STATS)


class _Health(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if STATS.connected:
            return b"ok\n"
        request.setResponseCode(503)
        return b"not connected to the master\n"


def listen(reactor: Any, port: int) -> Any:
    """Serve ``/healthz`` and ``/metrics`` on 127.0.0.1:``port``; returns the listening port."""
    root = resource.Resource()
    root.putChild(b"healthz", _Health())
    app = make_wsgi_app(REGISTRY)
    root.putChild(b"metrics", WSGIResource(reactor, reactor.getThreadPool(), app))
    site = server.Site(root)
    site.noisy = False
    return reactor.listenTCP(port, site, interface="127.0.0.1")
