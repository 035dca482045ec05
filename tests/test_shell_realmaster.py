"""``shell`` against a real Buildbot 4.3.0 master: pyworker's stored logs, byte for byte,
against the reference worker's, on the same master in the same run; bad input; concurrency;
nothing left running after a kill.

Both workers attach to one master; each scenario exists twice (``<name>-ref`` pinned to the
reference worker, ``<name>-py`` to pyworker) so the stored logs
differ only in the builder directory and ``elapsedTime``, which are normalised.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from realmaster import (
    Builder,
    RealMaster,
    WorkerProcess,
    descendants,
    kill_processes,
    leftover_processes,
    master_fixture,
    normalize_stdio,
)

#: name -> list-of-steps source; every step's logs are compared between the two workers.
SCENARIOS = {
    "echo": "[steps.ShellCommand(command=['echo', 'hello', 'a b', ''])]",
    "partial": "[steps.ShellCommand(command='printf \"a\\\\nb\"')]",
    "stderr": "[steps.ShellCommand(command='echo out; echo err >&2; exit 3')]",
    "env": "[steps.ShellCommand(command='echo \"$FOO|$PYTHONPATH|${BAR-unset}\"',"
    " env={'FOO': 'x${HOME}y', 'PYTHONPATH': ['p1', 'p2'], 'BAR': None})]",
    "timeout": "[steps.ShellCommand(command=['sleep', '10'], timeout=1)]",
    "maxtime": "[steps.ShellCommand(command='echo start; sleep 10', maxTime=1)]",
    "pty": "[steps.ShellCommand(command='echo hi; echo err >&2', usePTY=True)]",
    "cr-ansi": "[steps.ShellCommand(command=r\"printf 'a\\rb\\r\\nc\\033[31mred\\033[0m\\n"
    "p1\\rp2\\rp3\\n\\033[2Jx\\n'\")]",
    "stdin": "[steps.ShellCommand(command=['cat'], initialStdin='one\\ntwo\\n')]",
    "nostderr": "[steps.ShellCommand(command='echo out; echo err >&2', want_stderr=False,"
    " logEnviron=False)]",
    "utf8": "[steps.ShellCommand(command=r\"printf 'caf\\303\\251 \\377\\376 ok\\n'\")]",
    "logfile": "[steps.ShellCommand(command='echo one > my.log; echo two >> my.log; sleep 2.5;"
    " echo three >> my.log', logfiles={'mylog': 'my.log'})]",
    # one write(), so both workers read the five lines as one chunk (the kill point and
    # the count in the header depend on how output is chunked)
    "maxlines": "[steps.ShellCommand(command=r\"printf '1\\n2\\n3\\n4\\n5\\n'; sleep 5\","
    " max_lines=2)]",
    "rc-map": "[steps.ShellCommand(command='exit 1', decodeRC={0: SUCCESS, 1: WARNINGS})]",
    "noenv": "[steps.ShellCommand(command=['true'], logEnviron=False, timeout=None)]",
}

LONG_LINE = "".join(chr(ord("a") + i % 26) for i in range(9000))
EXTRA_BUILDERS = {
    "long-py": Builder(
        f"[steps.ShellCommand(command=['printf', '%s\\\\n', {LONG_LINE!r}], logEnviron=False)]",
        workers=["py"],
    ),
    "bad-env-py": Builder("[steps.ShellCommand(command=['true'], env={'X': 3})]", workers=["py"]),
    "bad-workdir-py": Builder(
        "[steps.ShellCommand(command='touch blocker', workdir='.'),"
        " steps.ShellCommand(command=['true'], workdir='blocker/sub')]",
        workers=["py"],
    ),
    "missing-exe-py": Builder(
        "[steps.ShellCommand(command=['no-such-program-anywhere'])]", workers=["py"]
    ),
    "unknown-command-py": Builder("[RawCommand('frobnicate', {})]", workers=["py"]),
    "bad-args-py": Builder(
        "[RawCommand('shell', {'workdir': 'build', 'command': {'not': 'a command'}})]",
        workers=["py"],
    ),
    "missing-args-py": Builder("[RawCommand('mkdir', {})]", workers=["py"]),
    "orphans-py": Builder(
        "[steps.ShellCommand(command='setsid sleep 300 </dev/null >/dev/null 2>&1 &"
        " (sleep 300 &) ; sleep 300', timeout=2)]",
        workers=["py"],
    ),
    "interrupt-py": Builder("[steps.ShellCommand(command='sleep 300 & sleep 300')]",
                            workers=["py"]),
}
CONCURRENT = 8
for i in range(CONCURRENT):
    EXTRA_BUILDERS[f"par{i}-py"] = Builder(
        "[steps.ShellCommand(command='for i in $(seq 1 3000); do echo line $i; done; sleep 1',"
        " logEnviron=False)]",
        workers=["py"],
    )


def _builders() -> dict[str, Builder]:
    out: dict[str, Builder] = {}
    for name, steps in SCENARIOS.items():
        for who in ("ref", "py"):
            out[f"{name}-{who}"] = Builder(steps, workers=[who])
    out.update(EXTRA_BUILDERS)
    return out


RAW_COMMAND_STEP = """
from buildbot.process import buildstep, remotecommand
from buildbot.process.results import SUCCESS, WARNINGS

class RawCommand(buildstep.BuildStep):
    '''Sends a command with exactly these args, whatever the worker reports it knows.'''
    def __init__(self, remote_name, remote_args, **kwargs):
        super().__init__(**kwargs)
        self.remote_name = remote_name
        self.remote_args = remote_args

    async def run(self):
        cmd = remotecommand.RemoteCommand(self.remote_name, dict(self.remote_args))
        await self.runCommand(cmd)
        return cmd.results()
"""

master = master_fixture(_builders(), workers=("ref", "py"), extra_config=RAW_COMMAND_STEP)


@pytest.fixture(scope="module")
def workers(
    master: RealMaster, reference_worker: str, pyworker_executable: str
) -> Iterator[dict[str, WorkerProcess]]:
    ws = {
        "ref": master.start_worker(reference_worker, "ref"),
        "py": master.start_worker(pyworker_executable, "py"),
    }
    yield ws
    for w in ws.values():
        w.stop()


def _normalized_logs(build, worker: WorkerProcess) -> list[tuple[str, str, dict[str, str]]]:  # type: ignore[no-untyped-def]
    builder_dir = f"{worker.basedir}/{build.builder}"
    return [
        (s.name, s.result, {k: normalize_stdio(v, builder_dir) for k, v in s.logs.items()})
        for s in build.steps
    ]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_logs_identical_to_the_reference(
    master: RealMaster, workers: dict[str, WorkerProcess], scenario: str
) -> None:
    ref, py = master.force_builds([(f"{scenario}-ref", None), (f"{scenario}-py", None)])
    assert py.result == ref.result, py.describe() + "\n---\n" + ref.describe()
    got = _normalized_logs(py, workers["py"])
    expected = _normalized_logs(ref, workers["ref"])
    assert got == expected


def test_long_lines_are_cut_without_losing_characters(
    master: RealMaster, workers: dict[str, WorkerProcess]
) -> None:
    build = master.force_build("long-py")
    assert build.result == "SUCCESS", build.describe()
    out = build.step("shell").stream("stdio", "o")
    assert out.split("\n")[:-1] == [LONG_LINE[:4095], LONG_LINE[4095:8190], LONG_LINE[8190:]]


@pytest.mark.parametrize(
    ("builder", "result", "message"),
    [
        ("bad-env-py", "EXCEPTION", "'env' values must be strings or lists; key 'X' is incorrect"),
        ("bad-workdir-py", "EXCEPTION", "cannot create workdir"),
        ("missing-exe-py", "FAILURE", "no-such-program-anywhere"),
        ("unknown-command-py", "EXCEPTION", "unrecognized WorkerCommand 'frobnicate'"),
        ("bad-args-py", "EXCEPTION", "'command' must be a string or a non-empty list"),
        ("missing-args-py", "EXCEPTION", "mkdir is missing args: dir"),
    ],
)
def test_bad_input_fails_the_step_readably_and_the_worker_goes_on(
    master: RealMaster, workers: dict[str, WorkerProcess], builder: str, result: str,
    message: str,
) -> None:
    build = master.force_build(builder)
    assert build.result == result, build.describe()
    everything = "".join(text for s in build.steps for text in s.logs.values())
    assert message in everything, build.describe()
    assert workers["py"].running()
    assert master.force_build("echo-py").result == "SUCCESS"


def test_eight_builders_at_once(master: RealMaster, workers: dict[str, WorkerProcess]) -> None:
    builds = master.force_builds([(f"par{i}-py", None) for i in range(CONCURRENT)], timeout=180)
    expected = "".join(f"line {i}\n" for i in range(1, 3001))
    for b in builds:
        assert b.result == "SUCCESS", b.describe()
        assert b.step("shell").stream("stdio", "o") == expected
    # they overlapped: every build started before any finished (whole-second timestamps)
    assert max(b.started_at or 0 for b in builds) <= min(b.complete_at or 0 for b in builds)


def _no_new_processes(baseline: set[int]) -> None:
    leftovers = leftover_processes(baseline, grace=5)
    kill_processes(leftovers)
    assert leftovers == [], f"left behind: {[str(p) for p in leftovers]}"


def test_nothing_survives_a_timeout(master: RealMaster, workers: dict[str, WorkerProcess]) -> None:
    baseline = {p.pid for p in descendants()}
    build = master.force_build("orphans-py")
    assert build.result == "FAILURE", build.describe()
    assert "command timed out: 2 seconds without output" in build.step("shell").logs["stdio"]
    _no_new_processes(baseline)


def test_nothing_survives_an_interrupt(
    master: RealMaster, workers: dict[str, WorkerProcess]
) -> None:
    baseline = {p.pid for p in descendants()}
    request = master.request_build("interrupt-py")
    buildid = master.wait_build_started(request)
    master.wait_for_log(buildid, "shell", "stdio", "using PTY")
    master.stop_build(buildid)
    build = master.wait_build(request)
    assert build.result == "CANCELLED", build.describe()
    assert "command interrupted, attempting to kill" in build.step("shell").logs["stdio"]
    _no_new_processes(baseline)
