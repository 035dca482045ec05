"""Run as a command by tests/test_inherit_realmaster.py: prints what the command inherited
from the worker that started it (Python's view of the dispositions, the signal mask and the
open descriptors). Not a test module."""

from __future__ import annotations

import os
import signal

NAMES = {signal.SIG_IGN: "ignored", signal.SIG_DFL: "default",
         signal.default_int_handler: "default"}  # Python's handler for an inherited SIG_DFL


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR2):
        print(f"probe {sig.name}={NAMES.get(signal.getsignal(sig), 'other')}")
    blocked = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    print(f"probe blocked={blocked}")
    print(f"probe fds={[fd for fd in range(1024) if _is_open(fd)]}")


if __name__ == "__main__":
    main()
