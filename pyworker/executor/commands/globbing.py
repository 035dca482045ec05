"""``glob.glob(pattern, recursive=True)`` that a link loop cannot blow up, for ``glob``.

The results and their order are those of the standard library's ``glob`` (Python 3.11) on
any tree without a loop: the same walk in ``scandir`` order, the same hidden-name and
trailing-slash rules. Where ``**`` would descend into a directory that is already on the
path being walked (``a/l1 -> ..``: the standard ``glob`` goes round such a loop until
``ELOOP``, and two of them multiply), the link is listed but not entered, as ``find -L``
does. :class:`Globber` also calls ``tick`` every :data:`TICK_EVERY` directory entries, so
that a long walk can be interrupted, and ``follow`` before entering a linked directory (a
policy can keep the walk beneath a root).

Paths are strings; with ``dir_fd`` they are relative to that directory (``glob``'s
``dir_fd``).
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from glob import has_magic

#: Directory entries between two calls of :attr:`Globber.tick`.
TICK_EVERY = 256

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _nothing() -> None:
    pass


def _always(path: str) -> bool:
    return True


class Globber:
    """One ``glob`` call: ``Globber(dir_fd, ...).glob(pattern)``."""

    def __init__(self, dir_fd: int | None = None, *, tick: Callable[[], None] = _nothing,
                 follow: Callable[[str], bool] = _always) -> None:
        self.dir_fd = dir_fd
        self.tick = tick
        self.follow = follow
        self._entries = 0

    def glob(self, pathname: str, whole: str | None = None) -> Iterator[str]:
        """The matches of ``pathname`` (``**`` recursive), lazily, in ``glob``'s order.

        ``whole``: the pattern ``pathname`` is the end of (the part relative to ``dir_fd``),
        whose start decides whether an empty match is dropped (``glob`` drops it when the
        pattern starts with ``**``)."""
        it = self._iglob(pathname, "", False)
        whole = pathname if whole is None else whole
        if not whole or _isrecursive(whole[:2]):
            for s in it:  # skip the empty string
                if s:
                    yield s
                break
        yield from it

    def _iglob(self, pathname: str, root: str, dironly: bool) -> Iterator[str]:
        dirname, basename = os.path.split(pathname)
        if not has_magic(pathname):
            if basename:
                if self._lexists(_join(root, pathname)):
                    yield pathname
            elif self._isdir(_join(root, dirname)):
                yield pathname  # a pattern ending with a slash matches only directories
            return
        if not dirname:
            if _isrecursive(basename):
                yield from self._glob2(root, dironly)
            else:
                yield from self._glob1(root, basename, dironly)
            return
        dirs: Iterable[str]
        if dirname != pathname and has_magic(dirname):
            dirs = self._iglob(dirname, root, True)
        else:
            dirs = [dirname]
        for d in dirs:
            here = _join(root, d)
            if not has_magic(basename):
                names: Iterable[str] = self._glob0(here, basename)
            elif _isrecursive(basename):
                names = self._glob2(here, dironly)
            else:
                names = self._glob1(here, basename, dironly)
            for name in names:
                yield os.path.join(d, name)

    def _glob0(self, dirname: str, basename: str) -> list[str]:
        if basename:
            if self._lexists(_join(dirname, basename)):
                return [basename]
        elif self._isdir(dirname):
            return [basename]
        return []

    def _glob1(self, dirname: str, pattern: str, dironly: bool) -> list[str]:
        names: Iterable[str] = (name for name, _, _ in self._listdir(dirname, dironly))
        if not _ishidden(pattern):
            names = (x for x in names if not _ishidden(x))
        return fnmatch.filter(names, pattern)

    def _glob2(self, dirname: str, dironly: bool) -> Iterator[str]:
        yield ""
        here = self._identity(dirname or ".")
        yield from self._rlistdir(dirname, dironly, {here} if here is not None else set())

    def _rlistdir(self, dirname: str, dironly: bool,
                  ancestors: set[tuple[int, int]]) -> Iterator[str]:
        """Every name below ``dirname``, pre-order; ``ancestors``: the directories on the
        path walked so far (``(st_dev, st_ino)``), never entered again."""
        for x, ident, linked in self._listdir(dirname, dironly, identify=True):
            if _ishidden(x):
                continue
            yield x
            path = _join(dirname, x)
            if ident is None or ident in ancestors:
                continue  # not a directory, or a loop back to one being walked
            if linked and not self.follow(path):
                continue
            ancestors.add(ident)
            try:
                for y in self._rlistdir(path, dironly, ancestors):
                    yield _join(x, y)
            finally:
                ancestors.discard(ident)

    def _listdir(self, dirname: str, dironly: bool, identify: bool = False
                 ) -> list[tuple[str, tuple[int, int] | None, bool]]:
        """The names in ``dirname`` (only directories with ``dironly``), in scandir order;
        none if it cannot be listed. With each: with ``identify``, the identity of the
        directory it leads to (None if not a directory), and whether it is a link."""
        found: list[tuple[str, tuple[int, int] | None, bool]] = []
        fd = None
        try:
            arg: int | str
            if self.dir_fd is not None:
                if dirname:
                    fd = arg = os.open(dirname, _DIR_FLAGS, dir_fd=self.dir_fd)
                else:
                    arg = self.dir_fd
            else:
                arg = dirname or os.curdir
            with os.scandir(arg) as it:
                for entry in it:
                    self._entries += 1
                    if self._entries % TICK_EVERY == 0:
                        self.tick()
                    try:
                        if not dironly or entry.is_dir():
                            ident = _dir_identity(entry) if identify else None
                            found.append((entry.name, ident, ident is not None
                                          and entry.is_symlink()))
                    except OSError:
                        pass
        except OSError:
            return []
        finally:
            if fd is not None:
                os.close(fd)
        return found

    def _identity(self, path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path, dir_fd=self.dir_fd)
        except (OSError, ValueError):
            return None
        return (st.st_dev, st.st_ino)

    def _lexists(self, path: str) -> bool:
        try:
            os.lstat(path, dir_fd=self.dir_fd)
        except (OSError, ValueError):
            return False
        return True

    def _isdir(self, path: str) -> bool:
        try:
            st = os.stat(path, dir_fd=self.dir_fd)
        except (OSError, ValueError):
            return False
        return stat.S_ISDIR(st.st_mode)


def _dir_identity(entry: os.DirEntry[str]) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the directory ``entry`` leads to (links followed), or None."""
    try:
        if not entry.is_dir():
            return None
        st = entry.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _join(dirname: str, basename: str) -> str:
    if not dirname or not basename:
        return dirname or basename
    return os.path.join(dirname, basename)


def _ishidden(path: str) -> bool:
    return path[0] == "."


def _isrecursive(pattern: str) -> bool:
    return pattern == "**"
