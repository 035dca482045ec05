"""The ``pyworker`` command line, compatible with ``buildbot-worker`` 4.3.0.

Sub-commands ``create-worker``, ``start``, ``stop``, ``restart`` take the same options
(parsed with Twisted's getopt-based ``usage.Options``, as the reference does) and print
the same messages with the same exit codes; ``bench`` runs ``pyworker.bench.profiler``.
``create-worker`` lives here; process management is in :mod:`pyworker.cli.daemon`.
"""

from __future__ import annotations

import grp
import importlib
import io
import os
import pwd
import re
import stat
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn

from twisted.python import usage

from pyworker.cli.tac import CreateWorkerError, TacOptions, make_tac, write_tac
from pyworker.config import REFERENCE_VERSION, SETTINGS, SettingError

PROG = "pyworker"
_NUMBER_OR_NONE = re.compile(r"^((0o)\d+|0|[1-9]\d*)$")


class MakerBase(usage.Options):
    """Common to the sub-commands that work on a worker directory."""

    optFlags: list[list[str | None]] = [
        ["help", "h", "Display this message"],
        ["quiet", "q", "Do not emit the commands being run"],
    ]
    longdesc = textwrap.dedent(
        """
    Operates upon the specified <basedir> (or the current directory, if not
    specified).
    """
    )
    opt_h = usage.Options.opt_help

    def parseArgs(self, *args: str) -> None:
        self["basedir"] = args[0] if args else os.getcwd()
        if len(args) > 1:
            raise usage.UsageError("I wasn't expecting so many arguments")

    def postOptions(self) -> None:
        self["basedir"] = os.path.abspath(self["basedir"])


class StartOptions(MakerBase):
    optFlags = [
        ["quiet", "q", "Don't display startup log messages"],
        ["nodaemon", None, "Don't daemonize (stay in foreground)"],
    ]
    optParameters = [
        [
            "logfile",
            "l",
            None,
            "Log to this file instead of <basedir>/twistd.log ('-' for stdout, with "
            "--nodaemon only), as twistd's --logfile; rotated as twistd.log",
        ],
    ]

    def getSynopsis(self) -> str:
        return f"Usage:    {PROG} start [--nodaemon] [--logfile <file>|-] [<basedir>]"

    def postOptions(self) -> None:
        MakerBase.postOptions(self)
        if self["logfile"] == "":
            raise usage.UsageError("--logfile needs a file name, or '-' for stdout")
        if self["logfile"] not in (None, "-"):
            self["logfile"] = os.path.abspath(self["logfile"])


_STOP_LONGDESC = """
    Stopping: by default the worker stops immediately (it is sent SIGTERM, as
    buildbot-worker's stop does): running commands are killed with their processes and
    the master retries their builds; stop waits up to 10 seconds for the process to go
    away, with the same messages as buildbot-worker.

    With --graceful the worker is sent SIGUSR2 and drains: it asks the master for a
    worker-initiated shutdown, takes no new builds, lets the running ones finish and
    then exits (at once if it is idle, not connected or on the msgpack protocol). stop
    waits until the process is gone, printing a line every 30 seconds while it drains;
    --timeout N gives up waiting after N seconds (exit 1, the worker keeps draining).
    Running `stop --graceful` again only waits again; a plain `stop` during a drain
    stops the worker immediately.

    Signals: SIGTERM, SIGINT or SIGQUIT = immediate stop; SIGUSR2 = graceful drain (for
    systemd's KillSignal= or an image's STOPSIGNAL); SIGHUP = graceful shutdown with
    --allow-shutdown=signal, as in buildbot-worker. Operates upon the specified
    <basedir> (or the current directory, if not specified).
    """


def _timeout_or_none(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        timeout = float(value)
    except ValueError as exc:
        raise usage.UsageError("timeout parameter needs to be a number of seconds") from exc
    if not timeout > 0:
        raise usage.UsageError("timeout parameter needs to be a positive number of seconds")
    return timeout


class StopOptions(MakerBase):
    optFlags = [
        ["quiet", "q", "Do not emit the commands being run"],
        [
            "graceful",
            None,
            "Let running builds finish and take no new ones, then exit (SIGUSR2); "
            "wait until the worker is gone",
        ],
    ]
    optParameters = [
        [
            "timeout",
            None,
            None,
            "With --graceful: give up waiting after this many seconds (default: no limit)",
        ],
    ]
    longdesc = textwrap.dedent(_STOP_LONGDESC)

    def getSynopsis(self) -> str:
        return f"Usage:    {PROG} stop [--graceful [--timeout N]] [<basedir>]"

    def postOptions(self) -> None:
        MakerBase.postOptions(self)
        self["timeout"] = _timeout_or_none(self["timeout"])


class RestartOptions(MakerBase):
    optFlags = [
        ["quiet", "q", "Don't display startup log messages"],
        ["nodaemon", None, "Don't daemonize (stay in foreground)"],
        [
            "graceful",
            None,
            "Stop the old worker gracefully: let its running builds finish first (SIGUSR2)",
        ],
    ]
    optParameters = [
        [
            "timeout",
            None,
            None,
            "With --graceful: give up (and do not start) after this many seconds",
        ],
    ]
    longdesc = textwrap.dedent(_STOP_LONGDESC)

    def getSynopsis(self) -> str:
        return f"Usage:    {PROG} restart [--graceful [--timeout N]] [<basedir>]"

    def postOptions(self) -> None:
        MakerBase.postOptions(self)
        self["timeout"] = _timeout_or_none(self["timeout"])


class CreateWorkerOptions(MakerBase):
    optFlags = [
        [
            "force",
            "f",
            "Re-use an existing directory; also accept a basedir (or the directory it is "
            "created in) that other users can write to or that another user owns",
        ],
        ["relocatable", "r", "Create a relocatable buildbot.tac"],
        ["no-logrotate", "n", "Do not permit buildmaster rotate logs by itself"],
        ["use-tls", None, "Uses TLS to connect to master"],
        [
            "delete-leftover-dirs",
            None,
            "Delete folders that are not required by the master on connection",
        ],
        # pyworker's own flags (pyworker.config.SETTINGS)
        *[[setting.option, None, setting.option_help]
          for setting in SETTINGS if setting.kind == "flag"],
    ]
    optParameters = [
        ["keepalive", "k", 600, "Interval at which keepalives should be sent (in seconds)"],
        [
            "umask",
            None,
            "None",
            "controls permissions of generated files. Use --umask=0o22 to be world-readable",
        ],
        ["maxdelay", None, 300, "Maximum time between connection attempts"],
        ["maxretries", None, "None", "Maximum number of retries before worker shutdown"],
        ["numcpus", None, "None", "Number of available cpus to use on a build. "],
        ["log-size", "s", "10000000", "size at which to rotate twisted log files"],
        [
            "log-count",
            "l",
            "10",
            "limit the number of kept old twisted log files (None for unlimited)",
        ],
        [
            "allow-shutdown",
            "a",
            None,
            "Allows the worker to initiate a graceful shutdown. One of 'signal' or 'file'",
        ],
        ["protocol", None, "pb", "Protocol to be used when creating master-worker connection"],
        [
            "connection-string",
            None,
            None,
            "Twisted endpoint connection string (this will override master host[:port])",
        ],
        ["proxy-connection-string", None, None, "Address of HTTP proxy to tunnel through"],
        # pyworker's own options with a value (pyworker.config.SETTINGS)
        *[
            [setting.option, None, None if setting.default is None else str(setting.default),
             setting.option_help]
            for setting in SETTINGS
            if setting.kind != "flag"
        ],
    ]
    longdesc = textwrap.dedent(
        """
    This command creates a buildbot worker directory and buildbot.tac
    file. The bot will use the <name> and <passwd> arguments to authenticate
    itself when connecting to the master. All commands are run in a
    build-specific subdirectory of <basedir>. <master> is a string of the
    form 'hostname[:port]', and specifies where the buildmaster can be reached.
    port defaults to 9989.

    The appropriate values for <name>, <passwd>, and <master> should be
    provided to you by the buildmaster administrator. You must choose <basedir>
    yourself.
    """
    )

    @staticmethod
    def validate_master(master_arg: str) -> tuple[str, int]:
        """Parse ``host[:port]`` / ``[v6addr]:port`` exactly like the reference."""
        if master_arg[:5] == "http:":
            raise usage.UsageError("<master> is not a URL - do not use URL")
        port: str | int
        if master_arg.startswith("[") and "]" in master_arg:
            master, port_tmp = master_arg.split("]")
            master = master[1:]
            port = 9989 if ":" not in port_tmp else port_tmp.split(":")[1]
        elif ":" not in master_arg:
            master, port = master_arg, 9989
        else:
            try:
                master, port = master_arg.split(":")
            except ValueError as exc:
                raise usage.UsageError(
                    f"invalid <master> argument '{master_arg}', "
                    "if it is an ipv6 address, it must be enclosed by []"
                ) from exc
        if not master:
            raise usage.UsageError(f"invalid <master> argument '{master_arg}'")
        try:
            return master, int(port)
        except ValueError as exc:
            raise usage.UsageError(f"invalid master port '{port}', needs to be a number") from exc

    def getSynopsis(self) -> str:
        return f"Usage:    {PROG} create-worker [options] <basedir> <master> <name> <passwd>"

    def parseArgs(self, *args: str) -> None:
        if len(args) != 4:
            raise usage.UsageError("incorrect number of arguments")
        basedir, master, name, passwd = args
        self["basedir"] = basedir
        self["host"], self["port"] = self.validate_master(master)
        self["name"] = name
        self["passwd"] = passwd

    def postOptions(self) -> None:
        MakerBase.postOptions(self)
        for argument in ("keepalive", "maxdelay", "log-size"):
            try:
                self[argument] = int(self[argument])
            except ValueError as exc:
                raise usage.UsageError(f"{argument} parameter needs to be a number") from exc
        for argument in ("log-count", "maxretries", "umask", "numcpus"):
            if not _NUMBER_OR_NONE.match(self[argument]) and self[argument] != "None":
                raise usage.UsageError(f"{argument} parameter needs to be a number or None")
        if self["allow-shutdown"] not in (None, "signal", "file"):
            raise usage.UsageError("allow-shutdown needs to be one of 'signal' or 'file'")
        for setting in SETTINGS:
            value = self[setting.option]
            if isinstance(value, str):
                value = setting.parse(value)
            try:
                self[setting.option] = setting.check(value)
            except SettingError as exc:
                raise usage.UsageError(f"{setting.option} {exc}") from exc


class BenchOptions(usage.Options):
    """Only for the command list in ``--help``: ``bench`` arguments go to the profiler."""

    def getSynopsis(self) -> str:
        return f"Usage:    {PROG} bench [bench options]"


class Options(usage.Options):
    longdesc = ""
    synopsis = f"Usage:    {PROG} <command> [command options]"
    subCommands = [
        [
            "create-worker",
            None,
            CreateWorkerOptions,
            "Create and populate a directory for a new worker",
        ],
        ["start", None, StartOptions, "Start a worker"],
        ["stop", None, StopOptions, "Stop a worker"],
        ["restart", None, RestartOptions, "Restart a worker"],
        ["bench", None, BenchOptions, "Run the pyworker benchmarks"],
    ]

    def opt_version(self) -> NoReturn:
        print(version_text(), end="")
        sys.exit(0)

    def opt_verbose(self) -> None:
        from twisted.python import log

        log.startLogging(sys.stderr)

    def postOptions(self) -> None:
        if not hasattr(self, "subOptions"):
            raise usage.UsageError("must specify a command")


def io_backend() -> str:
    """Name of the loaded I/O backend, or ``unavailable``."""
    try:
        return str(importlib.import_module("pyworker.iocore").BACKEND)
    except Exception:
        return "unavailable"


def version_text() -> str:
    """``--version``: the reference's two lines, then what this really is."""
    from twisted import copyright

    from pyworker.cli.daemon import _pyworker_version

    return (
        f"worker version: {REFERENCE_VERSION}\n"
        f"Twisted version: {copyright.version}\n"
        f"pyworker version: {_pyworker_version()}, io backend: {io_backend()}\n"
    )


# ---------------------------------------------------------------------------------------
# create-worker


def _private_group(gid: int) -> bool:
    """True if ``gid`` is the caller's own user-private group (umask 002 systems).

    That is: it is our primary group, and no other account has it as primary group or
    is listed as a member, so group write access gives nobody else a way in.
    """
    if gid != os.getegid():
        return False
    try:
        me = pwd.getpwuid(os.geteuid()).pw_name
        members = set(grp.getgrgid(gid).gr_mem)
        others = {p.pw_name for p in pwd.getpwall() if p.pw_gid == gid}
    except (KeyError, OSError):
        return False
    return members | others <= {me}


def unsafe_basedir(basedir: str) -> str | None:
    """Why ``basedir`` is not a safe place for a worker (its tac holds the password), or None.

    The directory checked is ``basedir`` if it exists, else the directory it would be
    created in. Unsafe: writable by group or others without the sticky bit (group write
    access is fine for the caller's own private group), or owned by someone other than
    the caller or root. Either way another account could replace ``buildbot.tac`` (and
    so run its own code as this worker) or read what the worker writes.
    """
    path = os.path.abspath(basedir)
    existing = os.path.exists(path)
    checked = path if existing else os.path.dirname(path)
    what = (
        f"the worker directory {checked}"
        if existing
        else (f"{checked}, the directory {path} would be created in")
    )
    try:
        st = os.stat(checked)
    except OSError:
        return None  # it cannot be created either; the usual error follows
    mode = stat.S_IMODE(st.st_mode)
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = f"uid {st.st_uid}"
        return (
            f"refusing to create a worker: {what} is owned by {owner}, not by the user "
            f"running create-worker (uid {euid}), who could change or read the worker's "
            "files including the password in buildbot.tac.\n"
            f"Fix: use a directory you own (or `chown` it), or pass --force to accept it."
        )
    writable = mode & (stat.S_IWOTH | stat.S_IWGRP)
    if mode & stat.S_IWGRP and not mode & stat.S_IWOTH and _private_group(st.st_gid):
        writable = 0
    if writable and not mode & stat.S_ISVTX:
        who = "others" if mode & stat.S_IWOTH else "its group"
        return (
            f"refusing to create a worker: {what} is writable by {who} "
            f"(mode {mode:04o}), so another user could replace buildbot.tac or the "
            "worker's files.\n"
            f"Fix: `chmod go-w {checked}`, or pass --force to accept it."
        )
    return None


def _make_basedir(basedir: str, quiet: bool) -> None:
    if os.path.exists(basedir):
        if not quiet:
            print("updating existing installation")
        return
    if not quiet:
        print("mkdir", basedir)
    try:
        os.mkdir(basedir)
    except OSError as exc:
        raise CreateWorkerError(f"error creating directory {basedir}") from exc


def _make_info_files(basedir: str, quiet: bool) -> None:
    path = os.path.join(basedir, "info")

    def create_file(name: str, contents: str) -> bool:
        filepath = os.path.join(path, name)
        if os.path.exists(filepath):
            return False
        if not quiet:
            print(f"Creating {os.path.join('info', name)}, you need to edit it appropriately.")
        try:
            with open(filepath, "w") as f:
                f.write(contents)
        except OSError as exc:
            raise CreateWorkerError(f"could not write {filepath}") from exc
        return True

    if not os.path.exists(path):
        if not quiet:
            print("mkdir", path)
        try:
            os.mkdir(path)
        except OSError as exc:
            raise CreateWorkerError(f"error creating directory {path}") from exc
    create_file("admin", "Your Name Here <admin@youraddress.invalid>\n")
    # As in the reference, only the last file decides the closing hint.
    created = create_file("host", "Please put a description of this build host here\n")
    if not os.path.exists(os.path.join(path, "access_uri")) and not quiet:
        print(f"Not creating {os.path.join('info', 'access_uri')} - add it if you wish")
    if created and not quiet:
        print(f"Please edit the files in {path} appropriately.")


def create_worker(config: dict[str, Any]) -> int:
    """``create-worker`` with parsed options (keys as the reference's Options)."""
    basedir: str = config["basedir"]
    quiet = bool(config["quiet"])
    opts = TacOptions(
        basedir=basedir,
        host=config["host"],
        port=config["port"],
        name=config["name"],
        passwd=config["passwd"],
        relocatable=bool(config["relocatable"]),
        no_logrotate=bool(config["no-logrotate"]),
        keepalive=config["keepalive"],
        umask=config["umask"],
        maxdelay=config["maxdelay"],
        numcpus=config["numcpus"],
        log_size=config["log-size"],
        log_count=config["log-count"],
        allow_shutdown=config["allow-shutdown"],
        maxretries=config["maxretries"],
        use_tls=bool(config["use-tls"]),
        delete_leftover_dirs=bool(config["delete-leftover-dirs"]),
        protocol=config["protocol"],
        connection_string=config["connection-string"],
        proxy_connection_string=config["proxy-connection-string"],
        settings={setting.name: config[setting.option] for setting in SETTINGS},
    )
    contents = make_tac(opts)
    if not config["force"]:
        problem = unsafe_basedir(basedir)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 1
    try:
        _make_basedir(basedir, quiet)
        write_tac(basedir, contents, quiet, sys.stdout)
        _make_info_files(basedir, quiet)
    except CreateWorkerError as exc:
        # The reference names '.' here for a relocatable tac (it rewrote its config).
        shown = "." if opts.relocatable else basedir
        print(f"{exc}\nfailed to configure worker in {shown}")
        return 1
    if not quiet:
        print(f"worker configured in {basedir}")
    return 0


# ---------------------------------------------------------------------------------------
# entry point


def run_bench(args: Sequence[str]) -> int:
    """``pyworker bench ...``: hand the remaining arguments to the profiler, with every
    scenario (those of ``pyworker.bench.scenarios`` included)."""
    from pyworker.bench import scenarios

    result = scenarios.main(list(args))
    return 0 if result is None else int(result)


def _sane_stdio() -> None:
    """Survive being spawned with closed descriptors, no locale and no environment."""
    for fd in range(3):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w"))
        elif isinstance(stream, io.TextIOWrapper):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, io.UnsupportedOperation):
                pass


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    _sane_stdio()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "bench":
        return run_bench(args[1:])

    config = Options()
    try:
        config.parseOptions(args)
    except usage.error as exc:
        print(f"{sys.argv[0]}:  {exc}")
        print()
        print(str(getattr(config, "subOptions", config)))
        return 1
    except SystemExit as exc:  # --help, --version
        return _exit_code(exc)

    sub = config.subOptions
    try:
        if config.subCommand == "create-worker":
            return create_worker(sub)
        from pyworker.cli import daemon

        if config.subCommand == "start":
            return daemon.start(
                sub["basedir"], bool(sub["quiet"]), bool(sub["nodaemon"]), sub["logfile"]
            )
        if config.subCommand == "stop":
            if sub["graceful"]:
                return daemon.stop_graceful(sub["basedir"], bool(sub["quiet"]), sub["timeout"])
            return daemon.stop(sub["basedir"], bool(sub["quiet"]))
        if config.subCommand == "restart":
            return daemon.restart(
                sub["basedir"],
                bool(sub["quiet"]),
                bool(sub["nodaemon"]),
                graceful=bool(sub["graceful"]),
                timeout=sub["timeout"],
            )
        return run_bench([])
    except SystemExit as exc:
        return _exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
