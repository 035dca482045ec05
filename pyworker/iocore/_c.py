"""Binding layer over the cffi C core: C error codes become Python exceptions.

Every C call below is an API-mode cffi call, which releases the GIL for its
duration, so blocking I/O here never stalls other Python threads.
"""

from __future__ import annotations

import errno
import os
import shutil
from types import TracebackType
from typing import Any

from pyworker import frames
from pyworker.iocore._common import FRAME_HEADER, check_frame_args, check_tar_args
from pyworker.iocore._iocore import ffi, lib

__all__ = [
    "FEATURES",
    "FRAME_HEADER",
    "PUMP_MAX_READ",
    "StreamPump",
    "TarStream",
    "copy_file",
    "features",
    "recv_to_file",
    "send_file_frames",
    "set_features",
]

_lib: Any = lib
_ffi: Any = ffi
_alloc_raw: Any = _ffi.new_allocator(should_clear_after_alloc=False)

_FEATURE_NAMES = {
    "splice": _lib.IOCORE_FEAT_SPLICE,
    "copy_file_range": _lib.IOCORE_FEAT_COPY_FILE_RANGE,
    "sendfile": _lib.IOCORE_FEAT_SENDFILE,
}
_COMPRESS = {None: _lib.IOCORE_COMPRESS_NONE, "gz": _lib.IOCORE_COMPRESS_GZ,
             "bz2": _lib.IOCORE_COMPRESS_BZ2}


def _error(code: int, filename: str | None = None, detail: str = "") -> Exception:
    """Turn a negative C return code into the matching Python exception."""
    if code == _lib.IOCORE_EEOF:
        return EOFError(detail or "pipe closed before all bytes arrived")
    if code == _lib.IOCORE_ESAMEFILE:
        return shutil.SameFileError(f"{detail or filename!r} are the same file")
    if code == _lib.IOCORE_EZLIB:
        return OSError(errno.EIO, "zlib compression error", filename)
    if code == _lib.IOCORE_EBZ2:
        return OSError(errno.EIO, "bzip2 compression error", filename)
    if code == _lib.IOCORE_EARG:
        return ValueError(detail or "invalid argument")
    if code == -errno.ENOMEM:
        return MemoryError()
    return OSError(-code, os.strerror(-code), filename)


def features() -> set[str]:
    """Names of the optional syscalls compiled in and currently enabled."""
    mask = int(_lib.iocore_features())
    return {name for name, bit in _FEATURE_NAMES.items() if mask & bit}


def set_features(names: set[str] | frozenset[str]) -> set[str]:
    """Enable only these optional syscalls (for tests of the fallbacks)."""
    mask = 0
    for name in names:
        mask |= _FEATURE_NAMES[name]
    _lib.iocore_set_features(mask)
    return features()


FEATURES: frozenset[str] = frozenset(features())
"""Optional syscalls compiled into the C core."""


def send_file_frames(src_fd: int, out_fd: int, kind: int, channel: int, count: int,
                     frame_max: int) -> int:
    """Send up to ``count`` bytes of ``src_fd`` to ``out_fd`` as frames; return bytes sent."""
    check_frame_args(kind, channel, count, frame_max)
    r = int(_lib.iocore_send_file_frames(src_fd, out_fd, kind, channel, count, frame_max))
    if r < 0:
        raise _error(r)
    return r


def recv_to_file(in_fd: int, dst_fd: int, count: int) -> int:
    """Move exactly ``count`` bytes from the pipe ``in_fd`` into ``dst_fd``."""
    if count < 0:
        raise ValueError("count must be >= 0")
    r = int(_lib.iocore_recv_to_file(in_fd, dst_fd, count))
    if r < 0:
        raise _error(r, detail=f"pipe closed before {count} bytes arrived")
    return r


def copy_file(src_path: str, dst_path: str) -> None:
    """Copy ``src_path`` to ``dst_path`` (created or truncated) and copy its mode."""
    which = _ffi.new("int *")
    r = int(_lib.iocore_copy_file(os.fsencode(src_path), os.fsencode(dst_path), which))
    if r < 0:
        if r == _lib.IOCORE_ESAMEFILE:
            raise _error(r, detail=f"{src_path!r} and {dst_path!r}")
        raise _error(r, src_path if which[0] == 1 else dst_path)


class TarStream:
    """Incremental tar archive of the tree at ``root`` (see the package docstring)."""

    def __init__(self, root: str, compress: str | None, level: int = 9, *,
                 gzip_mtime: int | None = None) -> None:
        check_tar_args(compress, level)
        out = _ffi.new("iocore_tar **")
        mtime = -1 if gzip_mtime is None else gzip_mtime & 0xFFFFFFFF
        r = int(_lib.iocore_tar_open(os.fsencode(root), _COMPRESS[compress], level, mtime, out))
        self._tar: Any = _ffi.gc(out[0], _lib.iocore_tar_free) if out[0] != _ffi.NULL else None
        if r < 0:
            path = root
            if self._tar is not None:
                raw = _ffi.string(_lib.iocore_tar_errpath(self._tar))
                path = os.fsdecode(raw) if raw else root
            self.close()
            raise _error(r, path)

    def read(self, max_bytes: int) -> bytes:
        """Return the next ``max_bytes`` of the archive (fewer only at the end, ``b''`` after)."""
        if self._tar is None:
            raise ValueError("read from a closed TarStream")
        if max_bytes <= 0:
            return b""
        buf = _alloc_raw("uint8_t[]", max_bytes)
        r = int(_lib.iocore_tar_read(self._tar, buf, max_bytes))
        if r < 0:
            raw = _ffi.string(_lib.iocore_tar_errpath(self._tar))
            raise _error(r, os.fsdecode(raw) if raw else None)
        return bytes(_ffi.buffer(buf, r))

    def close(self) -> None:
        """Release the open file, listings and compressor state."""
        tar, self._tar = getattr(self, "_tar", None), None
        if tar is not None:
            _ffi.release(tar)

    def __enter__(self) -> TarStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# -- output pump -------------------------------------------------------------------------

PUMP_MAX_READ: int = int(_lib.IOCORE_PUMP_MAX_READ)
"""Largest ``max_bytes`` of ``StreamPump.read_from`` (and ``feed`` slice): frames stay small."""

_DEFER = int(_lib.IOCORE_PUMP_DEFER)
_DISCARD = int(_lib.IOCORE_PUMP_DISCARD)
_EAGAIN = int(_lib.IOCORE_PUMP_EAGAIN)


def _pump_simd(level: int | None = None) -> int:
    """Query (None) or set (0 = SSE2/portable, 1 = AVX2) the plain-text scan of new pumps.

    For tests and benchmarks; the level in effect is returned (capped by the CPU).
    """
    return int(_lib.iocore_pump_simd(-1 if level is None else level))


def _check_max_bytes(max_bytes: int) -> None:
    if not 1 <= max_bytes <= PUMP_MAX_READ:
        raise ValueError(f"max_bytes must be in 1..{PUMP_MAX_READ}")


class StreamPump:
    """One output stream of a command -> ``TEXT`` frames of whole lines on ``out_fd``.

    C twin (csrc/pump.c): decoding, newline normalisation, line cutting and framing in one
    pass, the GIL released for every call.  See the package docstring for the API.
    """

    def __init__(self, out_fd: int, channel: int, max_line_length: int = 4096, *,
                 kind: int = frames.TEXT, count_lines: bool = False) -> None:
        if not 0 <= kind <= 255 or not 0 <= channel <= 255:
            raise ValueError("kind and channel must be in 0..255")
        if not 2 <= max_line_length <= 1 << 24:
            raise ValueError("max_line_length must be in 2..2**24")
        out = _ffi.new("iocore_pump **")
        r = int(_lib.iocore_pump_new(out_fd, kind, channel, max_line_length, out))
        if r < 0:
            raise _error(r)
        self._pump: Any = _ffi.gc(out[0], _lib.iocore_pump_free)
        self.out_fd = out_fd
        self.channel = channel
        self.kind = kind
        self.max_line_length = max_line_length
        self.count_lines = count_lines
        #: ``\r\n|\r|\n`` in the text decoded by the last read/feed (if ``count_lines``).
        self.last_newlines = 0

    def _live(self) -> Any:
        if self._pump is None:
            raise ValueError("operation on a closed StreamPump")
        return self._pump

    def _newlines(self, pump: Any) -> int:
        return int(_lib.iocore_pump_newlines(pump)) if self.count_lines else 0

    def feed(self, data: bytes | bytearray | memoryview, *, send: bool = True) -> None:
        """Process ``data`` as if read (slices of ``PUMP_MAX_READ`` bytes: one frame each)."""
        pump = self._live()
        view = memoryview(data).cast("B")
        if not view:
            r = int(_lib.iocore_pump_send(pump))
            self.last_newlines = 0
            if r < 0:
                raise _error(r)
            return
        buf = _ffi.from_buffer("uint8_t[]", view)
        total = len(view)
        count = 0
        for start in range(0, total, PUMP_MAX_READ):
            n = min(PUMP_MAX_READ, total - start)
            flags = 0 if send or start + n < total else _DEFER
            r = int(_lib.iocore_pump_feed(pump, buf + start, n, flags))
            if r < 0:
                raise _error(r)
            count += self._newlines(pump)
        self.last_newlines = count

    def read_from(self, fd: int, max_bytes: int = 262144, *, send: bool = True) -> int:
        """One read of up to ``max_bytes`` from ``fd``, processed and sent as one frame.

        Returns the bytes read, 0 at EOF, -1 if nothing can be read now (EAGAIN).
        """
        _check_max_bytes(max_bytes)
        pump = self._live()
        r = int(_lib.iocore_pump_read(pump, fd, max_bytes, 0 if send else _DEFER))
        self.last_newlines = self._newlines(pump)
        if r < 0:
            if r == _EAGAIN:
                return -1
            raise _error(r)
        return r

    def discard_from(self, fd: int, max_bytes: int = 262144) -> int:
        """Read and drop up to ``max_bytes``; same return value as :meth:`read_from`."""
        _check_max_bytes(max_bytes)
        r = int(_lib.iocore_pump_read(self._live(), fd, max_bytes, _DISCARD))
        self.last_newlines = 0
        if r < 0:
            if r == _EAGAIN:
                return -1
            raise _error(r)
        return r

    def eof(self) -> None:
        """The decoder's kept bytes (U+FFFD), as the end of the input; sends completed lines."""
        r = int(_lib.iocore_pump_eof(self._live()))
        if r < 0:
            raise _error(r)

    def flush(self) -> None:
        """:meth:`eof`, then the unfinished tail as a last line; one frame (none if empty)."""
        r = int(_lib.iocore_pump_flush(self._live()))
        if r < 0:
            raise _error(r)

    def send(self) -> None:
        """Write the frame kept by ``send=False`` (nothing if none)."""
        r = int(_lib.iocore_pump_send(self._live()))
        if r < 0:
            raise _error(r)

    @property
    def pending(self) -> int:
        """Payload bytes of the frame kept by ``send=False``."""
        return int(_lib.iocore_pump_pending(self._live()))

    @property
    def tail_chars(self) -> int:
        """Characters of the unfinished tail (always < ``max_line_length``)."""
        return int(_lib.iocore_pump_tail_chars(self._live()))

    def close(self) -> None:
        """Free the C state (unsent tail and kept frame are dropped)."""
        pump, self._pump = getattr(self, "_pump", None), None
        if pump is not None:
            _ffi.release(pump)

    def __enter__(self) -> StreamPump:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
