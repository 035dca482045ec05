"""Process management for a worker directory: start, stop and restart, twistd-compatible.

``start`` checks and runs ``buildbot.tac``, sets up ``twistd.log`` (same line format
and rotation as twistd), ``twistd.hostname`` and, when daemonising, ``twistd.pid``, then
hands the :class:`~pyworker.config.WorkerConfig` to ``pyworker.frontend.worker.run_worker`` and
exits with its return value. Files, messages and exit codes follow
``buildbot-worker`` 4.3.0 (``scripts/start.py``, ``stop.py``, ``restart.py``, twistd).

Differences, all opt-in or forced by the front end's signal semantics (SIGTERM = graceful
drain, SIGQUIT or a second SIGTERM = immediate stop): ``stop`` sends SIGQUIT (the
reference's immediate stop, same messages and 10 s wait); ``stop --graceful`` sends SIGTERM
and waits for the drain without a time limit (``--timeout``); ``log_format = 'json'`` in the
tac writes one JSON object per line to ``twistd.log`` instead of twistd's text lines.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import ILogObserver
from twisted.python.logfile import LogFile
from zope.interface import implementer

from pyworker.cli.tac import TacError, check_worker_dir, load_tac
from pyworker.config import REFERENCE_VERSION, WorkerConfig

PIDFILE = "twistd.pid"
#: Written by ``stop --graceful`` (the pid it sent SIGTERM to), so that running it again
#: waits for the same drain instead of sending the second SIGTERM (= stop now).
DRAINING_FILE = "pyworker.draining"
LOGFILE = "twistd.log"
HOSTNAME_FILE = "twistd.hostname"
#: The line ``start`` waits for (logged when the master calls the Bot's ``print``).
ATTACHED = b"message from master: attached"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
#: ``stop`` (and ``restart``) stop the worker at once with this signal; the front end
#: treats SIGTERM as a graceful drain (see ``stop --help``).
IMMEDIATE_SIGNAL = "QUIT"
#: ``stop --graceful`` prints a "still draining" line this often (seconds).
DRAIN_REPORT_INTERVAL = 30.0
#: twistd's umask for daemons when none is configured.
DAEMON_UMASK = 0o077

TIMEOUT_HINT = (
    "The worker took more than 10 seconds to start and/or connect to the buildmaster,\n"
    "so we were unable to confirm that it started and connected correctly. Please\n"
    "'tail twistd.log' and look for a line that says 'message from master: attached'\n"
    "to verify correct startup. If you see a bunch of messages like 'will retry in 6\n"
    "seconds', your worker might not have the correct hostname or portnumber for the\n"
    "buildmaster, or the buildmaster might not be running. If you see messages like"
    "   'Failure: twisted.cred.error.UnauthorizedLogin'\n"
    "then your worker might be using the wrong botname or password. Please correct\n"
    "these problems and then restart the worker."
)
UNCONFIRMED_HINT = (
    "Unable to confirm that the worker started correctly. You may need to stop it,\n"
    "fix the config file, and restart."
)

RunWorker = Callable[[WorkerConfig], int | None]


class WorkerNotRunning(Exception):
    """There is no ``twistd.pid`` in the worker directory."""


# ---------------------------------------------------------------------------------------
# start


def start(basedir: str, quiet: bool, nodaemon: bool) -> int:
    """``pyworker start``: exit code as the reference's ``startCommand``."""
    error = check_worker_dir(basedir)
    if error is not None:
        print(error)
        return 1
    return start_worker(basedir, quiet, nodaemon)


def start_worker(basedir: str, quiet: bool, nodaemon: bool) -> int:
    """Start the worker in ``basedir`` (already checked); foreground if ``nodaemon``."""
    os.chdir(basedir)
    try:
        loaded = load_tac(basedir)
    except TacError as exc:
        print(f"pyworker: {exc}", file=sys.stderr)
        return 1
    config, observer = loaded.config, loaded.log_observer
    pidfile = None if nodaemon else os.path.abspath(PIDFILE)
    if pidfile is not None:
        problem = _check_pid(pidfile)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 1
        _remove_draining()  # left by a drain that ended without `stop` watching
    try:
        # the tac's own log observer replaces twistd.log, as twistd has it
        logfile = open_logfile(config) if observer is None else None
    except OSError as exc:
        print(f"pyworker: cannot open {LOGFILE} in {config.basedir}: {exc}", file=sys.stderr)
        return 1
    if nodaemon:
        return run(config, logfile, pidfile=None, status_fd=None, log_observer=observer)
    return _daemonize(config, logfile, pidfile or PIDFILE, quiet, observer)


def open_logfile(config: WorkerConfig) -> LogFile:
    """``twistd.log`` as the reference opens it: the tac's LogFile, or twistd's default."""
    path = os.path.join(config.basedir, LOGFILE)
    if config.log_rotate:
        logfile: LogFile = LogFile.fromFullPath(
            path, rotateLength=config.rotate_length, maxRotatedFiles=config.max_rotated_files
        )
        return logfile
    # Without the tac's log block twistd opens --logfile=twistd.log with LogFile's
    # defaults (rotate at 1 MB, keep every old file) and rotates on SIGUSR1.
    logfile = LogFile.fromFullPath(path)
    return logfile


def _check_pid(pidfile: str) -> str | None:
    """twistd's checkPID: refuse to start over a live pid file, remove a stale one."""
    if not os.path.exists(pidfile):
        return None
    try:
        with open(pidfile) as f:
            pid = int(f.read())
    except ValueError:
        return f"Pidfile {pidfile} contains non-numeric value"
    except OSError as exc:
        return f"Can't read pidfile {pidfile}: {exc}"
    try:
        os.kill(pid, 0)
    except OSError as why:
        if why.errno == errno.ESRCH:
            os.remove(pidfile)  # stale
            return None
        return f"Can't check status of PID {pid} from pidfile {pidfile}: {why}"
    if _is_zombie(pid):
        os.remove(pidfile)
        return None
    return (
        f"Another twistd server is running, PID {pid}\n\n"
        "This could either be a previously started instance of your application or a\n"
        "different application entirely. To start a new one, either run it in some other\n"
        "directory, or use the --pidfile and --logfile parameters to avoid clashes.\n"
    )


def _daemonize(
    config: WorkerConfig, logfile: LogFile | None, pidfile: str, quiet: bool, observer: Any
) -> int:
    """Double-fork the worker away; the parent reports how the start went."""
    log_offset = _file_size(LOGFILE)
    if not quiet:
        print("Following twistd.log until startup finished..")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child
        rc = 1
        try:
            os.close(read_fd)
            os.setsid()
            if os.fork():
                os._exit(0)
            _redirect_stdio_to_devnull()
            os.umask(DAEMON_UMASK)
            rc = run(config, logfile, pidfile=pidfile, status_fd=write_fd, log_observer=observer)
        except BaseException as exc:  # nothing may escape a forked child
            _report_status(write_fd, _status_error(exc))
        finally:
            os._exit(rc)
    os.close(write_fd)
    if logfile is not None:
        logfile.close()
    os.waitpid(pid, 0)
    try:
        if quiet:
            return _wait_for_status(read_fd)
        return _follow(read_fd, log_offset, pidfile)
    finally:
        os.close(read_fd)


def _redirect_stdio_to_devnull() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in range(3):
        try:
            os.dup2(null, fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
    os.close(null)


def _status_error(exc: BaseException) -> bytes:
    return f"1 {type(exc).__name__}: {exc}".encode("ascii", "backslashreplace")[:100]


def _report_status(fd: int | None, message: bytes) -> None:
    if fd is None:
        return
    try:
        os.write(fd, message)
        os.close(fd)
    except OSError:
        pass


def _status_failure_text(data: bytes) -> str:
    return f"An error has occurred: {data[2:]!r}\nPlease look at log file for more information.\n"


def _wait_for_status(read_fd: int) -> int:
    """``start -q``: like twistd's first parent, wait for the daemon's status byte."""
    data = os.read(read_fd, 100)
    if data == b"0":
        return 0
    sys.stderr.write(_status_failure_text(data))
    return 1


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _follow(read_fd: int, offset: int, pidfile: str) -> int:
    """Tail ``twistd.log`` for up to 10 s waiting for the master's ``attached``."""
    os.set_blocking(read_fd, False)
    deadline = time.monotonic() + START_TIMEOUT
    status: bytes | None = None
    pending = b""
    in_reconfig = False
    while True:
        size = _file_size(LOGFILE)
        if size < offset:  # rotated or truncated: start from the top of the new file
            offset = 0
        if size > offset:
            with open(LOGFILE, "rb") as f:
                f.seek(offset)
                chunk = f.read(size - offset)
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if b"Log opened." in line or b"loading configuration from" in line:
                    in_reconfig = True
                if in_reconfig:
                    print(line.decode("utf-8", "replace"))
                if ATTACHED in line:
                    print("The buildbot-worker appears to have (re)started correctly.")
                    return 0
        if status is None:
            try:
                status = os.read(read_fd, 100)
            except BlockingIOError:
                pass
            if status is not None and status != b"0":
                print(UNCONFIRMED_HINT)
                print(_status_failure_text(status), end="")
                return 1
        elif not os.path.exists(pidfile):
            print(UNCONFIRMED_HINT)
            print("The worker process exited; see twistd.log for the reason.")
            return 1
        if time.monotonic() >= deadline:
            print(TIMEOUT_HINT)
            return 1
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------
# running (in the foreground process or in the daemon)


def json_log_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """One Twisted log event as the object ``--log-format json`` writes on a line.

    Keys: ``time`` (ISO-8601, local time with offset), ``level`` (Twisted's level name;
    legacy ``log.err`` events are ``critical``), ``namespace`` and/or ``system`` (when the
    event has them), ``message`` (the formatted text, as in the text format) and
    ``failure`` (the traceback text, only when the event carries a failure).
    """
    from twisted.logger import formatEvent

    when = event.get("log_time")
    if not isinstance(when, int | float):
        when = time.time()
    record: dict[str, Any] = {
        "time": datetime.datetime.fromtimestamp(when)
        .astimezone()
        .isoformat(timespec="milliseconds"),
    }
    level = event.get("log_level")
    record["level"] = getattr(level, "name", None) or ("error" if event.get("isError") else "info")
    namespace = event.get("log_namespace")
    if namespace:
        record["namespace"] = str(namespace)
    system = event.get("log_system", event.get("system"))
    if system and system != "-":
        record["system"] = str(system)
    failure = event.get("log_failure", event.get("failure"))
    if failure is not None and event.get("isError"):
        # legacy log.err(): its text has the traceback appended; keep that in "failure"
        message = str(event.get("why") or "Unhandled Error")
    else:
        message = formatEvent(dict(event))
    record["message"] = message
    if failure is not None:
        try:
            record["failure"] = failure.getTraceback()
        except Exception:
            record["failure"] = repr(failure)
    return record


@implementer(ILogObserver)
class JSONLineObserver:
    """A Twisted log observer writing :func:`json_log_record` lines to a :class:`LogFile`.

    The LogFile rotates exactly as for the text format.
    """

    def __init__(self, logfile: LogFile) -> None:
        self.logfile = logfile

    def __call__(self, event: Mapping[str, Any]) -> None:
        try:
            line = json.dumps(json_log_record(event), ensure_ascii=False, default=str)
        except Exception as exc:  # never lose a line because one value is odd
            line = json.dumps({"time": "", "level": "error", "message": f"unloggable: {exc!r}"})
        self.logfile.write(line + "\n")
        self.logfile.flush()


class _Logging:
    """Twisted's global log going to ``twistd.log`` the way twistd sets it up, or to the
    tac's own ``observer`` (then ``logfile`` is None)."""

    def __init__(
        self,
        logfile: LogFile | None,
        rotate_on_usr1: bool,
        log_format: str = "text",
        observer: Any = None,
    ) -> None:
        from twisted.logger import LegacyLogObserverWrapper, globalLogBeginner
        from twisted.python import log

        self.logfile = logfile
        self.saved_stdio = (sys.stdout, sys.stderr)
        self.observer: Any
        if logfile is None:
            # twistd: a new-style observer as it is, anything else as a legacy one
            self.observer = observer if ILogObserver.providedBy(observer) else (
                LegacyLogObserverWrapper(observer))
            rotate_on_usr1 = False
        elif log_format == "json":
            self.observer = JSONLineObserver(logfile)
        else:
            # a legacy observer is a plain callable; Twisted annotates it as ILogObserver
            emit = log.FileLogObserver(logfile).emit
            self.observer = LegacyLogObserverWrapper(emit)  # type: ignore[arg-type]
        globalLogBeginner.beginLoggingTo([self.observer], redirectStandardIO=True)
        self.old_usr1: Any = None
        if rotate_on_usr1 and not signal.getsignal(signal.SIGUSR1):
            self.old_usr1 = signal.signal(signal.SIGUSR1, self._rotate)

    def _rotate(self, signum: int, frame: object) -> None:
        from twisted.internet import reactor

        assert self.logfile is not None
        reactor.callFromThread(self.logfile.rotate)  # type: ignore[attr-defined]

    def stop(self) -> None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self.observer)
        sys.stdout, sys.stderr = self.saved_stdio
        if self.old_usr1 is not None:
            signal.signal(signal.SIGUSR1, self.old_usr1)
        if self.logfile is not None:
            self.logfile.close()


def _load_run_worker() -> RunWorker:
    from pyworker.frontend.worker import run_worker

    return run_worker


def run(
    config: WorkerConfig,
    logfile: LogFile | None,
    pidfile: str | None,
    status_fd: int | None,
    load_run_worker: Callable[[], RunWorker] | None = None,
    log_observer: Any = None,
) -> int:
    """Log to ``twistd.log`` (or the tac's ``log_observer``), record pid and hostname, run
    the worker, clean up.

    ``status_fd`` (daemon mode) receives twistd's status: ``b"0"`` once the worker is
    about to run, ``b"1 <error>"`` if it could not get that far.
    """
    from twisted.python import log
    from twisted.python.runtime import shortPythonVersion

    logging = _Logging(logfile, rotate_on_usr1=not config.log_rotate,
                       log_format=config.log_format, observer=log_observer)
    rc = 1
    failure: str | None = None
    try:
        if pidfile is not None:
            with open(pidfile, "w") as f:
                f.write(str(os.getpid()))
        log.msg("Loading buildbot.tac...")
        log.msg("Loaded.")
        log.msg(
            f"pyworker {_pyworker_version()} ({sys.executable} {shortPythonVersion()}) starting up."
        )
        log.msg(f"Starting Worker -- version: {REFERENCE_VERSION}")
        if config.umask is not None:
            os.umask(config.umask)
        _record_hostname(config.basedir)
        run_worker = (load_run_worker or _load_run_worker)()
        _report_status(status_fd, b"0")
        status_fd = None
        result = run_worker(config)
        rc = 0 if result is None else int(result)
    except Exception as exc:
        log.err(None, "pyworker: the worker failed")
        _report_status(status_fd, _status_error(exc))
        failure = f"{type(exc).__name__}: {exc}"
        rc = 1
    finally:
        if pidfile is not None:
            _remove_pidfile(pidfile)
        log.msg("Server Shut Down.")
        logging.stop()
    if failure is not None:  # stderr is the terminal again (or /dev/null in a daemon)
        print(f"pyworker: the worker failed ({failure}); see {LOGFILE}", file=sys.stderr)
    return rc


def _pyworker_version() -> str:
    try:
        from importlib.metadata import version

        return version("pyworker")
    except Exception:
        return "unknown"


def _record_hostname(basedir: str) -> None:
    from twisted.python import log

    log.msg("recording hostname in twistd.hostname")
    try:
        with open(os.path.join(basedir, HOSTNAME_FILE), "w") as f:
            f.write(f"{os.uname()[1]}\n")
    except Exception:
        log.msg("failed - ignoring")


def _remove_pidfile(pidfile: str) -> None:
    from twisted.python import log

    try:
        os.unlink(pidfile)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            log.msg("Warning: No permission to delete pid file")
        elif exc.errno != errno.ENOENT:
            log.err(exc, "Failed to unlink PID file:")


# ---------------------------------------------------------------------------------------
# stop / restart


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] == b"Z"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return not _is_zombie(pid)


def _read_pid() -> int | None:
    """The pid in ``twistd.pid`` (cwd); None (message printed) if it is garbage.

    Raises :class:`WorkerNotRunning` if there is no pid file.
    """
    try:
        with open(PIDFILE) as f:
            content = f.read()
    except OSError as exc:
        raise WorkerNotRunning() from exc
    try:
        return int(content.strip())
    except ValueError:
        print(f"invalid pid file {os.path.abspath(PIDFILE)}: {content.strip()!r}")
        return None


def _signal(pid: int, signum: int) -> bool:
    """Send ``signum``; False (message printed) if that is not allowed. A dead pid is fine."""
    try:
        os.kill(pid, signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            print(f"cannot signal worker process {pid}: {exc.strerror}")
            return False
    return True


def stop_worker(basedir: str, quiet: bool, signame: str = IMMEDIATE_SIGNAL) -> int:
    """Signal the worker of ``basedir`` (SIGQUIT: stop now) and wait up to 10 s for it.

    Messages and exit codes are the reference's. Raises :class:`WorkerNotRunning` if there
    is no pid file.
    """
    os.chdir(basedir)
    pid = _read_pid()
    if pid is None or not _signal(pid, getattr(signal, "SIG" + signame)):
        return 1
    time.sleep(0.1)
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        if not _alive(pid):
            _remove_draining()
            if not quiet:
                print(f"worker process {pid} is dead")
            return 0
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not quiet:
        print("never saw process go away")
    return 1


def drain_worker(basedir: str, quiet: bool, timeout: float | None = None) -> int:
    """SIGTERM the worker of ``basedir`` (graceful drain) and wait until it is gone.

    No time limit unless ``timeout``; every :data:`DRAIN_REPORT_INTERVAL` seconds a line
    says it is still draining. On timeout: a message, exit 1, the worker keeps draining.
    Raises :class:`WorkerNotRunning` if there is no pid file.
    """
    os.chdir(basedir)
    pid = _read_pid()
    if pid is None:
        return 1
    # A second SIGTERM would mean "stop now" to the front end: when an earlier
    # ``stop --graceful`` already started this drain, only wait for it again.
    already = _draining_pid() == pid and _alive(pid)
    if not already:
        if not _signal(pid, signal.SIGTERM):
            return 1
        _write_draining(pid)
    started = time.monotonic()
    if not quiet and _alive(pid):
        state = "is still draining" if already else "is draining"
        print(
            f"worker process {pid} {state}: running builds finish, no new ones start "
            f"(`{_prog()} stop` stops it now)",
            flush=True,
        )
    next_report = started + DRAIN_REPORT_INTERVAL
    while True:
        if not _alive(pid):
            _remove_draining()
            if not quiet:
                print(f"worker process {pid} is dead")
            return 0
        now = time.monotonic()
        if timeout is not None and now - started >= timeout:
            if not quiet:
                print(
                    f"worker process {pid} still draining after {timeout:g} seconds; "
                    f"gave up waiting (`{_prog()} stop` stops it now)"
                )
            return 1
        if now >= next_report:
            if not quiet:
                print(
                    f"worker process {pid} still draining after {now - started:.0f} seconds...",
                    flush=True,
                )
            next_report += DRAIN_REPORT_INTERVAL
        time.sleep(0.1)


def _draining_pid() -> int | None:
    try:
        with open(DRAINING_FILE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _write_draining(pid: int) -> None:
    try:
        with open(DRAINING_FILE, "w") as f:
            f.write(f"{pid}\n")
    except OSError:
        pass


def _remove_draining() -> None:
    try:
        os.unlink(DRAINING_FILE)
    except OSError:
        pass


def _prog() -> str:
    return os.path.basename(sys.argv[0]) or "pyworker"


def stop(basedir: str, quiet: bool, signame: str = IMMEDIATE_SIGNAL) -> int:
    """``pyworker stop``: immediate; ``worker not running`` is success, as in the reference."""
    return _stop_with(basedir, quiet, lambda: stop_worker(basedir, quiet, signame))


def stop_graceful(basedir: str, quiet: bool, timeout: float | None = None) -> int:
    """``pyworker stop --graceful``: drain, wait until the worker is gone."""
    return _stop_with(basedir, quiet, lambda: drain_worker(basedir, quiet, timeout))


def _stop_with(basedir: str, quiet: bool, action: Callable[[], int]) -> int:
    error = check_worker_dir(basedir)
    if error is not None:
        print(error)
        return 1
    try:
        return action()
    except WorkerNotRunning:
        if not quiet:
            print("worker not running")
        return 0


def restart(
    basedir: str,
    quiet: bool,
    nodaemon: bool,
    graceful: bool = False,
    timeout: float | None = None,
) -> int:
    """``pyworker restart``: stop (if running; immediate unless ``graceful``), then start.

    As in the reference, a stop that times out does not prevent the start (which then
    refuses a live pid file), except for a graceful stop that gave up (``timeout``): the
    old worker is still running its builds, so nothing is started.
    """
    error = check_worker_dir(basedir)
    if error is not None:
        print(error)
        return 1
    try:
        if graceful:
            if drain_worker(basedir, quiet, timeout) != 0:
                return 1
        else:
            stop_worker(basedir, quiet)
    except WorkerNotRunning:
        if not quiet:
            print("no old worker process found to stop")
    if not quiet:
        print("now restarting worker process..")
    return start_worker(basedir, quiet, nodaemon)
