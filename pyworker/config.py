"""The worker's configuration: what a ``buildbot.tac`` says, as one typed value.

``pyworker.cli.tac`` reads and writes ``buildbot.tac`` files; everything else in the package
takes a :class:`WorkerConfig` and never looks at the tac itself.

pyworker's own settings (tac variables the reference does not know) are declared once, in
:data:`SETTINGS`: for each its tac variable, its ``create-worker`` option, the values it
takes, its default and its help. The tac writer, the tac reader, the ``create-worker``
options and the README's settings table all come from it, and :meth:`Setting.check` is the
one validation of a value, wherever it comes from (a tac literal, a command-line string
once :meth:`Setting.parse` has read it, or a request the executor receives).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, TypeAlias

#: The version we report to the master (``getWorkerInfo()['version']``, ``getVersion``).
#: The master compares command versions, not this string, but operators read it in the UI.
REFERENCE_VERSION = "4.3.0"

PROTOCOL_PB = "pb"
PROTOCOL_MSGPACK = "msgpack_experimental_v7"
PROTOCOLS = (PROTOCOL_PB, PROTOCOL_MSGPACK)

#: Compression settings of directory uploads: a level per format or ``'auto'``.
AUTO_LEVEL = "auto"
LOWEST_LEVEL = {"gz": 0, "bz2": 1}
MAX_COMPRESS_THREADS = 64

LOG_FORMATS = ("text", "json")

# ---------------------------------------------------------------------------------------
# pyworker's own settings

#: A setting's value once checked: a flag, a number or a word (``None``: not set).
SettingValue: TypeAlias = bool | int | str | None
SettingKind: TypeAlias = Literal["flag", "int", "choice"]

_INTEGER = re.compile(r"[+-]?[0-9]+")


class SettingError(ValueError):
    """A value a setting refuses. ``str()`` is the reason without the name of the setting
    (``"must be 'text' or 'json', not 'xml'"``): the tac reader puts the variable before it,
    the command line the option."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One of pyworker's own settings.

    ``kind``: ``'flag'`` (on or off; a create-worker flag, ``name = 1`` in the tac),
    ``'int'`` (a number from ``low`` to ``high``, or one of ``words``) or ``'choice'``
    (one of ``words``). ``None`` in the tac (or ``None`` on the command line) means the
    default.
    """

    #: The tac variable, which is also the :class:`WorkerConfig` field.
    name: str
    #: The create-worker option, without its leading ``--``.
    option: str
    kind: SettingKind
    default: SettingValue
    #: What the setting does (the option's help says ``pyworker: <help>; tac: <name>``).
    help: str
    words: tuple[str, ...] = ()
    low: int | None = None
    high: int | None = None
    #: How the allowed values call a number (``'a TCP port number'``).
    number: str = "a number"

    @property
    def allowed(self) -> str:
        """The values the setting takes, as its error message (and the README) says them."""
        if self.kind == "flag":
            return "0 or 1"
        alternatives = [repr(word) for word in self.words]
        if self.low is not None:
            alternatives.append(f"{self.number} from {self.low} to {self.high}")
        if self.default is None:
            alternatives.append("None")
        if len(alternatives) == 1:
            return alternatives[0]
        return ", ".join(alternatives[:-1]) + " or " + alternatives[-1]

    def check(self, value: object) -> SettingValue:
        """``value`` as the setting holds it (``None``: the default; a flag: a bool).

        Raises :class:`SettingError` if the setting does not take it.
        """
        if value is None:
            return self.default
        if self.kind == "flag":
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
        elif isinstance(value, str):
            if value in self.words:
                return value
        elif isinstance(value, int) and not isinstance(value, bool):
            if self.low is not None and self.high is not None and self.low <= value <= self.high:
                return value
        raise SettingError(f"must be {self.allowed}, not {value!r}")

    def parse(self, text: str) -> object:
        """What a command-line string stands for, before :meth:`check`: ``'None'`` is None,
        digits of an ``'int'`` setting a number, anything else the string itself."""
        if text == "None":
            return None
        if self.kind == "int" and _INTEGER.fullmatch(text):
            return int(text)
        return text

    def tac_line(self, value: SettingValue) -> str | None:
        """The tac assignment for a checked value; None at the default (nothing written)."""
        if value == self.default:
            return None
        if self.kind == "flag":
            return f"{self.name} = 1"
        return f"{self.name} = {value!r}"

    @property
    def option_help(self) -> str:
        """The create-worker option's help text."""
        tac = f"{self.name} = 1" if self.kind == "flag" else self.name
        return f"pyworker: {self.help}; tac: {tac}"


RESTRICT_PATHS = Setting(
    "restrict_paths", "restrict-paths", "flag", False,
    "refuse any command path outside the worker's basedir (for masters that are not fully "
    "trusted)",
)
METRICS_PORT = Setting(
    "metrics_port", "metrics-port", "int", None,
    "serve /healthz and Prometheus /metrics over HTTP on 127.0.0.1 at this port "
    "(default: off)",
    low=1, high=65535, number="a TCP port number",
)
LOG_FORMAT = Setting(
    "log_format", "log-format", "choice", "text",
    "twistd.log format, 'text' (twistd's lines) or 'json' (one JSON object per line: time, "
    "level, namespace/system, message, failure)",
    words=LOG_FORMATS,
)
REPORT_RESOURCES = Setting(
    "report_resources", "report-resources", "flag", False,
    "add each command's CPU seconds and peak RSS as a last header line of its step log",
)
GZIP_LEVEL = Setting(
    "gzip_level", "gzip-level", "int", AUTO_LEVEL,
    "compression level of gz directory uploads, 'auto' (the level that moves the tree out "
    "fastest, measured as it goes) or 0-9",
    words=(AUTO_LEVEL,), low=LOWEST_LEVEL["gz"], high=9,
)
BZ2_LEVEL = Setting(
    "bz2_level", "bz2-level", "int", AUTO_LEVEL,
    "the same for bz2 directory uploads, 'auto' or 1-9",
    words=(AUTO_LEVEL,), low=LOWEST_LEVEL["bz2"], high=9,
)
COMPRESS_THREADS = Setting(
    "compress_threads", "compress-threads", "int", None,
    "threads compressing one directory upload (default: the usable CPUs, at most 4)",
    low=1, high=MAX_COMPRESS_THREADS,
)

#: pyworker's own settings, in the order the tac lists them.
SETTINGS: tuple[Setting, ...] = (
    RESTRICT_PATHS, METRICS_PORT, LOG_FORMAT, REPORT_RESOURCES, GZIP_LEVEL, BZ2_LEVEL,
    COMPRESS_THREADS,
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}
_LEVEL_SETTINGS = {"gz": GZIP_LEVEL, "bz2": BZ2_LEVEL}


def valid_level(fmt: str, value: object) -> bool:
    """Whether ``value`` is a level ``fmt`` (``'gz'`` or ``'bz2'``) accepts, ``'auto'`` too."""
    if value is None:
        return False
    try:
        _LEVEL_SETTINGS[fmt].check(value)
    except SettingError:
        return False
    return True


@dataclasses.dataclass
class WorkerConfig:
    """Everything the front end needs to run one worker, as the tac file states it."""

    basedir: str
    workername: str
    password: str = dataclasses.field(repr=False)
    master_host: str | None = None
    port: int | None = None
    connection_string: str | None = None
    keepalive: int | None = 600
    umask: int | None = None
    maxdelay: int = 300
    numcpus: int | None = None
    allow_shutdown: str | None = None
    maxretries: int | None = None
    use_tls: bool = False
    delete_leftover_dirs: bool = False
    proxy_connection_string: str | None = None
    protocol: str = PROTOCOL_PB
    #: msgpack: the WebSocket URL's path (the Worker's ``path``; PB ignores it).
    path: str | None = None
    # -- pyworker's own settings: one field per entry of SETTINGS, with its name and default
    # (checked when this module is imported); what each means is said there.
    restrict_paths: bool = False
    metrics_port: int | None = None
    log_format: str = "text"
    report_resources: bool = False
    gzip_level: int | str = AUTO_LEVEL
    bz2_level: int | str = AUTO_LEVEL
    compress_threads: int | None = None
    #: twistd.log rotation; ``log_rotate`` is False when the tac has no rotating log block.
    log_rotate: bool = True
    rotate_length: int = 10_000_000
    max_rotated_files: int | None = 10


def _check_settings_fields() -> None:
    """Fail at import if :class:`WorkerConfig` and :data:`SETTINGS` disagree."""
    fields = {field.name: field for field in dataclasses.fields(WorkerConfig)}
    for setting in SETTINGS:
        field = fields.get(setting.name)
        if field is None or field.default != setting.default:
            raise TypeError(f"WorkerConfig.{setting.name} does not match SETTINGS "
                            f"(default {setting.default!r})")
        if setting.check(setting.default) != setting.default:
            raise TypeError(f"setting {setting.name}: its default is not one of its values")


_check_settings_fields()
