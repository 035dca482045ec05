"""The commands this worker offers, as both processes know them.

The front end reports these names and versions to the master (``getCommands``,
``worker_commands``) and refuses any other name; the executor's registry
(:mod:`pyworker.executor.commands.registry`) maps each one to the class that runs it. This
module is shared by both sides and imports nothing of pyworker, so the front end never needs
the executor's code to know what it can run.
"""

from __future__ import annotations

from typing import Final

#: The version we report for every command (the reference 4.3.0 reports ``'3.3'`` for all).
COMMAND_VERSION: Final = "3.3"

#: Every name the reference worker 4.3.0 registers; the master picks steps by this list.
#: The snake_case names are the msgpack protocol's spellings of the transfer commands.
COMMAND_NAMES: Final = (
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

#: ``worker_commands`` as the reference reports it: every name at version 3.3.
WORKER_COMMANDS: Final = {name: COMMAND_VERSION for name in COMMAND_NAMES}

#: Arguments that are references to master objects (PB), never sent to an executor.
REFERENCE_ARGS: Final = ("writer", "reader")
