"""What an executor does to processes: its own options, and killing and reaping the
descendants of its command (the executor is their child subreaper)."""

from __future__ import annotations

import os
import signal
import time

from pyworker.executor.channel import FrontEndGone
from pyworker.linux import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, prctl


def set_process_options() -> None:
    """Die with the front end, and adopt the command's orphaned descendants.

    As a child subreaper, processes that a command daemonised come back to us instead of to
    init, so a kill can find and end every one of them.
    """
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def on_sigterm(signum: int, frame: object) -> None:
    raise FrontEndGone.now()


def kill_descendants(timeout: float = 2.0) -> None:
    """SIGKILL every process below this executor (they can only belong to its command), and
    collect them: as a subreaper, every one of them ends up our child."""
    import psutil  # imported late: most executors never need it

    try:
        victims = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for victim in victims:
        try:
            victim.kill()
        except psutil.Error:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no child left
        if pid == 0:
            time.sleep(0.005)


def reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
