"""Tacs of many shapes, each run end to end: the worker logs in to a real Buildbot 4.3.0
master with the settings the tac gives (environment, a module next to the tac, a file,
conditionals, an alias, a function, a log observer on stdout, msgpack's ``path``), and a
tac with an argument the reference's Worker does not take is refused by name.

Every worker is created with a wrong name and password; only the tac's code gives the
right ones. The tacs that work are run by the reference worker too: they are shapes the
reference runs.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from realmaster import (
    MSGPACK_PROTOCOL,
    PB_PROTOCOL,
    Builder,
    RealMaster,
    WorkerProcess,
    default_worker_env,
    master_fixture,
)

SHAPES = ("env", "conf", "file", "cond", "alias", "func", "docker", "wspath", "bad")
ENV_STEP = "[steps.ShellCommand(command=['env'], name='env')]"

master = master_fixture(
    {f"b-{name}": Builder(ENV_STEP, workers=[name]) for name in SHAPES},
    workers=SHAPES,
    msgpack=True,
)

WORKER_CALL_END = "s.setServiceParent(application)\n"


def replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def worker_call(text: str) -> str:
    """The template's ``s = Worker(...)`` statement."""
    return text[text.index("s = Worker(") : text.index(WORKER_CALL_END)]


def tac_worker(
    master: RealMaster,
    exe: str,
    name: str,
    edit: Callable[[str], str],
    *,
    env: Mapping[str, str] | None = None,
    files: Mapping[str, str] | None = None,
    protocol: str = PB_PROTOCOL,
) -> WorkerProcess:
    """A worker created (wrong name and password) by ``exe``, its tac edited, not started."""
    port = master.msgpack_port if protocol == MSGPACK_PROTOCOL else master.pb_port
    basedir = master.workers_dir / name
    if basedir.exists():
        shutil.rmtree(basedir)
    worker = WorkerProcess(exe, basedir, "nobody", "wrong", f"127.0.0.1:{port}", protocol,
                           env={**default_worker_env(exe), **(env or {})})
    worker.create()
    worker.name = name  # what the master calls it once the tac has named it
    tac = basedir / "buildbot.tac"
    tac.write_text(edit(tac.read_text()))
    for filename, content in (files or {}).items():
        (basedir / filename).write_text(content)
    return worker


def run_and_check(master: RealMaster, worker: WorkerProcess) -> str:
    """Start the worker; it must log in under its tac's name and run a build. The build's
    environment (``env`` output)."""
    worker.start()
    master.worker_procs.append(worker)
    try:
        master.wait_worker_connected(worker.name)
        build = master.force_build(f"b-{worker.name}")
        assert build.result == "SUCCESS", build.describe()
        return build.step("env").stream()
    finally:
        worker.stop()
        master.worker_procs.remove(worker)  # the next test's worker has the same name
        master.wait_worker_disconnected(worker.name)


def test_environment(master: RealMaster, worker_executable: str) -> None:
    def edit(text: str) -> str:
        text = replace(text, "workername = 'nobody'", "workername = os.environ['TAC_NAME']")
        text = replace(text, "passwd = 'wrong'", "passwd = os.environ['TAC_PASS']")
        return replace(text, WORKER_CALL_END, WORKER_CALL_END + "del os.environ['TAC_PASS']\n")

    env = {"TAC_NAME": "env", "TAC_PASS": master.password, "TAC_KEPT": "kept"}
    worker = tac_worker(master, worker_executable, "env", edit, env=env)
    build_env = run_and_check(master, worker)
    # the commands see the environment as the tac left it
    variables = {line.split("=", 1)[0] for line in build_env.splitlines()}
    assert "TAC_KEPT" in variables and "TAC_NAME" in variables and "TAC_PASS" not in variables


def test_config_module_next_to_the_tac(master: RealMaster, worker_executable: str) -> None:
    def edit(text: str) -> str:
        text = replace(text, "from twisted.application import service\n",
                       "from twisted.application import service\nimport workerconf\n")
        text = replace(text, "workername = 'nobody'", "workername = workerconf.NAME")
        return replace(text, "passwd = 'wrong'", "passwd = workerconf.PASSWORD")

    conf = f"NAME = 'conf'\nPASSWORD = {master.password!r}\n"
    worker = tac_worker(master, worker_executable, "conf", edit, files={"workerconf.py": conf})
    run_and_check(master, worker)


def test_password_from_a_file(master: RealMaster, worker_executable: str) -> None:
    def edit(text: str) -> str:
        text = replace(text, "workername = 'nobody'", "workername = 'worker:file'.split(':')[1]")
        # a relative name: the tac runs in its basedir
        return replace(text, "passwd = 'wrong'", "passwd = open('passwd.txt').read().strip()")

    files = {"passwd.txt": master.password + "\n"}
    run_and_check(master, tac_worker(master, worker_executable, "file", edit, files=files))


def test_worker_chosen_by_a_condition(master: RealMaster, worker_executable: str) -> None:
    def edit(text: str) -> str:
        call = worker_call(text)
        chosen = (
            "if os.environ.get('TAC_TARGET') == 'real':\n"
            f"    s = Worker(buildmaster_host, port, 'cond', {master.password!r}, basedir,\n"
            "               keepalive, maxdelay=maxdelay)\n"
            "else:\n"
            "    s = Worker('127.0.0.1', 1, 'nobody', 'wrong', basedir, keepalive)\n"
        )
        return replace(text, call, chosen)

    worker = tac_worker(master, worker_executable, "cond", edit, env={"TAC_TARGET": "real"})
    run_and_check(master, worker)


def test_worker_imported_under_another_name(master: RealMaster, worker_executable: str) -> None:
    def edit(text: str) -> str:
        text = replace(text, "from buildbot_worker.bot import Worker\n",
                       "from buildbot_worker import bot as worker_bot\n"
                       "from buildbot_worker.bot import Worker as BuildbotWorker\n")
        text = replace(text, "workername = 'nobody'", "workername = 'alias'")
        text = replace(text, "passwd = 'wrong'", f"passwd = {master.password!r}")
        text = replace(text, "s = Worker(", "s = BuildbotWorker(")
        assert "worker_bot" in text
        return text

    run_and_check(master, tac_worker(master, worker_executable, "alias", edit))


def test_worker_made_in_a_function(master: RealMaster, worker_executable: str) -> None:
    def edit(text: str) -> str:
        text = replace(text, "workername = 'nobody'", "workername = 'func'")
        text = replace(text, "s = Worker(buildmaster_host, port, workername, passwd,",
                       "def make_worker(passwd):\n"
                       "    return Worker(buildmaster_host, port, workername, passwd,")
        return replace(text, WORKER_CALL_END,
                       f"make_worker({master.password!r}).setServiceParent(application)\n")

    run_and_check(master, tac_worker(master, worker_executable, "func", edit))


#: The shape of the official buildbot/buildbot-worker docker image's tac: everything from
#: the environment, the password removed from it, the log on stdout.
DOCKER_TAC = """\
import fnmatch
import os
import sys

from twisted.application import service
from twisted.python.log import FileLogObserver
from twisted.python.log import ILogObserver

from buildbot_worker.bot import Worker

# setup worker
basedir = os.environ.get("BUILDBOT_BASEDIR",
    os.path.abspath(os.path.dirname(__file__)))
application = service.Application('buildbot-worker')


application.setComponent(ILogObserver, FileLogObserver(sys.stdout).emit)
# and worker on the same process!
buildmaster_host = os.environ.get("BUILDMASTER", 'localhost')
port = int(os.environ.get("BUILDMASTER_PORT", 9989))
workername = os.environ.get("WORKERNAME", 'docker')
passwd = os.environ.get("WORKERPASS")

# delete the password from the environ so that it is not leaked in the log
blacklist = os.environ.get("WORKER_ENVIRONMENT_BLACKLIST", "WORKERPASS").split()
for name in list(os.environ.keys()):
    for toremove in blacklist:
        if fnmatch.fnmatch(name, toremove):
            del os.environ[name]

keepalive = 600
umask = None
maxdelay = 300
allow_shutdown = None
maxretries = 10
delete_leftover_dirs = False

s = Worker(buildmaster_host, port, workername, passwd, basedir,
           keepalive, umask=umask, maxdelay=maxdelay,
           allow_shutdown=allow_shutdown, maxRetries=maxretries,
           delete_leftover_dirs=delete_leftover_dirs)
s.setServiceParent(application)
"""


def test_docker_image_tac_logs_to_stdout(master: RealMaster, worker_executable: str) -> None:
    env = {
        "BUILDMASTER": "127.0.0.1",
        "BUILDMASTER_PORT": str(master.pb_port),
        "WORKERNAME": "docker",
        "WORKERPASS": master.password,
        "WORKER_ENVIRONMENT_BLACKLIST": "WORKERPASS TAC_SECRET_*",
        "TAC_SECRET_TOKEN": "t0ken",
        "TAC_KEPT": "kept",
    }
    worker = tac_worker(master, worker_executable, "docker", lambda _: DOCKER_TAC, env=env)
    (worker.basedir / "twistd.log").unlink(missing_ok=True)
    offset = worker.console_log.stat().st_size if worker.console_log.exists() else 0
    build_env = run_and_check(master, worker)
    assert "TAC_KEPT=kept\n" in build_env
    variables = {line.split("=", 1)[0] for line in build_env.splitlines()}
    assert "WORKERPASS" not in variables and "TAC_SECRET_TOKEN" not in variables
    assert "WORKERNAME" in variables
    # `start --nodaemon`: the tac's observer writes the log to stdout, not to twistd.log
    with open(worker.console_log, "rb") as f:
        f.seek(offset)
        stdout = f.read().decode("utf-8", "replace")
    assert "message from master: attached" in stdout, stdout
    assert not worker.twistd_log.exists()


def test_msgpack_path_and_unicode_encoding(master: RealMaster, worker_executable: str) -> None:
    def edit(text: str) -> str:
        text = replace(text, "workername = 'nobody'", "workername = 'wspath'")
        text = replace(text, "passwd = 'wrong'", f"passwd = {master.password!r}")
        return replace(text, "protocol=protocol,",
                       "protocol=protocol, path='ws', unicode_encoding='utf-8',")

    worker = tac_worker(master, worker_executable, "wspath", edit, protocol=MSGPACK_PROTOCOL)
    run_and_check(master, worker)
    if "pyworker" in Path(worker_executable).name:
        assert f"connecting to ws://127.0.0.1:{master.msgpack_port}/ws with" in (
            worker.twistd_log.read_text())


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("usePTY=True", "TypeError: Worker(): got an unexpected keyword argument 'usePTY'"),
        ("unicode_encoding='latin-1'", "unicode_encoding 'latin-1' is not supported"),
    ],
)
def test_unknown_argument_is_refused_by_name(
    master: RealMaster, pyworker_executable: str, argument: str, message: str
) -> None:
    def edit(text: str) -> str:
        text = replace(text, "workername = 'nobody'", "workername = 'bad'")
        text = replace(text, "passwd = 'wrong'", f"passwd = {master.password!r}")
        return replace(text, "umask=umask,", f"umask=umask, {argument},")

    worker = tac_worker(master, pyworker_executable, "bad", edit)
    tac = worker.basedir / "buildbot.tac"
    for nodaemon in (["--nodaemon"], []):
        result = subprocess.run(
            [pyworker_executable, "start", *nodaemon, str(worker.basedir)],
            env=worker.env, capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 1, result
        assert result.stderr.startswith(f"pyworker: {tac}") or result.stderr.startswith(
            f"pyworker: error in {tac}"), result.stderr
        assert message in result.stderr
        assert master.password not in result.stderr + result.stdout
        assert not (worker.basedir / "twistd.pid").exists()
    assert not master.is_worker_connected("bad")
