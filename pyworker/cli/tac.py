"""Reading and writing ``buildbot.tac``: the tac template of create-worker and a loader.

The writer produces byte-for-byte the file ``buildbot-worker create-worker`` 4.3.0 writes.
The loader never executes the tac: it parses it with :mod:`ast`, follows the module-level
assignments (literals, simple arithmetic, earlier names, ``os.path`` helpers on
``__file__``, and ``if`` tests it can decide, such as the relocatable ``basedir == '.'``
block), reads the arguments of the ``Worker(...)`` call (or, without one, the variables
the template defines) and returns a :class:`~pyworker.config.WorkerConfig`.

pyworker's own settings (:data:`pyworker.config.SETTINGS`) are written as plain assignments
after ``protocol = ...`` and read back with the table's one check,
:meth:`~pyworker.config.Setting.check`.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

from pyworker.config import (
    PROTOCOLS,
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


class _Unknown:
    """Value of a name the loader could not compute; carries the reason for the error."""

    def __init__(self, why: str) -> None:
        self.why = why


class _CannotEvaluate(Exception):
    def __init__(self, node: ast.AST, detail: str = "") -> None:
        super().__init__(detail)
        self.node = node
        self.detail = detail


_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
}
_CMPOPS: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_PURE_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "int": int,
    "str": str,
    "bool": bool,
    "os.path.abspath": os.path.abspath,
    "os.path.dirname": os.path.dirname,
    "os.path.join": os.path.join,
    "os.path.normpath": os.path.normpath,
    "os.path.realpath": os.path.realpath,
}

#: ``buildbot_worker.pb.Worker.__init__`` parameters, in order, with their defaults.
_WORKER_PARAMS: tuple[tuple[str, Any], ...] = (
    ("buildmaster_host", None),
    ("port", None),
    ("name", None),
    ("passwd", None),
    ("basedir", None),
    ("keepalive", None),
    ("keepaliveTimeout", None),
    ("umask", None),
    ("maxdelay", None),
    ("numcpus", None),
    ("unicode_encoding", None),
    ("protocol", "pb"),
    ("useTls", None),
    ("allow_shutdown", None),
    ("maxRetries", None),
    ("connection_string", None),
    ("path", None),
    ("delete_leftover_dirs", False),
    ("proxy_connection_string", None),
)
_WORKER_REQUIRED = ("buildmaster_host", "port", "name", "passwd", "basedir", "keepalive")

#: Without a ``Worker(...)`` call: Worker parameter -> variable of the 4.3.0 template.
_TEMPLATE_VARIABLES = {
    "buildmaster_host": "buildmaster_host",
    "port": "port",
    "name": "workername",
    "passwd": "passwd",
    "basedir": "basedir",
    "keepalive": "keepalive",
    "umask": "umask",
    "maxdelay": "maxdelay",
    "numcpus": "numcpus",
    "allow_shutdown": "allow_shutdown",
    "maxRetries": "maxretries",
    "useTls": "use_tls",
    "delete_leftover_dirs": "delete_leftover_dirs",
    "connection_string": "connection_string",
    "proxy_connection_string": "proxy_connection_string",
    "protocol": "protocol",
}
_TEMPLATE_REQUIRED = ("name", "passwd", "basedir")


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


class _TacReader:
    """Walks the module body once, keeping a table of the names it could evaluate."""

    def __init__(self, path: str, source: str) -> None:
        self.path = path
        self.source = source
        self.names: dict[str, Any] = {"__file__": path, "__name__": "__builtin__"}
        self.worker_call: dict[str, Any] | None = None
        self.worker_call_line = 0
        self.log_observer = False
        self.logfile_args: dict[str, Any] | None = None

    # -- expressions ------------------------------------------------------------------

    def eval(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in self.names:
                raise _CannotEvaluate(node, f"name '{node.id}' is not defined before use")
            value = self.names[node.id]
            if isinstance(value, _Unknown):
                raise _CannotEvaluate(node, f"'{node.id}' {value.why}")
            return value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd | ast.Not):
            operand = self.eval(node.operand)
            if isinstance(node.op, ast.Not):
                return not operand
            if not isinstance(operand, int | float) or isinstance(operand, bool):
                raise _CannotEvaluate(node)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = self.eval(node.left), self.eval(node.right)
            if isinstance(node.op, ast.Pow) and (not isinstance(right, int) or right > 64):
                raise _CannotEvaluate(node)
            try:
                return _BINOPS[type(node.op)](left, right)
            except (TypeError, ValueError, ZeroDivisionError) as exc:
                raise _CannotEvaluate(node, str(exc)) from exc
        if isinstance(node, ast.BoolOp):
            result: Any = None
            for value_node in node.values:
                result = self.eval(value_node)
                if isinstance(node.op, ast.And) and not result:
                    return result
                if isinstance(node.op, ast.Or) and result:
                    return result
            return result
        if isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
            left = self.eval(node.left)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self.eval(comparator)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Tuple | ast.List):
            items = [self.eval(elt) for elt in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if (
            isinstance(node, ast.Call)
            and not any(isinstance(a, ast.Starred) for a in node.args)
            and all(k.arg is not None for k in node.keywords)
        ):
            func = _dotted(node.func)
            if func in _PURE_FUNCTIONS:
                args = [self.eval(a) for a in node.args]
                kwargs = {str(k.arg): self.eval(k.value) for k in node.keywords}
                try:
                    return _PURE_FUNCTIONS[func](*args, **kwargs)
                except (TypeError, ValueError) as exc:
                    raise _CannotEvaluate(node, str(exc)) from exc
        raise _CannotEvaluate(node)

    def describe(self, exc: _CannotEvaluate) -> str:
        segment = ast.get_source_segment(self.source, exc.node) or type(exc.node).__name__
        if len(segment) > 60:
            segment = segment[:57] + "..."
        line = getattr(exc.node, "lineno", "?")
        text = f"line {line}: cannot evaluate {segment!r} without running the tac"
        return f"{text} ({exc.detail})" if exc.detail else text

    # -- statements -------------------------------------------------------------------

    def run(self, body: Iterable[ast.stmt]) -> None:
        for stmt in body:
            self.statement(stmt)

    def statement(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.Assign):
            self.note_calls(stmt.value)
            value = self.lazy(stmt.value)
            for target in stmt.targets:
                self.bind(target, value)
        elif isinstance(stmt, ast.AnnAssign):
            if stmt.value is not None:
                self.note_calls(stmt.value)
                self.bind(stmt.target, self.lazy(stmt.value))
        elif isinstance(stmt, ast.AugAssign):
            self.bind(stmt.target, _Unknown(f"is modified in place (line {stmt.lineno})"))
        elif isinstance(stmt, ast.Expr):
            self.note_calls(stmt.value)
        elif isinstance(stmt, ast.If):
            try:
                test = self.eval(stmt.test)
            except _CannotEvaluate:
                self.unknown_assignments(stmt, f"is set inside an 'if' (line {stmt.lineno})")
                return
            self.run(stmt.body if test else stmt.orelse)
        elif isinstance(stmt, ast.Import | ast.ImportFrom):
            for alias in stmt.names:
                bound = alias.asname or alias.name.split(".")[0]
                if bound != "os":  # os.path.* helpers are recognised by name
                    self.names[bound] = _Unknown(f"is imported (line {stmt.lineno})")
        elif isinstance(
            stmt,
            ast.For | ast.AsyncFor | ast.While | ast.Try | ast.With | ast.AsyncWith | ast.Match,
        ) or isinstance(stmt, ast.TryStar):
            self.unknown_assignments(stmt, f"is set inside a block (line {stmt.lineno})")
        elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            self.names[stmt.name] = _Unknown(f"is a definition (line {stmt.lineno})")
        elif isinstance(stmt, ast.Delete):
            for target in stmt.targets:
                self.bind(target, _Unknown(f"is deleted (line {stmt.lineno})"))

    def bind(self, target: ast.expr, value: Any) -> None:
        if isinstance(target, ast.Name):
            self.names[target.id] = value
        elif isinstance(target, ast.Tuple | ast.List):
            if isinstance(value, tuple | list) and len(value) == len(target.elts):
                for elt, item in zip(target.elts, value, strict=True):
                    self.bind(elt, item)
            else:
                for elt in target.elts:
                    self.bind(elt, _Unknown("is set by an unpacking pyworker cannot read"))
        elif isinstance(target, ast.Starred):
            self.bind(target.value, _Unknown("is set by a starred unpacking"))

    def unknown_assignments(self, stmt: ast.stmt, why: str) -> None:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
                self.names[node.id] = _Unknown(why)
            elif isinstance(node, ast.Call):
                self.note_calls(node)

    def note_calls(self, expr: ast.expr) -> None:
        for node in ast.walk(expr):
            if not isinstance(node, ast.Call):
                continue
            func = _dotted(node.func) or ""
            last = func.rsplit(".", 1)[-1]
            if last == "Worker" and self.worker_call is None:
                self.worker_call = self.worker_arguments(node)
                self.worker_call_line = node.lineno
            elif last == "setComponent" and node.args:
                first = _dotted(node.args[0]) or ""
                if first.rsplit(".", 1)[-1] == "ILogObserver":
                    self.log_observer = True
            elif func.endswith("LogFile.fromFullPath") or last == "LogFile":
                self.logfile_args = self.logfile_arguments(node, func.endswith("fromFullPath"))

    def lazy(self, node: ast.expr) -> Any:
        """The value of ``node``, or an :class:`_Unknown` explaining why there is none."""
        if isinstance(node, ast.Name) and isinstance(self.names.get(node.id), _Unknown):
            return self.names[node.id]
        try:
            return self.eval(node)
        except _CannotEvaluate as exc:
            return _Unknown(f"is set by an expression pyworker cannot read: {self.describe(exc)}")

    def worker_arguments(self, call: ast.Call) -> dict[str, Any]:
        args: dict[str, Any] = {}
        names = [name for name, _ in _WORKER_PARAMS]
        for index, arg in enumerate(call.args):
            if isinstance(arg, ast.Starred) or index >= len(names):
                raise TacError(f"{self.path}: line {call.lineno}: unsupported Worker(...) call")
            args[names[index]] = self.lazy(arg)
        for keyword in call.keywords:
            if keyword.arg is None or keyword.arg not in names:
                raise TacError(
                    f"{self.path}: line {call.lineno}: unsupported Worker(...) argument "
                    f"{keyword.arg or '**'!r}"
                )
            args[keyword.arg] = self.lazy(keyword.value)
        return args

    def logfile_arguments(self, call: ast.Call, from_full_path: bool) -> dict[str, Any]:
        # LogFile(name, directory, rotateLength, defaultMode, maxRotatedFiles)
        positional = ["name", "directory", "rotateLength", "defaultMode", "maxRotatedFiles"]
        if from_full_path:
            positional = ["path", "rotateLength", "defaultMode", "maxRotatedFiles"]
        args: dict[str, Any] = {}
        for index, arg in enumerate(call.args[: len(positional)]):
            args[positional[index]] = self.lazy(arg)
        for keyword in call.keywords:
            if keyword.arg is not None:
                args[keyword.arg] = self.lazy(keyword.value)
        return args


def tac_path(basedir_or_tac: str) -> str:
    """The tac file for a worker directory (or the argument itself if it is a file)."""
    if os.path.isdir(basedir_or_tac):
        return os.path.join(basedir_or_tac, TAC_FILENAME)
    return basedir_or_tac


def load_tac(basedir_or_tac: str) -> WorkerConfig:
    """Read a worker's ``buildbot.tac`` without executing it. Raises :class:`TacError`."""
    path = os.path.abspath(tac_path(basedir_or_tac))
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as exc:
        raise TacError(f"error reading '{path}': {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise TacError(f"error reading '{path}': {exc}") from exc
    return parse_tac(source, path)


def parse_tac(source: str, path: str) -> WorkerConfig:
    """Turn the text of a tac (located at ``path``) into a :class:`WorkerConfig`."""
    if TAC_MARKER not in source:
        raise TacError(f"{path} is not a buildbot worker tac (no {TAC_MARKER})")
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as exc:
        raise TacError(f"{path}: line {exc.lineno}: syntax error: {exc.msg}") from exc
    reader = _TacReader(path, source)
    reader.run(tree.body)

    if reader.worker_call is not None:
        where = f"the Worker(...) call on line {reader.worker_call_line}"
        raw = reader.worker_call
        required: Iterable[str] = _WORKER_REQUIRED
    else:
        where = "the tac"
        raw = {
            param: reader.names[var]
            for param, var in _TEMPLATE_VARIABLES.items()
            if var in reader.names
        }
        required = _TEMPLATE_REQUIRED
    for param in required:
        if param not in raw:
            name = _TEMPLATE_VARIABLES.get(param, param)
            raise TacError(f"{path}: {where} does not set {param!r} ({name})")
    values = dict(_WORKER_PARAMS)
    values.update(raw)
    for param, value in values.items():
        if isinstance(value, _Unknown):
            var = _TEMPLATE_VARIABLES.get(param, param)
            raise TacError(
                f"{path}: {var!r} (used by {where}) {value.why}; pyworker reads buildbot.tac "
                "without executing it, so use plain literal values"
            )
    return _to_config(values, reader, path)


def _check(path: str, name: str, value: Any, kinds: tuple[type, ...], show: bool = True) -> None:
    if isinstance(value, kinds):
        return
    what = f" ({value!r})" if show else ""
    allowed = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
    raise TacError(f"{path}: {name} must be {allowed}, not {type(value).__name__}{what}")


def _to_config(values: Mapping[str, Any], reader: _TacReader, path: str) -> WorkerConfig:
    tac_dir = os.path.dirname(path)
    none = type(None)

    basedir = values["basedir"]
    _check(path, "basedir", basedir, (str,))
    if basedir == ".":
        basedir = tac_dir
    basedir = os.path.abspath(os.path.join(tac_dir, basedir))

    name = values["name"]
    passwd = values["passwd"]
    if isinstance(name, bytes):
        name = name.decode("utf-8")
    if isinstance(passwd, bytes):
        passwd = passwd.decode("utf-8")
    _check(path, "workername", name, (str,))
    _check(path, "passwd", passwd, (str,), show=False)

    host, port, conn = values["buildmaster_host"], values["port"], values["connection_string"]
    _check(path, "buildmaster_host", host, (str, none))
    _check(path, "port", port, (int, str, none))
    _check(path, "connection_string", conn, (str, none))
    if isinstance(port, str):
        try:
            port = int(port)
        except ValueError as exc:
            raise TacError(f"{path}: port must be a number, not {port!r}") from exc
    if conn is not None and (host, port) != (None, None):
        raise TacError(
            f"{path}: if you want to supply a connection string, then set "
            "buildmaster_host and port to None"
        )
    if conn is None and (host is None or port is None):
        raise TacError(f"{path}: set either buildmaster_host and port, or connection_string")

    for key in ("keepalive", "umask", "maxdelay", "numcpus", "maxRetries"):
        _check(path, key, values[key], (int, none))
    keepalive = values["keepalive"] or None  # the reference turns 0 into None
    maxdelay = values["maxdelay"] if values["maxdelay"] is not None else 300

    allow_shutdown = values["allow_shutdown"]
    _check(path, "allow_shutdown", allow_shutdown, (str, none))
    if allow_shutdown not in (None, "signal", "file"):
        raise TacError(f"{path}: allow_shutdown must be None, 'signal' or 'file'")
    protocol = values["protocol"]
    if protocol not in PROTOCOLS:
        raise TacError(f"{path}: Unknown protocol {protocol!r}")
    proxy = values["proxy_connection_string"]
    _check(path, "proxy_connection_string", proxy, (str, none))

    log_rotate = reader.log_observer
    rotate_length: Any = TWISTD_ROTATE_LENGTH
    max_rotated: Any = TWISTD_MAX_ROTATED_FILES
    if log_rotate:
        largs = reader.logfile_args or {}
        rotate_length = largs.get("rotateLength", reader.names.get("rotateLength", rotate_length))
        max_rotated = largs.get("maxRotatedFiles", reader.names.get("maxRotatedFiles", max_rotated))
        for key, value in (("rotateLength", rotate_length), ("maxRotatedFiles", max_rotated)):
            if isinstance(value, _Unknown):
                raise TacError(f"{path}: {key} {value.why}")
        _check(path, "rotateLength", rotate_length, (int,))
        _check(path, "maxRotatedFiles", max_rotated, (int, none))

    settings = _pyworker_settings(reader, path)
    return WorkerConfig(
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
        protocol=protocol,
        log_rotate=log_rotate,
        rotate_length=rotate_length,
        max_rotated_files=max_rotated,
        **settings,
    )


def _pyworker_settings(reader: _TacReader, path: str) -> dict[str, Any]:
    """pyworker's own tac variables (module-level assignments), checked; absent: defaults."""
    settings: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.name not in reader.names:
            continue
        value = reader.names[setting.name]
        if isinstance(value, _Unknown):
            raise TacError(
                f"{path}: {setting.name!r} {value.why}; pyworker reads buildbot.tac "
                "without executing it, so use plain literal values"
            )
        try:
            settings[setting.name] = setting.check(value)
        except SettingError as exc:
            raise TacError(f"{path}: {setting.name} {exc}") from exc
    return settings
