"""The one interface of the I/O core: what both twins (``_c`` and ``_python``) export.

:class:`IOCore` describes a twin module; ``pyworker.iocore`` loads one and exports its names
typed through it, so mypy checks the executor's calls against this API whichever twin runs,
and checks each twin module against it where the package loads it. :class:`TarStreamAPI`
and :class:`StreamPumpAPI` describe the objects the twins' ``TarStream`` and ``StreamPump``
make. What each call does is in the package docstring; ``tests/test_iocore_api.py`` checks
that both twins have every name here with the same signature.

Imports nothing of the twins, so importing it loads no backend by itself (the package's
``__init__`` does).
"""

from __future__ import annotations

import struct
from types import TracebackType
from typing import Protocol, Self

from pyworker import frames


class TarStreamAPI(Protocol):
    """An incremental tar archive of a tree (``TarStream(root, compress, level, ...)``)."""

    def read(self, max_bytes: int) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class StreamPumpAPI(Protocol):
    """One output stream of a command -> ``TEXT`` frames of whole lines on ``out_fd``."""

    out_fd: int
    channel: int
    kind: int
    max_line_length: int
    count_lines: bool
    last_newlines: int

    def feed(self, data: bytes | bytearray | memoryview, *, send: bool = True) -> None: ...

    def read_from(self, fd: int, max_bytes: int = 262144, *, send: bool = True) -> int: ...

    def discard_from(self, fd: int, max_bytes: int = 262144) -> int: ...

    def eof(self) -> None: ...

    def flush(self) -> None: ...

    def send(self) -> None: ...

    @property
    def pending(self) -> int: ...

    @property
    def tail_chars(self) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class IOCore(Protocol):
    """A twin module. Its classes appear here as the factories they are: calling one makes
    an object of the matching ``...API`` protocol, with the constructor's signature."""

    FEATURES: frozenset[str]
    FRAME_HEADER: struct.Struct
    PUMP_MAX_READ: int

    def StreamPump(self, out_fd: int, channel: int, max_line_length: int = 4096, *,  # noqa: N802
                   kind: int = frames.TEXT, count_lines: bool = False) -> StreamPumpAPI: ...

    def TarStream(self, root: str, compress: str | None, level: int = 9, *,  # noqa: N802
                  gzip_mtime: int | None = None) -> TarStreamAPI: ...

    def copy_file(self, src_path: str, dst_path: str) -> None: ...

    def features(self) -> set[str]: ...

    def recv_to_file(self, in_fd: int, dst_fd: int, count: int) -> int: ...

    def send_file_frames(self, src_fd: int, out_fd: int, kind: int, channel: int, count: int,
                         frame_max: int) -> int: ...

    def set_features(self, names: set[str] | frozenset[str]) -> set[str]: ...
