"""The front end against a real Buildbot 4.3.0 master: what the master learns about the
worker, shutdown from the master and from the worker (signal, file), duplicate names, a
master that goes away mid-build, and the daemonising ``start``/``stop``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MasterFactory
from realmaster import Builder, BuildResult, RealMaster, WorkerProcess, wait_for

SLEEPER = "[steps.ShellCommand(command=['sleep', '300'])]"
QUICK = "[steps.ShellCommand(command=['echo', 'ok'])]"
SHORT = "[steps.ShellCommand(command=['sleep', '3'])]"


def test_worker_info_matches_the_reference(
    make_master: MasterFactory, reference_worker: str, pyworker_executable: str
) -> None:
    master = make_master(
        {"qref": Builder(QUICK, workers=["ref"]), "qpy": Builder(QUICK, workers=["py"])},
        workers=("ref", "py"),
    )
    ref = master.start_worker(reference_worker, "ref")
    py = master.start_worker(pyworker_executable, "py")
    assert master.worker_info("py")["workerinfo"] == master.worker_info("ref")["workerinfo"]
    # every info key becomes a worker property of the build (os_*, numcpus, basedir, ...)
    ref_build, py_build = master.force_build("qref"), master.force_build("qpy")

    def worker_props(build: BuildResult, worker: WorkerProcess) -> dict[str, object]:
        return {
            k: str(v).replace(f"{worker.basedir}/{build.builder}", "<BUILDER>").replace(
                str(worker.basedir), "<BASEDIR>"
            )
            for k, v in build.properties.items()
            if build.property_sources.get(k) == "Worker" and k != "workername"
        }

    assert worker_props(py_build, py) == worker_props(ref_build, ref)
    assert py_build.properties["builddir"] == str(py.basedir / "qpy")
    ref.stop()
    py.stop()


def test_master_initiated_shutdown_exits_without_reconnecting(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    master = make_master({"q": QUICK})
    worker = master.start_worker(pyworker_executable)
    master.control_worker("w1", "kill")
    assert worker.wait(15) == 0
    assert "worker shutting down on command from master" in worker.twistd_log.read_text()


@pytest.mark.parametrize("how", ["signal", "file"])
def test_worker_initiated_graceful_shutdown_lets_the_build_finish(
    make_master: MasterFactory, pyworker_executable: str, how: str
) -> None:
    master = make_master({"short": SHORT})
    worker = master.start_worker(pyworker_executable, create_args=["-a", how])
    request = master.request_build("short")
    master.wait_build_started(request, step="shell")
    if how == "signal":
        os.kill(worker.pid, signal.SIGHUP)
    else:
        time.sleep(1.1)  # the stamp's mtime must be newer than at start-up
        (worker.basedir / "shutdown.stamp").write_text("")
    build = master.wait_build(request, timeout=60)
    assert build.result == "SUCCESS", build.describe()
    assert worker.wait(30) == 0


def test_duplicate_worker_name_is_refused_and_the_first_keeps_serving(
    make_master: MasterFactory, pyworker_executable: str, tmp_path: Path
) -> None:
    master = make_master({"q": QUICK})
    first = master.start_worker(pyworker_executable)
    second = WorkerProcess(
        pyworker_executable, tmp_path / "second", "w1", master.password,
        f"127.0.0.1:{master.pb_port}", env={},
    )
    second.create()
    second.start()
    try:
        assert second.wait(40) == 1
    finally:
        second.stop()
    assert "rejecting duplicate worker" in second.twistd_log.read_text()
    assert first.running()
    assert master.force_build("q").result == "SUCCESS"
    first.stop()


def _sleep_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "^sleep 300$"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def test_master_restart_mid_build_kills_the_command_and_the_worker_reconnects(
    make_master: MasterFactory, pyworker_executable: str
) -> None:
    master: RealMaster = make_master({"sleeper": SLEEPER, "q": QUICK})
    worker = master.start_worker(pyworker_executable)
    before = _sleep_pids()
    request = master.request_build("sleeper")
    master.wait_build_started(request, step="shell")
    started = wait_for(lambda: _sleep_pids() - before, 10, "the build's sleep to run")
    master.restart()
    # the lost connection stops the command: its process is gone
    wait_for(lambda: not (_sleep_pids() & started), 15, "the command to be killed")
    master.wait_worker_connected("w1", timeout=30)
    assert worker.running()
    assert master.force_build("q").result == "SUCCESS"
    worker.stop()


def test_daemon_start_waits_for_attached_and_stop_ends_it(
    make_master: MasterFactory, pyworker_executable: str, tmp_path: Path
) -> None:
    master = make_master({"q": QUICK})
    basedir = tmp_path / "daemon"
    subprocess.run(
        [pyworker_executable, "create-worker", "-q", str(basedir),
         f"127.0.0.1:{master.pb_port}", "w1", master.password],
        check=True, env={},
    )
    res = subprocess.run([pyworker_executable, "start", str(basedir)], env={},
                         capture_output=True, text=True, timeout=60)
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        assert "The buildbot-worker appears to have (re)started correctly." in res.stdout
        pid = int((basedir / "twistd.pid").read_text())
        master.wait_worker_connected("w1")
        assert master.force_build("q").result == "SUCCESS"
    finally:
        stop = subprocess.run([pyworker_executable, "stop", str(basedir)], env={},
                              capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert f"worker process {pid} is dead" in stop.stdout
    assert not (basedir / "twistd.pid").exists()
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                           text=True).stdout.strip()
    # gone, or a zombie: ps appends flags to the state letter (``ZN`` under nice), so only
    # the first letter says whether the process still runs
    assert state[:1] in ("", "Z"), f"daemon {pid} still running ({state})"
    master.wait_worker_disconnected("w1", timeout=15)


def test_pyworker_runs_a_basedir_made_by_buildbot_worker(
    make_master: MasterFactory, reference_worker: str, pyworker_executable: str,
    tmp_path: Path,
) -> None:
    master = make_master({"q": QUICK})
    basedir = tmp_path / "swapped"
    subprocess.run(
        [reference_worker, "create-worker", "-q", "--keepalive=30", str(basedir),
         f"127.0.0.1:{master.pb_port}", "w1", master.password],
        check=True, env={},
    )
    worker = WorkerProcess(pyworker_executable, basedir, "w1", master.password,
                           f"127.0.0.1:{master.pb_port}", env={})
    worker.start()  # no create-worker: the reference's tac as it is
    try:
        master.wait_worker_connected("w1")
        build = master.force_build("q")
        assert build.result == "SUCCESS", build.describe()
        assert build.properties["builddir"] == str(basedir / "q")
        log = worker.twistd_log.read_text()
        assert "sending application-level keepalives every 30 seconds" in log
        assert master.password not in log
    finally:
        worker.stop()
