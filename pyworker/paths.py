"""Paths beneath a root, resolved at the moment they are used (``restrict_paths``).

A worker created with ``--restrict-paths`` must never let its master act on anything outside
its basedir, nor on the worker's own files in it. Checking a path string and using it later
is not enough: between the two a command (a background process of an earlier step) can swap
a checked directory for a symlink that leads out. So nothing here returns a checked *string*:
:class:`Beneath` resolves a path to an open directory fd and the name of the last component
in it (:meth:`Beneath.locate`), and callers act relative to that fd (``dir_fd=``, ``os.fstat``,
``/proc/self/fd/N`` as a child's cwd). No path string is resolved again after the check.

Resolution, from an ``O_PATH`` fd on the root:

* ``openat2(2)`` with ``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`` resolves the directory part
  in one call where the kernel has it (Linux 5.6+). It refuses absolute symlinks even when
  they point back inside, and it cannot tell us where a final symlink leads, so those cases
  (``EXDEV``, ``ELOOP``, ``EAGAIN``, a final symlink to follow) go to the walk below, which
  is the authority on what is refused;
* elsewhere (``ENOSYS``, or ``EPERM`` under a seccomp filter; or ``PYWORKER_NO_OPENAT2`` set
  in the environment, for tests) and in those cases, a
  component-by-component walk: each component is opened with ``O_PATH | O_NOFOLLOW`` relative
  to the directory fd before it; a symlink is read through its own fd and its target walked
  in turn (a relative one from where it is, an absolute one only if it names a place in the
  root); ``..`` pops the stack of directory fds and is refused at the root.

Symlinks that stay inside the root are followed, as the kernel would; any step out of it
raises :class:`PathRefused`. The worker's own files (``protected`` names in the root, and
everything beneath a protected directory) are refused as targets whatever route leads to
them, hard links included: the check compares the identity (device, inode) of what was
reached with theirs, and a new entry may not be made with a protected name in the root.

This module imports nothing of pyworker: the executor uses it for command paths, the front
end for builder directories.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import stat
from collections.abc import Iterable

O_PATH = getattr(os, "O_PATH", 0o10000000)
SYS_OPENAT2 = 437  # the same number on every architecture (new-style syscall table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
MAX_LINKS = 40  # the kernel's MAXSYMLINKS
#: Entries below a protected directory that are recorded by identity (the rest: refused by
#: their directory's identity, which covers new entries too).
MAX_PROTECTED_ENTRIES = 10_000

#: The worker's own files in its basedir (``fnmatch`` patterns).
WORKER_FILES = ("buildbot.tac", "info", "twistd.pid", "twistd.log", "twistd.log.*",
                "shutdown.stamp")


class PathRefused(Exception):
    """A path leads outside the root, or to one of the worker's own files."""


def refused_outside(path: str, root: str) -> PathRefused:
    return PathRefused(
        f"path {path!r} is outside the worker's basedir {root!r} "
        f"(refused: the worker runs with restrict_paths)"
    )


def refused_protected(path: str, root: str) -> PathRefused:
    return PathRefused(
        f"path {path!r} is one of the worker's own files in its basedir {root!r} "
        f"(refused: the worker runs with restrict_paths)"
    )


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc: ctypes.CDLL | None = None
#: None: not tried yet; False: this kernel (or its seccomp filter) has no openat2.
_have_openat2: bool | None = None


def openat2_available() -> bool:
    """Whether ``openat2`` works here (tried once, on a harmless call)."""
    global _have_openat2
    if os.environ.get("PYWORKER_NO_OPENAT2"):  # tests and diagnosis: force the walk
        return False
    if _have_openat2 is None:
        try:
            os.close(openat2(-100, "/", O_PATH | os.O_DIRECTORY, 0))  # AT_FDCWD
            _have_openat2 = True
        except OSError:
            _have_openat2 = False
    return _have_openat2


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    """The raw ``openat2`` syscall (``O_CLOEXEC`` added); raises OSError."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd),
                       ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return int(fd)


#: openat2 errors after which the walk decides (escapes, absolute links, races, loops).
_WALK_DECIDES = {errno.EXDEV, errno.ELOOP, errno.EAGAIN}
#: openat2 errors that mean it cannot be used at all here.
_NO_OPENAT2 = {errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG}


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


class Beneath:
    """A root directory (opened once) and the policy for paths beneath it.

    ``use_openat2=False`` forces the walk (tests; kernels without ``openat2``).
    Every fd this returns is the caller's to close.
    """

    def __init__(self, root: str, protected: Iterable[str] = (), *,
                 use_openat2: bool | None = None) -> None:
        self.root = os.path.abspath(root)
        self.real_root = os.path.realpath(root)
        self.protected = tuple(protected)
        self.root_fd = os.open(self.root, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.root_id = _identity(os.fstat(self.root_fd))
        self.use_openat2 = openat2_available() if use_openat2 is None else use_openat2
        self._protected_ids: set[tuple[int, int]] | None = None

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> Beneath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- path strings --------------------------------------------------------------------

    def relative(self, path: str) -> str:
        """``path`` relative to the root: an absolute path must name a place in the root
        (spelt as configured or resolved); a relative one is taken from the root."""
        if not os.path.isabs(path):
            return path
        for prefix in (self.root, self.real_root):
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return path[len(prefix):].lstrip("/")
        raise refused_outside(path, self.root)

    # -- resolution ----------------------------------------------------------------------

    def locate(self, path: str, *, follow_last: bool = True,
               create_dirs: bool = False) -> tuple[int, str | None]:
        """``(dir_fd, name)``: the open directory holding the last component of ``path``
        and that component's name (``None`` when the path names the directory itself, as
        the root, ``x/..`` or ``x/.`` do).

        Symlinks before the last component are followed (inside the root); the last one
        too if ``follow_last``. ``create_dirs`` makes missing directories on the way (not
        the last component). The name may not exist. Raises :class:`PathRefused` for a way
        out or a protected target, OSError for the rest (ENOENT, ENOTDIR, ELOOP...).
        """
        rel = self.relative(path)
        located: tuple[int, str | None] | None = None
        if self.use_openat2:
            located = self._locate_openat2(rel, follow_last, create_dirs)
        if located is None:
            located = self._walk(path, rel, follow_last=follow_last, create_dirs=create_dirs)
        try:
            self.check(path, *located)
        except BaseException:
            os.close(located[0])
            raise
        return located

    def _locate_openat2(self, rel: str, follow_last: bool,
                        create_dirs: bool) -> tuple[int, str | None] | None:
        """The fast path; None when the walk must decide."""
        parts = [c for c in rel.split("/") if c not in ("", ".")]
        if parts and parts[-1] != "..":
            head, name = "/".join(parts[:-1]) or ".", parts[-1]
        else:
            head, name = "/".join(parts) or ".", None
        try:
            dir_fd = openat2(self.root_fd, head, O_PATH | os.O_DIRECTORY,
                             RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        except OSError as e:
            if e.errno in _NO_OPENAT2:
                self.use_openat2 = False
                return None
            if e.errno in _WALK_DECIDES or (create_dirs and e.errno == errno.ENOENT):
                return None
            raise
        if name is not None and follow_last:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                st = None
            if st is not None and stat.S_ISLNK(st.st_mode):
                os.close(dir_fd)
                return None
        return dir_fd, name

    def _walk(self, path: str, rel: str, *, follow_last: bool,
              create_dirs: bool) -> tuple[int, str | None]:
        stack = [os.dup(self.root_fd)]
        todo = [c for c in rel.split("/") if c not in ("", ".")]
        links = 0
        try:
            while todo:
                comp = todo.pop(0)
                if comp == "..":
                    if len(stack) == 1:
                        raise refused_outside(path, self.root)
                    os.close(stack.pop())
                    continue
                last = not todo
                if last and not follow_last:
                    return self._done(stack, comp)
                try:
                    fd = os.open(comp, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
                except FileNotFoundError:
                    if last:
                        return self._done(stack, comp)
                    if not create_dirs:
                        raise
                    self.check(path, stack[-1], comp)
                    try:
                        os.mkdir(comp, dir_fd=stack[-1])
                    except FileExistsError:
                        pass
                    todo.insert(0, comp)  # open it (whatever is there now) next round
                    continue
                st = os.fstat(fd)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    try:
                        target = os.readlink("", dir_fd=fd)
                    finally:
                        os.close(fd)
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    if target.startswith("/"):
                        try:
                            target = self.relative(target)
                        except PathRefused:
                            raise refused_outside(path, self.root) from None
                        while len(stack) > 1:
                            os.close(stack.pop())
                    todo[:0] = [c for c in target.split("/") if c not in ("", ".")]
                    if not todo:
                        return self._done(stack, None)  # a link to the root itself
                    continue
                if last:
                    os.close(fd)
                    return self._done(stack, comp)
                if not stat.S_ISDIR(st.st_mode):
                    os.close(fd)
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
                stack.append(fd)
            return self._done(stack, None)
        except BaseException:
            for fd in stack:
                os.close(fd)
            raise

    @staticmethod
    def _done(stack: list[int], name: str | None) -> tuple[int, str | None]:
        top = stack.pop()
        for fd in stack:
            os.close(fd)
        stack.clear()
        return top, name

    # -- the worker's own files ----------------------------------------------------------

    def protected_ids(self) -> set[tuple[int, int]]:
        """Identities of the protected entries of the root and of everything below the
        protected directories (not following links), found once."""
        if self._protected_ids is None:
            ids: set[tuple[int, int]] = set()
            listing_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                 dir_fd=self.root_fd)
            try:
                names = os.listdir(listing_fd)
            finally:
                os.close(listing_fd)
            for name in names:
                if self.is_protected_name(name):
                    self._record(self.root_fd, name, ids)
            self._protected_ids = ids
        return self._protected_ids

    def _record(self, dir_fd: int, name: str, ids: set[tuple[int, int]]) -> None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return
        ids.add(_identity(st))
        if not stat.S_ISDIR(st.st_mode) or len(ids) > MAX_PROTECTED_ENTRIES:
            return
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError:
            return
        try:
            for child in os.listdir(fd):
                self._record(fd, child, ids)
        finally:
            os.close(fd)

    def is_protected_name(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.protected)

    def check(self, path: str, dir_fd: int, name: str | None) -> None:
        """Refuse ``name`` in ``dir_fd`` (or the directory itself) if it is the worker's."""
        if not self.protected:
            return
        dir_id = _identity(os.fstat(dir_fd))
        ids = self.protected_ids()
        if dir_id in ids:
            raise refused_protected(path, self.root)
        if name is None:
            return
        if dir_id == self.root_id and self.is_protected_name(name):
            raise refused_protected(path, self.root)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return
        if _identity(st) in ids:
            raise refused_protected(path, self.root)

    def check_fd(self, path: str, fd: int) -> None:
        """Refuse an opened object that is one of the worker's files (a hard link to one)."""
        if self.protected and _identity(os.fstat(fd)) in self.protected_ids():
            raise refused_protected(path, self.root)

    # -- operations ----------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o777, *,
             follow_last: bool = True) -> int:
        """Open ``path`` beneath the root (``O_NOFOLLOW`` on the last component, which
        was resolved already: a link swapped in since fails with ELOOP, and we try again)."""
        for _ in range(3):
            dir_fd, name = self.locate(path, follow_last=follow_last)
            try:
                if name is None:
                    if flags & (os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_RDWR):
                        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
                    fd = os.open(".", flags | os.O_CLOEXEC, dir_fd=dir_fd)
                else:
                    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                                 dir_fd=dir_fd)
            except OSError as e:
                if e.errno == errno.ELOOP and follow_last:
                    continue
                raise
            finally:
                os.close(dir_fd)
            try:
                self.check_fd(path, fd)
            except BaseException:
                os.close(fd)
                raise
            return fd
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)

    def open_dir(self, path: str) -> int:
        """An ``O_PATH`` fd on the directory ``path``."""
        return self.open(path, O_PATH | os.O_DIRECTORY)

    def makedirs(self, path: str) -> int:
        """``os.makedirs(path, exist_ok=True)`` beneath the root; an ``O_PATH`` fd on it."""
        for _ in range(3):
            dir_fd, name = self.locate(path, create_dirs=True)
            try:
                if name is None:
                    return os.dup(dir_fd)
                try:
                    os.mkdir(name, dir_fd=dir_fd)
                except FileExistsError:
                    pass
                try:
                    fd = os.open(name, O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=dir_fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(dir_fd, name):
                        continue  # a link (now): follow it on the next round
                    raise
                return fd
            finally:
                os.close(dir_fd)
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def proc_path(fd: int, name: str | None = None) -> str:
    """``/proc/self/fd/N[/name]``: the open directory ``fd`` (and one entry in it) as a path
    string that does not depend on where the directory is (for a child's cwd, a tool)."""
    base = f"/proc/self/fd/{fd}"
    return base if name is None else f"{base}/{name}"
