"""What every command has: its arguments, the channel to the front end, argument checks, and
the path policy (``restrict_paths``) its paths go through."""

from __future__ import annotations

import os
import stat
from typing import Any, ClassVar

from pyworker import paths
from pyworker.executor.channel import Channel, CommandError


class Command:
    """One run of one command. Subclasses implement :meth:`run` and list ``required_args``."""

    required_args: ClassVar[tuple[str, ...]] = ()

    def __init__(self, channel: Channel, request: dict[str, Any]) -> None:
        self.channel = channel
        self.args: dict[str, Any] = request["args"]
        self.basedir: str = request["basedir"]
        self.command_id: str = request.get("command_id", "")
        self.io: dict[str, Any] = request.get("io", {})
        #: One line on what the command did, for the worker log next to its resource use.
        self.usage_note: str | None = None
        missing = [a for a in self.required_args if a not in self.args]
        if missing:
            raise CommandError(f"{type(self).__name__} is missing args: {', '.join(missing)}")
        #: ``restrict_paths``: every path this command opens is resolved beneath the root
        #: (and never to one of the worker's own files); None: paths are used as given.
        #: Opened when first used (:attr:`beneath`), closed by :meth:`close`.
        self.restrict: dict[str, Any] | None = request.get("restrict") or None
        self._beneath: paths.Beneath | None = None

    @property
    def beneath(self) -> paths.Beneath | None:
        if self.restrict is not None and self._beneath is None:
            self._beneath = paths.Beneath(self.restrict["root"],
                                          self.restrict.get("protected", ()))
        return self._beneath

    def close(self) -> None:
        """Release what the command holds beyond its run (the policy's root fd)."""
        if self._beneath is not None:
            self._beneath.close()
            self._beneath = None

    def run(self) -> None:
        raise NotImplementedError

    # -- argument access with readable errors ----------------------------------------------

    def arg_str(self, name: str, default: Any = None, allow_none: bool = False) -> Any:
        value = self.args.get(name, default)
        if value is None and allow_none:
            return None
        if not isinstance(value, str):
            raise CommandError(f"argument '{name}' must be a string, not {_kind(value)}")
        return value

    def arg_number(self, name: str, default: Any = None) -> float | int | None:
        value = self.args.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CommandError(f"argument '{name}' must be a number or None, not {_kind(value)}")
        return value

    def arg_bool(self, name: str, default: bool) -> bool:
        value = self.args.get(name, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return bool(value)
        raise CommandError(f"argument '{name}' must be a boolean, not {_kind(value)}")

    def arg_paths(self, name: str) -> list[str]:
        value = self.args.get(name)
        if isinstance(value, str):
            return [value]
        if isinstance(value, list | tuple) and all(isinstance(p, str) for p in value):
            return list(value)
        raise CommandError(f"argument '{name}' must be a string or a list of strings")


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"


class NotRegularFile(OSError):
    """A path to read is a FIFO, a device, a directory or a socket: it is not read."""

    def __init__(self, path: str, mode: int) -> None:
        self.kind = _file_kind(mode)
        super().__init__(f"'{path}' is not a regular file ({self.kind})")


def open_regular(path: str, beneath: paths.Beneath | None = None) -> int:
    """An fd open for reading on ``path`` if it is a regular file (links followed; beneath
    the root with ``beneath``), else :class:`NotRegularFile`. The open never blocks
    (``O_NONBLOCK``: a FIFO's would wait for a writer); the fd returned is blocking."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    fd = beneath.open(path, flags) if beneath is not None else os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for messages: ``a FIFO``, ..."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a file"
