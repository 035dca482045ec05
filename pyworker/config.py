"""The worker's configuration: what a ``buildbot.tac`` says, as one typed value.

``pyworker.cli.tac`` reads and writes ``buildbot.tac`` files; everything else in the package
takes a :class:`WorkerConfig` and never looks at the tac itself.
"""

from __future__ import annotations

import dataclasses

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


def valid_level(fmt: str, value: object) -> bool:
    """Whether ``value`` is a level ``fmt`` (``'gz'`` or ``'bz2'``) accepts, ``'auto'`` too."""
    return value == AUTO_LEVEL or (isinstance(value, int) and not isinstance(value, bool)
                                   and LOWEST_LEVEL[fmt] <= value <= 9)


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
    # -- pyworker's own settings (tac variables the reference does not know) --------------
    #: Refuse any command path outside ``basedir`` (for masters that are not fully trusted).
    restrict_paths: bool = False
    #: Serve ``/healthz`` and Prometheus ``/metrics`` on 127.0.0.1 at this port.
    metrics_port: int | None = None
    #: ``'text'`` (twistd's line format) or ``'json'`` (one JSON object per line).
    log_format: str = "text"
    #: Add each command's CPU seconds and peak RSS as a last header line of its log.
    report_resources: bool = False
    #: Compression of directory uploads: ``'auto'`` (the level that moves the tree out
    #: fastest, measured while it goes) or a fixed level; the master cannot tell.
    gzip_level: int | str = "auto"
    bz2_level: int | str = "auto"
    #: Threads compressing one directory upload (``None``: the CPUs we may use, at most 4).
    compress_threads: int | None = None
    #: twistd.log rotation; ``log_rotate`` is False when the tac has no rotating log block.
    log_rotate: bool = True
    rotate_length: int = 10_000_000
    max_rotated_files: int | None = 10
