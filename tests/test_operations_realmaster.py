"""Operating a worker, against a real Buildbot 4.3.0 master: immediate stop on SIGTERM (as
the reference) and SIGQUIT, the drain on SIGUSR2 and ``stop --graceful``, the metrics
endpoint, restricted paths and resource reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import MasterFactory
from prometheus_client.parser import text_string_to_metric_families
from realmaster import (
    MSGPACK_PROTOCOL,
    BuildRequest,
    BuildResult,
    RealMaster,
    wait_for,
    wait_for_process,
)

#: The documented drain signal (README "Draining", contrib/systemd/pyworker.service).
DRAIN_SIGNAL = signal.SIGUSR2

SHORT = "[steps.ShellCommand(command=['sleep', '3'])]"
LONG = "[steps.ShellCommand(command=['sleep', '301'])]"
QUICK = "[steps.ShellCommand(command=['echo', 'ok'])]"
#: Sleeps on its first run, succeeds on the next (a mark in the build directory).
ONCE_THEN_OK = ("[steps.ShellCommand(command=['sh', '-c', "
                "'if [ -e ran-once ]; then echo retried-ok; exit 0; fi; "
                "touch ran-once; exec sleep 301'])]")


def _wait_graceful(master: RealMaster, name: str = "w1") -> None:
    """Wait until the master holds the worker in graceful shutdown (no new builds for it)."""
    wait_for(lambda: master.get("workers", name=name)["workers"][0]["graceful"] or None, 30,
             f"the master to put {name} in graceful shutdown")


def _finished_build(master: RealMaster, buildid: int) -> BuildResult:
    """The build once it is complete (its request may be re-queued: no worker is left)."""
    wait_for(lambda: master.get(f"builds/{buildid}")["builds"][0]["complete"] or None, 60,
             f"build {buildid} to finish")
    return master.build_result(buildid)


def _build_results(master: RealMaster, request: BuildRequest) -> list[str]:
    builds = master.get("builds", buildrequestid=request.brid)["builds"]
    return [master.build_result(b["buildid"]).result
            for b in sorted(builds, key=lambda b: b["buildid"])]


def test_sigterm_stops_at_once_and_the_build_is_retried(
    make_master: MasterFactory, worker_executable: str
) -> None:
    """SIGTERM stops at once, as the reference's does: the command is killed, the build is
    RETRY (not waited for), and the master runs it again once the worker is back."""
    master = make_master({"once": ONCE_THEN_OK})
    worker = master.start_worker(worker_executable)
    request = master.request_build("once")
    master.wait_build_started(request, step="shell")
    wait_for_process("sleep 301")
    os.kill(worker.pid, signal.SIGTERM)
    # twistd re-raises the signal once stopped; pyworker exits 0 (README: Differences)
    reference = os.path.basename(worker_executable) == "buildbot-worker"
    assert worker.wait(30) == (-signal.SIGTERM if reference else 0)
    wait_for_process("sleep 301", gone=True, timeout=10)
    worker.start()  # the same basedir: the retry finds the first run's mark
    build = master.wait_build(request, timeout=90)
    assert build.result == "SUCCESS", build.describe()
    assert _build_results(master, request) == ["RETRY", "SUCCESS"]


def test_sigquit_stops_at_once_and_kills_the_command(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    master = make_master({"long": LONG})
    worker = master.start_worker(pyworker_executable)
    request = master.request_build("long")
    buildid = master.wait_build_started(request, step="shell")
    wait_for_process("sleep 301")
    os.kill(worker.pid, signal.SIGQUIT)
    assert worker.wait(15) == 0
    wait_for_process("sleep 301", gone=True, timeout=10)
    assert _finished_build(master, buildid).result == "RETRY"


def test_drain_signal_lets_the_running_build_finish_then_exits(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    master = make_master({"short": SHORT, "quick": QUICK})
    worker = master.start_worker(pyworker_executable)
    request = master.request_build("short")
    master.wait_build_started(request, step="shell")
    os.kill(worker.pid, DRAIN_SIGNAL)
    _wait_graceful(master)
    # while draining, a new build request is not given to this worker
    queued = master.request_build("quick")
    build = master.wait_build(request, timeout=60)
    assert build.result == "SUCCESS", build.describe()
    assert worker.wait(30) == 0
    assert f"received {DRAIN_SIGNAL.name}: draining" in worker.twistd_log.read_text()
    assert master.get("builds", buildrequestid=queued.brid)["builds"] == []


def test_drain_signal_to_the_whole_process_group_lets_the_build_finish(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    """As ``tini -g`` or ``kill -USR2 -- -PGID`` send it: the executors, in the worker's
    process group, survive it and the running build finishes."""
    master = make_master({"short": SHORT})
    worker = master.start_worker(pyworker_executable)
    request = master.request_build("short")
    master.wait_build_started(request, step="shell")
    wait_for_process("sleep 3")
    assert os.getpgid(worker.pid) == worker.pid
    os.killpg(worker.pid, DRAIN_SIGNAL)
    build = master.wait_build(request, timeout=60)
    assert build.result == "SUCCESS", build.describe()
    assert worker.wait(30) == 0


def test_drain_signal_over_msgpack_stops_at_once(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    """msgpack cannot ask the master for a graceful shutdown (PROTOCOL.md appendix A): the
    drain signal stops the worker as SIGTERM does, and the master retries the build."""
    master = make_master({"long": LONG}, msgpack=True)
    worker = master.start_worker(pyworker_executable, protocol=MSGPACK_PROTOCOL)
    request = master.request_build("long")
    buildid = master.wait_build_started(request, step="shell")
    wait_for_process("sleep 301")
    os.kill(worker.pid, DRAIN_SIGNAL)
    assert worker.wait(15) == 0
    wait_for_process("sleep 301", gone=True, timeout=10)
    assert "No active connection, shutting down NOW" in worker.twistd_log.read_text()
    assert _finished_build(master, buildid).result == "RETRY"


def test_sigterm_during_a_drain_stops_at_once(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    master = make_master({"long": LONG})
    worker = master.start_worker(pyworker_executable)
    request = master.request_build("long")
    buildid = master.wait_build_started(request, step="shell")
    wait_for_process("sleep 301")
    os.kill(worker.pid, DRAIN_SIGNAL)
    _wait_graceful(master)
    # the drain signal again changes nothing: the drain goes on
    os.kill(worker.pid, DRAIN_SIGNAL)
    wait_for(lambda: "again: still draining" in worker.twistd_log.read_text(), 10,
             "the second drain signal to be seen")
    assert worker.running()
    assert wait_for_process("sleep 301")
    os.kill(worker.pid, signal.SIGTERM)
    assert worker.wait(15) == 0
    wait_for_process("sleep 301", gone=True, timeout=10)
    assert _finished_build(master, buildid).result == "RETRY"


def test_stop_graceful_waits_for_the_build_then_the_worker_is_gone(
    make_master: MasterFactory, pyworker_executable: str, tmp_path: Path
) -> None:
    """``pyworker stop --graceful`` on a daemon: the build finishes, then stop reports it."""
    master = make_master({"short": SHORT, "quick": QUICK})
    basedir = tmp_path / "daemon"
    subprocess.run(
        [pyworker_executable, "create-worker", "-q", str(basedir),
         f"127.0.0.1:{master.pb_port}", "w1", master.password],
        check=True, env={},
    )
    start = subprocess.run([pyworker_executable, "start", str(basedir)], env={},
                           capture_output=True, text=True, timeout=60)
    assert start.returncode == 0, start.stdout + start.stderr
    pid = int((basedir / "twistd.pid").read_text())
    try:
        master.wait_worker_connected("w1")
        request = master.request_build("short")
        master.wait_build_started(request, step="shell")
        stop = subprocess.run([pyworker_executable, "stop", "--graceful", str(basedir)],
                              env={}, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        # the build was over before stop returned: its request is complete
        reqs = master.get(f"buildrequests/{request.brid}")["buildrequests"]
        assert reqs[0]["complete"], stop.stdout
    finally:
        subprocess.run([pyworker_executable, "stop", str(basedir)], env={},
                       capture_output=True, timeout=60)
    lines = stop.stdout.splitlines()
    assert lines[0].startswith(f"worker process {pid} is draining: running builds finish")
    assert lines[-1] == f"worker process {pid} is dead"
    assert master.wait_build(request).result == "SUCCESS"
    assert not (basedir / "twistd.pid").exists()
    assert f"received {DRAIN_SIGNAL.name}: draining" in (basedir / "twistd.log").read_text()
    master.wait_worker_disconnected("w1", timeout=15)


def _get(url: str, accept: str | None = None) -> tuple[int, str]:
    headers = {} if accept is None else {"Accept": accept}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed by prometheus_client's own parser (fails on bad escaping)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint(make_master: MasterFactory, pyworker_executable: str) -> None:
    master = make_master({"quick": QUICK})
    # the worker's own listener: a port free now, another one if it is taken before the bind
    worker, port = master.start_worker_with_port(
        pyworker_executable, lambda port: ["--metrics-port", str(port)]
    )
    base = f"http://127.0.0.1:{port}"
    # the master lists the worker a moment before the worker's login call returns
    wait_for(lambda: _get(base + "/healthz") == (200, "ok\n"), 10, "/healthz to say ok")
    assert master.force_build("quick").result == "SUCCESS"
    status, text = _get(base + "/metrics")
    assert status == 200
    samples = _samples(text)
    assert samples[("pyworker_connected", ())] == 1
    assert samples[("pyworker_commands_total", (("command", "shell"),))] == 1
    assert samples[("pyworker_running_commands", ())] == 0
    assert samples[("pyworker_bytes_total", (("kind", "stdout"),))] == 3  # "ok\n"
    assert ("pyworker_executors", (("state", "idle"),)) in samples
    # the front end's own process metrics (the executors are other processes)
    front_end = psutil.Process(worker.pid)
    assert abs(samples[("process_start_time_seconds", ())] - front_end.create_time()) < 1
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert samples[("process_open_fds", ())] > 0
    # a scraper that asks for OpenMetrics gets it
    status, text = _get(base + "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and text.endswith("# EOF\n")
    assert "pyworker_connected 1.0" in text
    master.restart()
    master.wait_worker_connected("w1")
    # as above: the worker's own view (login returned) can trail the master's by a moment
    wait_for(lambda: _samples(_get(base + "/metrics")[1])[("pyworker_reconnects_total", ())] == 1
             or None, 10, "/metrics to count the reconnect")
    assert _samples(_get(base + "/metrics")[1])[("pyworker_connected", ())] == 1
    worker.stop()


def test_start_nodaemon_logs_to_stdout(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    """``start --nodaemon --logfile -`` (as ``twistd --logfile -``): the log on stdout."""
    master = make_master({"quick": QUICK})
    worker = master.start_worker(pyworker_executable, start_args=["--logfile", "-"])
    assert master.force_build("quick").result == "SUCCESS"
    wait_for(lambda: "message from master: attached" in worker.console_log.read_text(), 10,
             "the attach to be logged on stdout")
    # the tac's own log block opens twistd.log as it runs (under twistd too): nothing in it
    assert not worker.twistd_log.exists() or worker.twistd_log.read_text() == ""
    os.kill(worker.pid, signal.SIGQUIT)
    assert worker.wait(15) == 0
    console = worker.console_log.read_text()
    assert "Starting Worker -- version: 4.3.0" in console and "Server Shut Down." in console


def test_restrict_paths_refuses_paths_outside_the_basedir(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    master = make_master({
        "inside": "[steps.ShellCommand(command=['true'], workdir='build/sub')]",
        "outside": "[steps.ShellCommand(command=['true'], workdir='/tmp')]",
        "escape": "[steps.ShellCommand(command=['true'], workdir='../../..')]",
    })
    master.start_worker(pyworker_executable, create_args=["--restrict-paths"])
    assert master.force_build("inside").result == "SUCCESS"
    for builder in ("outside", "escape"):
        build = master.force_build(builder)
        assert build.result == "EXCEPTION", build.describe()
        text = "".join(t for s in build.steps for t in s.logs.values())
        assert "outside the worker's basedir" in text, build.describe()


def test_report_resources_adds_a_last_header_line(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    master = make_master({"quick": QUICK})
    worker = master.start_worker(pyworker_executable, create_args=["--report-resources"])
    build = master.force_build("quick")
    stdio = build.step("shell").logs["stdio"].splitlines()
    assert stdio[-1].startswith("h resources: ") and "CPU seconds" in stdio[-1], stdio
    assert "shell resources:" in worker.twistd_log.read_text()


@pytest.mark.parametrize("fmt", ["json"])
def test_json_log_lines(make_master: MasterFactory, pyworker_executable: str, fmt: str) -> None:
    master = make_master({"quick": QUICK})
    worker = master.start_worker(pyworker_executable, create_args=["--log-format", fmt])
    lines = [json.loads(line) for line in worker.twistd_log.read_text().splitlines() if line]
    assert any("message from master: attached" in entry["message"] for entry in lines)
