"""Pure-Python twin of the C I/O core: same names, same results, no C needed.

The tar writer mirrors ``tarfile.TarFile.add(root, arcname='')`` (it builds
the same ``TarInfo`` objects and lets ``TarInfo.tobuf`` render the headers)
but produces the archive incrementally.
"""

from __future__ import annotations

import bz2
import codecs
import errno
import os
import select
import shutil
import stat
import sys
import tarfile
import time
import zlib
from collections.abc import Generator, Iterator
from types import TracebackType

from pyworker import frames
from pyworker.iocore._common import FRAME_HEADER, check_frame_args, check_tar_args
from pyworker.iocore.lines import LINE_COUNT_RE, MAX_LINE_LENGTH, LineSplitter

try:
    import grp
    import pwd
except ImportError:  # pragma: no cover - not on POSIX
    grp = None  # type: ignore[assignment]
    pwd = None  # type: ignore[assignment]

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

FEATURES: frozenset[str] = frozenset()
"""The Python twin uses plain read/write only."""

_ENCODING = sys.getfilesystemencoding()
_RW_BUF = 256 * 1024
_DATA_CHUNK = 64 * 1024
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


def features() -> set[str]:
    """Optional syscalls in use: none for the Python twin."""
    return set()


def set_features(names: set[str] | frozenset[str]) -> set[str]:
    """Accepted for interface parity; the Python twin has no optional syscalls."""
    return set()


def _read(fd: int, n: int) -> bytes:
    """One read, waiting if ``fd`` is non-blocking and has no data yet."""
    while True:
        try:
            return os.read(fd, n)
        except BlockingIOError:
            select.select([fd], [], [])


def _read_exact(fd: int, n: int) -> bytes:
    """Read up to n bytes, fewer only at EOF."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = _read(fd, n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write everything, continuing partial writes and waiting on non-blocking fds."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]


def send_file_frames(src_fd: int, out_fd: int, kind: int, channel: int, count: int,
                     frame_max: int) -> int:
    """Send up to ``count`` bytes of ``src_fd`` to ``out_fd`` as frames; return bytes sent."""
    check_frame_args(kind, channel, count, frame_max)
    sent = 0
    while sent < count:
        want = min(frame_max, count - sent)
        data = _read_exact(src_fd, want)
        if data:
            _write_all(out_fd, FRAME_HEADER.pack(len(data), kind, channel, 0) + data)
            sent += len(data)
        if len(data) < want:
            break  # EOF
    return sent


def recv_to_file(in_fd: int, dst_fd: int, count: int) -> int:
    """Move exactly ``count`` bytes from the pipe ``in_fd`` into ``dst_fd``."""
    if count < 0:
        raise ValueError("count must be >= 0")
    done = 0
    while done < count:
        data = _read(in_fd, min(_RW_BUF, count - done))
        if not data:
            raise EOFError(f"pipe closed before {count} bytes arrived")
        _write_all(dst_fd, data)
        done += len(data)
    return done


def open_regular_or_none(path: str, dir_fd: int | None = None, flags: int = 0) -> int:
    """An fd on ``path`` if it is still a regular file, else -1 (swapped for a FIFO or a
    device since it was listed: archived as zeros). The open does not wait for a FIFO's
    writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | flags, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return -1
    return fd


def copy_file(src_path: str, dst_path: str) -> None:
    """Copy ``src_path`` to ``dst_path`` (created or truncated) and copy its mode."""
    shutil.copyfile(src_path, dst_path)
    shutil.copymode(src_path, dst_path)


class _Names:
    """uid/gid -> user/group name lookups, cached like the C core."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        name = self._users.get(uid)
        if name is None:
            name = ""
            if pwd is not None:
                try:
                    name = pwd.getpwuid(uid)[0]
                except KeyError:
                    pass
            self._users[uid] = name
        return name

    def group(self, gid: int) -> str:
        name = self._groups.get(gid)
        if name is None:
            name = ""
            if grp is not None:
                try:
                    name = grp.getgrgid(gid)[0]
                except KeyError:
                    pass
            self._groups[gid] = name
        return name


class TarStream:
    """Incremental tar archive of the tree at ``root`` (see the package docstring)."""

    def __init__(self, root: str, compress: str | None, level: int = 9, *,
                 gzip_mtime: int | None = None) -> None:
        check_tar_args(compress, level)
        self._compress = compress
        self._names = _Names()
        self._inodes: dict[tuple[int, int], str] = {}
        self._out = bytearray()
        self._closed = False
        self._path = root
        self._arc = ""
        self._crc = zlib.crc32(b"")
        self._isize = 0
        self._zobj: zlib._Compress | None = None
        self._bobj: bz2.BZ2Compressor | None = None
        if compress == "gz":
            self._zobj = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS,
                                          zlib.DEF_MEM_LEVEL, 0)
            ts = int(time.time()) if gzip_mtime is None else gzip_mtime & 0xFFFFFFFF
            self._out += b"\037\213\010\010" + ts.to_bytes(4, "little") + b"\002\377\000"
        elif compress == "bz2":
            self._bobj = bz2.BZ2Compressor(level)
        # the root entry (and its listing) now, so unreadable roots raise here
        first = self._entry(root, "", is_root=True)
        #: The root entry until the generator starts (its fd is closed by :meth:`close`
        #: if the archive is never read).
        self._first = first
        self._gen: Generator[bytes, None, None] | None = self._generate(first)

    # -- archive generation --------------------------------------------

    def _tarinfo(self, path: str, arcname: str, st: os.stat_result) -> tarfile.TarInfo | None:
        """tarfile.TarFile.gettarinfo(), with hard links tracked only for st_nlink > 1."""
        info = tarfile.TarInfo(arcname)
        mode = st.st_mode
        linkname = ""
        if stat.S_ISREG(mode):
            inode = (st.st_ino, st.st_dev)
            prev = self._inodes.get(inode) if st.st_nlink > 1 else None
            if prev is not None and prev != arcname:
                ftype = tarfile.LNKTYPE
                linkname = prev
            else:
                ftype = tarfile.REGTYPE
                if st.st_nlink > 1 and inode[0]:
                    self._inodes[inode] = arcname
        elif stat.S_ISDIR(mode):
            ftype = tarfile.DIRTYPE
        elif stat.S_ISFIFO(mode):
            ftype = tarfile.FIFOTYPE
        elif stat.S_ISLNK(mode):
            ftype = tarfile.SYMTYPE
            linkname = os.readlink(path)
        elif stat.S_ISCHR(mode):
            ftype = tarfile.CHRTYPE
        elif stat.S_ISBLK(mode):
            ftype = tarfile.BLKTYPE
        else:
            return None
        info.mode = mode
        info.uid = st.st_uid
        info.gid = st.st_gid
        info.size = st.st_size if ftype == tarfile.REGTYPE else 0
        info.mtime = st.st_mtime
        info.type = ftype
        info.linkname = linkname
        info.uname = self._names.user(st.st_uid)
        info.gname = self._names.group(st.st_gid)
        if ftype in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor = os.major(st.st_rdev)
            info.devminor = os.minor(st.st_rdev)
        return info

    def _entry(self, path: str, arcname: str, is_root: bool = False
               ) -> tuple[bytes, int | None, int, list[str] | None] | None:
        """Header bytes, open fd (or None), data size and sorted listing for one entry."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if is_root:
                raise
            return None  # vanished: skipped
        info = self._tarinfo(path, arcname, st)
        if info is None:
            return None  # socket: tarfile skips it
        header = info.tobuf(tarfile.PAX_FORMAT, _ENCODING, "surrogateescape")
        listing: list[str] | None = None
        if info.type == tarfile.DIRTYPE:
            try:
                listing = sorted(os.listdir(path))
            except (FileNotFoundError, NotADirectoryError):
                if is_root:
                    raise
                listing = []
        fd: int | None = None
        if info.type == tarfile.REGTYPE and info.size > 0:  # last: nothing after it can fail
            try:
                fd = open_regular_or_none(path)
            except FileNotFoundError:
                fd = -1  # vanished since lstat: zeros
        size = info.size if info.type == tarfile.REGTYPE else 0
        return header, fd, size, listing

    def _file_data(self, fd: int, size: int) -> Iterator[bytes]:
        """File contents; zeros up to ``size`` if the file vanished or shrank."""
        left = size
        try:
            while left > 0:
                n = min(left, _DATA_CHUNK)
                data = os.read(fd, n) if fd >= 0 else b""
                if not data:
                    if fd >= 0:
                        os.close(fd)
                        fd = -1
                    data = bytes(n)
                yield data
                left -= len(data)
            pad = -size % _BLOCK
            if pad:
                yield bytes(pad)
        finally:
            if fd >= 0:
                os.close(fd)

    def _generate(self, first: tuple[bytes, int | None, int, list[str] | None] | None
                  ) -> Generator[bytes, None, None]:
        self._first = None
        total = 0
        stack: list[tuple[str, str, Iterator[str]]] = []
        current = first
        while True:
            if current is not None:
                header, fd, size, listing = current
                total += len(header)
                try:
                    yield header
                except BaseException:  # closed between a file's header and its data
                    if fd is not None and fd >= 0:
                        os.close(fd)
                    raise
                if fd is not None:
                    for piece in self._file_data(fd, size):
                        total += len(piece)
                        yield piece
                if listing is not None:
                    stack.append((self._path, self._arc, iter(listing)))
            current = None
            while stack:
                dpath, darc, names = stack[-1]
                name = next(names, None)
                if name is None:
                    stack.pop()
                    continue
                self._path = os.path.join(dpath, name)
                self._arc = os.path.join(darc, name)
                current = self._entry(self._path, self._arc)
                if current is not None:
                    break
            if current is None and not stack:
                break
        tail = 2 * _BLOCK
        tail += -(total + tail) % _RECORD
        yield bytes(tail)

    # -- public API ----------------------------------------------------

    def read(self, max_bytes: int) -> bytes:
        """Return the next ``max_bytes`` of the archive (fewer only at the end, ``b''`` after)."""
        if self._closed:
            raise ValueError("read from a closed TarStream")
        while len(self._out) < max_bytes and self._gen is not None:
            piece = next(self._gen, None)
            if piece is None:
                self._gen = None
                self._finish()
                break
            self._feed(piece)
        data = bytes(self._out[:max_bytes])
        del self._out[:max_bytes]
        return data

    def _feed(self, piece: bytes) -> None:
        if self._zobj is not None:
            self._crc = zlib.crc32(piece, self._crc)
            self._isize += len(piece)
            self._out += self._zobj.compress(piece)
        elif self._bobj is not None:
            self._out += self._bobj.compress(piece)
        else:
            self._out += piece

    def _finish(self) -> None:
        if self._zobj is not None:
            self._out += self._zobj.flush()
            self._out += self._crc.to_bytes(4, "little")
            self._out += (self._isize & 0xFFFFFFFF).to_bytes(4, "little")
        elif self._bobj is not None:
            self._out += self._bobj.flush()

    def close(self) -> None:
        """Release the open file and compressor state."""
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()
        first, self._first = self._first, None
        if first is not None and first[1] is not None and first[1] >= 0:
            os.close(first[1])
        self._out.clear()
        self._closed = True

    def __enter__(self) -> TarStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# -- output pump -------------------------------------------------------------------------

PUMP_MAX_READ = 2 * 1024 * 1024
"""Largest ``max_bytes`` of ``StreamPump.read_from`` (and ``feed`` slice): frames stay small."""


def check_pump_args(kind: int, channel: int, max_line_length: int) -> None:
    """Raise ValueError for pump settings the frame header or the splitter cannot take."""
    if not 0 <= kind <= 255 or not 0 <= channel <= 255:
        raise ValueError("kind and channel must be in 0..255")
    if not 2 <= max_line_length <= 1 << 24:
        raise ValueError("max_line_length must be in 2..2**24")


def check_max_bytes(max_bytes: int) -> None:
    if not 1 <= max_bytes <= PUMP_MAX_READ:
        raise ValueError(f"max_bytes must be in 1..{PUMP_MAX_READ}")


class StreamPump:
    """One output stream of a command -> ``TEXT`` frames of whole lines on ``out_fd``.

    The pure-Python twin is the executor's existing path, wrapped: per chunk,
    ``decoder.decode`` (UTF-8, ``errors='replace'``), ``LineSplitter.append`` and one frame
    when that completes lines.  See the package docstring for the API.
    """

    def __init__(self, out_fd: int, channel: int, max_line_length: int = MAX_LINE_LENGTH, *,
                 kind: int = frames.TEXT, count_lines: bool = False) -> None:
        check_pump_args(kind, channel, max_line_length)
        self.out_fd = out_fd
        self.channel = channel
        self.kind = kind
        self.max_line_length = max_line_length
        self.count_lines = count_lines
        #: ``\r\n|\r|\n`` in the text decoded by the last read/feed (if ``count_lines``).
        self.last_newlines = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._splitter = LineSplitter(max_line_length)
        self._pending = b""
        self._closed = False
        self._tty_fd = -1
        self._is_tty = False
        self._tty_nonblock = False

    # -- processing ------------------------------------------------------------------------

    def _chunk(self, data: bytes) -> str:
        text = self._decoder.decode(data)
        if not text:
            return ""
        if self.count_lines:
            self.last_newlines += len(LINE_COUNT_RE.findall(text))
        return self._splitter.append(text)

    def _emit(self, lines: str, send: bool) -> None:
        if lines:
            self._pending = lines.encode("utf-8")
        if send:
            self.send()

    def feed(self, data: bytes | bytearray | memoryview, *, send: bool = True) -> None:
        """Process ``data`` as if read (slices of ``PUMP_MAX_READ`` bytes: one frame each)."""
        self._live()
        view = memoryview(data).cast("B")
        self.send()
        self.last_newlines = 0
        for start in range(0, len(view), PUMP_MAX_READ):
            piece = view[start : start + PUMP_MAX_READ]
            last = start + PUMP_MAX_READ >= len(view)
            self._emit(self._chunk(bytes(piece)), send or not last)

    def read_from(self, fd: int, max_bytes: int = 262144, *, send: bool = True) -> int:
        """One read of up to ``max_bytes`` from ``fd``, processed and sent as one frame.

        Returns the bytes read, 0 at EOF, -1 if nothing can be read now (EAGAIN).
        """
        data = self._read(fd, max_bytes)
        if data is None:
            return -1
        if data:
            self._emit(self._chunk(data), send)
        return len(data)

    def discard_from(self, fd: int, max_bytes: int = 262144) -> int:
        """Read and drop up to ``max_bytes``; same return value as :meth:`read_from`."""
        data = self._read(fd, max_bytes)
        return -1 if data is None else len(data)

    def eof(self) -> None:
        """The decoder's kept bytes (U+FFFD), as the end of the input; sends completed lines."""
        self._live()
        self.send()
        tail = self._decoder.decode(b"", final=True)
        self._emit(self._splitter.append(tail) if tail else "", True)

    def flush(self) -> None:
        """:meth:`eof`, then the unfinished tail as a last line; one frame (none if empty)."""
        self._live()
        self.send()
        tail = self._decoder.decode(b"", final=True)
        lines = self._splitter.append(tail) if tail else ""
        self._emit(lines + self._splitter.flush(), True)

    def send(self) -> None:
        """Write the frame kept by ``send=False`` (nothing if none)."""
        self._live()
        if self._pending:
            payload, self._pending = self._pending, b""
            _write_all(self.out_fd, FRAME_HEADER.pack(len(payload), self.kind, self.channel, 0)
                       + payload)

    @property
    def pending(self) -> int:
        """Payload bytes of the frame kept by ``send=False``."""
        return len(self._pending)

    @property
    def tail_chars(self) -> int:
        """Characters of the unfinished tail (always < ``max_line_length``)."""
        return len(self._splitter._partial)

    def close(self) -> None:
        """Drop the state (unsent tail and kept frame), as the C twin frees its own."""
        self._closed = True
        self._pending = b""

    def _live(self) -> None:
        if self._closed:
            raise ValueError("operation on a closed StreamPump")

    def __enter__(self) -> StreamPump:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------

    def _read(self, fd: int, max_bytes: int) -> bytes | None:
        check_max_bytes(max_bytes)
        self._live()
        self.send()
        self.last_newlines = 0
        if fd != self._tty_fd:
            self._tty_fd = fd
            self._is_tty = os.isatty(fd)
            self._tty_nonblock = self._is_tty and not os.get_blocking(fd)
        try:
            data = os.read(fd, max_bytes)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno == errno.EIO and self._is_tty:
                return b""  # the PTY's last writer closed it
            raise
        if data and self._is_tty:
            data = self._read_more(fd, data, max_bytes)
        return data

    def _read_more(self, fd: int, data: bytes, max_bytes: int) -> bytes:
        """A PTY hands out a few KiB per read: gather what is ready."""
        parts = [data]
        size = len(data)
        poller = None if self._tty_nonblock else select.poll()
        if poller is not None:
            poller.register(fd, select.POLLIN)
        while size < max_bytes:
            if poller is not None and not any(ev & select.POLLIN for _, ev in poller.poll(0)):
                break
            try:
                more = os.read(fd, max_bytes - size)
            except OSError:  # EAGAIN: nothing more now; EIO: the next call sees the end
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts) if len(parts) > 1 else data
