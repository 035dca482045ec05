"""A real Buildbot 4.3.0 master with bugs cannot wedge a pyworker command (issue 12, 1 and 5).

A master-side step (:data:`STEPS`) sends raw ``RemoteCommand`` s (all at once), as a master with
bugs would: transfers whose ``writer``/``reader`` is a string, a bool, a number, bytes, a list
or a dict instead of a remote reference, and a second ``startCommand`` with the id of a
command that is still running. Each bad command must end at once with a readable failure;
the worker stays free (a plain build passes right after, and far more bad commands than the
executor pool has executors do not exhaust it); the first command of a reused id completes.
PB only: over msgpack the master makes the references itself.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from realmaster import PB_PROTOCOL, Builder, RealMaster, master_fixture

STEPS = """
import json  # noqa
from twisted.internet import defer
from buildbot.process import buildstep, remotecommand, results as _results


def _decode(value):
    if isinstance(value, dict) and list(value) == ['$bytes']:
        return value['$bytes'].encode()
    return value


class FixedIdCommand(remotecommand.RemoteCommand):
    fixed_id = None

    def _start(self):
        if self.fixed_id is not None:
            self.commandID = self.fixed_id
        return super()._start()


class RawCommands(buildstep.BuildStep):
    '''Sends each command of the 'cases' property in turn; one line per command in the
    'results' log: "ok rc=<rc>" or "failed: <exception>: <message>".'''
    name = 'raw'

    async def _one(self, case):
        args = {k: _decode(v) for k, v in case['args'].items()}
        cmd = remotecommand.RemoteCommand(case['name'], args)
        try:
            await self.runCommand(cmd)
            return f'ok rc={cmd.rc!r}'
        except Exception as e:
            text = str(e).strip().splitlines()[-1:] or ['']
            return f'failed: {type(e).__name__}: {text[0]}'

    async def run(self):
        out = await self.addLog('results')
        # all at once: the master waits up to 1 s for an 'rc' after each failed start
        cases = json.loads(self.getProperty('cases'))
        lines = await defer.gatherResults([defer.ensureDeferred(self._one(c)) for c in cases])
        await out.addStdout(''.join(line + '\\n' for line in lines))
        await out.finish()
        return _results.SUCCESS


class ReusedId(buildstep.BuildStep):
    '''Starts a shell command with a fixed id, then another with the same id while the first
    runs; the 'results' log gets a line for each: the second's first.'''
    name = 'reused'

    async def run(self):
        out = await self.addLog('results')
        first = FixedIdCommand('shell', {'workdir': 'build', 'command': ['sleep', '3'],
                                         'want_stdout': 1, 'want_stderr': 1})
        first.fixed_id = 'same-id'
        running = defer.ensureDeferred(self.runCommand(first))
        second = FixedIdCommand('shell', {'workdir': 'build', 'command': ['true'],
                                          'want_stdout': 1, 'want_stderr': 1})
        second.fixed_id = 'same-id'
        try:
            await self.runCommand(second)
            await out.addStdout(f'second ok rc={second.rc!r}\\n')
        except Exception as e:
            text = str(e).strip().splitlines()[-1:] or ['']
            await out.addStdout(f'second failed: {type(e).__name__}: {text[0]}\\n')
        await running
        await out.addStdout(f'first ok rc={first.rc!r}\\n')
        await out.finish()
        return _results.SUCCESS
"""

NORMAL = "[steps.ShellCommand(command=['echo', 'ok'])]"
BUILDERS: dict[str, str | Builder] = {
    "raw": "[RawCommands()]",
    "reused": "[ReusedId()]",
    "normal": NORMAL,
}
master = master_fixture(BUILDERS, extra_config=STEPS)

NOT_REFERENCES: list[Any] = ["not-a-reference", True, -1, 1.5, {"$bytes": "x"}, [], {}]
TRANSFERS: list[tuple[str, str, dict[str, Any]]] = [
    ("uploadFile", "writer", {"workdir": "build", "workersrc": "f", "blocksize": 16384,
                              "maxsize": None, "keepstamp": False}),
    ("uploadDirectory", "writer", {"workdir": "build", "workersrc": ".", "blocksize": 16384,
                                   "maxsize": None, "compress": None}),
    ("downloadFile", "reader", {"workdir": "build", "workerdest": "f", "blocksize": 16384,
                                "maxsize": None, "mode": None}),
]
#: more bad commands than the pool has executors (64)
MANY = 70


@pytest.fixture(scope="module")
def worker(master: RealMaster, pyworker_executable: str) -> Any:
    w = master.start_worker(pyworker_executable, protocol=PB_PROTOCOL)
    yield w
    w.stop()


def _results(build: Any) -> list[str]:
    lines: list[str] = build.step("raw").stream("results").splitlines()
    return lines


def test_each_non_reference_fails_at_once_and_readably(master: RealMaster, worker: Any) -> None:
    cases = [{"name": name, "args": dict(args, **{key: value})}
             for name, key, args in TRANSFERS for value in NOT_REFERENCES]
    started = time.monotonic()
    build = master.force_build("raw", {"cases": json.dumps(cases)}, timeout=60)
    assert build.result == "SUCCESS", build.describe()
    lines = _results(build)
    assert len(lines) == len(cases), build.describe()
    for case, line in zip(cases, lines, strict=True):
        key = "writer" if case["name"].startswith("upload") else "reader"
        assert line.startswith("failed: ") and f"'{key}' must be a remote reference" in line, (
            f"{json.dumps(case)}: {line}")
    print(f"{len(cases)} bad transfers refused in {time.monotonic() - started:.1f} s")
    assert master.force_build("normal").result == "SUCCESS"
    assert worker.running()


def test_many_bad_transfers_do_not_exhaust_the_pool(master: RealMaster, worker: Any) -> None:
    name, key, args = TRANSFERS[0]
    cases = [{"name": name, "args": dict(args, **{key: "not-a-reference"})}] * MANY
    build = master.force_build("raw", {"cases": json.dumps(cases)}, timeout=120)
    assert build.result == "SUCCESS", build.describe()
    lines = _results(build)
    assert len(lines) == MANY and all(line.startswith("failed: ") for line in lines), lines
    # every executor is free: builds that each need one still run, side by side
    builds = master.force_builds([("normal", None)] * 3)
    assert [b.result for b in builds] == ["SUCCESS"] * 3, [b.describe() for b in builds]


def test_a_reused_command_id_is_refused_and_the_first_completes(
    master: RealMaster, worker: Any,
) -> None:
    build = master.force_build("reused", timeout=60)
    assert build.result == "SUCCESS", build.describe()
    second, first = build.step("reused").stream("results").splitlines()
    assert second.startswith("second failed: ") and "command id same-id is already running" \
        in second, build.describe()
    assert first == "first ok rc=0", build.describe()
    assert master.force_build("normal").result == "SUCCESS"
