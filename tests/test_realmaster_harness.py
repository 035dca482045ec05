"""The real-master harness itself, proven against the reference worker (buildbot-worker 4.3.0).

These tests need ``BUILDBOT_MASTER_VENV`` (``ci/test.sh`` sets it); without it they skip.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import MasterFactory
from realmaster import (
    HarnessError,
    RealMaster,
    WorkerProcess,
    descendants,
    kill_processes,
    leftover_processes,
    master_fixture,
    normalize_stdio,
    wait_for_process,
)

SECRET = "secretvalue"

master = master_fixture(
    {
        # PROTOCOL.md §4.5's example, on a builder named 'testy' as in the interop suite
        "testy": "[steps.ShellCommand(command=['echo', 'hello', 'a b', ''])]",
        "props": "[steps.SetPropertyFromCommand(command=['echo', util.Property('foo')],"
        " property='echoed')]",
        "fails": "[steps.ShellCommand(command='echo out; echo err >&2; exit 3')]",
        "secret": "[steps.ShellCommand(command=['echo', util.Interpolate('%(secret:pw)s')])]",
        "sleepy0": "[steps.ShellCommand(command=['sleep', '2'])]",
        "sleepy1": "[steps.ShellCommand(command=['sleep', '2'])]",
        "sleepy2": "[steps.ShellCommand(command=['sleep', '2'])]",
        "long": "[steps.ShellCommand(command=['sleep', '100'])]",
        "orphan": "[steps.ShellCommand(command='setsid sleep 120 </dev/null >/dev/null 2>&1 &')]",
    },
    workers=("w1", "w2"),
    extra_config=f"""
from buildbot.test.fake.secrets import FakeSecretStorage
c['secretsProviders'] = [FakeSecretStorage(secretdict={{'pw': {SECRET!r}}})]
""",
)

# PROTOCOL.md §4.5: the stored stdio log of the reference worker started with an empty env
EXPECTED_ECHO_STDIO = (
    "hecho hello 'a b' \"\"\n"
    "h in dir <BASEDIR>/testy/build (timeout 1200 secs)\n"
    "h watching logfiles {}\n"
    "h argv: [b'echo', b'hello', b'a b', b'']\n"
    "h environment:\n"
    "h  LC_CTYPE=C.UTF-8\n"
    "h  PWD=<BASEDIR>/testy/build\n"
    "h using PTY: False\n"
    "ohello a b \n"
    "hprogram finished with exit code 0\n"
    "helapsedTime=<ELAPSED>\n"
)


@pytest.fixture(scope="module")
def worker(master: RealMaster, reference_worker: str) -> Iterator[WorkerProcess]:
    w = master.start_worker(reference_worker, "w1")
    yield w
    w.stop()


def test_echo_stdio_matches_protocol_reference(master: RealMaster, worker: WorkerProcess) -> None:
    build = master.force_build("testy")
    assert build.result == "SUCCESS", build.describe()
    shell = build.step("shell")
    assert shell.result == "SUCCESS"
    assert shell.log_types["stdio"] == "s"
    assert normalize_stdio(shell.logs["stdio"], worker.basedir) == EXPECTED_ECHO_STDIO
    assert shell.stream("stdio", "o") == "hello a b \n"
    assert build.properties["workername"] == "w1"


def test_properties_go_in_and_come_out(master: RealMaster, worker: WorkerProcess) -> None:
    value = "two words & 'quotes' ünïcode"
    build = master.force_build("props", properties={"foo": value})
    assert build.result == "SUCCESS", build.describe()
    assert build.properties["foo"] == value
    assert build.property_sources["foo"] == "Force Build Form"
    assert build.properties["echoed"] == value
    assert build.property_sources["echoed"] == "SetPropertyFromCommand Step"


def test_failure_exit_code_and_stderr(master: RealMaster, worker: WorkerProcess) -> None:
    build = master.force_build("fails")
    assert build.result == "FAILURE", build.describe()
    stdio = build.step("shell").logs["stdio"]
    assert build.step("shell").stream("stdio", "o") == "out\n"
    assert build.step("shell").stream("stdio", "e") == "err\n"
    assert "hprogram finished with exit code 3\n" in stdio
    assert stdio.startswith("hecho out; echo err >&2; exit 3\n")


def test_secrets_are_scrubbed_by_the_master(master: RealMaster, worker: WorkerProcess) -> None:
    build = master.force_build("secret")
    assert build.result == "SUCCESS", build.describe()
    stdio = build.step("shell").logs["stdio"]
    assert stdio.startswith("hecho <pw>\n")
    assert "o<pw>\n" in stdio
    assert SECRET not in stdio


def test_concurrent_builds_overlap(master: RealMaster, worker: WorkerProcess) -> None:
    builds = master.force_builds([(f"sleepy{i}", None) for i in range(3)] + [("testy", None)])
    assert [b.result for b in builds] == ["SUCCESS"] * 4, "\n".join(b.describe() for b in builds)
    sleepers = builds[:3]
    # all three 2 s sleeps were running at the same time (timestamps are whole seconds)
    assert max(b.started_at or 0 for b in sleepers) < min(b.complete_at or 0 for b in sleepers)


def test_timeout_reports_master_and_worker_logs(master: RealMaster, worker: WorkerProcess) -> None:
    request = master.request_build("sleepy0")
    with pytest.raises(HarnessError) as info:
        master.wait_build(request, timeout=0.3)
    message = str(info.value)
    assert "timed out after 0.3s" in message
    assert "master twistd.log tail" in message
    assert "worker w1" in message and "twistd.log tail" in message
    assert master.wait_build(request).result == "SUCCESS"


def test_leftover_processes_are_detected(master: RealMaster, worker: WorkerProcess) -> None:
    baseline = {p.pid for p in descendants()}
    build = master.force_build("orphan")
    assert build.result == "SUCCESS", build.describe()
    leftovers = leftover_processes(baseline, grace=0.5)
    kill_processes(leftovers)
    assert [p.cmdline for p in leftovers] == ["sleep 120"]
    assert leftover_processes(baseline, grace=2) == []


def test_stop_build_interrupts_the_command(master: RealMaster, worker: WorkerProcess) -> None:
    request = master.request_build("long")
    buildid = master.wait_build_started(request, step="shell")
    wait_for_process("sleep 100")
    master.stop_build(buildid)
    build = master.wait_build(request, timeout=30)
    assert build.result == "CANCELLED", build.describe()
    assert build.step("shell").result == "CANCELLED", build.describe()
    wait_for_process("sleep 100", timeout=5, gone=True)


def test_wait_for_log_sees_output_of_a_running_step(
    master: RealMaster, worker: WorkerProcess
) -> None:
    request = master.request_build("long")
    buildid = master.wait_build_started(request, step="shell")
    text = master.wait_for_log(buildid, "shell", "stdio", "h using PTY: False\n")
    assert text.startswith("hsleep 100\n")
    master.stop_build(buildid)
    assert master.wait_build(request).result == "CANCELLED"


def test_master_can_shut_a_worker_down(master: RealMaster, reference_worker: str) -> None:
    w2 = master.start_worker(reference_worker, "w2")
    master.control_worker("w2", "kill")
    assert w2.wait(timeout=20) == 0
    master.wait_worker_disconnected("w2")


def test_second_worker_starts_and_stops(master: RealMaster, reference_worker: str) -> None:
    w2 = master.start_worker(reference_worker, "w2")
    assert master.is_worker_connected("w2")
    info = master.worker_info("w2")["workerinfo"]
    assert info["version"] == "4.3.0"
    assert info["admin"] == "Your Name Here <admin@youraddress.invalid>\n"
    assert (w2.basedir / "buildbot.tac").exists()
    assert w2.stop() is not None
    master.wait_worker_disconnected("w2")
    assert not w2.running()


def test_fresh_master_per_test(make_master: MasterFactory, reference_worker: str) -> None:
    started = time.monotonic()
    m = make_master({"b": "util.BuildFactory([steps.ShellCommand(command=['true'])])"})
    m.start_worker(reference_worker)
    build = m.force_build("b")
    assert build.result == "SUCCESS", build.describe()
    assert time.monotonic() - started < 30


def test_reconfig_and_restart_keep_the_worker(
    make_master: MasterFactory, reference_worker: str
) -> None:
    def secrets(value: str) -> str:
        return (
            "from buildbot.test.fake.secrets import FakeSecretStorage\n"
            f"c['secretsProviders'] = [FakeSecretStorage(secretdict={{'s': {value!r}}})]\n"
        )

    m = make_master(
        {"b": "[steps.ShellCommand(command=['echo', util.Interpolate('%(secret:s)s')])]"},
        extra_config=secrets("first"),
    )
    # a fresh master binds port 0 and reports what the kernel chose (no pick-and-release)
    assert "'port': 'tcp:0:interface=127.0.0.1'" in (m.basedir / "master.cfg").read_text()
    ports = (m.pb_port, m.www_port)
    assert 0 not in ports and m.ports_file.exists()
    m.start_worker(reference_worker)
    assert "ofirst" not in m.force_build("b").step("shell").logs["stdio"]
    m.reconfig(secrets("second"))
    assert m.is_worker_connected("w1")
    stdio = m.force_build("b").step("shell").logs["stdio"]
    assert "o<s>\n" in stdio and "second" not in stdio
    m.restart()  # the worker notices the lost connection and reconnects by itself
    assert (m.pb_port, m.www_port) == ports  # as reported by the restarted master
    m.wait_worker_connected("w1", timeout=60)
    build = m.force_build("b")
    assert (build.number, build.result) == (3, "SUCCESS"), build.describe()


def test_each_worker_implementation_runs_a_build(
    make_master: MasterFactory, worker_executable: str
) -> None:
    """The same harness drives the reference worker and pyworker (``PYWORKER``)."""
    m = make_master({"b": "[steps.ShellCommand(command=['echo', 'hello', 'a b', ''])]"})
    w = m.start_worker(worker_executable)
    build = m.force_build("b")
    assert build.result == "SUCCESS", build.describe() + "\n" + w.logs()
    assert build.step("shell").stream("stdio", "o") == "hello a b \n"
    assert build.properties["workername"] == "w1"
