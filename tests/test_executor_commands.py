"""Commands run in a real executor process, checked update by update (no master needed).

These pin the reference's observable behaviour (PROTOCOL.md sections 3-5): header texts,
environment rules, timers, the kill sequence, rc rules and the file-system commands.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from executor_driver import ExecutorDriver
from realmaster import alive, descendants, wait_for_process

from pyworker import frames as wire
from pyworker import marks


@pytest.fixture
def ex() -> Iterator[ExecutorDriver]:
    driver = ExecutorDriver()
    yield driver
    driver.close()


def shell(ex: ExecutorDriver, workdir: Path, command: object, **args: object):  # type: ignore[no-untyped-def]
    return ex.run("shell", {"workdir": str(workdir), "command": command, **args}, timeout=60)


def test_list_command_headers_output_rc(ex: ExecutorDriver, tmp_path: Path) -> None:
    r = shell(ex, tmp_path, ["echo", "hello", "a b", ""], logEnviron=False, timeout=1200)
    header = r.text("header")
    lines = header.splitlines()
    assert lines[0] == "echo hello 'a b' \"\""
    assert lines[1] == f" in dir {tmp_path} (timeout 1200 secs)"
    assert lines[2] == " watching logfiles {}"
    assert lines[3] == " argv: [b'echo', b'hello', b'a b', b'']"
    assert lines[4] == " using PTY: False"
    assert lines[5].startswith("elapsedTime=")
    assert r.text("stdout") == "hello a b \n"
    assert r.rc == 0
    assert r.failure is None
    assert r.keys()[-1] == "elapsed"
    # rc comes before the elapsedTime header and the elapsed update
    keys = r.keys()
    assert keys.index("rc") < len(keys) - 2


def test_string_command_runs_in_sh(ex: ExecutorDriver, tmp_path: Path) -> None:
    r = shell(ex, tmp_path, 'printf "a\\nb"', logEnviron=False, timeout=1)
    lines = r.text("header").splitlines()
    assert lines[0] == 'printf "a\\nb"'
    assert lines[1] == f" in dir {tmp_path} (timeout 1 sec)"
    assert lines[3] == " argv: b'printf \"a\\\\nb\"'"
    assert r.text("stdout") == "a\nb\n"
    assert r.rc == 0


def test_environment_rules(ex: ExecutorDriver, tmp_path: Path) -> None:
    env = {"FOO": "x${HOME}y${NOPE_NOT_SET}", "PYTHONPATH": ["p1", "p2"], "PATH": None}
    r = shell(ex, tmp_path, ["/usr/bin/env"], env=env, logEnviron=True)
    out = r.text("stdout").splitlines()
    assert f"FOO=x{ex.env.get('HOME', '')}y" in out
    assert f"PYTHONPATH=p1:p2:{ex.env['PYTHONPATH']}" in out
    assert not any(line.startswith("PATH=") for line in out)
    assert f"PWD={tmp_path}" in out
    header = r.text("header")
    block = header[header.index(" environment:\n") :].split(" using PTY")[0]
    env_lines = block.splitlines()[1:]
    assert env_lines == sorted(env_lines)
    assert f"  PWD={tmp_path}" in env_lines


def test_bad_env_value_fails_the_command_without_rc(ex: ExecutorDriver, tmp_path: Path) -> None:
    r = shell(ex, tmp_path, ["true"], env={"X": 3})
    assert r.rc is None
    assert r.failure is not None
    assert "'env' values must be strings or lists; key 'X' is incorrect" in r.failure


def test_missing_executable_is_rc_1_with_a_message(ex: ExecutorDriver, tmp_path: Path) -> None:
    r = shell(ex, tmp_path, ["no-such-program-here"], logEnviron=False)
    assert r.rc == 1
    assert "no-such-program-here" in r.text("stderr")
    # and the executor keeps serving
    assert shell(ex, tmp_path, ["true"], logEnviron=False).rc == 0


def test_uncreatable_workdir_fails(ex: ExecutorDriver, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    r = shell(ex, tmp_path / "file" / "sub", ["true"])
    assert r.rc is None
    assert r.failure is not None and "cannot create workdir" in r.failure


def test_want_stdout_false_and_stderr(ex: ExecutorDriver, tmp_path: Path) -> None:
    r = shell(ex, tmp_path, "echo out; echo err >&2", want_stdout=False, logEnviron=False)
    assert r.text("stdout") == ""
    assert r.text("stderr") == "err\n"


def test_initial_stdin(ex: ExecutorDriver, tmp_path: Path) -> None:
    r = shell(ex, tmp_path, ["cat"], initial_stdin="line1\nline2\n", logEnviron=False)
    assert " writing 12 bytes to stdin\n" in r.text("header")
    assert r.text("stdout") == "line1\nline2\n"


def test_stdin_is_closed(ex: ExecutorDriver, tmp_path: Path) -> None:
    r = shell(ex, tmp_path, ["cat"], logEnviron=False, timeout=5)
    assert r.rc == 0


def test_pty(ex: ExecutorDriver, tmp_path: Path) -> None:
    r = shell(ex, tmp_path, "tty; echo err >&2", usePTY=True, logEnviron=False)
    assert " using PTY: True\n" in r.text("header")
    out = r.text("stdout")
    assert out.startswith("/dev/pts/")
    assert "err\n" in out
    assert r.rc == 0


def test_pty_disabled_with_stdin(ex: ExecutorDriver, tmp_path: Path) -> None:
    r = shell(ex, tmp_path, ["cat"], usePTY=True, initial_stdin="x", logEnviron=False)
    assert r.text("header").startswith("WARNING: disabling usePTY for this commandcat\n")


def test_timeout_kill_sequence(ex: ExecutorDriver, tmp_path: Path) -> None:
    r = shell(ex, tmp_path, ["sleep", "10"], timeout=1, logEnviron=False)
    assert r.values("failure_reason") == ["timeout_without_output"]
    header = r.text("header")
    assert (
        "\ncommand timed out: 1 seconds without output running [b'sleep', b'10'], "
        "attempting to kill\n" in header
    )
    assert "process killed by signal 9\n" in header
    assert r.rc == -1


def test_max_time(ex: ExecutorDriver, tmp_path: Path) -> None:
    r = shell(ex, tmp_path, "while true; do echo x; sleep 0.2; done", maxTime=1,
              logEnviron=False)
    assert r.values("failure_reason") == ["timeout"]
    assert "command timed out: 1 seconds elapsed running b'while" in r.text("header")
    assert r.rc == -1


def test_max_lines(ex: ExecutorDriver, tmp_path: Path) -> None:
    r = shell(ex, tmp_path, "for i in 1 2 3 4 5 6 7 8 9 10; do echo $i; done; sleep 10",
              max_lines=3, logEnviron=False)
    assert r.values("failure_reason") == ["max_lines_failure"]
    assert "command exceeds max lines: " in r.text("header")
    assert r.rc == -1


def test_sigterm_time_lets_the_process_clean_up(ex: ExecutorDriver, tmp_path: Path) -> None:
    script = "trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 0.1; done"
    r = shell(ex, tmp_path, ["bash", "-c", script], timeout=1, sigtermTime=5, logEnviron=False)
    assert "got-term" in r.text("stdout")
    assert r.rc == 3


def test_interrupt(ex: ExecutorDriver, tmp_path: Path) -> None:
    ex.start("shell", {"workdir": str(tmp_path), "command": ["sleep", "100"],
                       "logEnviron": False})
    wait_for_process("sleep 100", timeout=30)  # interrupt the running command, not its start
    ex.interrupt("stop it")
    from executor_driver import Result

    r = Result(list(ex.frames(20)))
    assert "\ncommand interrupted, attempting to kill\n" in r.text("header")
    assert r.rc == -1
    assert "elapsed" not in r.keys()  # suppressed after an interrupt


@pytest.mark.parametrize("how", ["group", "setsid", "double-fork"])
def test_no_descendant_survives_a_timeout(ex: ExecutorDriver, tmp_path: Path, how: str) -> None:
    pidfile = tmp_path / "pid"
    spawn = {
        "group": f"sleep 300 & echo $! > {pidfile}; wait",
        # the new session's process writes its own pid (pgrep would see every 'sleep 300'
        # on the machine, other test runs' too; and a fixed sleep may be too short)
        "setsid": f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' &"
                  f" while [ ! -s {pidfile} ]; do sleep 0.05; done; wait",
        "double-fork": f"(sleep 300 & echo $! > {pidfile}) ; sleep 300",
    }[how]
    r = shell(ex, tmp_path, ["bash", "-c", spawn], timeout=2, logEnviron=False)
    assert r.rc == -1
    pid = int(pidfile.read_text().split()[0])
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    survived = alive(pid)
    if survived:
        os.kill(pid, signal.SIGKILL)
    assert not survived, f"{how}: pid {pid} survived the command's kill"


def test_logfiles(ex: ExecutorDriver, tmp_path: Path) -> None:
    script = "sleep 0.5; echo first > my.log; sleep 2.5; echo second >> my.log; sleep 0.2"
    r = shell(ex, tmp_path, script, logfiles={"mylog": "my.log"}, logEnviron=False)
    assert " watching logfiles {'mylog': 'my.log'}\n" in r.text("header")
    logs = "".join(text for name, text in r.values("log") if name == "mylog")
    assert logs == "first\nsecond\n"


def test_texts_of_any_size_travel_in_bounded_frames(ex: ExecutorDriver, tmp_path: Path) -> None:
    """A header of 12 MB and a logfile written with one write of 3 MB arrive whole, in frames
    of at most TEXT_FRAME_BYTES."""
    from pyworker import frames

    args = [f"{i:07d}" + "a" * 93 for i in range(120_000)]  # 12 MB: execve refuses it
    r = shell(ex, tmp_path, ["true", *args], logEnviron=False)
    assert " ".join(args) in r.text("header").replace("\n", "")
    assert r.failure is None or "Argument list too long" in r.failure or r.rc != 0
    make = "r = ''.join(f'line {i} ' + 'é' * (i % 3000) + '\\n' for i in range(2000))"
    scope: dict[str, str] = {}
    exec(make, scope)
    report = scope["r"]
    write = make + "; open('r.txt', 'w').write(r)"
    r = shell(ex, tmp_path, [sys.executable, "-c", write], logfiles={"r": "r.txt"})
    assert r.rc == 0
    assert "".join(t for name, t in r.values("log") if name == "r").replace("\n", "") == (
        report.replace("\n", ""))
    assert max(r.text_frame_sizes) <= frames.TEXT_FRAME_BYTES
    assert ex.run("shell", {"workdir": str(tmp_path), "command": ["true"]}).rc == 0


def test_fs_commands(ex: ExecutorDriver, tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    assert ex.run("mkdir", {"paths": [str(d)]}).rc == 0
    assert d.is_dir()
    st = ex.run("stat", {"path": str(d)})
    assert st.rc == 0 and st.values("stat")[0][0] == os.stat(d).st_mode
    missing = ex.run("stat", {"path": str(tmp_path / "nope")})
    assert missing.rc == 2
    assert missing.text("header") == f"stat: No such file or directory: {tmp_path / 'nope'}\n"
    assert missing.keys().index("rc") < missing.keys().index("header")  # header flushed last
    (d / "f.txt").write_text("x")
    g = ex.run("glob", {"path": str(tmp_path / "**" / "*.txt")})
    assert g.values("files") == [[str(d / "f.txt")]] and g.rc == 0
    assert ex.run("listdir", {"path": str(d)}).values("files") == [["f.txt"]]
    assert ex.run("rmfile", {"path": str(d / "f.txt")}).rc == 0
    assert ex.run("rmfile", {"path": str(d / "f.txt")}).rc == 2
    (d / "ro").mkdir()
    (d / "ro" / "x").write_text("x")
    os.chmod(d / "ro", 0o500)
    assert ex.run("cpdir", {"from_path": str(tmp_path / "a"), "to_path": str(tmp_path / "c"),
                            "logEnviron": False}).rc == 0
    assert (tmp_path / "c" / "b" / "ro" / "x").read_text() == "x"
    r = ex.run("rmdir", {"paths": [str(tmp_path / "a"), str(tmp_path / "c")],
                         "logEnviron": False}, basedir=str(tmp_path))
    assert r.rc == 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_unknown_command_and_bad_args_keep_the_executor(ex: ExecutorDriver,
                                                         tmp_path: Path) -> None:
    r = ex.run("frobnicate", {})
    assert r.failure is not None and "unrecognized WorkerCommand 'frobnicate'" in r.failure
    r = ex.run("mkdir", {})
    assert r.failure is not None and "missing args: paths" in r.failure
    r = ex.run("shell", {"workdir": str(tmp_path), "command": {"not": "valid"}})
    assert r.failure is not None and "'command' must be" in r.failure
    r = ex.run("shell", {"workdir": str(tmp_path), "command": ["true"], "usePTY": "yes"})
    assert r.failure is not None and "usePTY" in r.failure
    assert shell(ex, tmp_path, ["true"], logEnviron=False).rc == 0


def test_executor_exits_and_kills_its_command_when_the_front_end_goes(tmp_path: Path) -> None:
    driver = ExecutorDriver()
    pidfile = tmp_path / "pid"
    driver.start("shell", {"workdir": str(tmp_path),
                           "command": ["bash", "-c", f"echo $$ > {pidfile}; exec sleep 300"],
                           "logEnviron": False})
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    driver.close()
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("process handling is tested on Linux")


def test_resource_usage_is_measured_and_reported(ex: ExecutorDriver, tmp_path: Path) -> None:
    script = "x = bytearray(120 * 2**20); sum(range(3 * 10**6)); import time; time.sleep(0.8)"
    r = ex.run("shell", {"workdir": str(tmp_path), "command": [sys.executable, "-c", script],
                         "logEnviron": False}, io={"report_resources": True})
    assert r.rc == 0
    assert r.usage["peak_rss"] >= 120 * 2**20
    assert r.usage["cpu_user"] + r.usage["cpu_system"] > 0.05
    last = r.text("header").splitlines()[-1]
    assert last.startswith(" resources: ") and "CPU seconds" in last and "peak RSS" in last
    # not asked for: no header line, still measured
    r = shell(ex, tmp_path, ["true"], logEnviron=False)
    assert "resources:" not in r.text("header") and "cpu_user" in r.usage


# -- the command mark (pyworker.marks) -----------------------------------------------------

MARK_BASE = "0123456789abcdef0123:4242-99"


@pytest.fixture
def marked_ex() -> Iterator[ExecutorDriver]:
    """An executor given a mark base, as the front end gives its executors one."""
    driver = ExecutorDriver({**os.environ, marks.BASE_VAR: MARK_BASE})
    yield driver
    driver.close()


def test_mark_in_the_command_environment_not_in_the_header(
    marked_ex: ExecutorDriver, tmp_path: Path
) -> None:
    r = shell(marked_ex, tmp_path, ["env"])
    seen = dict(line.split("=", 1) for line in r.text("stdout").splitlines() if "=" in line)
    assert seen[marks.MARK_VAR] == f"{MARK_BASE}:{marked_ex.proc.pid}.1"
    assert marks.BASE_VAR not in seen
    header = r.text("header")
    assert " environment:\n" in header
    assert marks.MARK_VAR not in header and marks.BASE_VAR not in header
    again = shell(marked_ex, tmp_path, "echo $PYWORKER_COMMAND_MARK", logEnviron=False)
    assert again.text("stdout") == f"{MARK_BASE}:{marked_ex.proc.pid}.2\n"


def _spawn_outside(mark: str, token: str) -> int:
    """Start ``sleep <token>`` with ``mark`` in its environment, outside the executor's tree
    (its parent exits at once: it belongs to no process group or subreaper of the executor,
    as a process started for the command by some service would)."""
    out = subprocess.run(["sh", "-c", f"sleep {token} >/dev/null 2>&1 & echo $!"],
                         env={**os.environ, marks.MARK_VAR: mark}, check=True,
                         capture_output=True, text=True).stdout
    return int(out)


def test_a_killed_command_sweeps_its_mark_outside_its_tree(
    marked_ex: ExecutorDriver, tmp_path: Path
) -> None:
    markfile = tmp_path / "mark"
    marked_ex.start("shell", {"workdir": str(tmp_path), "logEnviron": False,
                              "command": f"echo $PYWORKER_COMMAND_MARK > {markfile}.tmp;"
                                         f" mv {markfile}.tmp {markfile}; exec sleep 300"})
    wait_for_process("sleep 300")
    mark = markfile.read_text().strip()
    assert mark == f"{MARK_BASE}:{marked_ex.proc.pid}.1"
    escaped = _spawn_outside(mark, "304")
    # the same basedir and instance, another command (".10" starts with ".1": exact match)
    other = _spawn_outside(mark + "0", "305")
    try:
        assert alive(escaped) and alive(other)
        assert escaped not in {p.pid for p in descendants(marked_ex.proc.pid)}
        marked_ex.interrupt()
        frames = list(marked_ex.frames())
        assert frames[-1][0] == wire.COMPLETE
        # swept (killed and waited for) before the command completed
        assert not alive(escaped), "the escaped process carrying the mark survived"
        assert alive(other), "a process with another command's mark was killed"
    finally:
        for pid in (escaped, other):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_command_without_a_mark_base_runs_unmarked(tmp_path: Path) -> None:
    # (these tests may run in a build of a pyworker: its mark is not inherited here)
    env = {k: v for k, v in os.environ.items() if k not in (marks.MARK_VAR, marks.BASE_VAR)}
    unmarked = ExecutorDriver(env)
    try:
        r = shell(unmarked, tmp_path, ["env"], logEnviron=False)
    finally:
        unmarked.close()
    assert marks.MARK_VAR not in r.text("stdout")
    assert r.rc == 0
