"""Texts of any size reach a real Buildbot 4.3.0 master whole (issue 12, item 2).

Twisted's banana refuses any string over 640 KiB, and ordinary builds make texts far larger
than that in one go: a test report written to a logfile at once, a command line of thousands
of arguments (the step header), a big environment dumped by ``logEnviron``, megabytes of
output in one write (with bytes that are not UTF-8, which triple in size once decoded). Each
build below makes one of them, over PB and over msgpack, and every character must arrive:
the worker and the master may cut long lines into 4096-character pieces (by adding newlines),
so texts are compared with their newlines removed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
from realmaster import (
    MSGPACK_PROTOCOL,
    PB_PROTOCOL,
    Builder,
    RealMaster,
    WorkerProcess,
    master_fixture,
)

PYTHON = sys.executable
WORKER_NAMES = {PB_PROTOCOL: "bigpb", MSGPACK_PROTOCOL: "bigmsgpack"}

#: a 2,020,203-byte report, made by the command and written with one write(): lines of every
#: length, one of 100,000 characters, and multi-byte characters
MAKE_REPORT = (
    "r = ''.join(f\"<case n='{i}'>{'é€' * (i % 400)}</case>\\n\" for i in range(1000)); "
    "r += 'R' * 100000 + '\\n'; r += 't' * (2020203 - len(r.encode()) - 1) + '\\n'"
)
_scope: dict[str, str] = {}
exec(MAKE_REPORT, _scope)
REPORT = _scope["r"]
WRITE_REPORT = (
    f"import os; {MAKE_REPORT}; fd = os.open('report.xml', os.O_WRONLY | os.O_CREAT); "
    "os.write(fd, r.encode()); os.close(fd)"
)
#: 7,000 arguments of 100 bytes: a header line of 707,000 bytes
ARGS = [f"{i:06d}" + "a" * 94 for i in range(7000)]
#: 60 variables of 12 KB, dumped in the header by the default logEnviron
ENV = {f"BIG{i:02d}": f"{i:02d}" + chr(ord("A") + i % 26) * 12_000 for i in range(60)}
#: one write of 700,000 bytes that are not UTF-8 (2.1 MB once decoded) and 300,000 'é', then
#: 3 MiB without a newline on stderr
WRITE_OUTPUT = (
    "import sys; sys.stdout.buffer.write(b'\\xff' * 700000 + 'é'.encode() * 300000 + b'\\n'); "
    "sys.stdout.flush(); sys.stderr.write('x' * 3 * 1024 * 1024)"
)


def _steps() -> dict[str, str]:
    return {
        "report": f"[steps.ShellCommand(name='report', command=[{PYTHON!r}, '-c', "
                  f"{WRITE_REPORT!r}], logfiles={{'report': 'report.xml'}})]",
        "argv": f"[steps.ShellCommand(name='argv', command=[{PYTHON!r}, '-c', "
                f"'import sys; print(len(sys.argv))'] + {ARGS!r})]",
        "env": f"[steps.ShellCommand(name='env', command=[{PYTHON!r}, '-c', 'pass'], "
               f"env={ENV!r})]",
        "output": f"[steps.ShellCommand(name='output', command=[{PYTHON!r}, '-c', "
                  f"{WRITE_OUTPUT!r}])]",
    }


def _builders() -> dict[str, str | Builder]:
    return {f"{case}-{protocol}": Builder(factory, workers=[WORKER_NAMES[protocol]])
            for protocol in WORKER_NAMES for case, factory in _steps().items()}


master = master_fixture(_builders(), msgpack=True, workers=tuple(WORKER_NAMES.values()))


@pytest.fixture(scope="module", params=(PB_PROTOCOL, MSGPACK_PROTOCOL))
def worker(request: pytest.FixtureRequest, master: RealMaster,
           pyworker_executable: str) -> Iterator[WorkerProcess]:
    w = master.start_worker(pyworker_executable, WORKER_NAMES[request.param],
                            protocol=request.param)
    yield w
    w.stop()


def _flat(text: str) -> str:
    return text.replace("\n", "")


def _build(master: RealMaster, worker: WorkerProcess, case: str) -> Any:
    build = master.wait_build(master.request_build(f"{case}-{worker.protocol}"), timeout=180)
    assert build.result == "SUCCESS", build.describe()
    assert worker.running(), "the worker died"
    return build.step(case)


def test_a_logfile_written_at_once(master: RealMaster, worker: WorkerProcess) -> None:
    step = _build(master, worker, "report")
    got = step.stream("report", "o")
    assert len(_flat(got)) == len(_flat(REPORT))
    assert _flat(got) == _flat(REPORT)


def test_a_command_of_7000_arguments(master: RealMaster, worker: WorkerProcess) -> None:
    step = _build(master, worker, "argv")
    assert step.stream("stdio", "o") == "7001\n"
    assert " ".join(ARGS) in _flat(step.stream("stdio", "h"))


def test_an_environment_of_60_variables_of_12_kb(master: RealMaster,
                                                 worker: WorkerProcess) -> None:
    step = _build(master, worker, "env")
    header = _flat(step.stream("stdio", "h"))
    missing = [k for k, v in ENV.items() if f"{k}={v}" not in header]
    assert not missing, f"variables not in the header whole: {missing}"


def test_megabytes_of_output_in_one_write(master: RealMaster, worker: WorkerProcess) -> None:
    step = _build(master, worker, "output")
    out = step.stream("stdio", "o")
    assert out.count("\ufffd") == 700_000 and out.count("é") == 300_000
    assert _flat(out) == "\ufffd" * 700_000 + "é" * 300_000
    assert _flat(step.stream("stdio", "e")) == "x" * 3 * 1024 * 1024
