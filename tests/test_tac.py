"""Tests for pyworker.cli.tac: the create-worker template and the tac loader (runs the tac)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyworker.cli.tac import (
    TAC_MARKER,
    TacError,
    TacOptions,
    check_worker_dir,
    load_tac,
    make_tac,
    pyworker_settings,
    run_tac,
    write_tac,
)
from pyworker.config import PROTOCOL_MSGPACK, WorkerConfig


def reference_exe() -> str | None:
    """The reference ``buildbot-worker`` executable, if this machine has one."""
    venv = os.environ.get("BUILDBOT_MASTER_VENV") or "/tmp/setup/master"
    candidate = os.environ.get("REFERENCE_WORKER") or os.path.join(venv, "bin", "buildbot-worker")
    return candidate if os.access(candidate, os.X_OK) else None


needs_reference = pytest.mark.skipif(reference_exe() is None, reason="no reference worker")


def reference_create(basedir: Path, *args: str) -> str:
    ref = reference_exe()
    assert ref is not None
    subprocess.run(
        [ref, "create-worker", "-q", *args[:-3], str(basedir), *args[-3:]],
        check=True,
        capture_output=True,
    )
    return (basedir / "buildbot.tac").read_text()


def write(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "buildbot.tac").write_text(text)
    return path


# ---------------------------------------------------------------------------------------
# writer


def test_default_tac_is_python_with_marker(tmp_path: Path) -> None:
    text = make_tac(TacOptions(str(tmp_path), "master.example", 9989, "w", "pw"))
    compile(text, "buildbot.tac", "exec")
    assert TAC_MARKER in text
    assert f"basedir = {str(tmp_path)!r}" in text
    assert "rotateLength = 10000000\nmaxRotatedFiles = 10\n" in text
    assert "use_tls = 0\ndelete_leftover_dirs = 0\n" in text


@needs_reference
@pytest.mark.parametrize(
    "cli_args, opts",
    [
        ((), {}),
        (("-r",), {"relocatable": True}),
        (("-n",), {"no_logrotate": True}),
        (
            ("--umask=0o22", "-k", "0", "--maxretries=3", "--numcpus=4", "-l", "None"),
            {
                "umask": "0o22",
                "keepalive": 0,
                "maxretries": "3",
                "numcpus": "4",
                "log_count": "None",
            },
        ),
        (
            (
                "--use-tls",
                "--delete-leftover-dirs",
                "-a",
                "file",
                "--protocol",
                PROTOCOL_MSGPACK,
                "-s",
                "1234",
                "--maxdelay=7",
            ),
            {
                "use_tls": True,
                "delete_leftover_dirs": True,
                "allow_shutdown": "file",
                "protocol": PROTOCOL_MSGPACK,
                "log_size": 1234,
                "maxdelay": 7,
            },
        ),
        (
            ("--connection-string=tcp:host=m:port=1", "--proxy-connection-string=tcp:p:3"),
            {"connection_string": "tcp:host=m:port=1", "proxy_connection_string": "tcp:p:3"},
        ),
    ],
)
def test_make_tac_matches_reference(
    tmp_path: Path, cli_args: tuple[str, ...], opts: dict[str, object]
) -> None:
    ref_dir = tmp_path / "ref"
    expected = reference_create(ref_dir, *cli_args, "m.example:1234", "wörker", "p'w\"d")
    ours = make_tac(TacOptions(str(ref_dir), "m.example", 1234, "wörker", "p'w\"d", **opts))  # type: ignore[arg-type]
    assert ours == expected


def test_write_tac_modes_and_new_file(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with out.open("w") as f:
        assert write_tac(str(tmp_path), "one", False, f) == str(tmp_path / "buildbot.tac")
        assert write_tac(str(tmp_path), "one", False, f) == str(tmp_path / "buildbot.tac")
        assert write_tac(str(tmp_path), "two", False, f) == str(tmp_path / "buildbot.tac.new")
    assert (tmp_path / "buildbot.tac").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "buildbot.tac.new").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "buildbot.tac").read_text() == "one"
    assert out.read_text().splitlines() == [
        "buildbot.tac already exists and is correct",
        "not touching existing buildbot.tac",
        "creating buildbot.tac.new instead",
    ]


def test_check_worker_dir(tmp_path: Path) -> None:
    missing = check_worker_dir(str(tmp_path))
    assert missing == (
        f"error reading '{tmp_path}/buildbot.tac': No such file or directory\n"
        f"invalid worker directory '{tmp_path}'"
    )
    write(tmp_path, "print('hello')\n")
    assert check_worker_dir(str(tmp_path)) == (
        f"unexpected content in '{tmp_path}/buildbot.tac'\ninvalid worker directory '{tmp_path}'"
    )
    write(tmp_path, make_tac(TacOptions(str(tmp_path), "h", 1, "n", "p")))
    assert check_worker_dir(str(tmp_path)) is None


# ---------------------------------------------------------------------------------------
# loader


def test_load_default_tac(tmp_path: Path) -> None:
    write(tmp_path, make_tac(TacOptions(str(tmp_path), "master.example", 9989, "w1", "s3cret")))
    config = load_tac(str(tmp_path)).config
    assert config == WorkerConfig(
        basedir=str(tmp_path),
        workername="w1",
        password="s3cret",
        master_host="master.example",
        port=9989,
        keepalive=600,
        maxdelay=300,
    )
    assert "s3cret" not in repr(config)
    assert load_tac(str(tmp_path / "buildbot.tac")).config == config


@needs_reference
def test_load_reference_written_tacs(tmp_path: Path) -> None:
    reference_create(
        tmp_path / "a",
        "--umask=0o22",
        "-k",
        "0",
        "--maxretries=5",
        "--use-tls",
        "-a",
        "signal",
        "-s",
        "500",
        "-l",
        "None",
        "[::1]:4000",
        "wa",
        "pa",
    )
    a = load_tac(str(tmp_path / "a")).config
    assert (a.master_host, a.port, a.workername, a.password) == ("::1", 4000, "wa", "pa")
    assert a.umask == 0o22 and a.keepalive is None and a.maxretries == 5
    assert a.use_tls and a.allow_shutdown == "signal" and not a.delete_leftover_dirs
    assert (a.log_rotate, a.rotate_length, a.max_rotated_files) == (True, 500, None)

    reference_create(
        tmp_path / "b",
        "-r",
        "-n",
        "--connection-string=tcp:host=h:port=2",
        "--protocol=" + PROTOCOL_MSGPACK,
        "--delete-leftover-dirs",
        "h:1",
        "wb",
        "pb",
    )
    shutil.move(tmp_path / "b", tmp_path / "moved")
    b = load_tac(str(tmp_path / "moved")).config
    assert b.basedir == str(tmp_path / "moved")
    assert (b.master_host, b.port, b.connection_string) == (None, None, "tcp:host=h:port=2")
    assert b.protocol == PROTOCOL_MSGPACK and b.delete_leftover_dirs
    # twistd's own --logfile defaults apply without the tac's log block
    assert (b.log_rotate, b.rotate_length, b.max_rotated_files) == (False, 1_000_000, None)


def test_relocatable_and_relative_basedir(tmp_path: Path) -> None:
    opts = TacOptions("/somewhere/else", "h", 1, "n", "p", relocatable=True)
    write(tmp_path / "r", make_tac(opts))
    assert load_tac(str(tmp_path / "r")).config.basedir == str(tmp_path / "r")
    text = make_tac(TacOptions("sub", "h", 1, "n", "p"))
    write(tmp_path / "rel" / "sub", "")  # the tac's LogFile opens sub/twistd.log
    write(tmp_path / "rel", text)
    assert load_tac(str(tmp_path / "rel")).config.basedir == str(tmp_path / "rel" / "sub")


HAND_EDITED = """
import os
from buildbot_worker.bot import Worker
from twisted.application import service

basedir = os.path.abspath(os.path.dirname(__file__))
rotateLength = 10 * 1024 * 1024
maxRotatedFiles = 3
application = service.Application('buildbot-worker')
from twisted.python.logfile import LogFile
from twisted.python.log import ILogObserver, FileLogObserver
logfile = LogFile.fromFullPath(os.path.join(basedir, "twistd.log"),
                               rotateLength=rotateLength, maxRotatedFiles=maxRotatedFiles)
application.setComponent(ILogObserver, FileLogObserver(logfile).emit)

MASTER = "ci.example.org"   # edited by hand
prefix = "worker-"
try:
    import resource
except ImportError:
    resource = None
s = Worker(MASTER, 9990 + 1, prefix + "linux", "hand" "written", basedir, 0,
           umask=0o002, maxdelay=60, protocol="pb", useTls=True, maxRetries=None)
s.setServiceParent(application)
"""


def test_hand_edited_tac(tmp_path: Path) -> None:
    config = load_tac(str(write(tmp_path, HAND_EDITED))).config
    assert config.basedir == str(tmp_path)
    assert (config.master_host, config.port) == ("ci.example.org", 9991)
    assert (config.workername, config.password) == ("worker-linux", "handwritten")
    assert config.keepalive is None and config.umask == 0o002 and config.maxdelay == 60
    assert config.use_tls and config.protocol == "pb"
    assert (config.log_rotate, config.rotate_length, config.max_rotated_files) == (
        True,
        10 * 1024 * 1024,
        3,
    )


def test_tac_runs_as_twistd_runs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment, a module next to the tac, a file, conditionals, an alias, a function."""
    (tmp_path / "workerconf.py").write_text("MASTER = 'conf.example'\nPORT = 9000\n")
    (tmp_path / "secret").write_text("from-a-file\n")
    monkeypatch.setenv("TAC_WORKERNAME", "env-worker")
    monkeypatch.setenv("TAC_KIND", "msgpack")
    text = make_tac(TacOptions(str(tmp_path), "h", 1, "n", "p"))
    text = text.replace("from buildbot_worker.bot import Worker", "import sys\n"
                        "from buildbot_worker.bot import Worker as W\nimport workerconf")
    text = text.replace("workername = 'n'", "workername = os.environ['TAC_WORKERNAME']")
    text = text.replace("passwd = 'p'", "passwd = open('secret').read().strip()")
    text = text.replace("port = 1\n", "port = workerconf.PORT + 1\n")
    text = text.replace("buildmaster_host = 'h'", "buildmaster_host = workerconf.MASTER")
    head, tail = text.split("s = Worker(")
    tail = "s = W(" + tail.replace("s.setServiceParent(application)\n", "")
    text = head + (
        "cwd_seen = os.getcwd()\n"
        "path_seen = sys.path[0]\n"
        "def make():\n"
        "    if os.environ.get('TAC_KIND') == 'msgpack':\n"
        "        global protocol\n"
        "        protocol = 'msgpack_experimental_v7'\n"
        "        " + tail.replace("\n", "\n        ").rstrip() + "\n"
        "        return s\n"
        "make().setServiceParent(application)\n"
        "del os.environ['TAC_KIND']\n"
    )
    text = text.replace("protocol=protocol,", "protocol=protocol, path='/ws',")
    write(tmp_path, text)
    cwd, path = os.getcwd(), list(sys.path)
    loaded = load_tac(str(tmp_path))
    assert (os.getcwd(), sys.path) == (cwd, path)  # both put back
    assert "workerconf" in sys.modules and "buildbot_worker.bot" not in sys.modules
    config = loaded.config
    assert (config.master_host, config.port) == ("conf.example", 9001)
    assert (config.workername, config.password) == ("env-worker", "from-a-file")
    assert config.protocol == PROTOCOL_MSGPACK and config.path == "/ws"
    assert "TAC_KIND" not in os.environ  # what the tac does to the environment stays
    assert loaded.log_observer is None and config.log_rotate
    del sys.modules["workerconf"]


def test_stand_in_worker_only(tmp_path: Path) -> None:
    """The tac's buildbot_worker is pyworker's, even where buildbot-worker is installed."""
    text = make_tac(TacOptions(str(tmp_path), "h", 1, "n", "p"))
    text += "import buildbot_worker\nimport buildbot_worker.pb\nFROM = buildbot_worker.__file__\n"
    saved = sys.modules.get("buildbot_worker")
    write(tmp_path, text)
    with pytest.raises(TacError, match="AttributeError: module 'buildbot_worker' has no "
                                       "attribute '__file__'"):
        load_tac(str(tmp_path))
    assert sys.modules.get("buildbot_worker") is saved


def test_several_assignments_the_last_counts(tmp_path: Path) -> None:
    text = make_tac(TacOptions(str(tmp_path), "h", 1, "n", "p", settings={"metrics_port": 9100}))
    text = text.replace("s = Worker(", "workername = 'second'\nmetrics_port = 9200\n"
                        "keepalive = 0\ns = Worker(")
    config = load_tac(str(write(tmp_path, text))).config
    assert (config.workername, config.metrics_port, config.keepalive) == ("second", 9200, None)


def test_tac_log_observer_is_handed_on(tmp_path: Path) -> None:
    text = make_tac(TacOptions(str(tmp_path), "h", 1, "n", "p", no_logrotate=True))
    text = text.replace("s = Worker(", "import sys\nfrom twisted.python.log import ILogObserver, "
                        "FileLogObserver\napplication.setComponent(ILogObserver, "
                        "FileLogObserver(sys.stdout).emit)\ns = Worker(")
    loaded = load_tac(str(write(tmp_path, text)))
    assert loaded.log_observer is not None
    assert loaded.log_observer.__self__.write == sys.stdout.write
    # create-worker's own block is not handed on: pyworker opens twistd.log itself
    write(tmp_path, make_tac(TacOptions(str(tmp_path), "h", 1, "n", "p", log_size=77)))
    loaded = load_tac(str(tmp_path))
    assert loaded.log_observer is None and loaded.config.rotate_length == 77


@pytest.mark.parametrize(
    "edit, message",
    [
        (("passwd = 'SECRETPW'", "passwd = os.environ['PYWORKER_NO_SUCH_VAR']"),
         "(line 32): KeyError: 'PYWORKER_NO_SUCH_VAR'"),
        (("umask=umask,", "umask=umask, usePTY=1,"),
         "TypeError: Worker(): got an unexpected keyword argument 'usePTY'"),
        (("umask=umask,", "umask=umask, unicode_encoding='latin-1',"),
         "unicode_encoding 'latin-1' is not supported"),
        (("umask=umask,", "umask=umask, unicode_encoding='no-such-codec',"),
         "unknown encoding 'no-such-codec'"),
        (("protocol = 'pb'", "protocol = 'carrier-pigeon'"),
         "ValueError: Unknown protocol carrier-pigeon"),
        (("port = 1", "port = 'abc'"), "Worker(...) on line 44: port must be a number"),
        (("keepalive = 600", "keepalive = '600'"), "keepalive must be int or None"),
        (("connection_string = None", "connection_string = 'tcp:h:1'"),
         "AssertionError: If you want to supply a connection string"),
        (("workername = 'n'", "workername = ("), "syntax error"),
        ((TAC_MARKER, "Application('something-else')"), "not a buildbot worker tac"),
        (("s.setServiceParent(application)", "pass"), "found no Worker"),
        (("s.setServiceParent(application)", "s.setServiceParent(application)\n"
          "Worker('h', 2, 'n', 'p', '.', 0).setServiceParent(application)"),
         "found 2 Workers (created on lines 44, 52)"),
        (("s.setServiceParent(application)", "s.setServiceParent(application)\n"
          "from twisted.application.internet import TimerService\n"
          "TimerService(1, print).setServiceParent(application)"),
         "the application has a TimerService service; pyworker runs the Worker only"),
        (("s.setServiceParent(application)", "s.setServiceParent(application)\ndel application"),
         "does not set 'application'"),
        (("s.setServiceParent(application)", "import sys; sys.exit(3)"),
         "the tac called sys.exit(3)"),
    ],
)
def test_bad_tacs(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    text = make_tac(TacOptions(str(tmp_path), "h", 1, "n", "SECRETPW"))
    assert edit[0] in text
    write(tmp_path, text.replace(edit[0], edit[1]))
    with pytest.raises(TacError) as info:
        load_tac(str(tmp_path))
    assert message in str(info.value)
    assert str(tmp_path / "buildbot.tac") in str(info.value)
    assert "SECRETPW" not in str(info.value)


def test_unreadable_tac(tmp_path: Path) -> None:
    with pytest.raises(TacError, match="No such file"):
        load_tac(str(tmp_path))


# ---------------------------------------------------------------------------------------
# pyworker's own settings


def test_pyworker_settings_round_trip(tmp_path: Path) -> None:
    base = make_tac(TacOptions(str(tmp_path), "h", 1, "n", "p"))
    opts = TacOptions(
        str(tmp_path),
        "h",
        1,
        "n",
        "p",
        settings={
            "restrict_paths": True,
            "metrics_port": 9100,
            "log_format": "json",
            "report_resources": True,
            "gzip_level": 0,
            "bz2_level": 9,
            "compress_threads": 3,
        },
    )
    text = make_tac(opts)
    assert text != base and text.replace(pyworker_settings(opts), "") == base
    assert text.index("protocol = 'pb'") < text.index("restrict_paths = 1")
    assert text.index("report_resources = 1") < text.index("s = Worker(")
    config = run_tac(text, str(tmp_path / "buildbot.tac")).config
    assert (config.restrict_paths, config.metrics_port) == (True, 9100)
    assert (config.log_format, config.report_resources) == ("json", True)
    assert (config.gzip_level, config.bz2_level, config.compress_threads) == (0, 9, 3)
    # hand-written forms
    text = text.replace("restrict_paths = 1", "restrict_paths = True")
    text += "metrics_port = None\nlog_format = None\ngzip_level = 'auto'\nbz2_level = None\n"
    text += "compress_threads = None\n"
    config = run_tac(text, str(tmp_path / "buildbot.tac")).config
    assert (config.restrict_paths, config.metrics_port, config.log_format) == (True, None, "text")
    assert (config.gzip_level, config.bz2_level, config.compress_threads) == ("auto", "auto", None)


_PORT = "metrics_port must be a TCP port number from 1 to 65535 or None"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("metrics_port = '9100'", _PORT + ", not '9100'"),
        ("metrics_port = 70000", _PORT + ", not 70000"),
        ("metrics_port = 0", _PORT + ", not 0"),
        ("metrics_port = True", _PORT + ", not True"),
        ("log_format = 'xml'", "log_format must be 'text' or 'json', not 'xml'"),
        ("restrict_paths = 'yes'", "restrict_paths must be 0 or 1, not 'yes'"),
        ("restrict_paths = 2", "restrict_paths must be 0 or 1, not 2"),
        ("report_resources = 1.0", "report_resources must be 0 or 1, not 1.0"),
        ("report_resources = os.environ.get('PYWORKER_NO_SUCH_VAR', 'yes')",
     "report_resources must be 0 or 1, not 'yes'"),
        ("gzip_level = 10", "gzip_level must be 'auto' or a number from 0 to 9, not 10"),
        ("bz2_level = 0", "bz2_level must be 'auto' or a number from 1 to 9, not 0"),
        ("bz2_level = 'fast'", "bz2_level must be 'auto' or a number from 1 to 9, not 'fast'"),
        ("compress_threads = 0", "compress_threads must be a number from 1 to 64 or None, not 0"),
        ("compress_threads = '2'", "compress_threads must be a number from 1 to 64 or None, "
                                   "not '2'"),
    ],
)
def test_bad_pyworker_settings(tmp_path: Path, line: str, message: str) -> None:
    text = make_tac(TacOptions(str(tmp_path), "h", 1, "n", "SECRETPW"))
    text = text.replace("protocol = 'pb'\n", f"protocol = 'pb'\n{line}\n")
    with pytest.raises(TacError) as info:
        run_tac(text, str(tmp_path / "buildbot.tac"))
    assert message in str(info.value)
    assert "SECRETPW" not in str(info.value)
