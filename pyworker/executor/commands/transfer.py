"""File transfers: ``uploadFile``, ``uploadDirectory`` and ``downloadFile`` (PROTOCOL.md §6).

The master sees the reference's messages, headers, ``rc`` rules and closing calls; what
differs is the pace. The reference sends one block and waits for its reply before the next;
here a bounded window of blocks is in flight at any time:

* uploads send ``WRITE`` frames (each one ``writer.write`` call, answered by an ``ACK``)
  until ``window`` bytes wait for their ACK, then wait for the oldest;
* downloads keep several ``READ`` requests out; the front end answers them in order with
  ``DATA`` frames (``b''`` past the end) or ``RESULT (False, text)`` when the master failed.

Blocks are at most ``block_size`` bytes, under Twisted's 640 KiB string limit whatever
``blocksize`` the master configured, and never reach past ``maxsize``, so at most ``window``
bytes of a transfer are ever held in memory. By default a download reads 512 KiB blocks
and an upload writes 256 KiB ones. The worker's cost is per block (a frame each way, a PB
call): at 512 MiB, 512 KiB blocks took ``uploadFile`` from 4.3 to 3.3 worker CPU s/GiB
against 128 KiB. The master's cost on uploads grows with the block, as its PB decoder
copies a partly received string once per network read: master CPU s/GiB 4.2 at 128 KiB,
3.7 at 256 KiB, 5.1-5.9 at 512 KiB (the minimal worker's 4.9-6.0); at 256 KiB uploads ran
at 1.2-1.3x the minimal worker's MiB/s on this 2-core machine, at 1.03-1.09x its worker
CPU (512 KiB: 1.0x and 0.9-1.0x). A download block goes from the pipe into the file by
``splice(2)`` (:meth:`Channel.sink_data`), never through memory here.

At the first error from the master no new call is issued; the calls in flight are answered,
then the failure is reported. An interrupt stops issuing at once; the closing calls are still made,
but from then on no answer of the master is waited for (it may never come): an interrupted
transfer always completes.

Directory uploads stream the tar archive as :class:`pyworker.iocore.TarStream` produces it
instead of building it in a temporary file first; ``gz`` and ``bz2`` are compressed here by
:class:`pyworker.compress.ChunkedCompressor` in several threads, overlapped with the network,
at a level that follows the link unless one is configured. Downloads land in a temporary
file next to the destination, renamed over it only when the transfer completed: a failed or
interrupted download leaves the old file untouched.

Under ``restrict_paths`` the file to send or write is opened through :mod:`pyworker.paths`
(beneath the basedir, when the transfer starts); a download's temporary file is made and
renamed in the directory fd that resolution returned, and a directory upload walks the tree
by fds (:class:`BeneathTarStream`, the Python tar writer with fd-relative, ``O_NOFOLLOW``
opens) so an entry swapped for a link is archived as that link, never followed. A refusal
fails the command with the policy's message.

Tuning comes from the front end's ``io`` settings: ``block_size``, ``window``,
``gzip_level`` and ``bz2_level`` (``'auto'`` or a number), ``compress_threads``.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import tarfile
import tempfile
from collections import deque
from typing import Any, ClassVar

from pyworker import frames, iocore, paths
from pyworker.config import AUTO_LEVEL, MAX_COMPRESS_THREADS, valid_level
from pyworker.executor.channel import SUNK, Channel, CommandError, Interrupted
from pyworker.executor.commands.base import Command, NotRegularFile, open_regular
from pyworker.executor.compress import ChunkedCompressor, default_threads
from pyworker.executor.process import process_umask
from pyworker.iocore import _python as python_iocore

#: Block per ``read`` call of a download (Twisted refuses strings above 640 KiB).
BLOCK_SIZE = 512 * 1024
#: Block per ``write`` call of an upload: smaller, as the master's cost per byte grows
#: with the size of the strings it receives.
UPLOAD_BLOCK_SIZE = 256 * 1024
MAX_BLOCK_SIZE = 600 * 1024
#: Bytes of blocks in flight (sent, not yet answered) per transfer.
WINDOW = 2 * 1024 * 1024
#: The ``mode`` values ``chmod`` takes (a C int; the kernel keeps the low 12 bits).
MIN_MODE = -(2**31)
MAX_MODE = 2**31 - 1


class _Transfer(Command):
    """What the three transfers share: argument checks, the I/O window, the final updates."""

    #: The default block size (the ``block_size`` io setting overrides it).
    default_block: ClassVar[int] = BLOCK_SIZE

    def __init__(self, channel: Channel, request: dict[str, Any]) -> None:
        super().__init__(channel, request)
        self.path: str = self.arg_str("path")
        blocksize = self.args.get("blocksize")
        if isinstance(blocksize, bool) or not isinstance(blocksize, int):
            raise CommandError(f"argument 'blocksize' must be an integer, not {blocksize!r:.60}")
        if blocksize <= 0:
            raise CommandError(f"argument 'blocksize' must be positive, not {blocksize}")
        maxsize = self.args.get("maxsize")
        if maxsize is not None and (isinstance(maxsize, bool) or not isinstance(maxsize, int)):
            raise CommandError(
                f"argument 'maxsize' must be an integer or None, not {maxsize!r:.60}"
            )
        self.maxsize: int | None = maxsize
        self.block = _io_int(self.io, "block_size", self.default_block, 1, MAX_BLOCK_SIZE)
        self.window = max(self.block, _io_int(self.io, "window", WINDOW, 1, 256 * 1024 * 1024))
        self.rc = 0
        self.stderr: str | None = None
        self.failure: str | None = None

    @property
    def interrupted(self) -> bool:
        return self.channel.interrupt_reason is not None

    # -- endings -------------------------------------------------------------------------

    def truncated(self) -> None:
        if self.stderr is None:
            self.stderr = f"Maximum filesize reached, truncating file '{self.path}'"
            self.rc = 1

    def call_quietly(self, target: str, method: str, *args: Any) -> None:
        """A closing call whose failure is only noted in the log, as the reference does."""
        try:
            self.channel.call(target, method, *args)
        except CommandError:
            pass

    def report(self) -> None:
        """``rc`` (and ``stderr``) even after an interrupt, then fail if the master did."""
        self.channel.update([("rc", self.rc)], force=True)
        if self.stderr:
            self.channel.text("stderr", self.stderr, force=True)
        if self.failure is not None:
            raise CommandError(self.failure)


class _Upload(_Transfer):
    """The write window shared by file and directory uploads."""

    required_args: ClassVar[tuple[str, ...]] = ("path", "blocksize", "maxsize")
    default_block = UPLOAD_BLOCK_SIZE

    def __init__(self, channel: Channel, request: dict[str, Any]) -> None:
        super().__init__(channel, request)
        self.in_flight = 0
        self.frames = 0
        self.write_error: str | None = None
        self.remaining = self.maxsize

    def next_length(self) -> int:
        """The size of the next block, or 0 when ``maxsize`` is used up (reference quirk:
        also when the file is exactly ``maxsize`` bytes long)."""
        n = self.block
        if self.remaining is not None:
            n = min(n, self.remaining)
        return n

    def sent(self, n: int) -> None:
        self.frames += 1
        self.in_flight += n
        if self.remaining is not None:
            self.remaining -= n

    def _ack(self) -> None:
        kind, _, payload = self.channel.next_answer("an ACK")
        if kind != frames.ACK:
            raise frames.WireError(f"unexpected frame kind {kind} while waiting for an ACK")
        n, error = frames.load(payload)
        self.frames -= 1
        self.in_flight -= n
        if error is not None and self.write_error is None:
            self.write_error = error

    def make_room(self, n: int) -> bool:
        """Wait until ``n`` more bytes fit in the window; False if we must stop sending."""
        self.channel.absorb_available()
        try:
            while self.channel.has_frame() and self.frames:
                self._ack()
            while self.frames and self.in_flight + n > self.window and self.write_error is None:
                self._ack()
        except Interrupted:
            return False
        return self.write_error is None and not self.interrupted

    def drain(self) -> None:
        try:
            while self.frames:
                self._ack()
        except Interrupted:  # the writes in flight are abandoned
            self.frames = self.in_flight = 0


class UploadFile(_Upload):
    """``uploadFile``: one file to the master's ``writer`` (PROTOCOL.md §6.1)."""

    def run(self) -> None:
        keepstamp = self.arg_bool("keepstamp", False)
        times: tuple[float, float] | None = None
        fd = -1
        try:
            try:
                fd, times = self._open_source(keepstamp)
            except NotRegularFile as e:  # a directory: the reference's message; else why
                self.stderr = f"Cannot open file '{self.path}' for upload" + (
                    "" if e.kind == "a directory" else f": {e}")
                self.rc = 1
            except OSError:
                self.stderr = f"Cannot open file '{self.path}' for upload"
                self.rc = 1
            self.channel.text("header", f"sending {self.path}\n")
            if fd >= 0:
                self._send(fd)
        finally:
            if fd >= 0:
                os.close(fd)
            self.drain()
        if self.failure is None and self.write_error is not None:
            self.failure = self.write_error
        if self.failure is None:
            try:  # a failing close or utime: the reference keeps rc as it is
                self.channel.call("writer", "close")
                if keepstamp and times is not None:
                    self.channel.call("writer", "utime", times)
            except Interrupted:
                self.rc = 1
            except CommandError as e:
                self.failure = str(e)
        else:
            self.rc = 1
            self.call_quietly("writer", "close")
        self.report()

    def _open_source(self, keepstamp: bool) -> tuple[int, tuple[float, float] | None]:
        """The file to send, open, and its (atime, mtime) if ``keepstamp``; nothing is left
        open when this raises."""
        times: tuple[float, float] | None = None
        if keepstamp and self.beneath is None:
            st = os.stat(self.path)
            times = (st.st_atime, st.st_mtime)
        fd = open_regular(self.path, self.beneath)
        if keepstamp and self.beneath is not None:
            st = os.fstat(fd)
            times = (st.st_atime, st.st_mtime)
        return fd, times

    def _send(self, fd: int) -> None:
        while not self.interrupted:
            n = self.next_length()
            if n <= 0:
                self.truncated()
                return
            if not self.make_room(n):
                if self.interrupted:
                    self.rc = 1
                return
            try:
                got = iocore.send_file_frames(fd, self.channel.wfd, frames.WRITE, 0, n, n)
            except OSError as e:
                self.failure = f"{type(e).__name__}: {e}"
                return
            if got == 0:
                return  # end of file
            self.sent(got)
        self.rc = 1


class UploadDirectory(_Upload):
    """``uploadDirectory``: a tar archive of a tree, then ``writer.unpack()`` (§6.2)."""

    required_args = ("path", "blocksize", "maxsize", "compress")

    def run(self) -> None:
        compress = self.args.get("compress")
        if compress not in ("gz", "bz2"):
            compress = None  # the reference writes a plain tar for any other value
        tar: Any
        try:
            if self.beneath is not None:
                tar = BeneathTarStream(self.beneath, self.path)
            else:
                tar = iocore.TarStream(self.path, None)
        except OSError as e:
            self.stderr = f"Cannot read directory '{self.path}' for upload: {e}"
            self.rc = 1
            self.report()
            return
        compressor: ChunkedCompressor | None = None
        try:
            if compress is not None:
                level = self.io.get("gzip_level" if compress == "gz" else "bz2_level",
                                    AUTO_LEVEL)
                if not valid_level(compress, level):
                    level = AUTO_LEVEL
                threads = _io_int(self.io, "compress_threads", default_threads(), 1,
                                  MAX_COMPRESS_THREADS)
                compressor = ChunkedCompressor(tar.read, compress, level, threads)
            self.channel.text("header", f"sending {self.path}\n")
            complete = self._send(compressor or tar)
        finally:
            if compressor is not None:
                compressor.close()
                self.usage_note = f"{compress} {compressor.stats.describe()}"
            tar.close()
            self.drain()
        if self.failure is None and self.write_error is not None:
            self.failure = self.write_error  # the reference keeps rc 0 here
        if self.failure is None and complete:
            try:
                self.channel.call("writer", "unpack")
            except Interrupted:
                self.rc = 1
            except CommandError as e:
                self.rc = 1
                self.failure = str(e)
        self.report()

    def _send(self, tar: Any) -> bool:
        """Stream the archive; False if it could not be read to the end (no unpack then)."""
        while not self.interrupted:
            n = self.next_length()
            if n <= 0:
                self.truncated()
                return True
            if not self.make_room(n):
                if self.interrupted:
                    self.rc = 1
                return True
            try:
                data = tar.read(n)
            except OSError as e:
                self.stderr = f"Cannot read directory '{self.path}' for upload: {e}"
                self.rc = 1
                return False
            if not data:
                return True
            self.channel.write_frame(frames.WRITE, data)
            self.sent(len(data))
        self.rc = 1
        return True


class DownloadFile(_Transfer):
    """``downloadFile``: the master's ``reader`` into a file (PROTOCOL.md §6.3)."""

    required_args = ("path", "blocksize", "maxsize", "mode")

    def run(self) -> None:
        mode = self.args.get("mode")
        if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int)):
            raise CommandError(f"argument 'mode' must be an integer or None, not {mode!r:.60}")
        if mode is not None and not MIN_MODE <= mode <= MAX_MODE:
            # what chmod(2) can be given (the reference fails here too, with OverflowError)
            raise CommandError(f"argument 'mode' is not a file mode: {mode!r:.60}")
        target = self.path
        tmp: str | None = None
        fd = -1
        dir_fd: int | None = None  # restrict_paths: target and tmp are names in it
        try:
            try:
                if self.beneath is not None:
                    dir_fd, target, tmp, fd = _open_destination_beneath(self.beneath,
                                                                        self.path, mode)
                else:
                    target, tmp, fd = _open_destination(self.path, mode)
            except NotRegularFile as e:
                self.stderr = f"Cannot open file '{self.path}' for download: {e}"
                self.rc = 1
            except OSError:
                self.stderr = f"Cannot open file '{self.path}' for download"
                self.rc = 1
            if fd >= 0:
                completed = self._receive(fd)
                closing, fd = fd, -1
                try:
                    os.close(closing)  # the fd is released even when this fails
                except OSError as e:  # a delayed write error: the data is not all there
                    if completed:
                        self.failure = f"{type(e).__name__}: {e}"
                    completed = False
                if completed and tmp is not None:
                    try:
                        os.replace(tmp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                    except OSError as e:
                        self.failure = f"{type(e).__name__}: {e}"
                    else:
                        tmp = None
            self.call_quietly("reader", "close")
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp is not None:
                try:
                    os.unlink(tmp, dir_fd=dir_fd)
                except OSError:
                    pass
            if dir_fd is not None:
                os.close(dir_fd)
        self.report()

    def _receive(self, fd: int) -> bool:
        """Read the master's file into ``fd``; True if it should replace the destination."""
        self.channel.sink_data(fd)  # the blocks go from the pipe into the file (splice)
        try:
            return self._receive_blocks(fd)
        finally:
            self.channel.sink_data(None)

    def _receive_blocks(self, fd: int) -> bool:
        pending: deque[int] = deque()
        asked = 0
        received = 0
        eof = False
        limit_reached = False
        while True:
            self.channel.absorb_available()
            stopping = eof or self.failure is not None or self.interrupted
            while not stopping and asked + self.block <= self.window:
                n = self.block
                if self.maxsize is not None:
                    n = min(n, self.maxsize - received - asked)
                if n <= 0:
                    limit_reached = not pending
                    break
                self.channel.write(frames.value_frame(frames.READ, n))
                pending.append(n)
                asked += n
            if not pending:
                break
            try:
                kind, _, payload = self.channel.next_answer("DATA")
            except Interrupted:  # the reads in flight are abandoned
                break
            asked -= pending.popleft()
            if kind == SUNK:  # already in the file
                received += self.channel.take_sunk()
                if self.channel.sink_error is not None and self.failure is None:
                    self.failure = self.channel.sink_error  # the reference keeps rc 0
                if eof or self.failure is not None or self.interrupted:
                    self.channel.sink_data(None)  # what comes after is not written
            elif kind == frames.DATA:
                if not payload:
                    eof = True
                    self.channel.sink_data(None)
                elif not (eof or self.failure is not None or self.interrupted):
                    try:
                        _write_all(fd, payload)
                    except OSError as e:
                        self.failure = f"{type(e).__name__}: {e}"  # the reference keeps rc 0
                    received += len(payload)
            elif kind == frames.RESULT:
                ok, value = frames.load(payload)
                if not ok and self.failure is None:
                    self.failure = str(value)
                    self.channel.sink_data(None)
            else:
                raise frames.WireError(f"unexpected frame kind {kind} while waiting for DATA")
        if self.failure is not None:
            return False
        if self.interrupted and not eof:
            self.rc = 1
            return False
        if limit_reached and not eof:
            self.truncated()
        return True


def _open_destination(path: str, mode: int | None) -> tuple[str, str | None, int]:
    """Create the temporary file for ``path``: (final path, temporary path, open fd).

    Like the reference's ``open(path, 'wb')``: parent directories are created, a symlink is
    written through, an existing file keeps its mode unless ``mode`` is given. If no temporary
    file can be made next to the destination (a read-only directory holding a writable file),
    the destination itself is truncated and written, as the reference does.
    """
    parent = os.path.dirname(path)
    if parent and not os.path.exists(parent):
        os.makedirs(parent)
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(target)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(target, st.st_mode)  # a FIFO or a device: never renamed over
    if mode is None:
        if st is not None:
            mode = stat.S_IMODE(st.st_mode)
        else:
            mode = 0o666 & ~process_umask()
    name = os.path.basename(target)[:64]
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".pyworker-tmp",
                                   dir=os.path.dirname(target) or ".")
    except OSError:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        tmp = None
    try:
        os.fchmod(fd, mode)
    except BaseException:
        _discard(fd, tmp)
        raise
    return target, tmp, fd


def _discard(fd: int, tmp: str | None, dir_fd: int | None = None) -> None:
    """Close ``fd`` and remove the temporary file ``tmp`` (if one was made) after a failure;
    errors here are not the ones to report."""
    try:
        os.close(fd)
    except OSError:
        pass
    if tmp is not None:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass


def _open_destination_beneath(beneath: paths.Beneath, path: str, mode: int | None
                              ) -> tuple[int, str, str | None, int]:
    """:func:`_open_destination` under ``restrict_paths``: (directory fd, final name in it,
    temporary name or None, open fd). Parents are made and links followed beneath the root
    only; the names are then used relative to the directory fd, with ``O_NOFOLLOW``."""
    dir_fd, name = beneath.locate(path, create_dirs=True)
    try:
        if name is None:
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        try:
            st: os.stat_result | None = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", path)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, st.st_mode)
        if mode is None:
            if st is not None:
                mode = stat.S_IMODE(st.st_mode)
            else:
                mode = 0o666 & ~process_umask()
        tmp: str | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            for _ in range(100):
                candidate = f".{name[:64]}.{os.urandom(6).hex()}.pyworker-tmp"
                try:
                    fd = os.open(candidate, flags | os.O_EXCL, 0o600, dir_fd=dir_fd)
                except FileExistsError:
                    continue
                tmp = candidate
                break
            else:
                raise FileExistsError(errno.EEXIST, "no temporary name", path)
        except PermissionError:
            fd = os.open(name, flags | os.O_TRUNC, 0o666, dir_fd=dir_fd)
        try:
            if tmp is None:
                beneath.check_fd(path, fd)
            os.fchmod(fd, mode)
        except BaseException:
            _discard(fd, tmp, dir_fd)
            raise
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd, name, tmp, fd


class BeneathTarStream(python_iocore.TarStream):
    """The tar writer for ``restrict_paths``: each entry is located beneath the root
    without following its last component, then read through fds with ``O_NOFOLLOW``
    (an entry swapped for a link since it was listed is archived as that link)."""

    def __init__(self, beneath: paths.Beneath, root: str) -> None:
        self._beneath = beneath
        super().__init__(root, None)

    def _entry(self, path: str, arcname: str, is_root: bool = False
               ) -> tuple[bytes, int | None, int, list[str] | None] | None:
        try:
            dir_fd, name = self._beneath.locate(path, follow_last=False)
        except (FileNotFoundError, NotADirectoryError):
            if is_root:
                raise
            return None  # vanished: skipped
        try:
            try:
                st = (os.fstat(dir_fd) if name is None
                      else os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
            except FileNotFoundError:
                if is_root:
                    raise
                return None
            info = self._tarinfo(paths.proc_path(dir_fd, name), arcname, st)
            if info is None:
                return None
            here = "." if name is None else name
            header = info.tobuf(tarfile.PAX_FORMAT, sys.getfilesystemencoding(),
                                "surrogateescape")
            listing: list[str] | None = None
            if info.type == tarfile.DIRTYPE:
                try:
                    lfd = os.open(here, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, dir_fd=dir_fd)
                    try:
                        listing = sorted(os.listdir(lfd))
                    finally:
                        os.close(lfd)
                except OSError:
                    if is_root:
                        raise
                    listing = []
            fd: int | None = None
            if info.type == tarfile.REGTYPE and info.size > 0:  # opened last: nothing after
                try:                                             # it can fail and leak it
                    fd = python_iocore.open_regular_or_none(here, dir_fd, os.O_NOFOLLOW)
                except OSError:
                    fd = -1  # gone, or not that file any more: zeros
                if fd >= 0:
                    try:
                        self._beneath.check_fd(path, fd)
                    except BaseException:
                        os.close(fd)
                        raise
            size = info.size if info.type == tarfile.REGTYPE else 0
            return header, fd, size, listing
        finally:
            os.close(dir_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _io_int(io: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = io.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return default
    return value


COMMANDS: dict[str, type[Command]] = {
    "uploadFile": UploadFile,
    "upload_file": UploadFile,
    "uploadDirectory": UploadDirectory,
    "upload_directory": UploadDirectory,
    "downloadFile": DownloadFile,
    "download_file": DownloadFile,
}
