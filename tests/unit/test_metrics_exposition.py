"""``/metrics`` as ``prometheus_client`` renders it: STATS's names and values, escaped
label values, the front end's ``process_*`` metrics."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from pyworker.frontend import metrics

WEIRD = 'say "hi"\\ to\nme'


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_counters_keep_their_names_and_values(fresh_stats: metrics.Stats) -> None:
    fresh_stats.connected = True
    fresh_stats.reconnects = 2
    fresh_stats.command_started("shell")
    fresh_stats.command_started("shell")
    fresh_stats.command_finished(failed=True)
    fresh_stats.bytes["stdout"] += 3
    fresh_stats.pool = SimpleNamespace(idle=[1, 2], busy=[3], started_count=4, died_count=1)
    samples = _samples(generate_latest(metrics.make_registry(fresh_stats)).decode())
    assert samples[("pyworker_connected", ())] == 1
    assert samples[("pyworker_reconnects_total", ())] == 2
    assert samples[("pyworker_running_commands", ())] == 1
    assert samples[("pyworker_commands_total", (("command", "shell"),))] == 2
    assert samples[("pyworker_failed_commands_total", ())] == 1
    assert samples[("pyworker_bytes_total", (("kind", "stdout"),))] == 3
    assert samples[("pyworker_executors", (("state", "idle"),))] == 2
    assert samples[("pyworker_executors", (("state", "busy"),))] == 1
    assert samples[("pyworker_executors_started_total", ())] == 4
    assert samples[("pyworker_executors_died_total", ())] == 1
    assert samples[("pyworker_uptime_seconds", ())] >= 0


def test_label_values_with_quotes_backslashes_and_newlines_are_escaped(
    fresh_stats: metrics.Stats,
) -> None:
    fresh_stats.command_started(WEIRD)
    fresh_stats.bytes[WEIRD] += 7
    text = generate_latest(metrics.make_registry(fresh_stats)).decode()
    # one line per sample: the newline in the value is escaped, not written
    assert [line for line in text.splitlines() if "say" in line] == [
        'pyworker_commands_total{command="say \\"hi\\"\\\\ to\\nme"} 1.0',
        'pyworker_bytes_total{kind="say \\"hi\\"\\\\ to\\nme"} 7.0',
    ]
    samples = _samples(text)
    assert samples[("pyworker_commands_total", (("command", WEIRD),))] == 1
    assert samples[("pyworker_bytes_total", (("kind", WEIRD),))] == 7
    openmetrics = generate_openmetrics(metrics.make_registry(fresh_stats)).decode()
    families = {f.name: f for f in parse_openmetrics(openmetrics)}
    assert [s.labels for s in families["pyworker_commands"].samples] == [{"command": WEIRD}]


def test_process_metrics_of_this_process(fresh_stats: metrics.Stats) -> None:
    import psutil

    families = {f.name: f for f in
                text_string_to_metric_families(generate_latest(metrics.make_registry(fresh_stats)).decode())}
    for name in ("process_resident_memory_bytes", "process_virtual_memory_bytes",
                 "process_start_time_seconds", "process_cpu_seconds", "process_open_fds",
                 "process_max_fds"):
        assert name in families, sorted(families)
    me = psutil.Process()
    (start,) = families["process_start_time_seconds"].samples
    assert abs(start.value - me.create_time()) < 1  # the same /proc field, rounded apart
    (rss,) = families["process_resident_memory_bytes"].samples
    assert rss.value > 0
