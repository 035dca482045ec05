"""What a command inherits from the worker, against a real Buildbot 4.3.0 master: signal
dispositions, the signal mask and open descriptors, over a pipe and over a PTY, pyworker
against the reference worker; and a build stopped with ``interruptSignal='INT'`` whose
script traps the signal, cleans up and exits with its own code.

Each worker runs twice: started as the harness starts it, and started with SIGHUP ignored
(as under ``nohup``) through a wrapper script. Both implementations' commands must see the
same thing; on top of that, SIGINT must not be ignored and only 0, 1 and 2 may be open. (The
reference resets every signal its process ignores to the default for its commands: SIGHUP
ignored by the worker is not ignored by the commands.)
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from realmaster import (
    Builder,
    RealMaster,
    WorkerProcess,
    descendants,
    kill_processes,
    leftover_processes,
    master_fixture,
)

PROBE = Path(__file__).with_name("inherit_probe.py")
WHO = ("ref", "py", "ref-nohup", "py-nohup")

#: the kernel's view (grep is exec'd by the worker directly) and Python's view
PROBE_STEPS = (
    "[steps.ShellCommand(name='kernel', command=['grep', '-E', '^Sig(Ign|Blk):',"
    " '/proc/self/status'], usePTY={pty}),"
    f" steps.ShellCommand(name='python', command=[{sys.executable!r}, {str(PROBE)!r}],"
    " usePTY={pty})]"
)
#: the trap kills the background sleep (asynchronous commands of a non-interactive shell
#: ignore SIGINT), leaves a file and exits 7. Over a PTY both workers close the terminal
#: right after the interrupt signal, and the hangup would race the trap: the script ignores
#: SIGHUP so that only SIGINT decides.
TRAP_STEPS = (
    "[steps.ShellCommand(name='trapped', command=\"{hup}rm -f trapped; trap 'kill $!;"
    " echo cleaned > trapped; exit 7' INT; echo ready; sleep 300 & wait\","
    " interruptSignal='INT', usePTY={pty})]"
)


def _builders() -> dict[str, Builder]:
    out: dict[str, Builder] = {}
    for who in WHO:
        for pty in (False, True):
            tty = "pty" if pty else "pipe"
            out[f"probe-{tty}-{who}"] = Builder(PROBE_STEPS.format(pty=pty), workers=[who])
            out[f"trap-{tty}-{who}"] = Builder(
                TRAP_STEPS.format(pty=pty, hup="trap '' HUP; " if pty else ""), workers=[who])


    out["sleeper-py-int"] = Builder(
        "[steps.ShellCommand(command='echo ready; sleep 300', usePTY=False),"
        " steps.ShellCommand(command='echo ready; sleep 300', usePTY=True)]",
        workers=["py-int"])
    return out


master = master_fixture(_builders(), workers=(*WHO, "py-int"))


def _hup_ignoring(executable: str, directory: Path) -> str:
    """A wrapper that starts ``executable`` with SIGHUP ignored, as ``nohup`` does. Named
    after the executable so the harness gives it the same environment."""
    wrapper = directory / f"{Path(executable).name}-nohup"
    wrapper.write_text(f"#!/bin/sh\ntrap '' HUP\nexec {executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture(scope="module")
def workers(
    master: RealMaster, reference_worker: str, pyworker_executable: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, WorkerProcess]]:
    wrappers = tmp_path_factory.mktemp("wrappers")
    executables = {
        "ref": reference_worker,
        "py": pyworker_executable,
        "ref-nohup": _hup_ignoring(reference_worker, wrappers),
        "py-nohup": _hup_ignoring(pyworker_executable, wrappers),
    }
    ws = {who: master.start_worker(exe, who) for who, exe in executables.items()}
    yield ws
    for w in ws.values():
        w.stop()


def _ignored(pid: int) -> int:
    """The kernel's set of signals a process ignores (bit n-1 for signal n)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("SigIgn:")).split()[1], 16)


def _probe(master: RealMaster, builder: str) -> list[str]:
    build = master.force_build(builder)
    assert build.result == "SUCCESS", build.describe()
    lines = []
    for step in ("kernel", "python"):
        for line in build.step(step).stream().splitlines():
            line = line.strip()
            if line.startswith(("Sig", "probe ")):
                lines.append(" ".join(line.split()))
    return lines


@pytest.mark.parametrize("nohup", [False, True], ids=["plain", "nohup"])
@pytest.mark.parametrize("tty", ["pipe", "pty"])
def test_commands_inherit_what_the_reference_gives_them(
    master: RealMaster, workers: dict[str, WorkerProcess], tty: str, nohup: bool
) -> None:
    suffix = "-nohup" if nohup else ""
    for who in ("ref", "py"):  # the wrapper did its job: the worker itself ignores SIGHUP
        assert bool(_ignored(workers[who + suffix].pid) & 1) == nohup
    reference = _probe(master, f"probe-{tty}-ref{suffix}")
    ours = _probe(master, f"probe-{tty}-py{suffix}")
    assert ours == reference
    assert len(ours) == 9, ours  # SigBlk, SigIgn, five dispositions, mask, descriptors
    sig_ign = int(next(x for x in ours if x.startswith("SigIgn:")).split()[1], 16)
    assert not sig_ign & (1 << (2 - 1)), f"SIGINT ignored: {ours}"
    assert "probe SIGINT=default" in ours
    # the reference's spawnProcess resets every ignored signal, nohup's SIGHUP included
    assert "probe SIGHUP=default" in ours
    # the executor's handler for the drain signal (sent to its process group) is not inherited
    assert "probe SIGUSR2=default" in ours
    assert "probe fds=[0, 1, 2]" in ours


@pytest.mark.parametrize("who", ["ref", "py"])
@pytest.mark.parametrize("tty", ["pipe", "pty"])
def test_interrupt_with_sigint_runs_the_scripts_trap(
    master: RealMaster, workers: dict[str, WorkerProcess], tty: str, who: str
) -> None:
    builder = f"trap-{tty}-{who}"
    request = master.request_build(builder)
    buildid = master.wait_build_started(request)
    master.wait_for_log(buildid, "trapped", "stdio", "ready")
    master.stop_build(buildid)
    build = master.wait_build(request)
    stdio = build.step("trapped").logs["stdio"]
    assert build.result == "CANCELLED", build.describe()
    assert "program finished with exit code 7" in stdio, stdio
    assert "failed to kill" not in stdio, stdio
    trapped = workers[who].basedir / builder / "build" / "trapped"
    assert trapped.read_text() == "cleaned\n"


def test_ctrl_c_in_the_workers_terminal_stops_everything(
    master: RealMaster, workers: dict[str, WorkerProcess], pyworker_executable: str
) -> None:
    """``pyworker start --nodaemon`` and ^C: the terminal signals the foreground process group
    (the front end and its executors; commands have groups of their own). The front end stops
    at once and nothing it started survives, whatever the executors do with the signal."""
    baseline = {p.pid for p in descendants()}
    worker = master.start_worker(pyworker_executable, "py-int")
    request = master.request_build("sleeper-py-int")
    buildid = master.wait_build_started(request)
    master.wait_for_log(buildid, "shell", "stdio", "ready")
    os.killpg(worker.pid, signal.SIGINT)  # the harness made the worker a group leader
    worker.wait(30)
    leftovers = leftover_processes(baseline)
    kill_processes(leftovers)
    assert leftovers == [], f"left behind: {[str(p) for p in leftovers]}"
