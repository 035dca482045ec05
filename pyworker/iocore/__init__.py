"""pyworker's I/O core: streaming tar writer and chunked copy helpers.

Two twins implement the same names with identical results: the C core
(``_c``, cffi API mode, sources in ``csrc/``) and a pure-Python one
(``_python``).  ``PYWORKER_IO`` picks the backend:

* unset / ``auto``: C, falling back silently to Python if the C core cannot be
  imported (the reason is kept in ``C_IMPORT_ERROR``);
* ``c``: C or ``ImportError``;
* ``python``: always the Python twin.

API (both twins):

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

Threads: every C call releases the GIL; the functions may run in several
threads at once, but one ``TarStream`` must be read by one thread at a time,
and frames from concurrent ``send_file_frames`` calls on the same ``out_fd``
would interleave.  Byte identity is with the running CPython's ``tarfile``
(checked against 3.11.7: rounded mtime in the ustar field, float mtime as a PAX record);
the gzip header differs only in its timestamp unless ``gzip_mtime`` is given.
"""

from __future__ import annotations

import os
from types import ModuleType

BACKEND: str
"""``'c'`` or ``'python'``: the twin behind the names below."""

C_IMPORT_ERROR: BaseException | None = None
"""Why the C core could not be imported (``None`` if it could or was not tried)."""


def _load() -> tuple[str, ModuleType]:
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
FRAME_HEADER = _impl.FRAME_HEADER
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
    "TarStream",
    "copy_file",
    "features",
    "recv_to_file",
    "send_file_frames",
    "set_features",
]
