"""Bad input from a real Buildbot 4.3.0 master never takes pyworker down (issue 6, item 4).

A master-side step (:data:`FUZZ_STEP`) sends ``RemoteCommand(name, args)`` verbatim, with
``name`` and ``args`` taken from a build property (JSON, plus a few ``{"$...": ...}`` forms
for what JSON cannot carry: master-side writer/reader references, bytes, huge strings). A
seeded generator makes argument dicts for every command: valid ones, then mutated (keys
missing, values mistyped, huge or malformed, unknown keys), unknown command names, args that
are not a dict, and two commands on two builders that reuse one ``command_id`` while both
run. Every build must end (no hang) as SUCCESS, FAILURE or EXCEPTION; afterwards the worker
still runs, a normal build passes and no process is left behind.

Paths are always relative, with no ``..`` and no ``~``: whatever the fuzz asks for lands in
the builder's directory under pytest's tmp dir (``rmdir ''`` removes the builder directory
itself, never more). ``PYWORKER_FUZZ_SEED`` replays a run; ``PYWORKER_FUZZ_BUILDS`` sets the
count (default 60).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realmaster import (
    RESULT_NAMES,
    Builder,
    BuildRequest,
    RealMaster,
    WorkerProcess,
    descendants,
    master_fixture,
    wait_for,
)

SEED = int(os.environ.get("PYWORKER_FUZZ_SEED") or 20250607)
BUILDS = int(os.environ.get("PYWORKER_FUZZ_BUILDS") or 60)
#: builders the fuzz builds run on, side by side (all on the one worker)
LANES = 2
ALLOWED = {"SUCCESS", "WARNINGS", "FAILURE", "EXCEPTION"}

FUZZ_STEP = """
import json, os, tempfile  # noqa
from buildbot.process import buildstep, remotecommand, remotetransfer

class FixedIdCommand(remotecommand.RemoteCommand):
    '''A RemoteCommand whose command_id is chosen by the test (to reuse one).'''
    fixed_id = None

    def _start(self):
        if self.fixed_id is not None:
            self.commandID = self.fixed_id
        return super()._start()

class FuzzCommand(buildstep.BuildStep):
    '''Sends the command described by the 'fuzz' property, whatever it is.'''
    name = 'fuzz'

    def _decode(self, value):
        if isinstance(value, list):
            return [self._decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, arg), = value.items()
            if key == '$writer':
                d = tempfile.mkdtemp(dir=self._dir)
                w = (remotetransfer.FileWriter(os.path.join(d, 'f'), None, None) if arg == 'file'
                     else remotetransfer.DirectoryWriter(d, None, None, None))
                self._closers.append(w)
                return w
            if key == '$reader':
                fp = open(os.path.join(self._dir, 'source.bin'), 'rb')
                r = remotetransfer.FileReader(fp)
                self._closers.append(r)
                return r
            if key == '$bytes':
                return arg.encode('utf-8')
            if key == '$huge':
                return 'x' * arg
            if key == '$tuple':
                return tuple(self._decode(arg))
        return {k: self._decode(v) for k, v in value.items()}

    async def run(self):
        self._closers = []
        self._dir = self.getProperty('fuzz_dir')
        spec = json.loads(self.getProperty('fuzz'))
        cmd = FixedIdCommand(spec['name'], self._decode(spec['args']))
        cmd.fixed_id = spec.get('command_id')
        try:
            await self.runCommand(cmd)
        finally:
            for c in self._closers:
                try:
                    c.remote_close()
                except Exception:
                    pass
        return cmd.results()
"""

NORMAL = "[steps.ShellCommand(command=['echo', 'ok'])]"


# -- the generator --------------------------------------------------------------------------

#: Safe relative path values: never absolute, never '..', never '~'.
PATHS: list[Any] = ["f", "d", "sub/dir", "", ".", "x y", "caf\u00e9", "n" * 300, "d/*", "*",
                    ["a", "b"], []]
JUNK: list[Any] = [None, 0, -1, 2**40, 1.5, True, "", "x", [], {}, ["a", 1], {"k": "v"},
                   {"$bytes": "b\u00e9"}, {"$huge": 500_000}, {"$tuple": ["a", "b"]},
                   list(range(2000)), {"k": {"k": {"k": [None]}}}]
SHELL_COMMANDS: list[Any] = [["echo", "hi"], "echo hi; exit 3", ["true"], ["printf", "%s\\n", "a"],
                             "echo err >&2", ["sleep", "0.2"], "seq 1 20000",
                             ["no-such-program-xyz"]]

VALID: dict[str, dict[str, Any]] = {
    "shell": {"workdir": "build", "command": ["echo", "hi"], "env": None, "want_stdout": 1,
              "want_stderr": 1, "logfiles": {}, "timeout": 20, "maxTime": 30,
              "max_lines": None, "sigtermTime": None, "usePTY": False, "logEnviron": True,
              "initial_stdin": None},
    "mkdir": {"dir": "d", "logEnviron": False},
    "rmdir": {"dir": "d", "logEnviron": False, "timeout": 20},
    "cpdir": {"fromdir": "d", "todir": "e", "logEnviron": False, "timeout": 20},
    "stat": {"file": "f", "workdir": "build"},
    "glob": {"path": "*"},
    "listdir": {"dir": "build"},
    "rmfile": {"path": "f"},
    "uploadFile": {"workdir": "build", "workersrc": "f", "writer": {"$writer": "file"},
                   "maxsize": None, "blocksize": 16384, "keepstamp": False},
    "uploadDirectory": {"workdir": "build", "workersrc": "d", "writer": {"$writer": "dir"},
                        "maxsize": None, "blocksize": 16384, "compress": None},
    "downloadFile": {"workdir": "build", "workerdest": "f", "reader": {"$reader": 1},
                     "maxsize": None, "blocksize": 16384, "mode": None},
}
PATH_KEYS = {"workdir", "dir", "fromdir", "todir", "file", "path", "workersrc", "workerdest"}
#: values that could make a command run long: the fuzz keeps them bounded
TIME_KEYS = {"timeout", "maxTime"}
SPECIAL: dict[str, list[Any]] = {
    "command": SHELL_COMMANDS + [123, None, {}, [], ["echo", None], "", [["nested"]]],
    "env": [{"A": "1"}, {"A": 1}, {"A": ["x", 2]}, "notadict", {"PATH": None}, {1: "x"},
            {"A": ["p1", "p2"], "PYTHONPATH": "q"}],
    "logfiles": [{"l": "f"}, {"l": {"filename": "f", "follow": True}}, "bad", {"l": 3}],
    "usePTY": [True, "yes", None],
    "sigtermTime": [0, 1, "x", -5],
    "interruptSignal": ["KILL", "TERM", "NOPE", 9],
    "max_lines": [0, 1, -1, "x"],
    "initial_stdin": ["one\ntwo\n", 5, {"$bytes": "x"}],
    "blocksize": [0, -1, 1, 2**31, "16k", 700_000],
    "maxsize": [0, 1, -1, "x", 10**12],
    "mode": [0o600, "0644", -1, 0o7777],
    "compress": ["gz", "bz2", "zip", 1],
    "keepstamp": [True, "x"],
    "timeout": [0, 1, -1, "x", 1e300],
    "maxTime": [0, 1, -1, "x"],
}


def _value_for(rng: random.Random, key: str) -> Any:
    if key in PATH_KEYS:
        return rng.choice(PATHS + JUNK[:12])
    choices = SPECIAL.get(key, []) + JUNK
    value = rng.choice(choices)
    if key in TIME_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = min(value, 20)
    return value


def generate(rng: random.Random, i: int) -> dict[str, Any]:
    """One fuzz case: {'name': command, 'args': args[, 'command_id': id]}."""
    roll = rng.random()
    if roll < 0.05:
        return {"name": rng.choice(["frobnicate", "", "shell ", "SHELL", "\u00e9"]),
                "args": dict(VALID["shell"])}
    name = list(VALID)[i % len(VALID)] if roll < 0.9 else rng.choice(list(VALID))
    if roll > 0.97:
        return {"name": name, "args": rng.choice([None, [], "args", 5, [["k", "v"]]])}
    args = json.loads(json.dumps(VALID[name]))
    for _ in range(rng.randint(0, 3)):
        action = rng.random()
        keys = list(args)
        if action < 0.25 and keys:
            del args[rng.choice(keys)]
        elif action < 0.85 and keys:
            key = rng.choice(keys)
            args[key] = _value_for(rng, key)
        else:
            extra = rng.choice(["interruptSignal", "sigtermTime", "logfiles", "unknown_key",
                                "max_lines", "usePTY", "mode", "compress"])
            args[extra] = _value_for(rng, extra)
    if name == "shell":
        # never a command that waits for input or for ever: the command is from the list
        if not isinstance(args.get("command"), (str, list)) or rng.random() < 0.5:
            args["command"] = rng.choice(SPECIAL["command"])
        if args.get("usePTY") and args.get("command") == "":
            args["usePTY"] = False
    return {"name": name, "args": args}


# -- fixtures -------------------------------------------------------------------------------


_builders: dict[str, str | Builder] = {f"fuzz{i}": "[FuzzCommand()]" for i in range(LANES)}
_builders["normal"] = NORMAL
master = master_fixture(_builders, extra_config=FUZZ_STEP)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Master-side files: the download source and the upload destinations."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "source.bin").write_bytes(os.urandom(100_000))
    return d


@pytest.fixture(scope="module")
def worker(master: RealMaster, pyworker_executable: str) -> Iterator[WorkerProcess]:
    w = master.start_worker(pyworker_executable)
    yield w
    w.stop()


def _wait(master: RealMaster, requests: list[BuildRequest], timeout: float) -> list[int]:
    """Wait for the requests; the buildid of each one's last build."""

    def complete() -> bool | None:
        for r in requests:
            reqs = master.get(f"buildrequests/{r.brid}")["buildrequests"]
            if not (reqs and reqs[0]["complete"]):
                return None
        return True

    wait_for(complete, timeout, f"fuzz builds {[r.brid for r in requests]}", master.logs, 0.1)
    out = []
    for r in requests:
        builds = master.get("builds", buildrequestid=r.brid)["builds"]
        out.append(max(b["buildid"] for b in builds))
    return out


def test_random_arguments_never_take_the_worker_down(
    master: RealMaster, worker: WorkerProcess, fuzz_dir: Path
) -> None:
    rng = random.Random(SEED)
    print(f"\nfuzz seed {SEED} (PYWORKER_FUZZ_SEED), {BUILDS} builds")
    cases = [generate(rng, i) for i in range(BUILDS)]
    # a reused command_id: two commands with the same id run at once on two builders
    for j in range(0, BUILDS - 1, 10):
        cases[j] = {"name": "shell", "args": dict(VALID["shell"], command=["sleep", "1"]),
                    "command_id": "reused-1"}
        cases[j + 1] = {"name": "shell", "args": dict(VALID["shell"], command="echo two"),
                        "command_id": "reused-1"}
    seen: dict[str, int] = {}
    bad: list[str] = []
    started = time.monotonic()
    for k in range(0, len(cases), LANES):
        batch = cases[k : k + LANES]
        props = [{"fuzz": json.dumps(c), "fuzz_dir": str(fuzz_dir)} for c in batch]
        reqs = [master.request_build(f"fuzz{n}", p) for n, p in enumerate(props)]
        t0 = time.monotonic()
        buildids = _wait(master, reqs, timeout=90)
        if time.monotonic() - t0 > 5:
            print(f"slow ({time.monotonic() - t0:.0f} s): {json.dumps(batch)[:400]}")
        for case, buildid in zip(batch, buildids, strict=True):
            b = master.get(f"builds/{buildid}")["builds"][0]
            result = RESULT_NAMES.get(b["results"], str(b["results"]))
            seen[result] = seen.get(result, 0) + 1
            if result not in ALLOWED:
                bad.append(f"{result}: {json.dumps(case)[:300]}")
        assert worker.running(), f"the worker died on {json.dumps(batch)[:600]}\n{worker.logs()}"
        assert master.is_worker_connected("w1"), f"disconnected by {json.dumps(batch)[:600]}"
    print(f"fuzz results {seen} in {time.monotonic() - started:.0f} s")
    assert bad == [], "\n".join(bad)
    build = master.force_build("normal")
    assert build.result == "SUCCESS", build.describe()
    # nothing left running under the worker but its executors
    wait_for(
        lambda: [p for p in descendants(worker.pid) if "pyworker.executor" not in p.cmdline]
        == [] or None,
        10, "no process under the worker but its executors",
        lambda: "\n".join(str(p) for p in descendants(worker.pid)),
    )
    # PB logs every exception a remote method raises as "Unhandled Error" after "Peer will
    # receive following PB traceback" (the reference too): only other ones are bugs
    lines = worker.twistd_log.read_text(errors="replace").splitlines()
    unhandled = [n for n, line in enumerate(lines) if "Unhandled Error" in line
                 and not (n and "Peer will receive following PB traceback" in lines[n - 1])]
    assert unhandled == [], "\n".join(lines[unhandled[0] : unhandled[0] + 30])
