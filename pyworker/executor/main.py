"""An executor process: runs one command at a time for the front end.

The front end starts executors ahead of demand (``python -m pyworker.executor``) and talks to
each over its stdin (control frames in) and stdout (event frames out), in the format of
:mod:`pyworker.frames`. An executor is plain blocking Python with no Twisted reactor: it reads a
``START`` frame, runs the command to its end, writes ``COMPLETE`` and waits for the next one.
While a command runs, control frames (``INTERRUPT``, answers to its calls) are read by the
command's own poll loop through :class:`Channel`.

If the front end goes away (its end of our stdin closes, or it dies: we ask the kernel for
SIGTERM when the parent dies), the running command's process group is killed and we exit.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import sys
import time
import traceback
from typing import Any

from pyworker import frames, paths
from pyworker.executor.channel import Channel, CommandError, FrontEndGone
from pyworker.executor.process import (
    kill_descendants,
    on_sigterm,
    reset_signal_dispositions,
    set_process_options,
    shield_from_group_signals,
    take_mark_base,
)


def run_one(channel: Channel, request: dict[str, Any]) -> None:
    """Run the command described by a ``START`` request and report its completion."""
    from pyworker.executor.commands import registry

    name = request["name"]
    started = time.time()
    usage_before = _cpu_times()
    channel.peak_rss = 0
    failure: str | None = None
    command = None
    try:
        command_class = registry.COMMANDS.get(name)
        if command_class is None:
            raise CommandError(f"unrecognized WorkerCommand '{name}'")
        command = command_class(channel, request)
        try:
            command.run()
        finally:
            command.close()
    except FrontEndGone:
        raise
    except (CommandError, paths.PathRefused) as e:
        failure = str(e)
    except Exception as e:  # a bug or bad input: the master gets a failed step, we go on
        failure = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    user, system = (after - before for after, before in zip(_cpu_times(), usage_before,
                                                             strict=True))
    usage = {"name": name, "cpu_user": user, "cpu_system": system,
             "peak_rss": channel.peak_rss}
    if command is not None and command.usage_note:
        usage["note"] = command.usage_note
    if request.get("io", {}).get("report_resources"):
        channel.text("header", frames.describe_usage(usage) + "\n", force=True)
    channel.update([("elapsed", time.time() - started)])
    channel.write(frames.value_frame(frames.USAGE, usage))
    channel.finish(failure)


def _cpu_times() -> tuple[float, float]:
    """User and system CPU seconds of this executor plus every child it has waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + kids.ru_utime, own.ru_stime + kids.ru_stime


def main() -> int:
    set_process_options()
    # Load the I/O core now (PYWORKER_IO=c fails here, loudly), then hide the choice from
    # the commands' environment.
    import pyworker.iocore  # noqa: F401

    os.environ.pop("PYWORKER_IO", None)
    take_mark_base()
    reset_signal_dispositions()
    signal.signal(signal.SIGTERM, on_sigterm)
    shield_from_group_signals()
    if os.getppid() == 1:
        return 1
    # Our stdout is the event pipe: nothing else may write to it.
    wfd = os.dup(1)
    rfd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # stray prints go to the front end's log
    os.close(devnull)
    os.set_inheritable(rfd, False)
    os.set_inheritable(wfd, False)
    channel = Channel(rfd, wfd)
    try:
        while True:
            kind, _, payload = channel.next_frame()
            if kind != frames.START:
                continue  # a late answer for an interrupted command: nothing waits for it
            request = frames.load(payload)
            channel.reset()
            run_one(channel, request)
    except FrontEndGone:
        kill_descendants()
        return 0
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
        FrontEndGone.now()
        kill_descendants()
        return 0


if __name__ == "__main__":
    sys.exit(main())
