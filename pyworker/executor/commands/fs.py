"""File-system commands: ``mkdir``, ``rmdir``, ``cpdir``, ``stat``, ``glob``, ``listdir``,
``rmfile`` (PROTOCOL.md section 3.5), with the reference's updates, errors and ``rc`` rules.

Failures are reported the reference's way: a header ``<command>: <strerror>: <path>`` (no
newline, so it reaches the log after ``rc``) and ``rc = errno``.
"""

from __future__ import annotations

import glob
import os

from pyworker.executor.commands.base import Command
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
                if not os.path.isdir(path):
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
        rc = 0
        for path in self.arg_paths("paths"):
            result = self.tool(["rm", "-rf", path])
            if result != 0 and self.channel.running:
                self.tool(["chmod", "-Rf", "u+rwx", path])
                result = self.tool(["rm", "-rf", path])
            if result != 0:
                rc = result
        self.channel.update([("rc", rc)])


class CopyDirectory(_ToolCommand):
    required_args = ("from_path", "to_path")

    def run(self) -> None:
        from_path = self.arg_str("from_path")
        to_path = self.arg_str("to_path")
        parent = os.path.dirname(to_path)
        if parent and not os.path.exists(parent):
            os.makedirs(parent)
        rc = self.tool(["cp", "-R", "-P", "-p", "-v", from_path, to_path])
        self.channel.update([("rc", rc)])


class StatFile(_OSErrorReporting):
    header = "stat"
    required_args = ("path",)

    def run(self) -> None:
        path = self.arg_str("path")
        try:
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
            files = glob.glob(path, recursive=True)
        except OSError as e:
            self.fail(e, path)
            return
        self.channel.update([("files", files), ("rc", 0)])


class ListDir(_OSErrorReporting):
    header = "listdir"
    required_args = ("path",)

    def run(self) -> None:
        path = self.arg_str("path")
        try:
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
            os.remove(path)
        except OSError as e:
            self.fail(e, path)
            return
        self.channel.update([("rc", 0)])
