"""Bad input from a real Buildbot 4.3.0 master never takes pyworker down (issue 6, item 4;
issue 12, item 7).

Every case runs over both protocols, PB and ``msgpack_experimental_v7``: one master serves
both, with one worker per protocol (started and checked one protocol after the other).

A master-side step (:data:`FUZZ_STEP`) sends ``RemoteCommand(name, args)`` verbatim, with
``name`` and ``args`` taken from a build property (JSON, plus a few ``{"$...": ...}`` forms
for what JSON cannot carry: master-side writer/reader references, bytes, huge strings). A
seeded generator makes argument dicts for every command: valid ones, then mutated (keys
missing, values mistyped, huge or malformed, unknown keys), unknown command names, args that
are not a dict, and two commands on two builders that reuse one ``command_id`` while both
run (PB only, see below). Every build must end (no hang) as SUCCESS, FAILURE or EXCEPTION,
a failed one with a readable reason (:func:`_unreadable`). The worker keeps serving: it runs
and is connected after every batch, with no command running and no executor busy (its
``/metrics``), a plain build passes in the batch after each one with a file transfer and at
the end (next to one trivial build per fuzz builder), and no process is left behind.

Two systematic sets of cases run the same way, each followed by a plain build and the same
checks: every transfer with every non-reference object as its ``writer``/``reader`` (over PB
each is refused at once, readably), and texts of several MiB (:func:`big_cases`): single
writes of 2-6 MiB to stdout, stderr and a logfile (one line or many, multi-byte UTF-8,
invalid bytes) and headers over Twisted's 640 KiB string limit (7,000 arguments, 60 big
environment variables). Each such shell command has a ``timeout`` and a ``maxTime`` and must
succeed, with every character in the master's log (compared with newlines removed: worker
and master cut lines at 4096 characters); arguments of 18 MB in all (over the 16 MiB an
executor takes in one request) must be refused, readably.

Over msgpack the 4.3.0 master translates the arguments itself (PROTOCOL.md appendix A.3: a
missing or mistyped path key fails the step on the master) and its transfer ops are broken
(appendix A: downloads get no data, ``keepstamp`` always raises), so for transfers only what
holds for both protocols is asserted: the step ends, readably, and the worker goes on.

Paths are always relative, with no ``..`` and no ``~``: whatever the fuzz asks for lands in
the builder's directory under pytest's tmp dir (``rmdir ''`` removes the builder directory
itself, never more). ``PYWORKER_FUZZ_SEED`` replays a run; ``PYWORKER_FUZZ_BUILDS`` sets the
count (default 60).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realmaster import (
    MSGPACK_PROTOCOL,
    PB_PROTOCOL,
    Builder,
    BuildRequest,
    BuildResult,
    RealMaster,
    WorkerProcess,
    descendants,
    enable_subreaper,
    kill_processes,
    leftover_processes,
    master_fixture,
    wait_for,
)

SEED = int(os.environ.get("PYWORKER_FUZZ_SEED") or 20250607)
BUILDS = int(os.environ.get("PYWORKER_FUZZ_BUILDS") or 60)
#: builders the fuzz builds run on, side by side (all on the one worker): a refused command
#: costs its build a second on the 4.3.0 master (it waits that long for an rc), so they overlap
LANES = 4
ALLOWED = {"SUCCESS", "WARNINGS", "FAILURE", "EXCEPTION"}
PROTOCOLS = (PB_PROTOCOL, MSGPACK_PROTOCOL)
#: the worker of each protocol (each master worker name is used over one protocol only)
WORKER_NAMES = {PB_PROTOCOL: "wpb", MSGPACK_PROTOCOL: "wmsgpack"}
TRANSFERS = {"uploadFile", "uploadDirectory", "downloadFile"}

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
    '''Sends the command described by the 'fuzz' property, whatever it is.

    What the worker sends as output goes to the 'stdio' log; the rc it reports to 'rc'.'''
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
            if key == '$repeat':  # [head, template, n]: head + [template.format(i), ...]
                head, template, n = arg
                return list(head) + [template.format(i) for i in range(n)]
            if key == '$dict':  # [key template, value template, n]
                kt, vt, n = arg
                return {kt.format(i): vt.format(i) for i in range(n)}
        return {k: self._decode(v) for k, v in value.items()}

    async def run(self):
        self._closers = []
        self._dir = self.getProperty('fuzz_dir')
        spec = json.loads(self.getProperty('fuzz'))
        cmd = FixedIdCommand(spec['name'], self._decode(spec['args']))
        cmd.fixed_id = spec.get('command_id')
        stdio = await self.addLog('stdio')
        cmd.useLog(stdio, closeWhenFinished=False)
        logs = [await self.addLog(name) for name in spec.get('logs', [])]
        for log in logs:  # the logfiles the test reads back
            cmd.useLog(log, closeWhenFinished=False)
        try:
            await self.runCommand(cmd)
        finally:
            for c in self._closers:
                try:
                    c.remote_close()
                except Exception:
                    pass
            for log in [stdio, *logs]:
                await log.finish()
        await self.addCompleteLog('rc', f'{cmd.rc!r}\\n')
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
#: Every kind of object a master with bugs may send as ``writer``/``reader`` that is not a
#: reference: over PB each one is refused at once (pyworker/frontend/pb.py
#: ``check_pb_references``); over msgpack the master puts its own in their place.
NON_REFERENCES: list[Any] = ["not-a-reference", "", True, False, -1, 0, 1.5, {"$bytes": "x"},
                             [], {}, None, {"$huge": 600_000}, [[["a"]], [1, [2, [None]]]],
                             {"k": {"k": ["v"]}}]
REFERENCE_KEYS = {"uploadFile": "writer", "uploadDirectory": "writer", "downloadFile": "reader"}
SPECIAL["writer"] = SPECIAL["reader"] = NON_REFERENCES


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


MIB = 1024 * 1024
#: What a single write of several MiB is made of, repeated. No '\r', backspace or ESC: the
#: line splitters turn those into newlines, and the delivered text is compared with the
#: written one with only newlines removed (worker and master cut long lines at 4096 chars).
UNITS: dict[str, bytes] = {
    "one line of 'x'": b"x",
    "lines of 99 'x'": b"x" * 99 + b"\n",
    "one line of multi-byte UTF-8": "\u00e9\u20ac\U0001f600ab".encode(),
    "lines of multi-byte UTF-8": ("\u00e9\u20ac\U0001f600" * 40 + "\n").encode(),
    "invalid UTF-8": b"ab\xffcd\xe2\x82x\xf0\x9f" + b"y" * 40 + b"\xc3",
}
#: the shell command's timers (every big case has both: the build must end within them)
BIG_TIMERS = {"timeout": 60, "maxTime": 120}
#: the 7,000 arguments of 100 bytes of a command whose header is over 640 KiB
ARG_COUNT = 7000
ARG_TEMPLATE = "{:05d}" + "a" * 95
#: 60 environment variables of 12 KB, with logEnviron on
ENV_COUNT = 60
ENV_VALUE = "{:02d}" + "v" * 12_000
#: arguments of 600 KB for a request of 18 MB
HUGE_ARGS = 30


class BigCase:
    """One shell command whose output, logfile or header is a text of several MiB (or over
    640 KiB in one line), and what the master must have received of it."""

    def __init__(self, what: str, args: dict[str, Any], logs: tuple[str, ...] = (),
                 refused: str = "") -> None:
        self.what = what
        #: set: the worker cannot run the command and must refuse it, saying this
        self.refused = refused
        self.spec: dict[str, Any] = {"name": "shell", "logs": list(logs),
                                     "args": dict(VALID["shell"], **BIG_TIMERS, **args)}
        #: (log, line prefix, the text expected there with every newline removed)
        self.texts: list[tuple[str, str, str]] = []
        #: (what, text the header must contain once newlines are removed)
        self.in_header: list[str] = []

    def problems(self, build: BuildResult) -> list[str]:
        """What the build did not deliver of the text (empty: all of it, in order)."""
        if self.refused:
            text = build.step("fuzz").logs.get("err.text", "")
            if build.result != "EXCEPTION" or self.refused not in text:
                return [f"{build.result}, not refused with {self.refused!r}"]
            return []
        if build.result != "SUCCESS":
            return [f"{build.result}, not SUCCESS"]
        step = build.step("fuzz")
        out = []
        for log, prefix, expected in self.texts:
            got = step.stream(log, prefix).replace("\n", "")
            if got != expected:
                pairs = zip(got, expected, strict=False)
                at = next((i for i, (a, b) in enumerate(pairs) if a != b),
                          min(len(got), len(expected)))
                out.append(f"log {log!r} ({prefix}): {len(got)} chars instead of "
                           f"{len(expected)}, first difference at {at}: "
                           f"{got[at - 20 : at + 20]!r} instead of {expected[at - 20 : at + 20]!r}")
        header = step.stream("stdio", "h").replace("\n", "")
        missing = [text[:40] for text in self.in_header if text not in header]
        if missing:
            out.append(f"{len(missing)} of {len(self.in_header)} texts not in the header "
                       f"({len(header)} chars), e.g. {missing[:3]}")
        return out


#: how every big write ends: complete characters (a trailing partial one is an end-of-file
#: matter, not a size one) and a newline
END = b"<end>\n"


def _write(rng: random.Random, unit: bytes) -> tuple[str, str]:
    """Python source of a 2-6 MiB bytes value made of ``unit``; the text it decodes to."""
    count = rng.randint(2 * MIB, 6 * MIB) // len(unit)
    return f"{unit!r} * {count} + {END!r}", (unit * count + END).decode("utf-8", "replace")


def big_cases(rng: random.Random, python: str) -> list[BigCase]:
    """Single writes of 2-6 MiB (sizes from ``rng``) to stdout, stderr and a logfile; a
    header over 640 KiB from 7,000 arguments, another from 60 big environment variables;
    arguments too big for an executor."""
    cases = []
    for what, unit in UNITS.items():
        write, text = _write(rng, unit)
        code = f"import sys; sys.stdout.buffer.write({write}); sys.stdout.flush()"
        case = BigCase(f"stdout: {len(text)} chars, {what}", {"command": [python, "-c", code]})
        case.texts.append(("stdio", "o", text.replace("\n", "")))
        cases.append(case)
    for stream, log, prefix in (("stderr", "stdio", "e"), ("logfile", "big", "o")):
        what, unit = rng.choice(list(UNITS.items()))
        write, text = _write(rng, unit)
        if stream == "stderr":
            code = f"import sys; sys.stderr.buffer.write({write}); sys.stderr.flush()"
            args: dict[str, Any] = {"command": [python, "-c", code]}
        else:  # a new file each run: the watcher reads it from its start
            name = f"big-{rng.randrange(10**9)}.log"
            code = f"f = open({name!r}, 'wb'); f.write({write}); f.close()"
            args = {"command": [python, "-c", code], "logfiles": {log: name}}
        case = BigCase(f"{stream}: {len(text)} chars, {what}", args,
                       logs=(log,) if log != "stdio" else ())
        case.texts.append((log, prefix, text.replace("\n", "")))
        cases.append(case)
    argv = [ARG_TEMPLATE.format(i) for i in range(ARG_COUNT)]
    case = BigCase(f"{ARG_COUNT} arguments of 100 bytes",
                   {"command": {"$repeat": [["echo"], ARG_TEMPLATE, ARG_COUNT]}})
    case.texts.append(("stdio", "o", " ".join(argv)))
    # the command line, then the argv line (a list of bytes, as the reference shows it)
    case.in_header += [" ".join(["echo", *argv]), repr([a.encode() for a in ["echo", *argv]])]
    cases.append(case)
    env = {f"BIG{i:02d}": ENV_VALUE.format(i) for i in range(ENV_COUNT)}
    case = BigCase(f"{ENV_COUNT} environment variables of 12 KB",
                   {"command": ["sh", "-c", f"echo ${{#BIG{ENV_COUNT - 1:02d}}}"],
                    "env": {"$dict": ["BIG{:02d}", ENV_VALUE, ENV_COUNT]}, "logEnviron": True})
    case.texts.append(("stdio", "o", str(len(ENV_VALUE.format(0)))))
    case.in_header += [f"  {k}={v}" for k, v in env.items()]
    cases.append(case)
    # arguments over the 16 MiB an executor takes in one request (each under 640 KiB)
    cases.append(BigCase(f"{HUGE_ARGS} arguments of 600 KB", {"command": {
        "$repeat": [["true"], "{:03d}" + "a" * 600_000, HUGE_ARGS]}},
        refused="more than the 16777216 an executor takes"))
    return cases


# -- fixtures -------------------------------------------------------------------------------


def _builders() -> dict[str, str | Builder]:
    out: dict[str, str | Builder] = {}
    for protocol, name in WORKER_NAMES.items():
        for i in range(LANES):
            out[f"fuzz{i}-{protocol}"] = Builder("[FuzzCommand()]", workers=[name])
        out[f"normal-{protocol}"] = Builder(NORMAL, workers=[name])
    return out


# one master for both protocols: its start-up is paid once
master = master_fixture(_builders(), extra_config=FUZZ_STEP, msgpack=True,
                        workers=tuple(WORKER_NAMES.values()))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Master-side files: the download source and the upload destinations."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "source.bin").write_bytes(os.urandom(100_000))
    return d


@pytest.fixture(scope="module", params=PROTOCOLS)
def worker(
    request: pytest.FixtureRequest, master: RealMaster, pyworker_executable: str
) -> Iterator[WorkerProcess]:
    """The pyworker of one protocol; when it stops, nothing it started may be left running.

    It serves ``/metrics`` (:data:`METRICS`): how many commands run and executors are busy.
    """
    protocol: str = request.param
    enable_subreaper()
    baseline = {p.pid for p in descendants()}
    w, port = master.start_worker_with_port(
        pyworker_executable, lambda port: ["--metrics-port", str(port)], WORKER_NAMES[protocol],
        protocol=protocol,
    )
    METRICS[w.name] = f"http://127.0.0.1:{port}/metrics"
    yield w
    w.stop()
    leftovers = leftover_processes(baseline)
    if leftovers:
        kill_processes(leftovers)
        pytest.fail(f"processes left behind by the {protocol} worker:\n"
                    + "\n".join(f"  {p}" for p in leftovers))


#: worker name -> the URL of its ``/metrics``
METRICS: dict[str, str] = {}


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


def _run(
    master: RealMaster, protocol: str, batch: list[dict[str, Any]], fuzz_dir: Path,
    normal: str = "", timeout: float = 90,
) -> list[BuildResult]:
    """Run the cases side by side (one builder each) until each build ends; their builds.

    With ``normal`` (what came before) a plain build runs next to them and must pass.
    """
    assert len(batch) <= LANES
    props = [{"fuzz": json.dumps(c), "fuzz_dir": str(fuzz_dir)} for c in batch]
    reqs = [master.request_build(f"fuzz{n}-{protocol}", p) for n, p in enumerate(props)]
    plain = [master.request_build(f"normal-{protocol}")] if normal else []
    builds = [master.build_result(b) for b in _wait(master, reqs + plain, timeout)]
    if plain:
        build = builds.pop()
        assert build.result == "SUCCESS", f"after {normal}:\n{build.describe()}"
    return builds


def _metrics(worker: WorkerProcess) -> dict[str, float]:
    """The worker's ``/metrics`` samples: 'name{labels}' -> value."""
    with urllib.request.urlopen(METRICS[worker.name], timeout=10) as r:
        text = r.read().decode()
    samples = (line.rsplit(" ", 1) for line in text.splitlines()
               if line.strip() and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def _assert_free(worker: WorkerProcess, where: str) -> None:
    """No command runs on the worker and no executor is busy (they are back in the pool)."""
    seen: dict[str, float] = {}

    def free() -> bool | None:
        seen.update(_metrics(worker))
        return (seen["pyworker_running_commands"] == 0
                and seen['pyworker_executors{state="busy"}'] == 0) or None

    wait_for(free, 30, f"the worker to be free again after {where}",
             lambda: f"{seen}\n{worker.logs()}")


def _assert_serving(master: RealMaster, worker: WorkerProcess, where: str) -> None:
    """The worker runs, is connected and has every executor free."""
    assert worker.running(), f"the worker died on {where}\n{worker.logs()}"
    assert master.is_worker_connected(worker.name), f"disconnected by {where}"
    _assert_free(worker, where)


TRIVIAL = {"name": "shell", "args": dict(VALID["shell"], command=["echo", "free"])}


def _assert_all_free(master: RealMaster, worker: WorkerProcess, fuzz_dir: Path) -> None:
    """At the end: plain builds on every builder of the worker run side by side and pass,
    and then nothing runs and no executor is busy; nothing but the executors runs under the
    worker, and its log has no unexpected error."""
    protocol = worker.protocol
    builds = _run(master, protocol, [TRIVIAL] * LANES, fuzz_dir, normal="the last batch")
    assert [b.result for b in builds] == ["SUCCESS"] * LANES, [b.describe() for b in builds]
    assert all(b.step("fuzz").stream() == "free\n" for b in builds), builds[0].describe()
    _assert_serving(master, worker, "the last builds")
    # no executor died under a command: whatever the arguments, a command ends by itself
    metrics = _metrics(worker)
    assert metrics["pyworker_executors_died_total"] == 0, metrics
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


def _unreadable(build: BuildResult) -> str | None:
    """Why a failed fuzz build does not tell its user what went wrong (None: it does).

    EXCEPTION (refused by the worker, or by the master's own argument handling): the
    ``err.text`` log ends with ``<exception type>: <message>``. FAILURE: the worker reported
    a non-zero rc and said why in stdio.
    """
    if build.result in ("SUCCESS", "WARNINGS"):
        return None
    step = build.step("fuzz")
    if build.result == "EXCEPTION":
        lines = [line for line in step.logs.get("err.text", "").splitlines() if line.strip()]
        if not lines or not re.search(r"[\w.]+: \S", lines[-1]):
            return "err.text does not end with '<exception>: <message>'"
        return None
    rc = step.logs.get("rc", "").strip()
    if not re.fullmatch(r"-?[1-9][0-9]*", rc):
        return f"the worker's rc is {rc or 'missing'}"
    if not step.logs.get("stdio", "").strip():
        return f"rc {rc} and nothing in stdio"
    return None


def _bad(case: dict[str, Any], build: BuildResult) -> str | None:
    """What is wrong with how a fuzz build ended (None: it ended readably)."""
    if build.result not in ALLOWED:
        return f"{build.result}: {json.dumps(case)[:300]}"
    if why := _unreadable(build):
        return f"{build.result}, {why}: {json.dumps(case)[:300]}\n{build.describe()}"
    return None


def test_random_arguments_never_take_the_worker_down(
    master: RealMaster, worker: WorkerProcess, fuzz_dir: Path
) -> None:
    protocol = worker.protocol
    rng = random.Random(SEED)
    print(f"\nfuzz over {protocol}: seed {SEED} (PYWORKER_FUZZ_SEED), {BUILDS} builds")
    cases = [generate(rng, i) for i in range(BUILDS)]
    # a reused command_id: two commands with the same id run at once on two builders. Over
    # PB the master keeps commands per builder; over msgpack 4.3.0 it keys them by the id
    # alone, so the first 'complete' drops the other command and that build never ends: no
    # worker can make that work, so msgpack gets the generated cases there instead.
    for j in range(0, BUILDS - 1, 10) if protocol == PB_PROTOCOL else ():
        cases[j] = {"name": "shell", "args": dict(VALID["shell"], command=["sleep", "1"]),
                    "command_id": "reused-1"}
        cases[j + 1] = {"name": "shell", "args": dict(VALID["shell"], command="echo two"),
                        "command_id": "reused-1"}
    seen: dict[str, int] = {}
    bad: list[str] = []
    started = time.monotonic()
    after_transfer = ""  # the previous batch, when it had a file transfer
    for k in range(0, len(cases), LANES):
        batch = cases[k : k + LANES]
        # after a transfer (the master's side of it is broken over msgpack) the worker must
        # still serve a plain build: it runs next to this batch, after the transfer's
        t0 = time.monotonic()
        builds = _run(master, protocol, batch, fuzz_dir, normal=after_transfer)
        if time.monotonic() - t0 > 5:
            print(f"slow ({time.monotonic() - t0:.0f} s): {json.dumps(batch)[:400]}")
        for case, build in zip(batch, builds, strict=True):
            seen[build.result] = seen.get(build.result, 0) + 1
            if why := _bad(case, build):
                bad.append(why)
        where = f"{protocol}: {json.dumps(batch)[:600]}"
        _assert_serving(master, worker, where)
        after_transfer = where if any(c["name"] in TRANSFERS for c in batch) else ""
    print(f"fuzz results over {protocol}: {seen} in {time.monotonic() - started:.0f} s")
    assert bad == [], "\n".join(bad)
    _assert_all_free(master, worker, fuzz_dir)


def test_every_non_reference_writer_or_reader_ends_readably(
    master: RealMaster, worker: WorkerProcess, fuzz_dir: Path
) -> None:
    """Each transfer with each non-reference object as its ``writer``/``reader`` ends with a
    readable failure (over PB: refused at once by the worker) and leaves the worker free."""
    protocol = worker.protocol
    cases: list[dict[str, Any]] = [{"name": name, "args": dict(VALID[name], **{key: value})}
                                   for name, key in REFERENCE_KEYS.items()
                                   for value in NON_REFERENCES]
    bad: list[str] = []
    seen: dict[str, int] = {}
    for k in range(0, len(cases), LANES):
        batch = cases[k : k + LANES]
        where = f"{protocol}: {json.dumps(batch)[:600]}"
        for case, build in zip(batch, _run(master, protocol, batch, fuzz_dir, normal=where),
                               strict=True):
            seen[build.result] = seen.get(build.result, 0) + 1
            if why := _bad(case, build):
                bad.append(why)
            elif protocol == PB_PROTOCOL:
                key = REFERENCE_KEYS[case["name"]]
                text = build.step("fuzz").logs.get("err.text", "")
                if build.result != "EXCEPTION" or f"'{key}' must be a remote reference" not in text:
                    bad.append(f"not refused: {json.dumps(case)[:300]}\n{build.describe()}")
        _assert_serving(master, worker, where)
    print(f"\nnon-references over {protocol}: {seen}")
    assert bad == [], "\n".join(bad)
    _assert_all_free(master, worker, fuzz_dir)


def test_texts_of_several_mib_arrive_whole(
    master: RealMaster, worker: WorkerProcess, fuzz_dir: Path
) -> None:
    """Single writes of 2-6 MiB to stdout, stderr and a logfile, and headers over 640 KiB,
    reach the master's logs with every character, each command within its timers; 18 MB of
    arguments are refused; the worker stays free."""
    protocol = worker.protocol
    rng = random.Random(SEED)
    cases = big_cases(rng, sys.executable)
    print(f"\nbig texts over {protocol}: seed {SEED} (PYWORKER_FUZZ_SEED)")
    bad: list[str] = []
    for k in range(0, len(cases), LANES):
        batch = cases[k : k + LANES]
        where = f"{protocol}: {[c.what for c in batch]}"
        t0 = time.monotonic()
        builds = _run(master, protocol, [c.spec for c in batch], fuzz_dir, normal=where,
                      timeout=300)
        print(f"  {[c.what for c in batch]}: {time.monotonic() - t0:.0f} s")
        for case, build in zip(batch, builds, strict=True):
            if problems := case.problems(build):
                bad.append(f"{case.what}: " + "; ".join(problems)
                           + f"\n{build.describe()[:3000]}")
        _assert_serving(master, worker, where)
    assert bad == [], "\n".join(bad)
    _assert_all_free(master, worker, fuzz_dir)
