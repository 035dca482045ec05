"""End-to-end harness: a REAL Buildbot 4.3.0 master and REAL worker processes.

The master runs as a subprocess from the master venv (``$BUILDBOT_MASTER_VENV``, made by
``ci/setup.sh``): ``buildbot create-master`` + a generated ``master.cfg`` (sqlite db; PB and
the REST API on loopback, msgpack if asked for), started with ``buildbot start --nodaemon``.
Every listener binds port 0 and the master writes the ports the kernel chose to
``<basedir>/ports.json`` once it listens (:data:`PORTS_SERVICE`); the harness reads them
there. No port is picked, released and bound again later (on a loaded machine another
process took such ports in between: "Address already in use").
Workers are started exactly as Buildbot's own interop tests do (PROTOCOL.md §8.1)::

    <exe> create-worker -q <dir> 127.0.0.1:<port> <name> <password>
    <exe> start --nodaemon <dir>          # with a completely empty environment

so the same harness drives the reference ``buildbot-worker`` and ``pyworker``.
Everything is observed through the master's REST API (``/api/v2``), as a user would.

Typical use::

    with RealMaster(tmp_path, builders={"b1": "[steps.ShellCommand(command=['echo', 'hi'])]"},
                    venv=master_venv) as master:
        master.start_worker(worker_exe)
        build = master.force_build("b1")
        assert build.result == "SUCCESS"
        print(build.steps[0].logs["stdio"])   # 'h...' / 'o...' / 'e...' prefixed lines

A builder's factory is the Python source of an expression evaluated inside master.cfg
(where ``util``, ``steps`` and the other ``buildbot.plugins`` names are imported): either a
``util.BuildFactory`` or a list of steps. ``extra_config`` is Python source pasted into
master.cfg after the defaults and before the builders (custom step classes, secrets
providers, changes to ``c``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Buildbot's result codes (``buildbot.process.results``).
RESULT_NAMES: dict[int, str] = {
    0: "SUCCESS",
    1: "WARNINGS",
    2: "FAILURE",
    3: "SKIPPED",
    4: "EXCEPTION",
    5: "RETRY",
    6: "CANCELLED",
}

#: How many arbitrary ``name=value`` properties one forced build can carry.
MAX_FORCE_PROPERTIES = 16
FORCE_SCHEDULER = "force"
PB_PROTOCOL = "pb"
MSGPACK_PROTOCOL = "msgpack_experimental_v7"

_TAIL_LINES = 60

#: The file, in the master's basedir, that :data:`PORTS_SERVICE` writes the bound ports to.
PORTS_FILE = "ports.json"

#: master.cfg code (appended by :meth:`RealMaster.master_cfg`): a service that waits until
#: the master listens on every port it was configured with (port 0: the kernel picks one)
#: and then writes ``{"pb": n, "msgpack": n, "www": n}`` to :data:`PORTS_FILE` (atomically).
#: The ports are read where Buildbot 4.3.0 keeps them (as ``buildbot.test.util.integration``
#: does): each protocol manager's dispatcher (``master.pbmanager`` / ``master.msgmanager``
#: ``.dispatchers[...].port.getHost().port``) and ``master.www.getPortnum()`` (only set up
#: for a configured www port of exactly ``tcp:0:interface=127.0.0.1``). The dispatchers only
#: appear when the workers register, after the service manager's reconfig, hence the poll.
PORTS_SERVICE = """
import json as _json
import os as _os

from twisted.internet import task as _task
from twisted.python import log as _log
from buildbot.util import service as _service


class _ReportPorts(_service.BuildbotService):
    '''Writes the ports the master listens on to a file, once it listens on all of them.'''

    def checkConfig(self, path, wanted):
        pass

    def reconfigService(self, path, wanted):
        self._path = path
        self._wanted = wanted  # 'pb'/'msgpack'/'www' -> the port master.cfg gave (0: any)

    def startService(self):
        self._loop = None
        d = super().startService()

        def poll(_):
            self._loop = _task.LoopingCall(self._poll)
            self._loop.clock = self.master.reactor
            self._loop.start(0.05).addErrback(_log.err, 'reporting the ports')

        d.addCallback(poll)
        return d

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    def _bound(self):
        found = {}
        managers = {'pb': self.master.pbmanager, 'msgpack': self.master.msgmanager}
        for key, wanted in self._wanted.items():
            if key == 'www':
                try:
                    found[key] = self.master.www.getPortnum()
                except AttributeError:  # not listening yet, or not asked for port 0
                    if wanted and self.master.www.port_service is not None:
                        found[key] = wanted
                continue
            for dispatcher in list(managers[key].dispatchers.values()):
                if dispatcher.port is not None:
                    found[key] = dispatcher.port.getHost().port
        return found

    def _poll(self):
        found = self._bound()
        if set(found) != set(self._wanted):
            return
        tmp = self._path + '.tmp'
        with open(tmp, 'w') as f:
            _json.dump(found, f)
        _os.replace(tmp, self._path)
        _log.msg(f'tests/realmaster.py: listening on {found}')
        self._loop.stop()
"""


class HarnessError(AssertionError):
    """Something in the real master/worker set-up went wrong (the message has log tails)."""


# --------------------------------------------------------------------------------------
# small helpers


def _port_free_now() -> int:
    """A loopback TCP port nobody listens on at this moment (it may be taken a moment later).

    Only for listeners that cannot bind port 0 and report the port: see
    :meth:`RealMaster.start_worker_with_port`, which retries when the port was taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file (or a note that it does not exist)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"<cannot read {path}: {e.strerror}>"
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:])


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    on_timeout: Callable[[], str] | None = None,
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns something other than None/False."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            details = on_timeout() if on_timeout else ""
            raise HarnessError(f"timed out after {timeout:g}s waiting for {what}\n{details}")
        time.sleep(interval)


def normalize_stdio(text: str, basedir: str | Path | None = None) -> str:
    """Make a stdio log comparable across runs and workers.

    Replaces the worker basedir with ``<BASEDIR>`` and the ``elapsedTime=`` value with
    ``<ELAPSED>``.
    """
    if basedir is not None:
        text = text.replace(str(basedir), "<BASEDIR>")
    return re.sub(r"^helapsedTime=[0-9.e-]+$", "helapsedTime=<ELAPSED>", text, flags=re.M)


# --------------------------------------------------------------------------------------
# process bookkeeping: nothing may be left behind

_PR_SET_CHILD_SUBREAPER = 36
_subreaper_enabled: bool | None = None


def enable_subreaper() -> bool:
    """Make this (pytest) process adopt orphaned descendants (Linux ``prctl``).

    Commands a worker starts in their own session or process group and then abandons are
    re-parented to us instead of to init, so :func:`descendants` still sees them.
    """
    global _subreaper_enabled
    if _subreaper_enabled is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _subreaper_enabled = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            _subreaper_enabled = False
    return _subreaper_enabled


@dataclasses.dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    state: str
    cmdline: str

    def __str__(self) -> str:
        return f"pid {self.pid} (ppid {self.ppid}, state {self.state}): {self.cmdline}"


def _read_proc(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw_cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    rest = stat[stat.rindex(")") + 2 :].split()
    cmd = raw_cmd.replace(b"\0", b" ").decode("utf-8", "replace").strip()
    if not cmd:
        cmd = "[" + stat[stat.index("(") + 1 : stat.rindex(")")] + "]"
    return ProcInfo(pid=pid, ppid=int(rest[1]), state=rest[0], cmdline=cmd)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(root: int | None = None) -> list[ProcInfo]:
    """All live (or zombie) descendants of ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    procs: dict[int, ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _read_proc(int(entry))
            if info is not None:
                procs[info.pid] = info
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: list[ProcInfo] = []
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(procs[pid])
        stack.extend(children.get(pid, []))
    return sorted(found, key=lambda p: p.pid)


def reap_zombies(pids: Iterable[int]) -> None:
    """``waitpid`` the given pids if they are our zombie children (adopted orphans)."""
    for pid in pids:
        info = _read_proc(pid)
        if info is not None and info.state == "Z" and info.ppid == os.getpid():
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def leftover_processes(baseline: set[int], grace: float = 5.0) -> list[ProcInfo]:
    """Descendants not in ``baseline`` that are still alive after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        new = [p for p in descendants() if p.pid not in baseline]
        reap_zombies(p.pid for p in new)
        alive = [p for p in new if p.state != "Z" and _read_proc(p.pid) is not None]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def wait_for_process(cmdline: str, timeout: float = 30, gone: bool = False) -> list[ProcInfo]:
    """Wait until a descendant whose command line is exactly ``cmdline`` runs (or is gone).

    E.g. ``wait_for_process("sleep 100")`` before interrupting a build: a stop that reaches
    the master before the worker has started the command makes the step EXCEPTION, not
    CANCELLED.
    """

    def check() -> list[ProcInfo] | bool | None:
        found = [p for p in descendants() if p.cmdline == cmdline and p.state != "Z"]
        if gone:
            return not found or None
        return found or None

    state = "to be gone" if gone else "to run"
    result = wait_for(check, timeout, f"process {cmdline!r} {state}")
    return result if isinstance(result, list) else []


def kill_processes(procs: Iterable[ProcInfo]) -> None:
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.1)
    reap_zombies(p.pid for p in procs)


def default_worker_env(executable: str) -> dict[str, str]:
    """The environment a worker is started with: empty, as in Buildbot's interop tests.

    Exception: when ``PYWORKER_IO`` is set (ci/test.sh runs tests/ once per I/O backend)
    it is passed on to pyworker executables (basename starting with ``pyworker``), never
    to the reference worker. pyworker must therefore keep it out of its commands'
    environment, or their ``environment:`` headers differ from the reference.
    """
    io = os.environ.get("PYWORKER_IO")
    if io and os.path.basename(executable).startswith("pyworker"):
        return {"PYWORKER_IO": io}
    return {}


def _clean_env() -> dict[str, str]:
    """The environment for the master: ours, minus what would leak our venv into it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        and not k.startswith("PYTEST_")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait, then SIGKILL the whole process group (the process leads it)."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class StepResult:
    stepid: int
    number: int
    name: str
    results: int | None
    state_string: str
    #: log name -> full content; stream ('s') logs keep their one-char h/o/e line prefixes
    logs: dict[str, str]
    #: log name -> log type ('s' stream, 't' text, 'h' html)
    log_types: dict[str, str]
    hidden: bool = False

    @property
    def result(self) -> str:
        return RESULT_NAMES.get(self.results, str(self.results)) if self.results is not None else ""

    def stream(self, log: str = "stdio", prefix: str = "o") -> str:
        """The text of one stream of a stream log (``prefix`` 'o', 'e' or 'h'), unprefixed."""
        return "".join(
            line[1:] for line in self.logs[log].splitlines(keepends=True) if line[:1] == prefix
        )


@dataclasses.dataclass
class BuildResult:
    buildid: int
    number: int
    builder: str
    results: int | None
    state_string: str
    #: property name -> value
    properties: dict[str, Any]
    #: property name -> source ('Force Build Form', 'Worker', 'SetPropertyFromCommand Step', ...)
    property_sources: dict[str, str]
    steps: list[StepResult]
    workerid: int | None = None
    #: epoch seconds (whole seconds, as the master stores them)
    started_at: int | None = None
    complete_at: int | None = None
    #: builds of the same request that ended in RETRY before this one
    retried_buildids: list[int] = dataclasses.field(default_factory=list)

    @property
    def result(self) -> str:
        return RESULT_NAMES.get(self.results, str(self.results)) if self.results is not None else ""

    def step(self, name: str) -> StepResult:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"no step {name!r}; steps are {[s.name for s in self.steps]}")

    def describe(self) -> str:
        """A readable dump of the build, for assertion messages."""
        out = [f"build {self.builder}#{self.number}: {self.result} ({self.state_string})"]
        for s in self.steps:
            out.append(f"  step {s.number} {s.name!r}: {s.result} ({s.state_string})")
            for name, text in s.logs.items():
                out.append(f"    log {name!r}:")
                out.extend("      " + line for line in text.splitlines()[-40:])
        return "\n".join(out)


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    builder: str
    bsid: int
    brid: int


@dataclasses.dataclass(frozen=True)
class Builder:
    """A builder definition: ``factory`` is Python source (BuildFactory or list of steps)."""

    factory: str
    #: worker names allowed to run it (default: every worker of the master)
    workers: Sequence[str] | None = None
    #: extra ``BuilderConfig`` keyword arguments as Python source, e.g. ``"tags=['x']"``
    extra: str = ""


# --------------------------------------------------------------------------------------
# the worker process


class WorkerProcess:
    """A real worker: ``<exe> create-worker`` then ``<exe> start --nodaemon``, empty env."""

    def __init__(
        self,
        executable: str | Path,
        basedir: Path,
        name: str,
        password: str,
        master_addr: str,
        protocol: str = PB_PROTOCOL,
        create_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start_args: Sequence[str] = (),
    ) -> None:
        # relative paths would break: the worker is started from another directory
        self.executable = (
            os.path.abspath(executable) if os.sep in str(executable) else str(executable)
        )
        self.basedir = basedir
        self.name = name
        self.password = password
        self.master_addr = master_addr
        self.protocol = protocol
        self.create_args = list(create_args)
        self.start_args = list(start_args)
        self.env = dict(env) if env is not None else default_worker_env(self.executable)
        self.console_log = basedir.parent / f"{basedir.name}.console.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def twistd_log(self) -> Path:
        return self.basedir / "twistd.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "worker not started"
        return self.proc.pid

    def create(self) -> None:
        self.basedir.mkdir(parents=True, exist_ok=True)
        argv = [self.executable, "create-worker"]
        if self.protocol != PB_PROTOCOL:
            argv.append(f"--protocol={self.protocol}")
        argv += [*self.create_args, "-q", str(self.basedir), self.master_addr]
        argv += [self.name, self.password]
        res = subprocess.run(
            argv,
            env=self.env,
            cwd=self.basedir.parent,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if res.returncode != 0:
            raise HarnessError(
                f"{' '.join(argv)} exited {res.returncode}\n"
                f"stdout:\n{res.stdout.decode(errors='replace')}\n"
                f"stderr:\n{res.stderr.decode(errors='replace')}"
            )

    def start(self) -> None:
        with open(self.console_log, "ab") as console:
            self.proc = subprocess.Popen(
                [self.executable, "start", "--nodaemon", *self.start_args, str(self.basedir)],
                env=self.env,  # {} as Buildbot's SandboxedWorker (spawnProcess without env)
                cwd=self.basedir.parent,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the worker (SIGKILL its process group after ``timeout``); exit code."""
        if self.proc is None:
            return None
        _terminate(self.proc, timeout)
        return self.proc.returncode

    def wait(self, timeout: float) -> int:
        """Wait for the worker to exit by itself (e.g. after a master-initiated shutdown)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(
                f"worker {self.name} did not exit within {timeout:g}s\n{self.logs()}"
            ) from None

    def logs(self, lines: int = _TAIL_LINES) -> str:
        return (
            f"--- worker {self.name} ({self.executable}) twistd.log tail ---\n"
            f"{tail(self.twistd_log, lines)}\n"
            f"--- worker {self.name} console tail ---\n{tail(self.console_log, lines)}"
        )


# --------------------------------------------------------------------------------------
# the master


class RealMaster:
    """A real Buildbot master in ``<workdir>/master`` with workers under ``<workdir>/workers``."""

    def __init__(
        self,
        workdir: str | Path,
        builders: Mapping[str, str | Builder],
        *,
        venv: str | Path | None = None,
        workers: Sequence[str] = ("w1",),
        password: str = "pw",
        extra_config: str = "",
        msgpack: bool = False,
        startup_timeout: float = 60.0,
    ) -> None:
        venv = venv or os.environ.get("BUILDBOT_MASTER_VENV")
        if not venv:
            raise HarnessError("no master venv: set BUILDBOT_MASTER_VENV (see ci/setup.sh)")
        self.venv = Path(venv).absolute()
        self.workdir = Path(workdir).absolute()
        self.basedir = self.workdir / "master"
        self.workers_dir = self.workdir / "workers"
        self.builders = {
            name: b if isinstance(b, Builder) else Builder(factory=b)
            for name, b in builders.items()
        }
        self.worker_names = list(workers)
        self.password = password
        self.extra_config = extra_config
        self.msgpack = msgpack
        self.startup_timeout = startup_timeout
        #: the ports the running master listens on (read from its PORTS_FILE)
        self.pb_port = 0
        self.msgpack_port = 0
        self.www_port = 0
        #: the ports master.cfg asks for: 0 (any) on a fresh start, the old ones on restart()
        self._listen: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.worker_procs: list[WorkerProcess] = []
        self._builderids: dict[str, int] = {}
        self._baseline: set[int] = set()
        self.leftovers: list[ProcInfo] = []

    # ---- life cycle ----------------------------------------------------------------

    @property
    def twistd_log(self) -> Path:
        return self.basedir / "twistd.log"

    @property
    def console_log(self) -> Path:
        return self.workdir / "master.console.log"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.www_port}/api/v2"

    def __enter__(self) -> RealMaster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def ports_file(self) -> Path:
        return self.basedir / PORTS_FILE

    def start(self) -> None:
        """Create the master directory, write master.cfg, start it and wait for the API.

        Every listener binds port 0; the ports the kernel chose are in ``pb_port``,
        ``msgpack_port`` and ``www_port`` once this returns.
        """
        self._start(keep_ports=False)

    def _start(self, keep_ports: bool) -> None:
        enable_subreaper()
        self._baseline = {p.pid for p in descendants()}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workers_dir.mkdir(exist_ok=True)
        buildbot = self.venv / "bin" / "buildbot"
        if not self.basedir.exists():
            res = subprocess.run(
                [str(buildbot), "create-master", "-q", "-r", "--db=sqlite:///state.sqlite",
                 str(self.basedir)],
                env=_clean_env(), capture_output=True, timeout=120, check=False,
            )  # fmt: skip
            if res.returncode != 0:
                raise HarnessError(
                    f"buildbot create-master failed ({res.returncode}):\n"
                    f"{res.stdout.decode(errors='replace')}{res.stderr.decode(errors='replace')}"
                )
        wanted = {"www": self.www_port}
        if self.worker_names:  # no worker registered: no worker port is listened on
            wanted["pb"] = self.pb_port
            if self.msgpack:
                wanted["msgpack"] = self.msgpack_port
        # A fresh start binds port 0 everywhere. restart() keeps the ports, so that running
        # workers (which know only the old address) can reconnect: re-binding the numbers the
        # master has just released is a small window in which another process could take
        # one, accepted for restart tests only (Twisted listens with SO_REUSEADDR, so the old
        # connections in TIME_WAIT do not block it).
        self._listen = wanted if keep_ports else {k: 0 for k in wanted}
        self.pb_port = self.msgpack_port = self.www_port = 0
        self.ports_file.unlink(missing_ok=True)
        (self.basedir / "master.cfg").write_text(self.master_cfg())
        start_at = self.twistd_log.stat().st_size if self.twistd_log.exists() else 0
        with open(self.console_log, "ab") as console:
            self.proc = subprocess.Popen(
                [str(buildbot), "start", "--nodaemon", str(self.basedir)],
                env=_clean_env(),
                cwd=self.basedir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def started() -> bool | None:
            log = self._read_log_from(start_at)
            if "BuildMaster startup failed" in log or "Configuration Errors" in log:
                raise HarnessError(f"the master did not start\n{self.logs()}")
            if self.proc is not None and self.proc.poll() is not None:
                raise HarnessError(f"the master exited ({self.proc.returncode})\n{self.logs()}")
            if "BuildMaster is running" not in log:
                return None
            return self._read_ports()

        wait_for(started, self.startup_timeout, f"the master to start and write {PORTS_FILE}",
                 self.logs)  # fmt: skip
        wait_for(self._api_ready, 30, "the master's REST API", self.logs)

    def _read_ports(self) -> bool | None:
        """Take the ports from the master's PORTS_FILE (None while it is not written yet)."""
        try:
            ports: dict[str, int] = json.loads(self.ports_file.read_text())
        except FileNotFoundError:
            return None
        missing = set(self._listen) - set(ports)
        if missing:
            raise HarnessError(f"{self.ports_file} lacks {sorted(missing)}: {ports}")
        self.pb_port = ports.get("pb", 0)
        self.msgpack_port = ports.get("msgpack", 0)
        self.www_port = ports["www"]
        return True

    def _read_log_from(self, offset: int) -> str:
        try:
            with open(self.twistd_log, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _api_ready(self) -> bool:
        try:
            builders = self.get("builders")["builders"]
        except (OSError, HarnessError):
            return False
        self._builderids = {b["name"]: b["builderid"] for b in builders}
        return all(name in self._builderids for name in self.builders)

    def stop(self) -> list[ProcInfo]:
        """Stop every worker, then the master; kill anything left behind.

        Returns the processes that were still alive after a grace period (they have been
        SIGKILLed by then); :func:`conftest` fixtures assert this list is empty.
        """
        for w in self.worker_procs:
            w.stop()
        if self.proc is not None:
            _terminate(self.proc, 20)
        leftovers = leftover_processes(self._baseline) if self._baseline else []
        kill_processes(leftovers)
        self.leftovers = leftovers
        return leftovers

    def restart(self, extra_config: str | None = None) -> None:
        """Stop the master only (workers keep running) and start it again on the same ports.

        Also for a master that was killed or died: it is started on its old ports.
        """
        if self.proc is not None:
            _terminate(self.proc, 20)
        if extra_config is not None:
            self.extra_config = extra_config
        baseline = self._baseline
        self._start(keep_ports=True)
        self._baseline = baseline

    def reconfig(self, extra_config: str | None = None, timeout: float = 30) -> None:
        """Rewrite master.cfg and SIGHUP the master; wait for the reconfig.

        master.cfg asks for the same ports as at start (0 after a fresh start): the master
        then keeps its listeners (a changed port string would make it re-register each
        worker on a new listener).
        """
        assert self.proc is not None
        if extra_config is not None:
            self.extra_config = extra_config
        (self.basedir / "master.cfg").write_text(self.master_cfg())
        offset = self.twistd_log.stat().st_size
        self.proc.send_signal(signal.SIGHUP)

        def done() -> bool | None:
            log = self._read_log_from(offset)
            if "reconfig aborted" in log or "configuration update failed" in log:
                raise HarnessError(f"reconfig failed\n{self.logs()}")
            return "configuration update complete" in log or None

        wait_for(done, timeout, "the master reconfig", self.logs)

    # ---- master.cfg ------------------------------------------------------------------

    def master_cfg(self) -> str:
        workers = ", ".join(f"worker.Worker({n!r}, {self.password!r})" for n in self.worker_names)
        listen = self._listen
        protocols = f"'pb': {{'port': 'tcp:{listen.get('pb', 0)}:interface=127.0.0.1'}}"
        if self.msgpack:
            protocols += (
                f", 'msgpack_experimental_v7': "
                f"{{'port': {listen.get('msgpack', 0)}}}"  # 4.3.0 takes only an integer here
            )
        ports_service = (
            f"_ReportPorts({str(self.ports_file)!r}, {listen!r}, name='tests-report-ports')"
        )
        anyprops = ", ".join(
            f"util.AnyPropertyParameter('prop{i}')" for i in range(MAX_FORCE_PROPERTIES)
        )
        builder_lines = []
        for name, b in self.builders.items():
            names = list(b.workers) if b.workers is not None else self.worker_names
            extra = f", {b.extra}" if b.extra else ""
            builder_lines.append(
                f"c['builders'].append(util.BuilderConfig(name={name!r}, workernames={names!r},"
                f" factory=_factory({b.factory}){extra}))"
            )
        return (
            textwrap.dedent(
                f"""\
                # generated by tests/realmaster.py
                import re

                from buildbot.plugins import *  # noqa

                c = BuildmasterConfig = {{}}
                c['title'] = 'pyworker tests'
                c['titleURL'] = 'http://localhost/'
                # the www port is chosen by the kernel at start: nothing here uses this URL
                # (the REST API compares it with an Origin header, which urllib never sends)
                c['buildbotURL'] = 'http://127.0.0.1/'
                c['buildbotNetUsageData'] = None
                c['db'] = {{'db_url': 'sqlite:///state.sqlite'}}
                c['protocols'] = {{{protocols}}}
                c['www'] = {{'port': 'tcp:{listen.get('www', 0)}:interface=127.0.0.1'}}
                c['workers'] = [{workers}]
                c['builders'] = []
                c['schedulers'] = []
                c['collapseRequests'] = False
                # forced builds may carry any property value (tests send arbitrary text)
                c['validation'] = {{'property_value': re.compile(r'(?s).*')}}
                # after an EXCEPTION build the master would keep the worker idle for 10 s
                # ("quarantine"): tests provoke EXCEPTIONs on purpose and go on at once
                from buildbot.worker.base import AbstractWorker
                AbstractWorker.quarantine_timeout = 0
                AbstractWorker.quarantine_initial_timeout = 0
                AbstractWorker.quarantine_max_timeout = 0


                def _factory(f):
                    if isinstance(f, (list, tuple)):
                        return util.BuildFactory(list(f))
                    return f

                """
            )
            + "# ---- extra_config ----\n"
            + textwrap.dedent(self.extra_config)
            + "\n# ---- the ports the master listens on, for tests/realmaster.py ----\n"
            + PORTS_SERVICE
            + f"c.setdefault('services', []).append({ports_service})\n"
            + "\n# ---- builders ----\n"
            + "\n".join(builder_lines)
            + "\n"
            + textwrap.dedent(
                f"""\
                c['schedulers'].append(schedulers.ForceScheduler(
                    name={FORCE_SCHEDULER!r},
                    builderNames=[b.name for b in c['builders']],
                    properties=[{anyprops}],
                ))
                """
            )
        )

    # ---- REST ------------------------------------------------------------------------

    def get(self, path: str, **params: str | int) -> dict[str, Any]:
        """GET ``/api/v2/<path>`` and return the decoded JSON (HarnessError on HTTP error)."""
        query = "&".join(f"{k}={urllib.request.quote(str(v))}" for k, v in params.items())
        url = f"{self.api_url}/{path}" + (f"?{query}" if query else "")
        for attempt in range(3):
            try:
                with urllib.request.urlopen(url, timeout=30) as resp:
                    data: dict[str, Any] = json.loads(resp.read())
                    return data
            except urllib.error.HTTPError as e:
                body = e.read().decode(errors="replace")
                raise HarnessError(f"GET {url}: HTTP {e.code}: {body}") from None
            except (http.client.HTTPException, ConnectionError):
                # seen once on a loaded machine: the master closed the connection mid-body
                # (IncompleteRead); a GET is safe to repeat
                if attempt == 2:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def rpc(self, path: str, method: str, **params: Any) -> Any:
        """JSON-RPC ``POST /api/v2/<path>``; returns ``result``."""
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        req = urllib.request.Request(
            f"{self.api_url}/{path}",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                reply = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise HarnessError(
                f"POST {path} {method}: HTTP {e.code}: {e.read().decode(errors='replace')}"
            ) from None
        if "error" in reply:
            raise HarnessError(f"POST {path} {method}: {reply['error']}")
        return reply["result"]

    # ---- workers ---------------------------------------------------------------------

    def start_worker(
        self,
        executable: str | Path,
        name: str | None = None,
        *,
        protocol: str = PB_PROTOCOL,
        create_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start_args: Sequence[str] = (),
        wait: bool = True,
        timeout: float = 30,
    ) -> WorkerProcess:
        """Create and start a worker process; by default wait until the master sees it.

        ``env`` is the worker's whole environment; the default is
        :func:`default_worker_env` (empty, but for ``PYWORKER_IO`` given to pyworker).
        ``start_args`` go after ``start --nodaemon`` (its console goes to ``console_log``).
        """
        name = name or self.worker_names[0]
        if name not in self.worker_names:
            raise HarnessError(f"worker {name!r} is not in this master's {self.worker_names}")
        if protocol == PB_PROTOCOL:
            port = self.pb_port
        elif self.msgpack:
            port = self.msgpack_port
        else:
            raise HarnessError("RealMaster(msgpack=True) is needed for msgpack workers")
        for old in [w for w in self.worker_procs if w.name == name]:
            if old.running():
                raise HarnessError(f"worker {name!r} is already running (pid {old.pid})")
            self.worker_procs.remove(old)
        basedir = self.workers_dir / name
        if basedir.exists():
            shutil.rmtree(basedir)
        w = WorkerProcess(
            executable,
            basedir,
            name,
            self.password,
            f"127.0.0.1:{port}",
            protocol,
            create_args,
            env,
            start_args,
        )
        w.create()
        w.start()
        self.worker_procs.append(w)
        if wait:
            self.wait_worker_connected(name, timeout=timeout)
        return w

    def start_worker_with_port(
        self,
        executable: str | Path,
        port_args: Callable[[int], Sequence[str]],
        name: str | None = None,
        *,
        create_args: Sequence[str] = (),
        attempts: int = 5,
        **kwargs: Any,
    ) -> tuple[WorkerProcess, int]:
        """Start a worker that listens on a port of its own, e.g. ``--metrics-port``; the port.

        Unlike the master's, such a listener cannot be given port 0 and report what it got
        (pyworker's ``--metrics-port`` must be 1-65535), so the port is one the kernel has
        just handed out as free; when another process binds it before the worker does, the
        worker exits with "Address already in use" and the next attempt takes another port.
        ``port_args(port)`` gives the create-worker options.
        """
        name = name or self.worker_names[0]
        console = self.workers_dir / f"{name}.console.log"  # WorkerProcess.console_log
        for attempt in range(1, attempts + 1):
            port = _port_free_now()
            seen = console.stat().st_size if console.exists() else 0
            try:
                w = self.start_worker(
                    executable, name, create_args=[*create_args, *port_args(port)], **kwargs
                )
            except HarnessError:
                clash = False
                if console.exists():
                    with open(console, "rb") as f:
                        f.seek(seen)
                        clash = b"Address already in use" in f.read()
                if attempt == attempts or not clash:
                    raise
                continue
            return w, port
        raise AssertionError("unreachable")

    def worker_info(self, name: str) -> dict[str, Any]:
        workers = self.get("workers", name=name)["workers"]
        if not workers:
            raise HarnessError(f"the master knows no worker {name!r}")
        info: dict[str, Any] = workers[0]
        return info

    def is_worker_connected(self, name: str) -> bool:
        return bool(self.worker_info(name)["connected_to"])

    def wait_worker_connected(self, name: str, timeout: float = 30) -> dict[str, Any]:
        def connected() -> dict[str, Any] | None:
            for w in self.worker_procs:
                if w.name == name and w.proc is not None and w.proc.poll() is not None:
                    raise HarnessError(
                        f"worker {name} exited ({w.proc.returncode}) before connecting\n"
                        + self.logs()
                    )
            info = self.worker_info(name)
            return info if info["connected_to"] else None

        return wait_for(connected, timeout, f"worker {name!r} to connect", self.logs)

    def wait_worker_disconnected(self, name: str, timeout: float = 30) -> None:
        wait_for(
            lambda: not self.is_worker_connected(name),
            timeout,
            f"worker {name!r} to disconnect",
            self.logs,
        )

    def stop_worker(self, worker: WorkerProcess, timeout: float = 15) -> int | None:
        return worker.stop(timeout)

    # ---- builds ----------------------------------------------------------------------

    def builderid(self, builder: str) -> int:
        if builder not in self._builderids:
            self._api_ready()
        if builder not in self._builderids:
            raise HarnessError(f"no builder {builder!r}; the master has {list(self._builderids)}")
        return self._builderids[builder]

    def request_build(
        self,
        builder: str,
        properties: Mapping[str, str] | None = None,
        reason: str = "test",
    ) -> BuildRequest:
        """Force a build through the ForceScheduler's JSON-RPC; don't wait for it."""
        props = dict(properties or {})
        if len(props) > MAX_FORCE_PROPERTIES:
            raise HarnessError(f"at most {MAX_FORCE_PROPERTIES} properties per forced build")
        params: dict[str, Any] = {"builderid": self.builderid(builder), "reason": reason}
        for i, (k, v) in enumerate(props.items()):
            params[f"prop{i}_name"] = k
            params[f"prop{i}_value"] = str(v)
        bsid, brids = self.rpc(f"forceschedulers/{FORCE_SCHEDULER}", "force", **params)
        brid = next(iter(brids.values()))
        return BuildRequest(builder=builder, bsid=int(bsid), brid=int(brid))

    def wait_build(self, request: BuildRequest, timeout: float = 60) -> BuildResult:
        """Wait until the build request is complete and return its (last) build."""

        def complete() -> bool | None:
            reqs = self.get(f"buildrequests/{request.brid}")["buildrequests"]
            return bool(reqs and reqs[0]["complete"]) or None

        def on_timeout() -> str:
            return self._describe_request(request) + "\n" + self.logs()

        wait_for(complete, timeout, f"build request {request.brid} on {request.builder}",
                 on_timeout, interval=0.1)  # fmt: skip
        builds = self.get("builds", buildrequestid=request.brid)["builds"]
        if not builds:
            raise HarnessError(f"build request {request.brid} completed without a build")
        builds.sort(key=lambda b: b["buildid"])
        result = self.build_result(builds[-1]["buildid"])
        result.retried_buildids = [b["buildid"] for b in builds[:-1]]
        return result

    def force_build(
        self,
        builder: str,
        properties: Mapping[str, str] | None = None,
        reason: str = "test",
        timeout: float = 60,
    ) -> BuildResult:
        """Force a build and wait for it to finish."""
        return self.wait_build(self.request_build(builder, properties, reason), timeout)

    def force_builds(
        self,
        requests: Iterable[tuple[str, Mapping[str, str] | None]],
        timeout: float = 120,
    ) -> list[BuildResult]:
        """Force many builds at once (concurrently), then wait for all of them."""
        reqs = [self.request_build(b, p) for b, p in requests]
        deadline = time.monotonic() + timeout
        return [self.wait_build(r, max(1.0, deadline - time.monotonic())) for r in reqs]

    def wait_build_started(
        self, request: BuildRequest, step: str | None = None, timeout: float = 30
    ) -> int:
        """Wait until the request's build has started (and ``step``, if given); its buildid."""

        def started() -> int | None:
            builds = self.get("builds", buildrequestid=request.brid)["builds"]
            if not builds:
                return None
            buildid: int = max(b["buildid"] for b in builds)
            if step is None:
                return buildid
            steps = self.get(f"builds/{buildid}/steps", name=step)["steps"]
            return buildid if steps and steps[0]["started_at"] is not None else None

        what = f"build request {request.brid} to start" + (f" step {step!r}" if step else "")
        return wait_for(started, timeout, what, self.logs, interval=0.1)

    def wait_for_log(
        self, buildid: int, step: str, log: str, contains: str, timeout: float = 30
    ) -> str:
        """Wait until a running build's log contains ``contains``; returns the log text.

        Remember the reference worker sends output up to 5 s late (PROTOCOL.md §4.3).
        """

        def check() -> str | None:
            steps = self.get(f"builds/{buildid}/steps", name=step)["steps"]
            if not steps:
                return None
            for entry in self.get(f"steps/{steps[0]['stepid']}/logs")["logs"]:
                if entry["name"] == log:
                    text = self.log_content(entry["logid"], entry["num_lines"])
                    return text if contains in text else None
            return None

        return wait_for(check, timeout, f"{contains!r} in log {step}/{log}", self.logs, 0.2)

    def stop_build(self, buildid: int, reason: str = "stopped by test") -> None:
        """Stop (interrupt) a running build, like the UI's Stop button."""
        self.rpc(f"builds/{buildid}", "stop", reason=reason)

    def control_worker(self, name: str, action: str, reason: str = "test") -> None:
        """``action``: 'stop' (graceful shutdown), 'kill' (shutdown now), 'pause', 'unpause'."""
        workerid = self.worker_info(name)["workerid"]
        self.rpc(f"workers/{workerid}", action, reason=reason)

    def build_result(self, buildid: int) -> BuildResult:
        build = self.get(f"builds/{buildid}", property="*")["builds"][0]
        props = build.get("properties") or {}
        names = {v: k for k, v in self._builderids.items()}
        steps = [
            self._step_result(s)
            for s in self.get(f"builds/{buildid}/steps", order="number")["steps"]
        ]
        return BuildResult(
            buildid=buildid,
            number=build["number"],
            builder=names.get(build["builderid"], str(build["builderid"])),
            results=build["results"],
            state_string=build["state_string"],
            properties={k: v[0] for k, v in props.items()},
            property_sources={k: v[1] for k, v in props.items()},
            steps=steps,
            workerid=build.get("workerid"),
            started_at=build.get("started_at"),
            complete_at=build.get("complete_at"),
        )

    def _step_result(self, step: dict[str, Any]) -> StepResult:
        logs: dict[str, str] = {}
        types: dict[str, str] = {}
        for log in self.get(f"steps/{step['stepid']}/logs")["logs"]:
            logs[log["name"]] = self.log_content(log["logid"], log["num_lines"])
            types[log["name"]] = log["type"]
        return StepResult(
            stepid=step["stepid"],
            number=step["number"],
            name=step["name"],
            results=step["results"],
            state_string=step["state_string"],
            logs=logs,
            log_types=types,
            hidden=bool(step.get("hidden")),
        )

    def log_content(self, logid: int, num_lines: int | None = None) -> str:
        """A log's full stored text; stream logs keep their h/o/e line prefixes."""
        if num_lines == 0:
            return ""
        chunks = self.get(f"logs/{logid}/contents")["logchunks"]
        return "".join(c["content"] for c in chunks)

    def _describe_request(self, request: BuildRequest) -> str:
        try:
            builds = self.get("builds", buildrequestid=request.brid)["builds"]
            parts = [f"build request {request.brid}: {len(builds)} build(s)"]
            for b in builds:
                parts.append(self.build_result(b["buildid"]).describe())
            return "\n".join(parts)
        except (OSError, HarnessError) as e:
            return f"<cannot describe build request {request.brid}: {e}>"

    # ---- diagnostics -----------------------------------------------------------------

    def logs(self, lines: int = _TAIL_LINES) -> str:
        """Tails of the master's and every worker's logs."""
        parts = [
            f"--- master twistd.log tail ({self.twistd_log}) ---\n{tail(self.twistd_log, lines)}",
            f"--- master console tail ---\n{tail(self.console_log, 20)}",
        ]
        parts += [w.logs(lines) for w in self.worker_procs]
        return "\n".join(parts)


# --------------------------------------------------------------------------------------
# pytest glue


def master_fixture(
    builders: Mapping[str, str | Builder], *, scope: str = "module", **kwargs: Any
) -> Any:
    """A pytest fixture (default: module-scoped) yielding one started, shared RealMaster.

    In a test module: ``master = master_fixture({"b1": "[...steps...]"}, workers=("w1",))``.
    It needs the ``master_venv`` fixture of ``tests/conftest.py`` (skips without a master
    venv), stops everything at the end and fails if any process was left behind.
    """
    import pytest

    @pytest.fixture(scope=scope)  # type: ignore[misc]
    def _master(master_venv: Path, tmp_path_factory: Any) -> Iterator[RealMaster]:
        m = RealMaster(tmp_path_factory.mktemp("realmaster"), builders, venv=master_venv, **kwargs)
        try:
            m.start()
            yield m
        finally:
            leftovers = m.stop()
        if leftovers:
            pytest.fail("processes left behind:\n" + "\n".join(f"  {p}" for p in leftovers))

    return _master
