"""pyworker's I/O core: streaming tar writer, chunked copy helpers and the output pump.

Two twins implement the same names with identical results: the C core
(``_c``, cffi API mode, sources in ``csrc/``) and a pure-Python one
(``_python``).  ``PYWORKER_IO`` picks the backend:

* unset / ``auto``: C, falling back silently to Python if the C core cannot be
  imported (the reason is kept in ``C_IMPORT_ERROR``);
* ``c``: C or ``ImportError``;
* ``python``: always the Python twin.

API (both twins; the one interface they share, for mypy and for callers, is
:mod:`pyworker.iocore.api`, and the names below are exported typed as it):

* ``TarStream(root, compress, level=9, *, gzip_mtime=None)`` with
  ``read(max_bytes) -> bytes`` (``b''`` at the end) and ``close()``: the
  archive ``tarfile.open(mode='w'|'w|gz'|'w|bz2').add(root, arcname='')``
  would write (PAX format, one gzip member / one bzip2 stream), produced
  incrementally.  ``OSError`` from the constructor if ``root`` cannot be read,
  from ``read`` for later unreadable entries.  Races: entries that vanish
  before being stat'ed are skipped, vanished directories are stored empty,
  regular files that vanish or shrink are padded with zeros to the size in
  their header (as GNU tar does), files that grow are cut at that size.
  Hard links are detected for files with ``st_nlink > 1``.
* ``send_file_frames(src_fd, out_fd, kind, channel, count, frame_max) -> int``
* ``recv_to_file(in_fd, dst_fd, count) -> int`` (``EOFError`` if the pipe closes early)
* ``copy_file(src_path, dst_path) -> None`` (copies the mode too)
* ``FRAME_HEADER``: ``struct.Struct('<IBBH')``; ``FEATURES``/``features()``/
  ``set_features()``: optional syscalls compiled in / enabled.
* ``StreamPump(out_fd, channel, max_line_length=4096, *, kind=frames.TEXT,
  count_lines=False)``: one output stream of a command (pipe or PTY master)
  -> ``TEXT`` frames of whole lines on ``out_fd``, byte for byte what the
  executor's Python path sends (per chunk: incremental UTF-8 decoding with
  ``errors='replace'``, ``LineSplitter.append``, one frame if that completes
  lines).  Methods:

  - ``read_from(fd, max_bytes=262144, *, send=True) -> int``: one ``read``
    (a PTY: more non-blocking reads until EAGAIN/EIO or ``max_bytes``);
    returns the bytes read, ``0`` at EOF (EIO from a PTY is EOF), ``-1`` if
    nothing can be read now (EAGAIN); ``OSError`` for other errors.
    ``send=False`` keeps the frame until ``send()`` (or the next call), so
    that ``last_newlines`` can be checked before it goes out.
  - ``discard_from(fd, max_bytes=262144) -> int``: read and drop (same
    return values).
  - ``feed(data, *, send=True)``: process bytes given directly (slices of
    ``PUMP_MAX_READ`` = 2 MiB, one frame each).
  - ``eof()``: the decoder's kept bytes become U+FFFD, completed lines sent.
  - ``flush()``: ``eof()`` then the unfinished tail as a last line, one frame
    (nothing if empty).  ``send()``; ``close()``.
  - ``last_newlines``: ``LINE_COUNT_RE`` matches in the text decoded by the
    last ``read_from``/``feed`` (0 unless ``count_lines``); ``pending``:
    payload bytes kept by ``send=False``; ``tail_chars``: the unfinished tail
    (< ``max_line_length``).

  Frames are written with one write each, continued after partial writes and
  waiting if ``out_fd`` is non-blocking, so a slow reader pauses the pump.

Threads: every C call releases the GIL; the functions may run in several
threads at once, but one ``TarStream`` or ``StreamPump`` must be used by one
thread at a time,
and frames from concurrent ``send_file_frames`` calls on the same ``out_fd``
would interleave.  Byte identity is with the running CPython's ``tarfile``
(checked against 3.11.7: rounded mtime in the ustar field, float mtime as a PAX record);
the gzip header differs only in its timestamp unless ``gzip_mtime`` is given.
"""

from __future__ import annotations

import os
import struct

from pyworker.iocore.api import IOCore, StreamPumpAPI, TarStreamAPI

BACKEND: str
"""``'c'`` or ``'python'``: the twin behind the names below."""

C_IMPORT_ERROR: BaseException | None = None
"""Why the C core could not be imported (``None`` if it could or was not tried)."""


def _load() -> tuple[str, IOCore]:
    """The chosen twin, typed as the one interface (mypy checks each twin module against it)."""
    global C_IMPORT_ERROR
    choice = os.environ.get("PYWORKER_IO", "auto").strip().lower() or "auto"
    if choice not in ("auto", "c", "python"):
        raise ImportError(f"PYWORKER_IO must be 'c', 'python' or 'auto', not {choice!r}")
    if choice == "python":
        from pyworker.iocore import _python

        return "python", _python
    try:
        from pyworker.iocore import _c
    except ImportError as exc:
        C_IMPORT_ERROR = exc
        if choice == "c":
            raise ImportError(f"PYWORKER_IO=c but the C I/O core cannot be loaded: {exc}") from exc
        from pyworker.iocore import _python

        return "python", _python
    return "c", _c


BACKEND, _impl = _load()

FEATURES: frozenset[str] = _impl.FEATURES
FRAME_HEADER: struct.Struct = _impl.FRAME_HEADER
PUMP_MAX_READ: int = _impl.PUMP_MAX_READ
StreamPump = _impl.StreamPump
TarStream = _impl.TarStream
copy_file = _impl.copy_file
features = _impl.features
recv_to_file = _impl.recv_to_file
send_file_frames = _impl.send_file_frames
set_features = _impl.set_features

__all__ = [
    "BACKEND",
    "C_IMPORT_ERROR",
    "FEATURES",
    "FRAME_HEADER",
    "IOCore",
    "PUMP_MAX_READ",
    "StreamPump",
    "StreamPumpAPI",
    "TarStream",
    "TarStreamAPI",
    "copy_file",
    "features",
    "recv_to_file",
    "send_file_frames",
    "set_features",
]
