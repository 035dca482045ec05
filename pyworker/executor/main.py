"""An executor process: runs commands for the front end, many at once, one per thread.

The front end starts executors (``python -c <boot>``) and gives each *slots*: a slot is a pipe
pair, control frames in and event frames out, in the format of :mod:`pyworker.frames`, and one
thread here serves it: it reads a ``START`` frame, runs the command to its end, writes
``COMPLETE`` and waits for the next one. While a command runs, control frames (``INTERRUPT``,
answers to its calls) are read by the command's own poll loop through :class:`Channel`. The
commands' blocking work (polls, reads, copies, compression) runs with the GIL released, so a
few executors serve the commands of a whole machine.

The slots' pipes come over our stdin, a unix socket, with ``SCM_RIGHTS`` (one message per
slot, and one byte back, ``READY``, once we can serve them); the main thread receives them,
starts their threads and collects the orphans no command waits for. An executor whose stdin
is a pipe serves that one slot, on stdin and stdout, in its main thread (tests drive it so).

If the front end goes away (our stdin reaches EOF, or it dies: we ask the kernel for SIGTERM
when the parent dies), every command's processes are killed and we exit. A slot whose pipe
the front end closes ends its command alone.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import stat
import sys
import threading
import time
from typing import Any

from pyworker import frames, paths
from pyworker.executor import process
from pyworker.executor.channel import Channel, CommandError, FrontEndGone
from pyworker.executor.process import (
    ensure_mark_base,
    kill_all_commands,
    on_sigterm,
    process_umask,
    reap_unowned,
    reset_signal_dispositions,
    set_process_options,
    shield_from_group_signals,
    take_mark_base,
)
from pyworker.linux import release_free_memory

#: What an executor answers on its socket once it serves slots.
READY = b"R"
#: How often the main thread collects orphans when no slot arrives.
REAP_INTERVAL = 1.0


def run_one(channel: Channel, request: dict[str, Any]) -> None:
    """Run the command described by a ``START`` request and report its completion."""
    from pyworker.executor.commands import registry

    name = request["name"]
    started = time.time()
    usage_before = _thread_cpu_times()
    channel.peak_rss = 0
    channel.children_cpu = (0.0, 0.0)
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
        import traceback

        failure = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    user, system = (after - before + child for after, before, child
                    in zip(_thread_cpu_times(), usage_before, channel.children_cpu,
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


def _thread_cpu_times() -> tuple[float, float]:
    """User and system CPU seconds of this thread (the command's own work here); its
    processes' come from their ``wait4`` (``Channel.children_cpu``)."""
    own = resource.getrusage(resource.RUSAGE_THREAD)
    return own.ru_utime, own.ru_stime


_running_lock = threading.Lock()
_running = 0


def serve_slot(rfd: int, wfd: int) -> None:
    """Run the commands that come over one slot's pipes until the front end closes it.

    When the last command running in this executor ends, the heap memory the commands
    freed goes back to the kernel (a few microseconds): after 64 commands at once, the
    executor shrinks back instead of keeping their high-water mark."""
    global _running
    channel = Channel(rfd, wfd)
    try:
        while True:
            kind, _, payload = channel.next_frame()
            if kind != frames.START:
                continue  # a late answer for an interrupted command: nothing waits for it
            request = frames.load(payload)
            channel.reset()
            with _running_lock:
                _running += 1
            try:
                run_one(channel, request)
            finally:
                with _running_lock:
                    _running -= 1
                    idle = _running == 0
                if idle:
                    release_free_memory()
    except FrontEndGone:
        return
    except BrokenPipeError:  # the event pipe's reader is gone
        FrontEndGone.now()


def _slot_thread(rfd: int, wfd: int) -> None:
    try:
        serve_slot(rfd, wfd)
    except BaseException as e:  # a bug: the slot ends, and a command it ran fails readably
        import traceback

        traceback.print_exc()
        try:
            Channel(rfd, wfd).write(frames.value_frame(
                frames.COMPLETE, f"pyworker executor error: {type(e).__name__}: {e}"))
        except OSError:
            pass
    finally:
        os.close(rfd)
        os.close(wfd)


def serve_slots(sock: socket.socket) -> None:
    """Receive slots on ``sock`` and serve each in a thread, until the front end is gone."""
    sock.sendall(READY)
    sock.settimeout(REAP_INTERVAL)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 2, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            reap_unowned()
            continue
        if not msg:
            for fd in fds:
                os.close(fd)
            raise FrontEndGone.now()
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        threading.Thread(target=_slot_thread, args=(fds[0], fds[1]), daemon=True,
                         name=f"slot-{fds[0]}").start()


def main() -> int:
    set_process_options()
    # Load the I/O core now (PYWORKER_IO=c fails here, loudly), then hide the choice from
    # the commands' environment.
    import pyworker.iocore  # noqa: F401

    os.environ.pop("PYWORKER_IO", None)
    # The commands too, before we say we are ready: the first command does not wait for
    # their imports (about 20 ms), which overlap the front end's connection to the master.
    from pyworker.executor.commands import registry  # noqa: F401

    take_mark_base()
    process_umask()
    reset_signal_dispositions()
    signal.signal(signal.SIGTERM, on_sigterm)
    shield_from_group_signals()
    if os.getppid() == 1:
        return 1
    # Our stdout is the event pipe (or, with slots, unused): nothing else may write to it.
    slotted = stat.S_ISSOCK(os.fstat(0).st_mode)
    wfd = os.dup(1)
    rfd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # stray prints go to the front end's log
    os.close(devnull)
    os.set_inheritable(rfd, False)
    os.set_inheritable(wfd, False)
    try:
        if slotted:
            os.close(wfd)
            process.single_command = False
            ensure_mark_base()
            serve_slots(socket.socket(fileno=rfd))
        else:
            serve_slot(rfd, wfd)
    except FrontEndGone:
        pass
    except BrokenPipeError:  # our socket's other end is gone
        FrontEndGone.now()
    kill_all_commands()
    if slotted:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # the slots' threads may be blocked in a read: nothing to wait for
    return 0


if __name__ == "__main__":
    sys.exit(main())
