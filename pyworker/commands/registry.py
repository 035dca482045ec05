"""Command name -> class, and the versions we report to the master (all ``'3.3'``).

The snake_case names are the msgpack protocol's spellings of the same commands.
"""

from __future__ import annotations

from pyworker.commands import fs, shell, transfer
from pyworker.commands.base import Command

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

COMMAND_VERSION = "3.3"

#: Every name the reference worker 4.3.0 registers; the master picks steps by this list.
REFERENCE_COMMANDS = (
    "shell",
    "uploadFile",
    "upload_file",
    "uploadDirectory",
    "upload_directory",
    "downloadFile",
    "download_file",
    "mkdir",
    "rmdir",
    "cpdir",
    "stat",
    "glob",
    "listdir",
    "rmfile",
)
