"""Command name -> the class that runs it in an executor.

The names are those of :mod:`pyworker.commandset` (a test checks that both agree); the
snake_case names are the msgpack protocol's spellings of the transfer commands.
"""

from __future__ import annotations

from pyworker.executor.commands import fs, shell, transfer
from pyworker.executor.commands.base import Command

COMMANDS: dict[str, type[Command]] = {
    "shell": shell.ShellCommand,
    "mkdir": fs.MakeDirectory,
    "rmdir": fs.RemoveDirectory,
    "cpdir": fs.CopyDirectory,
    "stat": fs.StatFile,
    "glob": fs.GlobPath,
    "listdir": fs.ListDir,
    "rmfile": fs.RemoveFile,
    **transfer.COMMANDS,
}
