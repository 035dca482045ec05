"""Reading and writing ``buildbot.tac``: the tac template of create-worker and a loader.

The writer produces byte-for-byte the file ``buildbot-worker create-worker`` 4.3.0 writes.
The loader runs the tac as twistd does (:func:`run_tac`: the tac's folder as working
directory and first on ``sys.path``, ``__file__`` set), with pyworker's stand-in
``buildbot_worker.bot.Worker`` (:mod:`pyworker.cli.worker_shim`), so whatever the reference
runs works: environment, imports, files, conditionals, functions. The one Worker attached
to the application gives the :class:`~pyworker.config.WorkerConfig`; a log observer the
tac installs is handed on (:class:`LoadedTac`).

pyworker's own settings (:data:`pyworker.config.SETTINGS`) are written as plain assignments
after ``protocol = ...`` and read back from the tac's module namespace with the table's
one check, :meth:`~pyworker.config.Setting.check`.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from twisted.application import service
from twisted.logger import ILogObserver
from twisted.python.log import FileLogObserver as LegacyFileLogObserver
from twisted.python.log import ILogObserver as LegacyILogObserver
from twisted.python.logfile import LogFile

from pyworker import linux
from pyworker.cli import worker_shim
from pyworker.config import (
    SETTINGS,
    SETTINGS_BY_NAME,
    SettingError,
    SettingValue,
    WorkerConfig,
)

TAC_FILENAME = "buildbot.tac"
#: create-worker writes this line; start/stop only accept directories whose tac has it.
TAC_MARKER = "Application('buildbot-worker')"

#: Defaults of ``twisted.python.logfile.LogFile`` (what twistd uses without a log block).
TWISTD_ROTATE_LENGTH = 1_000_000
TWISTD_MAX_ROTATED_FILES: int | None = None

# ---------------------------------------------------------------------------------------
# Writing (create-worker)

_TEMPLATE_HEAD = """
import os

from buildbot_worker.bot import Worker
from twisted.application import service

basedir = %(basedir)r
rotateLength = %(log-size)d
maxRotatedFiles = %(log-count)s

# if this is a relocatable tac file, get the directory containing the TAC
if basedir == '.':
    import os.path
    basedir = os.path.abspath(os.path.dirname(__file__))

# note: this line is matched against to check that this is a worker
# directory; do not edit it.
application = service.Application('buildbot-worker')
"""

_TEMPLATE_LOGROTATE = """
from twisted.python.logfile import LogFile
from twisted.python.log import ILogObserver, FileLogObserver
logfile = LogFile.fromFullPath(
    os.path.join(basedir, "twistd.log"), rotateLength=rotateLength,
    maxRotatedFiles=maxRotatedFiles)
application.setComponent(ILogObserver, FileLogObserver(logfile).emit)
"""

_TEMPLATE_HOST_PORT = """
buildmaster_host = %(host)r
port = %(port)d
connection_string = None
"""

_TEMPLATE_CONNECTION_STRING = """
buildmaster_host = None  # %(host)r
port = None  # %(port)d
connection_string = %(connection-string)r
"""

_TEMPLATE_TAIL = """
workername = %(name)r
passwd = %(passwd)r
keepalive = %(keepalive)d
umask = %(umask)s
maxdelay = %(maxdelay)d
numcpus = %(numcpus)s
allow_shutdown = %(allow-shutdown)r
maxretries = %(maxretries)s
use_tls = %(use-tls)s
delete_leftover_dirs = %(delete-leftover-dirs)s
proxy_connection_string = %(proxy-connection-string)r
protocol = %(protocol)r
%(pyworker-settings)s
s = Worker(buildmaster_host, port, workername, passwd, basedir,
           keepalive, umask=umask, maxdelay=maxdelay,
           numcpus=numcpus, allow_shutdown=allow_shutdown,
           maxRetries=maxretries, protocol=protocol, useTls=use_tls,
           delete_leftover_dirs=delete_leftover_dirs,
           connection_string=connection_string,
           proxy_connection_string=proxy_connection_string)
s.setServiceParent(application)
"""


@dataclasses.dataclass
class TacOptions:
    """The create-worker options that end up in the tac, already validated.

    ``umask``, ``numcpus``, ``maxretries`` and ``log_count`` are the command-line strings
    (``'None'``, ``'0o22'``, ``'10'``): the reference writes them into the tac verbatim.
    """

    basedir: str
    host: str
    port: int
    name: str
    passwd: str
    relocatable: bool = False
    no_logrotate: bool = False
    keepalive: int = 600
    umask: str = "None"
    maxdelay: int = 300
    numcpus: str = "None"
    log_size: int = 10_000_000
    log_count: str = "10"
    allow_shutdown: str | None = None
    maxretries: str = "None"
    use_tls: bool = False
    delete_leftover_dirs: bool = False
    protocol: str = "pb"
    connection_string: str | None = None
    proxy_connection_string: str | None = None
    #: pyworker's own settings by tac variable (:data:`pyworker.config.SETTINGS`); those
    #: absent or at their default are not written.
    settings: Mapping[str, SettingValue] = dataclasses.field(default_factory=dict)


#: Heads pyworker's own tac variables (the reference worker ignores plain assignments).
PYWORKER_SETTINGS_COMMENT = "# pyworker settings (buildbot-worker ignores these)"


def pyworker_settings(opts: TacOptions) -> str:
    """The tac lines for pyworker's own settings; empty when all are at their defaults.

    Raises :class:`~pyworker.config.SettingError` for a value a setting does not take and
    ``ValueError`` for a name that is not a setting.
    """
    for name in opts.settings:
        if name not in SETTINGS_BY_NAME:
            raise ValueError(f"{name!r} is not a pyworker setting")
    lines: list[str] = []
    for setting in SETTINGS:
        line = setting.tac_line(setting.check(opts.settings.get(setting.name)))
        if line is not None:
            lines.append(line)
    if not lines:
        return ""
    return "\n".join([PYWORKER_SETTINGS_COMMENT, *lines, ""])


def make_tac(opts: TacOptions) -> str:
    """Return the text of ``buildbot.tac`` exactly as buildbot-worker 4.3.0 writes it.

    pyworker's own settings, when given, are extra assignments after ``protocol = ...``;
    without them the text is byte-for-byte the reference's.
    """
    values: dict[str, Any] = {
        "basedir": "." if opts.relocatable else opts.basedir,
        "log-size": opts.log_size,
        "log-count": opts.log_count,
        "host": opts.host,
        "port": opts.port,
        "connection-string": opts.connection_string,
        "name": opts.name,
        "passwd": opts.passwd,
        "keepalive": opts.keepalive,
        "umask": opts.umask,
        "maxdelay": opts.maxdelay,
        "numcpus": opts.numcpus,
        "allow-shutdown": opts.allow_shutdown,
        "maxretries": opts.maxretries,
        "use-tls": int(opts.use_tls),
        "delete-leftover-dirs": int(opts.delete_leftover_dirs),
        "proxy-connection-string": opts.proxy_connection_string,
        "protocol": opts.protocol,
        "pyworker-settings": pyworker_settings(opts),
    }
    parts = [_TEMPLATE_HEAD]
    if not opts.no_logrotate:
        parts.append(_TEMPLATE_LOGROTATE)
    parts.append(_TEMPLATE_CONNECTION_STRING if opts.connection_string else _TEMPLATE_HOST_PORT)
    parts.append(_TEMPLATE_TAIL)
    return "".join(parts) % values


class CreateWorkerError(Exception):
    """A file or directory create-worker needs could not be made (message is printed)."""


def write_tac(basedir: str, contents: str, quiet: bool, out: TextIO) -> str:
    """Write ``buildbot.tac`` (mode 0600) like the reference; return the path written.

    If a tac with different contents exists it is left alone and ``buildbot.tac.new`` is
    written instead; an identical one is left untouched. Raises :class:`CreateWorkerError`.
    """
    tacfile = os.path.join(basedir, TAC_FILENAME)
    if os.path.exists(tacfile):
        try:
            with open(tacfile) as f:
                oldcontents = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CreateWorkerError(f"error reading {tacfile}") from exc
        if oldcontents == contents:
            if not quiet:
                print("buildbot.tac already exists and is correct", file=out)
            return tacfile
        if not quiet:
            print("not touching existing buildbot.tac", file=out)
            print("creating buildbot.tac.new instead", file=out)
        tacfile = os.path.join(basedir, TAC_FILENAME + ".new")
    try:
        with open(tacfile, "w") as f:
            f.write(contents)
        os.chmod(tacfile, 0o600)
    except OSError as exc:
        raise CreateWorkerError(f"could not write {tacfile}") from exc
    return tacfile


# ---------------------------------------------------------------------------------------
# Checking a worker directory (start/stop/restart)


def check_worker_dir(basedir: str) -> str | None:
    """Return None if ``basedir`` holds a worker tac, else the reference's two-line error."""
    tacfile = os.path.join(basedir, TAC_FILENAME)
    error: str | None = None
    try:
        with open(tacfile) as f:
            contents = f.read()
    except OSError as exc:
        error = f"error reading '{tacfile}': {exc.strerror}"
    except UnicodeDecodeError as exc:
        error = f"error reading '{tacfile}': {exc}"
    else:
        if TAC_MARKER not in contents:
            error = f"unexpected content in '{tacfile}'"
    if error is None:
        return None
    return f"{error}\ninvalid worker directory '{basedir}'"


# ---------------------------------------------------------------------------------------
# Loading


class TacError(Exception):
    """``buildbot.tac`` cannot be used; the message says why and where (never the password)."""


def tac_path(basedir_or_tac: str) -> str:
    """The tac file for a worker directory (or the argument itself if it is a file)."""
    if os.path.isdir(basedir_or_tac):
        return os.path.join(basedir_or_tac, TAC_FILENAME)
    return basedir_or_tac


@dataclasses.dataclass
class LoadedTac:
    """What running a tac gave: the worker's configuration and the tac's log observer."""

    config: WorkerConfig
    #: The observer the tac installed (``application.setComponent(ILogObserver, ...)``), to
    #: be used instead of ``twistd.log`` as twistd would; None when there is none, or when
    #: it is create-worker's ``twistd.log`` block, which pyworker opens itself from
    #: ``config.rotate_length`` and ``config.max_rotated_files`` (and writes as
    #: ``log_format`` says).
    log_observer: Any = None


def load_tac(basedir_or_tac: str) -> LoadedTac:
    """Run a worker's ``buildbot.tac`` as twistd does. Raises :class:`TacError`."""
    path = os.path.abspath(tac_path(basedir_or_tac))
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as exc:
        raise TacError(f"error reading '{path}': {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise TacError(f"error reading '{path}': {exc}") from exc
    return run_tac(source, path)


def run_tac(source: str, path: str) -> LoadedTac:
    """Run the text of a tac located at ``path`` (absolute) as twistd's ``--python`` does.

    The working directory is the tac's folder, which is also first on ``sys.path``
    (buildbot-worker's ``start`` puts it there); ``__file__`` is the tac's name, relative
    to it, as twistd has it. ``buildbot_worker`` is pyworker's stand-in
    (:mod:`pyworker.cli.worker_shim`). Working directory and ``sys.path`` are put back
    afterwards; what the tac does to ``os.environ`` stays (the worker's commands see it), and
    a variable it removes is also erased from the process's initial environment block.
    """
    if TAC_MARKER not in source:
        raise TacError(f"{path} is not a buildbot worker tac (no {TAC_MARKER})")
    namespace: dict[str, Any] = {"__file__": os.path.basename(path)}
    try:
        code = compile(source, path, "exec")
    except SyntaxError as exc:
        raise TacError(f"{path}: line {exc.lineno}: syntax error: {exc.msg}") from None
    saved_path = list(sys.path)
    try:
        saved_cwd: str | None = os.getcwd()
    except OSError:
        saved_cwd = None
    folder = os.path.dirname(path)
    environment = set(os.environ)
    try:
        with worker_shim.installed():
            os.chdir(folder)
            sys.path.insert(0, folder)
            exec(code, namespace, namespace)  # noqa: S102 - running the tac is the point
    except (Exception, SystemExit) as exc:
        raise TacError(_failure(path, exc)) from None
    finally:
        sys.path[:] = saved_path
        if saved_cwd is not None:
            os.chdir(saved_cwd)
    # What the tac took out of the environment (a password, as the official image's tac
    # does) must not stay readable in /proc/<pid>/environ either.
    linux.erase_initial_environment(environment - set(os.environ))
    return _loaded(namespace, path)


def _failure(path: str, exc: BaseException) -> str:
    """``error in <tac> (line N): <the traceback's last line>``."""
    line = 0
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == path:
            line = lineno
    where = f" (line {line})" if line else ""
    if isinstance(exc, SystemExit):
        last = f"the tac called sys.exit({exc.code!r})"
    elif isinstance(exc, SyntaxError):  # in a module the tac imports
        last = f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    else:
        last = traceback.format_exception_only(exc)[-1].strip()
    return f"error in {path}{where}: {last}"


def _services(collection: Any) -> Iterator[Any]:
    for child in collection:
        yield child
        if not isinstance(child, worker_shim.Worker):
            inner = service.IServiceCollection(child, None)
            if inner is not None:
                yield from _services(inner)


def _loaded(namespace: Mapping[str, Any], path: str) -> LoadedTac:
    application: Any = namespace.get("application")
    collection = service.IServiceCollection(application, None)
    if collection is None:
        raise TacError(f"{path} does not set 'application' (service.Application(...))")
    workers: list[worker_shim.Worker] = []
    for child in _services(collection):
        if isinstance(child, worker_shim.Worker):
            workers.append(child)
        elif type(child) is not service.MultiService:  # a plain container is looked into
            raise TacError(
                f"{path}: the application has a {type(child).__name__} service; "
                "pyworker runs the Worker only"
            )
    if len(workers) != 1:
        lines = ", ".join(str(w.caller[1]) for w in workers)
        found = f"{len(workers)} Workers (created on lines {lines})" if workers else "no Worker"
        raise TacError(
            f"{path}: expected one Worker attached to the application "
            f"(s.setServiceParent(application)), found {found}"
        )
    worker = workers[0]
    filename, lineno = worker.caller
    where = f"line {lineno}" if filename == path else f"{filename}, line {lineno}"
    observer: Any = None
    for interface in (ILogObserver, LegacyILogObserver):
        observer = getattr(application, "getComponent", lambda *_: None)(interface, None)
        if observer is not None:
            break
    return _to_loaded(worker.args, namespace, observer, f"{path}: Worker(...) on {where}", path)


def _check(where: str, name: str, value: Any, kinds: tuple[type, ...], show: bool = True) -> None:
    if isinstance(value, kinds):
        return
    what = f" ({value!r})" if show else ""
    allowed = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
    raise TacError(f"{where}: {name} must be {allowed}, not {type(value).__name__}{what}")


def _to_loaded(
    values: Mapping[str, Any],
    namespace: Mapping[str, Any],
    observer: Any,
    where: str,
    path: str,
) -> LoadedTac:
    """The Worker's arguments (``values``), checked, as a :class:`LoadedTac`."""
    none = type(None)
    basedir = values["basedir"]
    _check(where, "basedir", basedir, (str,))
    # relative to the working directory the tac ran in (the tac's folder)
    basedir = os.path.abspath(os.path.join(os.path.dirname(path), basedir))

    name = values["name"]
    passwd = values["passwd"]
    if isinstance(name, bytes):
        name = name.decode("utf-8")
    if isinstance(passwd, bytes):
        passwd = passwd.decode("utf-8")
    _check(where, "name", name, (str,))
    _check(where, "passwd", passwd, (str,), show=False)

    host, port, conn = values["buildmaster_host"], values["port"], values["connection_string"]
    _check(where, "buildmaster_host", host, (str, none))
    _check(where, "port", port, (int, str, none))
    _check(where, "connection_string", conn, (str, none))
    if isinstance(port, str):
        try:
            port = int(port)
        except ValueError as exc:
            raise TacError(f"{where}: port must be a number, not {port!r}") from exc
    if conn is None and (host is None or port is None):
        raise TacError(f"{where}: set either buildmaster_host and port, or connection_string")

    for key in ("keepalive", "umask", "maxdelay", "numcpus", "maxRetries"):
        _check(where, key, values[key], (int, none))
    keepalive = values["keepalive"] or None  # the reference turns 0 into None
    maxdelay = values["maxdelay"] if values["maxdelay"] is not None else 300

    allow_shutdown = values["allow_shutdown"]
    _check(where, "allow_shutdown", allow_shutdown, (str, none))
    if allow_shutdown not in (None, "signal", "file"):
        raise TacError(f"{where}: allow_shutdown must be None, 'signal' or 'file'")
    proxy = values["proxy_connection_string"]
    _check(where, "proxy_connection_string", proxy, (str, none))
    ws_path = values["path"]
    _check(where, "path", ws_path, (str, none))
    _check_encoding(where, values["unicode_encoding"])

    # create-worker's log block: a FileLogObserver over a LogFile at <basedir>/twistd.log;
    # pyworker opens that file itself (same rotation), in the format log_format says
    log_rotate = False
    rotate_length: int = TWISTD_ROTATE_LENGTH
    max_rotated: int | None = TWISTD_MAX_ROTATED_FILES
    logfile = _template_logfile(observer, os.path.join(basedir, "twistd.log"))
    if logfile is not None:
        log_rotate = True
        rotate_length, max_rotated = logfile.rotateLength, logfile.maxRotatedFiles
        logfile.close()
        observer = None

    config = WorkerConfig(
        basedir=basedir,
        workername=name,
        password=passwd,
        master_host=host,
        port=port,
        connection_string=conn,
        keepalive=keepalive,
        umask=values["umask"],
        maxdelay=maxdelay,
        numcpus=values["numcpus"],
        allow_shutdown=allow_shutdown,
        maxretries=values["maxRetries"],
        use_tls=bool(values["useTls"]),
        delete_leftover_dirs=bool(values["delete_leftover_dirs"]),
        proxy_connection_string=proxy,
        protocol=values["protocol"],
        path=ws_path,
        log_rotate=log_rotate,
        rotate_length=rotate_length,
        max_rotated_files=max_rotated,
        **_pyworker_settings(namespace, path),
    )
    return LoadedTac(config, observer)


def _check_encoding(where: str, encoding: Any) -> None:
    """``unicode_encoding``: pyworker encodes and decodes UTF-8 (the reference's default on
    a UTF-8 system); another encoding is refused rather than ignored."""
    if encoding is None:
        return
    _check(where, "unicode_encoding", encoding, (str,))
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise TacError(f"{where}: unicode_encoding: unknown encoding {encoding!r}") from None
    if name != "utf-8":
        raise TacError(
            f"{where}: unicode_encoding {encoding!r} is not supported: pyworker reads "
            "command output and writes names and passwords as UTF-8 only"
        )


def _template_logfile(observer: Any, twistd_log: str) -> LogFile | None:
    """The LogFile behind ``FileLogObserver(LogFile(<basedir>/twistd.log)).emit``, else None."""
    owner = getattr(observer, "__self__", None)
    if type(owner) is not LegacyFileLogObserver or observer != owner.emit:
        return None
    if owner.timeFormat is not None:  # the tac's own line format: its observer is used
        return None
    logfile = getattr(owner.write, "__self__", None)
    if isinstance(logfile, LogFile) and os.path.abspath(logfile.path) == twistd_log:
        return logfile
    return None


def _pyworker_settings(namespace: Mapping[str, Any], path: str) -> dict[str, Any]:
    """pyworker's own tac variables (module-level names), checked; absent: defaults."""
    settings: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.name not in namespace:
            continue
        try:
            settings[setting.name] = setting.check(namespace[setting.name])
        except SettingError as exc:
            raise TacError(f"{path}: {setting.name} {exc}") from exc
    return settings
