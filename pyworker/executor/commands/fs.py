"""File-system commands: ``mkdir``, ``rmdir``, ``cpdir``, ``stat``, ``glob``, ``listdir``,
``rmfile`` (PROTOCOL.md section 3.5), with the reference's updates, errors and ``rc`` rules.

Failures are reported the reference's way: a header ``<command>: <strerror>: <path>`` (no
newline, so it reaches the log after ``rc``) and ``rc = errno``.

Under ``restrict_paths`` (``self.beneath`` set) every path is resolved beneath the basedir by
:mod:`pyworker.paths` when it is used, and acted on through the directory fd that resolution
returns; a refusal fails the command with the policy's message. ``rmdir`` and ``cpdir`` then
do not run ``rm``/``cp`` (which would resolve the path strings again, and ``cp`` writes through
links in an existing destination): they remove and copy here, fd by fd, never following a
link (``rm -rf`` and ``cp -R -P -p`` semantics; ``cp -v``'s lines on stdout).
"""

from __future__ import annotations

import errno
import glob
import itertools
import os
import stat
from collections.abc import Callable, Iterator

from pyworker import paths
from pyworker.executor.channel import CommandError
from pyworker.executor.commands.base import Command
from pyworker.executor.commands.globbing import Globber
from pyworker.executor.commands.shell import ProcessRunner


class _OSErrorReporting(Command):
    header = ""

    def fail(self, error: OSError, path: str) -> None:
        self.channel.text("header", f"{self.header}: {error.strerror}: {path}")
        self.channel.update([("rc", error.errno or 1)])


class MakeDirectory(_OSErrorReporting):
    header = "mkdir"
    required_args = ("paths",)

    def run(self) -> None:
        for path in self.arg_paths("paths"):
            try:
                if self.beneath is not None:
                    os.close(self.beneath.makedirs(path))
                elif not os.path.isdir(path):
                    os.makedirs(path)
            except OSError as e:
                self.fail(e, path)
                return
        self.channel.update([("rc", 0)])


class _ToolCommand(Command):
    """Commands that run ``rm``/``cp`` through the shell runner, in the worker's basedir."""

    def tool(self, argv: list[str]) -> int:
        return ProcessRunner(
            self.channel,
            argv,
            self.basedir,
            send_rc=False,
            timeout=self.arg_number("timeout", 120),
            max_time=self.arg_number("maxTime"),
            log_environ=self.arg_bool("logEnviron", True),
        ).run()


class RemoveDirectory(_ToolCommand):
    required_args = ("paths",)

    def run(self) -> None:
        if self.beneath is not None:
            self.remove_beneath(self.beneath)
            return
        rc = 0
        for path in self.arg_paths("paths"):
            result = self.tool(["rm", "-rf", path])
            if result != 0 and self.channel.running:
                self.tool(["chmod", "-Rf", "u+rwx", path])
                result = self.tool(["rm", "-rf", path])
            if result != 0:
                rc = result
        self.channel.update([("rc", rc)])

    def remove_beneath(self, beneath: paths.Beneath) -> None:
        rc = 0
        for path in self.arg_paths("paths"):
            self.channel.text("header", f"rm -rf {path} (restrict_paths: removed by the "
                              "worker, links not followed)\n")
            try:
                dir_fd, name = beneath.locate(path, follow_last=False)
            except (FileNotFoundError, NotADirectoryError):
                continue  # a missing parent (or a file as one): nothing to remove, as rm -f
            try:
                if name is None:
                    self.channel.text("stderr", f"rm: refusing to remove '.' or '..' "
                                      f"directory: skipping '{path}'\n")
                    rc = 1
                    continue
                errors: list[str] = []
                _remove_tree(dir_fd, name, path, errors)
            finally:
                os.close(dir_fd)
            if errors:
                self.channel.text("stderr", "".join(errors))
                rc = 1
        self.channel.update([("rc", rc)])


def _remove_tree(dir_fd: int, name: str, shown: str, errors: list[str]) -> None:
    """``rm -rf`` of ``name`` in ``dir_fd``: links are removed, never followed; directories
    without ``u+rwx`` are given it (as the reference's ``chmod -Rf u+rwx`` retry)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)
            return
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.EACCES and _grant_rwx_then(dir_fd):
            return _remove_tree(dir_fd, name, shown, errors)
        errors.append(f"rm: cannot remove '{shown}': {e.strerror}\n")
        return
    try:
        if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
            try:
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
            except OSError:
                pass
        try:
            children = os.listdir(fd)
        except OSError as e:
            errors.append(f"rm: cannot remove '{shown}': {e.strerror}\n")
            return
        for child in children:
            _remove_tree(fd, child, f"{shown}/{child}", errors)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        errors.append(f"rm: cannot remove '{shown}': {e.strerror}\n")


def _grant_rwx_then(dir_fd: int) -> bool:
    """Give the directory ``dir_fd`` u+rwx if it lacks it; True if it did."""
    mode = stat.S_IMODE(os.fstat(dir_fd).st_mode)
    if mode & 0o700 == 0o700:
        return False
    try:
        os.chmod(paths.proc_path(dir_fd), mode | 0o700)
    except OSError:
        return False
    return True


class CopyDirectory(_ToolCommand):
    required_args = ("from_path", "to_path")

    def run(self) -> None:
        from_path = self.arg_str("from_path")
        to_path = self.arg_str("to_path")
        if self.beneath is not None:
            self.copy_beneath(self.beneath, from_path, to_path)
            return
        parent = os.path.dirname(to_path)
        if parent and not os.path.exists(parent):
            os.makedirs(parent)
        rc = self.tool(["cp", "-R", "-P", "-p", "-v", from_path, to_path])
        self.channel.update([("rc", rc)])

    def copy_beneath(self, beneath: paths.Beneath, from_path: str, to_path: str) -> None:
        self.channel.text("header", f"cp -R -P -p -v {from_path} {to_path} (restrict_paths: "
                          "copied by the worker, links not followed)\n")
        src_fd, src_name = beneath.locate(from_path, follow_last=False)
        dst_fd = -1
        copier = _Copier(self, beneath)
        try:
            if os.path.samestat(os.fstat(src_fd), os.fstat(beneath.root_fd)) and (
                    src_name is None or src_name == ".."):
                raise paths.refused_protected(from_path, beneath.root)
            dst_fd, dst_name = beneath.locate(to_path, create_dirs=True)
            shown_dst = to_path
            into = _open_dir_nofollow(dst_fd, dst_name)
            if into is not None:  # an existing directory: copy into it, as cp does
                os.close(dst_fd)
                dst_fd, dst_name = into, os.path.basename(from_path.rstrip("/")) or "."
                beneath.check(to_path, dst_fd, dst_name)
                shown_dst = os.path.join(to_path, dst_name)
            if dst_name is None or dst_name in (".", ".."):
                raise IsADirectoryError(errno.EISDIR, "cannot copy onto a directory", to_path)
            copier.copy(src_fd, src_name, dst_fd, dst_name, from_path, shown_dst)
        except OSError as e:
            self.channel.text("stderr", f"cp: {e.strerror}: {to_path}\n")
            self.channel.update([("rc", 1)])
            return
        finally:
            os.close(src_fd)
            if dst_fd >= 0:
                os.close(dst_fd)
        self.channel.update([("rc", 1 if copier.failed else 0)])


def _open_dir_nofollow(dir_fd: int, name: str | None) -> int | None:
    """An fd on ``name`` in ``dir_fd`` if it is a directory (not a link to one), else None."""
    try:
        return os.open("." if name is None else name,
                       os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=dir_fd)
    except OSError:
        return None


class _Copier:
    """``cp -R -P -p -v`` with fds: sources opened ``O_NOFOLLOW`` (links copied as links),
    destinations created ``O_NOFOLLOW`` in directories opened the same way."""

    def __init__(self, command: Command, beneath: paths.Beneath) -> None:
        self.channel = command.channel
        self.beneath = beneath
        self.failed = False
        #: The directories this copy made: a source among them is a copy into itself.
        self.made: set[tuple[int, int]] = set()

    def error(self, text: str) -> None:
        self.failed = True
        self.channel.text("stderr", f"cp: {text}\n")

    def copy(self, src_dir: int, src_name: str | None, dst_dir: int, dst_name: str,
             shown_src: str, shown_dst: str) -> None:
        src = "." if src_name is None else src_name
        try:
            st = os.stat(src, dir_fd=src_dir, follow_symlinks=False)
        except OSError as e:
            self.error(f"cannot stat '{shown_src}': {e.strerror}")
            return
        self.channel.text("stdout", f"'{shown_src}' -> '{shown_dst}'\n")
        try:
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(src, dir_fd=src_dir)
                try:
                    os.symlink(target, dst_name, dir_fd=dst_dir)
                except FileExistsError:
                    os.unlink(dst_name, dir_fd=dst_dir)
                    os.symlink(target, dst_name, dir_fd=dst_dir)
                _keep_times(dst_dir, dst_name, st, follow=False)
            elif stat.S_ISDIR(st.st_mode):
                self._copy_dir(src_dir, src, dst_dir, dst_name, st, shown_src, shown_dst)
            elif stat.S_ISREG(st.st_mode):
                self._copy_file(src_dir, src, dst_dir, dst_name, st, shown_src)
            else:
                self.error(f"'{shown_src}': not copied (not a file, directory or link)")
        except paths.PathRefused as e:
            self.error(str(e))
        except OSError as e:
            self.error(f"cannot copy '{shown_src}' to '{shown_dst}': {e.strerror}")

    def _copy_dir(self, src_dir: int, src: str, dst_dir: int, dst_name: str,
                  st: os.stat_result, shown_src: str, shown_dst: str) -> None:
        sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=src_dir)
        try:
            sst = os.fstat(sfd)
            if (sst.st_dev, sst.st_ino) in self.made:
                self.error(f"cannot copy a directory, '{shown_src}', into itself")
                return
            try:
                os.mkdir(dst_name, 0o700, dir_fd=dst_dir)
            except FileExistsError:
                pass
            dfd = os.open(dst_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dst_dir)
            try:
                dst = os.fstat(dfd)
                if os.path.samestat(dst, sst):
                    self.error(f"'{shown_src}' and '{shown_dst}' are the same file")
                    return
                self.made.add((dst.st_dev, dst.st_ino))
                for child in sorted(os.listdir(sfd)):
                    self.copy(sfd, child, dfd, child, f"{shown_src}/{child}",
                              f"{shown_dst}/{child}")
                _keep_owner_mode(dfd, st)
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def _copy_file(self, src_dir: int, src: str, dst_dir: int, dst_name: str,
                   st: os.stat_result, shown_src: str) -> None:
        sfd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=src_dir)  # O_NONBLOCK: swapped for a FIFO, it must not wait
        try:
            if not stat.S_ISREG(os.fstat(sfd).st_mode):
                self.error(f"'{shown_src}': not copied (not a file, directory or link)")
                return
            os.set_blocking(sfd, True)
            self.beneath.check_fd(shown_src, sfd)
            try:
                existing = os.stat(dst_name, dir_fd=dst_dir, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if os.path.samestat(existing, os.fstat(sfd)):
                    self.error(f"'{shown_src}' and the destination are the same file")
                    return
            dfd = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=dst_dir)
            try:
                while os.sendfile(dfd, sfd, None, 1 << 24):
                    pass
                _keep_owner_mode(dfd, st)
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)


def _keep_owner_mode(fd: int, st: os.stat_result) -> None:
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except OSError:
        pass
    os.fchmod(fd, stat.S_IMODE(st.st_mode))


def _keep_times(dir_fd: int, name: str, st: os.stat_result, follow: bool) -> None:
    try:
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd,
                 follow_symlinks=follow)
    except OSError:
        pass


class StatFile(_OSErrorReporting):
    header = "stat"
    required_args = ("path",)

    def run(self) -> None:
        path = self.arg_str("path")
        try:
            if self.beneath is not None:
                fd = self.beneath.open(path, paths.O_PATH)
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
            else:
                st = os.stat(path)
        except OSError as e:
            self.fail(e, path)
            return
        self.channel.update([("stat", tuple(int(v) for v in tuple(st))), ("rc", 0)])


class GlobPath(_OSErrorReporting):
    header = "glob"
    required_args = ("path",)

    def run(self) -> None:
        path = self.arg_str("path")
        try:
            if self.beneath is not None:
                files = _glob_beneath(self.beneath, path, self._tick)
            else:
                files = _bounded(Globber(tick=self._tick).glob(path), path)
        except OSError as e:
            self.fail(e, path)
            return
        self.channel.update([("files", files), ("rc", 0)])

    def _tick(self) -> None:
        self.channel.check_interrupt("globbing")


#: Most matches one ``glob`` returns: past it the command fails (a tree of links that does
#: not loop can still multiply paths beyond any use).
MAX_GLOB_MATCHES = 1_000_000


def _bounded(matches: Iterator[str], pattern: str) -> list[str]:
    """The matches as a list, failing the command past :data:`MAX_GLOB_MATCHES`."""
    files = list(itertools.islice(matches, MAX_GLOB_MATCHES + 1))
    if len(files) > MAX_GLOB_MATCHES:
        raise CommandError(f"glob: more than {MAX_GLOB_MATCHES} matches for '{pattern}'")
    return files


class ListDir(_OSErrorReporting):
    header = "listdir"
    required_args = ("path",)

    def run(self) -> None:
        path = self.arg_str("path")
        try:
            if self.beneath is not None:
                fd = self.beneath.open(path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    files = os.listdir(fd)
                finally:
                    os.close(fd)
            else:
                files = os.listdir(path)
        except OSError as e:
            self.fail(e, path)
            return
        self.channel.update([("files", files), ("rc", 0)])


class RemoveFile(_OSErrorReporting):
    header = "rmfile"
    required_args = ("path",)

    def run(self) -> None:
        path = self.arg_str("path")
        try:
            if self.beneath is not None:
                dir_fd, name = self.beneath.locate(path, follow_last=False)
                try:
                    if name is None:
                        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
                    os.unlink(name, dir_fd=dir_fd)
                finally:
                    os.close(dir_fd)
            else:
                os.remove(path)
        except OSError as e:
            self.fail(e, path)
            return
        self.channel.update([("rc", 0)])


def _glob_beneath(beneath: paths.Beneath, pattern: str, tick: Callable[[], None]
                  ) -> list[str]:
    """``glob.glob(pattern, recursive=True)`` run from the root's fd. The pattern's literal
    directory part must resolve beneath the root (else refused, as any path); ``**`` does
    not follow a link out of the root, and results that resolve outside the root (or to the
    worker's own files) are dropped."""
    rel = beneath.relative(pattern)
    prefix = pattern[: len(pattern) - len(rel)]
    if not rel.strip("/"):
        return [pattern] if os.path.isabs(pattern) else []
    literal: list[str] = []
    for part in rel.split("/")[:-1]:
        if glob.has_magic(part):
            break
        literal.append(part)
    if literal:
        try:  # PathRefused goes up: the command fails
            fd, _ = beneath.locate("/".join(literal))
        except OSError:
            return []  # no such directory: glob finds nothing
        os.close(fd)
    root = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=beneath.root_fd)
    try:
        globber = Globber(root, tick=tick, follow=_inside(beneath))
        found = _bounded(globber.glob(rel, pattern), pattern)
    finally:
        os.close(root)
    kept = []
    for name in found:
        try:
            fd, _ = beneath.locate(name)
        except paths.PathRefused:
            continue
        except OSError:
            pass  # inside, but broken (a loop, a dangling link): glob lists it too
        else:
            os.close(fd)
        kept.append(prefix + name)
    return kept


def _inside(beneath: paths.Beneath) -> Callable[[str], bool]:
    """Whether ``**`` may enter a linked directory (a path relative to the root): only if
    it resolves beneath the root."""
    def follow(rel: str) -> bool:
        try:
            fd, _ = beneath.locate(rel)
        except paths.PathRefused:
            return False
        except OSError:
            return True  # broken: listing it finds nothing
        os.close(fd)
        return True
    return follow
