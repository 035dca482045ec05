"""Process management for a worker directory: start, stop and restart, twistd-compatible.

``start`` checks and runs ``buildbot.tac``, sets up the log (:func:`open_log`: ``twistd.log``
with twistd's line format and rotation, or ``--logfile``), ``twistd.hostname`` and, when
daemonising, ``twistd.pid``, then hands the :class:`~pyworker.config.WorkerConfig` to
``pyworker.frontend.worker.run_worker`` and exits with its return value. Files, messages and
exit codes follow ``buildbot-worker`` 4.3.0 (``scripts/start.py``, ``stop.py``,
``restart.py``, twistd).

Why not Twisted's own runners (checked against Twisted 25.5 and 26.10):

* twistd's ``UnixApplicationRunner`` (``twisted.scripts._twistd_unix``, a private module)
  runs an ``IService`` application inside its own ``reactor.run()`` and always exits 0; the
  front end owns its reactor run and its exit code (``run_worker``). Its ``daemonize``
  makes the first parent exit as soon as the status byte arrives, but ``start`` must stay
  and follow the log until the master's ``attached`` (the reference forks a log follower
  before twistd, sleeps 0.2 s, and never learns twistd's status: a daemon that fails shows
  as a 10 s timeout). So the double fork is ours, with twistd's status pipe and messages,
  and the same parent both reads the status and follows the log.
* ``twisted.application.runner`` (``Runner``, ``PIDFile``) does not daemonise at all, logs
  to a plain stream (no ``LogFile`` rotation, no SIGUSR1), and its ``PIDFile`` differs from
  twistd's pid file: it writes ``"<pid>\n"`` (twistd: ``"<pid>"``), checks and writes in
  one ``with`` in the process whose pid it records (after the fork: a refused start could
  not print twistd's "Another twistd server is running" before the parent returns), takes
  an EPERM pid for a live one and raises ``InvalidPIDFileError`` where twistd prints "Pidfile
  ... contains non-numeric value". :func:`_check_pid` is twistd's ``checkPID`` (same
  messages) plus one thing: a zombie pid is stale.
* What is Twisted's: the log file (``twisted.python.logfile.LogFile``, rotation by size and
  on SIGUSR1 as twistd installs it), the observers (the tac's legacy ``FileLogObserver``,
  twistd's ``textFileLogObserver``) and ``globalLogBeginner``.

Differences, all opt-in: ``stop --graceful`` sends the front end's drain signal (SIGUSR2)
where the reference only has SIGTERM (stop now), and waits for the drain without a time
limit (``--timeout``); ``log_format = 'json'`` in the tac writes one JSON object per line
instead of twistd's text lines; ``start --logfile`` (twistd's option, which
``buildbot-worker start`` does not take) wins over the tac's log block, where in twistd the
tac's observer would win and ``--logfile -`` would do nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from twisted.logger import ILogObserver
from twisted.python.logfile import LogFile
from zope.interface import implementer

from pyworker.cli.tac import TacError, check_worker_dir, load_tac
from pyworker.config import DRAIN_SIGNAL, REFERENCE_VERSION, WorkerConfig

PIDFILE = "twistd.pid"
LOGFILE = "twistd.log"
#: ``--logfile`` value that logs to standard output (``--nodaemon`` only), as in twistd.
STDOUT = "-"
HOSTNAME_FILE = "twistd.hostname"
#: The line ``start`` waits for (logged when the master calls the Bot's ``print``).
ATTACHED = b"message from master: attached"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
#: ``stop`` (and ``restart``) send this, as the reference does: the worker stops at once.
IMMEDIATE_SIGNAL = "TERM"
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


def start(basedir: str, quiet: bool, nodaemon: bool, logfile: str | None = None) -> int:
    """``pyworker start``: exit code as the reference's ``startCommand``."""
    error = check_worker_dir(basedir)
    if error is not None:
        print(error)
        return 1
    return start_worker(basedir, quiet, nodaemon, logfile)


def start_worker(basedir: str, quiet: bool, nodaemon: bool, logfile: str | None = None) -> int:
    """Start the worker in ``basedir`` (already checked); foreground if ``nodaemon``.

    ``logfile``: twistd's ``--logfile`` (see :func:`open_log`).
    """
    os.chdir(basedir)
    try:
        loaded = load_tac(basedir)
    except TacError as exc:
        print(f"pyworker: {exc}", file=sys.stderr)
        return 1
    config = loaded.config
    if logfile == STDOUT and not nodaemon:
        print("Daemons cannot log to stdout, exiting!", file=sys.stderr)  # twistd's words
        return 1
    pidfile = None if nodaemon else os.path.abspath(PIDFILE)
    if pidfile is not None:
        problem = _check_pid(pidfile)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 1
    try:
        log = open_log(config, logfile, loaded.log_observer)
    except OSError as exc:
        where = logfile if logfile else f"{LOGFILE} in {config.basedir}"
        print(f"pyworker: cannot open {where}: {exc}", file=sys.stderr)
        return 1
    if nodaemon:
        return run(config, log, pidfile=None, status_fd=None)
    return _daemonize(config, log, pidfile or PIDFILE, quiet)


@dataclasses.dataclass
class LogDestination:
    """Where the worker's log goes: the observer, and the file or stream it writes to."""

    observer: Any  # a twisted.logger.ILogObserver
    #: None: the tac's own observer, which owns where it writes
    stream: LogFile | TextIO | None
    #: the file ``start`` follows for ``attached``; None for stdout or the tac's observer
    path: str | None
    #: rotate on SIGUSR1 (twistd does so for its own ``--logfile``, not for the tac's)
    rotate_on_usr1: bool

    def close(self) -> None:
        if isinstance(self.stream, LogFile):
            self.stream.close()
        elif self.stream is not None:
            self.stream.flush()


def open_log(
    config: WorkerConfig, logfile: str | None = None, tac_observer: Any = None
) -> LogDestination:
    """Where the worker logs: the one place that decides it.

    * ``logfile == "-"`` (``--logfile -``, foreground only): standard output, in twistd's
      text format;
    * else, a log observer the tac installed itself (``tac_observer``: stdout in the
      container image's tac, a file of its own, ...) unless ``--logfile`` names a file: it
      is used as it is, as twistd uses it (a legacy observer wrapped);
    * the tac's log block (``rotateLength``/``maxRotatedFiles``): a ``LogFile`` with them at
      ``logfile`` or ``twistd.log``, written by the tac's legacy ``FileLogObserver``;
    * no log block (``create-worker -n``): twistd's own ``--logfile``: a ``LogFile`` with its
      defaults (rotate at 1 MB, keep every old file, SIGUSR1 rotates), twistd's
      ``textFileLogObserver`` format.

    ``log_format = 'json'`` changes the observer, not the destination. Raises OSError if
    the file cannot be opened.
    """
    from twisted.logger import LegacyLogObserverWrapper, textFileLogObserver
    from twisted.python import log as legacy_log

    if tac_observer is not None and logfile is None:
        if not ILogObserver.providedBy(tac_observer):
            tac_observer = LegacyLogObserverWrapper(tac_observer)
        return LogDestination(tac_observer, None, None, rotate_on_usr1=False)
    stream: LogFile | TextIO
    path: str | None = None
    if logfile == STDOUT:
        stream = sys.stdout
    else:
        path = os.path.join(config.basedir, logfile or LOGFILE)
        if config.log_rotate:
            stream = LogFile.fromFullPath(
                path, rotateLength=config.rotate_length, maxRotatedFiles=config.max_rotated_files
            )
        else:
            stream = LogFile.fromFullPath(path)
    observer: Any
    if config.log_format == "json":
        observer = JSONLineObserver(stream)
    elif config.log_rotate and path is not None:
        # the tac's: FileLogObserver(LogFile(...)).emit; a legacy observer is a plain
        # callable, which Twisted annotates as ILogObserver
        emit = legacy_log.FileLogObserver(stream).emit
        observer = LegacyLogObserverWrapper(emit)  # type: ignore[arg-type]
    else:
        # twistd passes its LogFile just so: it has the write/flush the observer uses
        observer = textFileLogObserver(stream)  # type: ignore[arg-type]
    return LogDestination(observer, stream, path,
                          rotate_on_usr1=path is not None and not config.log_rotate)


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


def _daemonize(config: WorkerConfig, log: LogDestination, pidfile: str, quiet: bool) -> int:
    """Double-fork the worker away; the parent reports how the start went."""
    # a daemon never logs to stdout (start_worker refuses it); with the tac's own observer
    # there is no file of ours to follow, only the status pipe
    log_offset = _file_size(log.path) if log.path is not None else 0
    if not quiet and log.path is not None:
        print(f"Following {os.path.basename(log.path)} until startup finished..")
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
            rc = run(config, log, pidfile=pidfile, status_fd=write_fd)
        except BaseException as exc:  # nothing may escape a forked child
            _report_status(write_fd, _status_error(exc))
        finally:
            os._exit(rc)
    os.close(write_fd)
    log.close()
    os.waitpid(pid, 0)
    try:
        if quiet or log.path is None:
            return _wait_for_status(read_fd)
        return _follow(read_fd, log.path, log_offset, pidfile)
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


def _follow(read_fd: int, logpath: str, offset: int, pidfile: str) -> int:
    """Tail the log (``twistd.log``) for up to 10 s waiting for the master's ``attached``."""
    os.set_blocking(read_fd, False)
    deadline = time.monotonic() + START_TIMEOUT
    status: bytes | None = None
    pending = b""
    in_reconfig = False
    while True:
        size = _file_size(logpath)
        if size < offset:  # rotated or truncated: start from the top of the new file
            offset = 0
        if size > offset:
            with open(logpath, "rb") as f:
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
            print(f"The worker process exited; see {os.path.basename(logpath)} for the reason.")
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
    """A Twisted log observer writing :func:`json_log_record` lines to a :class:`LogFile`
    (which rotates exactly as for the text format) or a stream.
    """

    def __init__(self, logfile: LogFile | TextIO) -> None:
        self.logfile = logfile

    def __call__(self, event: Mapping[str, Any]) -> None:
        try:
            line = json.dumps(json_log_record(event), ensure_ascii=False, default=str)
        except Exception as exc:  # never lose a line because one value is odd
            line = json.dumps({"time": "", "level": "error", "message": f"unloggable: {exc!r}"})
        self.logfile.write(line + "\n")
        self.logfile.flush()


class _Logging:
    """Twisted's global log going to a :class:`LogDestination` the way twistd sets it up."""

    def __init__(self, destination: LogDestination) -> None:
        from twisted.logger import globalLogBeginner

        self.destination = destination
        self.saved_stdio = (sys.stdout, sys.stderr)
        # the observer already holds the real stdout, if that is where it writes
        globalLogBeginner.beginLoggingTo([destination.observer], redirectStandardIO=True)
        self.old_usr1: Any = None
        if destination.rotate_on_usr1 and not signal.getsignal(signal.SIGUSR1):
            self.old_usr1 = signal.signal(signal.SIGUSR1, self._rotate)

    def _rotate(self, signum: int, frame: object) -> None:
        from twisted.internet import reactor

        stream = self.destination.stream
        if isinstance(stream, LogFile):
            reactor.callFromThread(stream.rotate)  # type: ignore[attr-defined]

    def stop(self) -> None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self.destination.observer)
        sys.stdout, sys.stderr = self.saved_stdio
        if self.old_usr1 is not None:
            signal.signal(signal.SIGUSR1, self.old_usr1)
        self.destination.close()


def _load_run_worker() -> RunWorker:
    from pyworker.frontend.worker import run_worker

    return run_worker


def run(
    config: WorkerConfig,
    log_destination: LogDestination,
    pidfile: str | None,
    status_fd: int | None,
    load_run_worker: Callable[[], RunWorker] | None = None,
) -> int:
    """Log to ``log_destination``, record pid and hostname, run the worker, clean up.

    ``status_fd`` (daemon mode) receives twistd's status: ``b"0"`` once the worker is
    about to run, ``b"1 <error>"`` if it could not get that far.
    """
    from twisted.python import log
    from twisted.python.runtime import shortPythonVersion

    logging = _Logging(log_destination)
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
        where = log_destination.path or "the log above"
        if os.path.dirname(where) == config.basedir:
            where = os.path.basename(where)
        print(f"pyworker: the worker failed ({failure}); see {where}", file=sys.stderr)
    return rc


def _pyworker_version() -> str:
    """The installed pyworker's version, as ``importlib.metadata.version`` gives it.

    Read from the one ``pyworker-*.dist-info`` beside the imported package (a pip install),
    else by ``importlib.metadata``, which costs a start about 10 ms before attached: it
    imports a dozen modules and scans every ``sys.path`` entry.
    """
    version = _version_beside_package()
    if version is not None:
        return version
    try:
        from importlib.metadata import version as metadata_version

        return metadata_version("pyworker")
    except Exception:
        return "unknown"


def _version_beside_package() -> str | None:
    import pyworker

    parent = os.path.dirname(os.path.dirname(os.path.abspath(pyworker.__file__)))
    try:
        found = [n for n in os.listdir(parent)
                 if n.startswith("pyworker-") and n.endswith(".dist-info")]
        if len(found) != 1:
            return None
        with open(os.path.join(parent, found[0], "METADATA"), encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the headers
                if line.startswith("Version:"):
                    return line[len("Version:"):].strip() or None
    except OSError:
        pass
    return None


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
    """Signal the worker of ``basedir`` (SIGTERM: stop now) and wait up to 10 s for it.

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
    """Send the worker of ``basedir`` the drain signal and wait until it is gone.

    No time limit unless ``timeout``; every :data:`DRAIN_REPORT_INTERVAL` seconds a line
    says it is still draining. On timeout: a message, exit 1, the worker keeps draining.
    The signal changes nothing for a worker already draining, so running this again only
    waits again. Raises :class:`WorkerNotRunning` if there is no pid file.
    """
    os.chdir(basedir)
    pid = _read_pid()
    if pid is None or not _signal(pid, DRAIN_SIGNAL):
        return 1
    started = time.monotonic()
    if not quiet and _alive(pid):
        print(
            f"worker process {pid} is draining: running builds finish, no new ones start "
            f"(`{_prog()} stop` stops it now)",
            flush=True,
        )
    next_report = started + DRAIN_REPORT_INTERVAL
    while True:
        if not _alive(pid):
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
