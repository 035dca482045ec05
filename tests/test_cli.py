"""Tests for the ``pyworker`` command line (pyworker.cli, pyworker.cli.daemon) as real processes.

Each test runs a small launcher with an absolute interpreter path, like a console script,
so that it also works with a completely empty environment. The front end is replaced by a
tiny fake ``run_worker`` (set in the launcher) because these tests are about the CLI.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import pyworker
from pyworker.config import SETTINGS

#: Where the pyworker under test is imported from (site-packages in CI, else the tree);
#: the launchers import the very same package.
PKG_ROOT = Path(pyworker.__file__).resolve().parent.parent

LAUNCHER = """\
#!{python}
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import pyworker.cli.daemon

def fake_run_worker(config):
    from twisted.python import log
    log.msg("fake front end for %r basedir=%s" % (config, config.basedir))
    mode = {mode!r}
    if mode.startswith("exit"):
        return int(mode[4:])
    if mode == "attach":
        log.msg("message from master: attached")
    stop = []
    def on_term(*args):
        # like the real front end: the first SIGTERM drains, a second one stops at once
        stop.append("graceful" if not stop else "immediate")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGQUIT, lambda *args: stop.append("immediate"))
    drain = {drain!r}
    while not stop or (stop[-1] == "graceful" and drain != 0):
        time.sleep(0.02)
        if stop and stop[-1] == "graceful" and drain > 0:
            drain = max(0, drain - 0.02)
    log.msg("fake front end stopping (%s)" % stop[-1])
    return 0

def broken_front_end():
    raise ImportError("no front end here")

if {mode!r} == "broken":
    pyworker.cli.daemon._load_run_worker = broken_front_end
elif {mode!r} != "real":
    pyworker.cli.daemon._load_run_worker = lambda: fake_run_worker
pyworker.cli.daemon.START_TIMEOUT = 1.0
pyworker.cli.daemon.DRAIN_REPORT_INTERVAL = 0.5
from pyworker.cli.main import main
sys.exit(main())
"""


def launcher(tmp_path: Path, mode: str = "attach", drain: float = 0) -> str:
    """A pyworker with a fake front end; ``drain``: seconds a graceful stop takes (-1: forever)."""
    path = tmp_path / f"pyworker-{mode}{'-drain' if drain else ''}"
    path.write_text(
        LAUNCHER.format(python=sys.executable, repo=str(PKG_ROOT), mode=mode, drain=drain)
    )
    path.chmod(0o755)
    return str(path)


def run(
    exe: str, *args: str, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=timeout)


def reference_exe() -> str | None:
    venv = os.environ.get("BUILDBOT_MASTER_VENV") or "/tmp/setup/master"
    candidate = os.environ.get("REFERENCE_WORKER") or os.path.join(venv, "bin", "buildbot-worker")
    return candidate if os.access(candidate, os.X_OK) else None


needs_reference = pytest.mark.skipif(reference_exe() is None, reason="no reference worker")


def create(exe: str, basedir: Path, *opts: str, passwd: str = "localpw") -> None:
    result = run(exe, "create-worker", "-q", *opts, str(basedir), "127.0.0.1:1", "w", passwd)
    assert result.returncode == 0, result.stdout + result.stderr


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts: pytest may be a child subreaper)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def wait_gone(pid: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive"
        time.sleep(0.02)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[None]:
    """Kill any daemon a failed test leaves behind (found through twistd.pid files)."""
    yield
    for pidfile in tmp_path.rglob("twistd.pid"):
        try:
            pid = int(pidfile.read_text())
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid)
        except (ValueError, OSError):
            pass


def cli_main(args: Sequence[str]) -> int:
    from pyworker.cli.main import main

    return main(args)


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d{4} \[-\] ")

# ---------------------------------------------------------------------------------------
# global options


def test_version(tmp_path: Path) -> None:
    result = run(launcher(tmp_path), "--version")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "worker version: 4.3.0"
    assert re.fullmatch(r"Twisted version: \d+\.\d+\.\d+.*", lines[1])
    assert re.fullmatch(r"pyworker version: \S+, io backend: \S+", lines[2])


def test_no_command_and_unknown_command(tmp_path: Path) -> None:
    exe = launcher(tmp_path)
    result = run(exe)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{exe}:  must specify a command\n\nUsage:    pyworker ")
    result = run(exe, "bogus")
    assert result.returncode == 1
    assert "Unknown command: bogus" in result.stdout
    assert run(exe, "--help").returncode == 0


def test_installed_console_script(tmp_path: Path) -> None:
    """The real ``pyworker`` console script (``$PYWORKER`` in CI), with an empty environment."""
    exe = os.environ.get("PYWORKER")
    if not exe:
        pytest.skip("PYWORKER is not set")
    result = run(exe, "--version", env={})
    assert result.returncode == 0 and result.stdout.startswith("worker version: 4.3.0\n")
    create(exe, tmp_path / "w")
    assert "Application('buildbot-worker')" in (tmp_path / "w" / "buildbot.tac").read_text()
    result = run(exe, "start", "--nodaemon", str(tmp_path / "nope"), env={})
    assert result.returncode == 1
    assert result.stdout.endswith(f"invalid worker directory '{tmp_path}/nope'\n")
    result = run(exe, "stop", str(tmp_path / "w"), env={})
    assert (result.returncode, result.stdout) == (0, "worker not running\n")


# ---------------------------------------------------------------------------------------
# create-worker


def test_create_worker_files(tmp_path: Path) -> None:
    exe = launcher(tmp_path)
    basedir = tmp_path / "w"
    result = run(exe, "create-worker", str(basedir), "master:4000", "w", "pw")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"mkdir {basedir}",
        f"mkdir {basedir}/info",
        "Creating info/admin, you need to edit it appropriately.",
        "Creating info/host, you need to edit it appropriately.",
        "Not creating info/access_uri - add it if you wish",
        f"Please edit the files in {basedir}/info appropriately.",
        f"worker configured in {basedir}",
    ]
    assert (basedir / "buildbot.tac").stat().st_mode & 0o777 == 0o600
    assert "Application('buildbot-worker')" in (basedir / "buildbot.tac").read_text()
    assert (basedir / "info" / "admin").read_text() == (
        "Your Name Here <admin@youraddress.invalid>\n"
    )
    assert (basedir / "info" / "host").read_text() == (
        "Please put a description of this build host here\n"
    )
    assert not (basedir / "info" / "access_uri").exists()

    # again: identical tac; then with different options: buildbot.tac.new
    result = run(exe, "create-worker", str(basedir), "master:4000", "w", "pw")
    assert result.stdout.splitlines() == [
        "updating existing installation",
        "buildbot.tac already exists and is correct",
        "Not creating info/access_uri - add it if you wish",
        f"worker configured in {basedir}",
    ]
    result = run(exe, "create-worker", "--keepalive", "5", str(basedir), "master", "w", "pw")
    assert result.returncode == 0
    assert "creating buildbot.tac.new instead" in result.stdout
    assert "keepalive = 5\n" in (basedir / "buildbot.tac.new").read_text()
    assert "keepalive = 600\n" in (basedir / "buildbot.tac").read_text()


def test_create_worker_option_forms(tmp_path: Path) -> None:
    exe = launcher(tmp_path)
    for name, opts in {
        "a": ["--keepalive=30", "--umask=0o22"],
        "b": ["--keepalive", "30", "--umask", "0o22"],
        "c": ["-k30", "--umask=0o22", "-q"],
    }.items():
        result = run(exe, "create-worker", *opts, str(tmp_path / name), "h", "w", "pw")
        assert result.returncode == 0, result.stdout
        text = (tmp_path / name / "buildbot.tac").read_text()
        assert "keepalive = 30\n" in text and "umask = 0o22\n" in text
        assert "port = 9989\n" in text


CREATE_ERRORS = [
    (["-k", "abc"], "keepalive parameter needs to be a number"),
    (["--maxdelay=x"], "maxdelay parameter needs to be a number"),
    (["-s", "1e3"], "log-size parameter needs to be a number"),
    (["--umask=022"], "umask parameter needs to be a number or None"),
    (["-l", "-1"], "log-count parameter needs to be a number or None"),
    (["--maxretries=x"], "maxretries parameter needs to be a number or None"),
    (["--numcpus=1.5"], "numcpus parameter needs to be a number or None"),
    (["-a", "bogus"], "allow-shutdown needs to be one of 'signal' or 'file'"),
    (["--no-such-option"], "option --no-such-option not recognized"),
    (["DIR", "h:1", "w", "pw", "-q"], "incorrect number of arguments"),
    (["DIR", "http://h", "w", "pw"], "<master> is not a URL - do not use URL"),
    (["DIR", "h:port", "w", "pw"], "invalid master port 'port', needs to be a number"),
    (["DIR", ":1", "w", "pw"], "invalid <master> argument ':1'"),
    (
        ["DIR", "a:b:c", "w", "pw"],
        "invalid <master> argument 'a:b:c', if it is an ipv6 address, it must be enclosed by []",
    ),
]


def _error_args(tmp_path: Path, args: list[str]) -> list[str]:
    full = [str(tmp_path / "w") if a == "DIR" else a for a in args]
    if "DIR" not in args:
        full += [str(tmp_path / "w"), "h:1", "w", "pw"]
    return ["create-worker", *full]


@pytest.mark.parametrize("args, message", CREATE_ERRORS)
def test_create_worker_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert cli_main(_error_args(tmp_path, args)) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{sys.argv[0]}:  {message}\n\nUsage:    pyworker create-worker ")
    assert not (tmp_path / "w").exists()


#: create-worker options only pyworker has (documented in its --help).
PYWORKER_ONLY_OPTIONS = {setting.option for setting in SETTINGS}
_OPTION_LINE = re.compile(r"^  (?:-\w, |    )--([\w-]+)")


def _usage_parts(text: str) -> tuple[list[str], dict[str, str]]:
    """Split a usage text into its non-option lines and {option: help text (one line)}."""
    other: list[str] = []
    options: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        match = _OPTION_LINE.match(line)
        if match:
            current = match.group(1)
            options[current] = line
        elif current is not None and line.startswith(" " * 20):
            options[current] += " " + line.strip()
        else:
            current = None
            other.append(line)
    return other, {k: " ".join(v.split()) for k, v in options.items()}


@needs_reference
def test_create_worker_errors_same_as_reference(tmp_path: Path) -> None:
    """Same messages and usage as the reference, but for pyworker's documented additions."""
    ref = reference_exe()
    assert ref is not None
    exe = launcher(tmp_path)
    for args, _ in CREATE_ERRORS[::3]:
        full = _error_args(tmp_path, args)
        ours, theirs = run(exe, *full), run(ref, *full)
        assert (ours.returncode, theirs.returncode) == (1, 1)
        our_other, our_opts = _usage_parts(
            ours.stdout.replace(exe, "PROG").replace("pyworker", "buildbot-worker")
        )
        their_other, their_opts = _usage_parts(theirs.stdout.replace(ref, "PROG"))
        assert our_other == their_other
        assert set(our_opts) == set(their_opts) | PYWORKER_ONLY_OPTIONS
        for name, text in their_opts.items():
            if name == "force":  # pyworker: --force also accepts an unsafe basedir
                assert our_opts[name].startswith(text + ";")
            else:
                assert our_opts[name] == text, name


def test_create_worker_error_writing(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    result = run(launcher(tmp_path), "create-worker", "-q", str(tmp_path / "file"), "h", "w", "p")
    assert result.returncode == 1
    assert result.stdout == (
        f"could not write {tmp_path}/file/buildbot.tac\n"
        f"failed to configure worker in {tmp_path}/file\n"
    )


@needs_reference
@pytest.mark.parametrize(
    "opts",
    [
        [],
        ["-r", "-n"],
        [
            "--use-tls",
            "--delete-leftover-dirs",
            "-a",
            "signal",
            "-l",
            "None",
            "-s",
            "77",
            "--maxretries=4",
            "--numcpus=2",
            "--umask=0o27",
            "-k",
            "0",
            "--maxdelay=9",
            "--protocol=msgpack_experimental_v7",
        ],
        ["--connection-string=tcp:host=m:port=5", "--proxy-connection-string=tcp:p:8080"],
    ],
)
def test_create_worker_same_as_reference(tmp_path: Path, opts: list[str]) -> None:
    ref = reference_exe()
    assert ref is not None
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    r1 = run(launcher(tmp_path), "create-worker", *opts, str(ours), "[::1]:99", "wn", "p w'\"")
    r2 = run(ref, "create-worker", *opts, str(theirs), "[::1]:99", "wn", "p w'\"")
    assert (r1.returncode, r2.returncode) == (0, 0)
    assert r1.stdout.replace(str(ours), "B") == r2.stdout.replace(str(theirs), "B")
    tac1 = (ours / "buildbot.tac").read_text().replace(str(ours), "B")
    tac2 = (theirs / "buildbot.tac").read_text().replace(str(theirs), "B")
    assert tac1 == tac2
    for rel in ("buildbot.tac", "info", "info/admin", "info/host"):
        assert (ours / rel).stat().st_mode == (theirs / rel).stat().st_mode, rel
        if (ours / rel).is_file():
            assert (ours / rel).read_bytes().replace(bytes(ours), b"B") == (
                (theirs / rel).read_bytes().replace(bytes(theirs), b"B")
            )
    assert sorted(p.name for p in ours.rglob("*")) == sorted(p.name for p in theirs.rglob("*"))


# ---------------------------------------------------------------------------------------
# start / stop / restart


def test_start_bad_dir_with_empty_environment(tmp_path: Path) -> None:
    exe = launcher(tmp_path)
    for sub in (["start", "--nodaemon"], ["start"], ["stop"], ["restart", "--nodaemon"]):
        result = run(exe, *sub, str(tmp_path / "nope"), env={})
        assert result.returncode == 1
        assert result.stdout == (
            f"error reading '{tmp_path}/nope/buildbot.tac': No such file or directory\n"
            f"invalid worker directory '{tmp_path}/nope'\n"
        )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "buildbot.tac").write_text("print('master tac')\n")
    result = run(exe, "start", "--nodaemon", str(tmp_path / "other"), env={})
    assert result.returncode == 1
    assert result.stdout.startswith(f"unexpected content in '{tmp_path}/other/buildbot.tac'")


def test_start_failing_tac(tmp_path: Path) -> None:
    """A tac that raises: start exits 1 naming the tac, its line and the exception."""
    exe = launcher(tmp_path)
    create(exe, tmp_path / "w", passwd="TOPSECRET")
    tac = tmp_path / "w" / "buildbot.tac"
    text = tac.read_text()
    tac.write_text(text.replace("'TOPSECRET'", "open('pw').read()"))
    line = text[: text.index("'TOPSECRET'")].count("\n") + 1
    for nodaemon in (["--nodaemon"], []):
        result = run(exe, "start", *nodaemon, str(tmp_path / "w"), env={})
        assert result.returncode == 1
        assert result.stderr == (
            f"pyworker: error in {tac} (line {line}): FileNotFoundError: [Errno 2] No such "
            "file or directory: 'pw'\n"
        )
        assert not (tmp_path / "w" / "twistd.pid").exists()


def test_start_uses_the_tacs_own_log_observer(tmp_path: Path) -> None:
    """A tac's observer on a file of its own replaces twistd.log, as with twistd."""
    exe = launcher(tmp_path, "exit0")
    create(exe, tmp_path / "w", "-n")
    tac = tmp_path / "w" / "buildbot.tac"
    tac.write_text(tac.read_text().replace(
        "application = service.Application('buildbot-worker')\n",
        "application = service.Application('buildbot-worker')\n"
        "from twisted.python.log import ILogObserver, FileLogObserver\n"
        "os.mkdir('logs')\n"
        "application.setComponent(ILogObserver, "
        "FileLogObserver(open('logs/worker.log', 'a')).emit)\n",
    ))
    result = run(exe, "start", "--nodaemon", str(tmp_path / "w"), env={})
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "w" / "logs" / "worker.log").read_text()
    assert "fake front end for WorkerConfig(" in log and "Server Shut Down." in log
    assert not (tmp_path / "w" / "twistd.log").exists()


def test_start_nodaemon_empty_environment_and_closed_stdio(tmp_path: Path) -> None:
    exe = launcher(tmp_path, "exit7")
    basedir = tmp_path / "w"
    create(exe, basedir, "-r", passwd="TOPSECRET")
    moved = tmp_path / "moved"
    shutil.move(basedir, moved)
    # stdout/stderr closed, no environment at all: must still run and exit with rc
    result = subprocess.run(
        ["/bin/sh", "-c", 'exec "$0" start --nodaemon "$1" >&- 2>&-', exe, str(moved)],
        env={},
        timeout=20,
    )
    assert result.returncode == 7
    log = (moved / "twistd.log").read_text()
    assert f"basedir={moved}\n" in log
    assert all(LOG_LINE.match(line) for line in log.splitlines() if not line.startswith("\t"))
    assert "TOPSECRET" not in log
    assert (moved / "twistd.hostname").read_text() == os.uname()[1] + "\n"
    assert not (moved / "twistd.pid").exists()


def test_daemon_start_restart_stop(tmp_path: Path, daemons: None) -> None:
    exe = launcher(tmp_path, "attach")
    basedir = tmp_path / "w"
    create(exe, basedir, passwd="TOPSECRET")
    result = run(exe, "start", str(basedir), env={})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == (
        "Following twistd.log until startup finished..\n"
        "The buildbot-worker appears to have (re)started correctly.\n"
    )
    pid = int((basedir / "twistd.pid").read_text())
    assert not gone(pid)
    # twistd's daemon umask applies when the tac sets none
    assert (basedir / "twistd.hostname").stat().st_mode & 0o777 == 0o600

    again = run(exe, "start", "-q", str(basedir))
    assert again.returncode == 1 and f"Another twistd server is running, PID {pid}" in again.stderr

    result = run(exe, "restart", str(basedir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == f"worker process {pid} is dead"
    assert result.stdout.splitlines()[1] == "now restarting worker process.."
    new_pid = int((basedir / "twistd.pid").read_text())
    assert new_pid != pid

    result = run(exe, "stop", str(basedir))
    assert (result.returncode, result.stdout) == (0, f"worker process {new_pid} is dead\n")
    assert not (basedir / "twistd.pid").exists()
    log = (basedir / "twistd.log").read_text()
    assert log.count("fake front end stopping") == 2 and "Server Shut Down." in log
    assert "TOPSECRET" not in log

    result = run(exe, "stop", str(basedir))
    assert (result.returncode, result.stdout) == (0, "worker not running\n")


def test_daemon_quiet_and_start_timeout(tmp_path: Path, daemons: None) -> None:
    exe = launcher(tmp_path, "silent")
    basedir = tmp_path / "w"
    create(exe, basedir, "--umask=0o22")
    result = run(exe, "start", "-q", str(basedir))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    pid = int((basedir / "twistd.pid").read_text())
    assert (basedir / "twistd.hostname").stat().st_mode & 0o777 == 0o644
    assert run(exe, "stop", "-q", str(basedir)).stdout == ""
    wait_gone(pid)

    # never attached: the hint after START_TIMEOUT (1 s in the launcher), daemon keeps running
    result = run(exe, "start", str(basedir))
    assert result.returncode == 1
    assert "The worker took more than 10 seconds to start and/or connect" in result.stdout
    pid = int((basedir / "twistd.pid").read_text())
    assert not gone(pid)
    assert run(exe, "stop", str(basedir)).returncode == 0


def test_daemon_reports_front_end_failure(tmp_path: Path, daemons: None) -> None:
    exe = launcher(tmp_path, "broken")
    basedir = tmp_path / "w"
    create(exe, basedir)
    result = run(exe, "start", str(basedir))
    assert result.returncode == 1
    assert result.stdout.splitlines()[1:] == [
        "Unable to confirm that the worker started correctly. You may need to stop it,",
        "fix the config file, and restart.",
        "An error has occurred: b'ImportError: no front end here'",
        "Please look at log file for more information.",
    ]
    result = run(exe, "start", "-q", str(basedir))
    assert result.returncode == 1
    assert result.stderr.startswith("An error has occurred: b'ImportError: no front end here'")
    result = run(exe, "start", "--nodaemon", str(basedir))
    assert result.returncode == 1
    assert "ImportError: no front end here" in result.stderr
    assert not (basedir / "twistd.pid").exists()
    assert "ImportError: no front end here" in (basedir / "twistd.log").read_text()


def test_stop_stale_and_garbage_pid(tmp_path: Path) -> None:
    exe = launcher(tmp_path)
    basedir = tmp_path / "w"
    create(exe, basedir)
    dead = subprocess.Popen(["/bin/true"])
    dead.wait()
    (basedir / "twistd.pid").write_text(str(dead.pid))
    result = run(exe, "stop", str(basedir))
    assert (result.returncode, result.stdout) == (0, f"worker process {dead.pid} is dead\n")
    (basedir / "twistd.pid").write_text("garbage")
    assert run(exe, "stop", str(basedir)).returncode == 1


def test_stop_gives_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process ignoring SIGQUIT/SIGTERM: 'never saw process go away' (in-process)."""
    from pyworker.cli import daemon

    basedir = tmp_path / "w"
    create(launcher(tmp_path), basedir)
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "signal.signal(signal.SIGQUIT, signal.SIG_IGN)\n"
            "print(1, flush=True)\ntime.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline()
        (basedir / "twistd.pid").write_text(str(stubborn.pid))
        monkeypatch.setattr(daemon, "STOP_TIMEOUT", 0.3)
        monkeypatch.chdir(tmp_path)
        assert daemon.stop(str(basedir), quiet=False) == 1
    finally:
        stubborn.send_signal(signal.SIGKILL)
        stubborn.wait()


def test_main_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("worker version: 4.3.0\n")
    assert cli_main(["create-worker", "-q", str(tmp_path / "w"), "h", "n", "p"]) == 0
    assert cli_main(["stop", str(tmp_path / "w")]) == 0
    assert capsys.readouterr().out == "worker not running\n"
    assert cli_main(["start", "--help"]) == 0


# ---------------------------------------------------------------------------------------
# pyworker's own create-worker options, the unsafe-basedir refusal, stop --graceful, JSON log

SETTINGS_OPTS = [
    "--restrict-paths",
    "--metrics-port=9101",
    "--log-format",
    "json",
    "--report-resources",
    "--gzip-level=3",
    "--bz2-level",
    "9",
    "--compress-threads=2",
]


def test_create_worker_pyworker_settings(tmp_path: Path) -> None:
    from pyworker.cli.tac import load_tac

    exe = launcher(tmp_path)
    create(exe, tmp_path / "plain")
    create(exe, tmp_path / "w", *SETTINGS_OPTS)
    plain = (tmp_path / "plain" / "buildbot.tac").read_text().replace("plain", "w")
    tac = (tmp_path / "w" / "buildbot.tac").read_text()
    block = (
        "# pyworker settings (buildbot-worker ignores these)\n"
        "restrict_paths = 1\n"
        "metrics_port = 9101\n"
        "log_format = 'json'\n"
        "report_resources = 1\n"
        "gzip_level = 3\n"
        "bz2_level = 9\n"
        "compress_threads = 2\n"
    )
    # the reference's text, with the settings after its last variable
    assert tac == plain.replace("protocol = 'pb'\n", "protocol = 'pb'\n" + block)
    config = load_tac(str(tmp_path / "w")).config
    assert (config.restrict_paths, config.metrics_port) == (True, 9101)
    assert (config.log_format, config.report_resources) == ("json", True)
    assert (config.gzip_level, config.bz2_level, config.compress_threads) == (3, 9, 2)
    default = load_tac(str(tmp_path / "plain")).config
    assert (default.restrict_paths, default.metrics_port) == (False, None)
    assert (default.log_format, default.report_resources) == ("text", False)
    assert (default.gzip_level, default.bz2_level, default.compress_threads) == ("auto", "auto",
                                                                                 None)

    create(exe, tmp_path / "one", "--metrics-port", "8080")
    tac = (tmp_path / "one" / "buildbot.tac").read_text()
    assert "metrics_port = 8080\n" in tac and "restrict_paths" not in tac
    assert "log_format" not in tac and "report_resources" not in tac


@needs_reference
def test_reference_runs_tac_with_pyworker_settings(tmp_path: Path) -> None:
    """The reference's own tac loading (executing it) accepts pyworker's extra variables."""
    ref = reference_exe()
    assert ref is not None
    create(launcher(tmp_path), tmp_path / "w", *SETTINGS_OPTS)
    tac = tmp_path / "w" / "buildbot.tac"
    python = os.path.join(os.path.dirname(ref), "python")
    code = (
        "import sys\n"
        "ns = {'__file__': sys.argv[1]}\n"
        "exec(compile(open(sys.argv[1]).read(), sys.argv[1], 'exec'), ns)\n"
        "print(type(ns['s']).__name__, ns['metrics_port'], ns['log_format'])\n"
    )
    result = subprocess.run(
        [python, "-c", code, str(tac)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Worker 9101 json\n"


_PORT = "metrics-port must be a TCP port number from 1 to 65535 or None"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics-port=http"], _PORT + ", not 'http'"),
        (["--metrics-port=0"], _PORT + ", not 0"),
        (["--metrics-port=65536"], _PORT + ", not 65536"),
        (["--log-format=xml"], "log-format must be 'text' or 'json', not 'xml'"),
        (["--gzip-level=10"], "gzip-level must be 'auto' or a number from 0 to 9, not 10"),
        (["--bz2-level=0"], "bz2-level must be 'auto' or a number from 1 to 9, not 0"),
        (["--compress-threads=0"], "compress-threads must be a number from 1 to 64 or None, "
                                   "not 0"),
        (["--compress-threads=many"], "compress-threads must be a number from 1 to 64 or None, "
                                      "not 'many'"),
    ],
)
def test_create_worker_settings_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = ["create-worker", *args, str(tmp_path / "w"), "m", "n", "SECRETPW"]
    assert cli_main(argv) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{sys.argv[0]}:  {message}\n") and "SECRETPW" not in out
    assert not (tmp_path / "w").exists()


def test_create_worker_refuses_unsafe_basedir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    argv = ["create-worker", "-q", str(shared), "m", "n", "SECRETPW"]
    assert cli_main(argv) == 1
    captured = capsys.readouterr()
    assert f"the worker directory {shared} is writable by others (mode 0777)" in captured.err
    assert f"`chmod go-w {shared}`, or pass --force" in captured.err
    assert "SECRETPW" not in captured.out + captured.err
    assert not (shared / "buildbot.tac").exists()
    assert cli_main(["create-worker", "-q", "--force", *argv[2:]]) == 0
    assert (shared / "buildbot.tac").stat().st_mode & 0o777 == 0o600

    # a basedir still to be made: the directory it would be created in is checked
    assert cli_main(["create-worker", "-q", str(shared / "new"), "m", "n", "p"]) == 1
    err = capsys.readouterr().err
    assert f"{shared}, the directory {shared / 'new'} would be created in" in err
    assert not (shared / "new").exists()

    # group-writable (not our private group) is refused too; sticky (like /tmp) is fine
    group = tmp_path / "group"
    group.mkdir()
    group.chmod(0o770)
    if os.geteuid() == 0:
        os.chown(group, -1, 4242)
        assert cli_main(["create-worker", "-q", str(group), "m", "n", "p"]) == 1
        assert "is writable by its group (mode 0770)" in capsys.readouterr().err
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert cli_main(["create-worker", "-q", str(sticky / "w"), "m", "n", "p"]) == 0
    safe = tmp_path / "safe"
    safe.mkdir()
    safe.chmod(0o755)
    assert cli_main(["create-worker", "-q", str(safe), "m", "n", "p"]) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_create_worker_refuses_basedir_of_another_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 4242, 4242)
    assert cli_main(["create-worker", "-q", str(theirs), "m", "n", "p"]) == 1
    err = capsys.readouterr().err
    assert f"the worker directory {theirs} is owned by uid 4242" in err
    assert "pass --force" in err
    assert cli_main(["create-worker", "-q", "--force", str(theirs), "m", "n", "p"]) == 0


def _pid(basedir: Path) -> int:
    return int((basedir / "twistd.pid").read_text())


def test_stop_immediate_and_graceful(tmp_path: Path, daemons: None) -> None:
    exe = launcher(tmp_path, "attach", drain=1.6)
    basedir = tmp_path / "w"
    create(exe, basedir)
    log = basedir / "twistd.log"

    # stop: SIGQUIT, the reference's messages
    assert run(exe, "start", "-q", str(basedir)).returncode == 0
    pid = _pid(basedir)
    result = run(exe, "stop", str(basedir))
    assert (result.returncode, result.stdout) == (0, f"worker process {pid} is dead\n")
    assert log.read_text().count("fake front end stopping (immediate)") == 1

    # stop --graceful: SIGTERM, waits for the whole drain, reports while it lasts
    assert run(exe, "start", "-q", str(basedir)).returncode == 0
    pid = _pid(basedir)
    started = time.monotonic()
    result = run(exe, "stop", "--graceful", str(basedir))
    assert time.monotonic() - started >= 1.5
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout
    assert lines[0].startswith(f"worker process {pid} is draining: running builds finish")
    assert any(line.startswith(f"worker process {pid} still draining after") for line in lines)
    assert lines[-1] == f"worker process {pid} is dead"
    assert "fake front end stopping (graceful)" in log.read_text()
    assert run(exe, "stop", "--graceful", "-q", str(basedir)).stdout == ""

    # restart --graceful drains the old one, then starts a new one
    assert run(exe, "start", "-q", str(basedir)).returncode == 0
    pid = _pid(basedir)
    result = run(exe, "restart", "--graceful", "-q", str(basedir))
    assert result.returncode == 0, result.stdout + result.stderr
    wait_gone(pid)
    assert _pid(basedir) != pid
    assert log.read_text().count("fake front end stopping (graceful)") == 2
    assert run(exe, "stop", "-q", str(basedir)).returncode == 0


def test_stop_graceful_timeout(tmp_path: Path, daemons: None) -> None:
    exe = launcher(tmp_path, "attach", drain=-1)  # drains forever
    basedir = tmp_path / "w"
    create(exe, basedir)
    assert run(exe, "start", "-q", str(basedir)).returncode == 0
    pid = _pid(basedir)
    result = run(exe, "stop", "--graceful", "--timeout", "1", str(basedir))
    assert result.returncode == 1
    assert f"worker process {pid} still draining after 1 seconds; gave up waiting" in (
        result.stdout
    )
    assert not gone(pid)
    # again: no second SIGTERM (that would mean "stop now"), it waits for the same drain
    result = run(exe, "stop", "--graceful", "--timeout", "0.3", str(basedir))
    assert result.returncode == 1
    assert result.stdout.startswith(f"worker process {pid} is still draining: running builds")
    assert not gone(pid)
    # restart --graceful --timeout gives up too, and starts nothing
    result = run(exe, "restart", "--graceful", "--timeout=0.5", str(basedir))
    assert result.returncode == 1 and "now restarting" not in result.stdout
    assert _pid(basedir) == pid
    # a plain stop ends the drain at once
    result = run(exe, "stop", str(basedir))
    assert (result.returncode, result.stdout) == (0, f"worker process {pid} is dead\n")
    log = (basedir / "twistd.log").read_text()
    assert "fake front end stopping (immediate)" in log
    assert not (basedir / "pyworker.draining").exists()
    for bad in ("--timeout=soon", "--timeout=0"):
        result = run(exe, "stop", "--graceful", bad, str(basedir))
        assert result.returncode == 1 and "timeout parameter needs to be" in result.stdout


def test_json_log_format(tmp_path: Path) -> None:
    import datetime
    import json

    basedir = tmp_path / "w"
    create(launcher(tmp_path), basedir, "--log-format=json", passwd="TOPSECRET")
    result = run(launcher(tmp_path, "exit0"), "start", "--nodaemon", str(basedir), env={})
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(launcher(tmp_path, "broken"), "start", "--nodaemon", str(basedir), env={})
    assert result.returncode == 1
    text = (basedir / "twistd.log").read_text()
    assert "TOPSECRET" not in text
    records = [json.loads(line) for line in text.splitlines()]
    for record in records:
        assert {"time", "level", "message"} <= set(record), record
        assert datetime.datetime.fromisoformat(record["time"]).tzinfo is not None
        assert "namespace" in record or "system" in record, record
    messages = [r["message"] for r in records]
    assert "Loading buildbot.tac..." in messages and "Server Shut Down." in messages
    assert any(m.startswith("fake front end for WorkerConfig(") for m in messages)
    assert any("log_format='json'" in m for m in messages)
    failed = [r for r in records if r["message"] == "pyworker: the worker failed"]
    assert len(failed) == 1 and "ImportError: no front end here" in failed[0]["failure"]
    assert failed[0]["level"] in ("critical", "error")
