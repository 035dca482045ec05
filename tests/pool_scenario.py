"""Drives a real ExecutorPool under a real reactor (run as a script by tests/test_pool.py).

Prints one JSON object with what it observed.
"""

from __future__ import annotations

import json
import marshal
import os
import signal
import sys
from typing import Any

from twisted.internet import reactor, task

from pyworker import frames
from pyworker.frontend.pool import ExecutorPool, ExecutorSlot

observed: dict[str, Any] = {}


class Client:
    """A minimal command owner: runs ``sleep`` through the executor, records what happens."""

    def __init__(self, pool: ExecutorPool, name: str, seconds: float) -> None:
        self.pool = pool
        self.name = name
        self.seconds = seconds
        self.started = False
        self.completed: Any = "pending"
        self.lost: str | None = None
        self.executor: ExecutorSlot | None = None

    def start(self, executor: ExecutorSlot) -> None:
        self.started = True
        self.executor = executor
        request = {"name": "shell", "command_id": self.name, "basedir": "/tmp", "io": {},
                   "args": {"workdir": "/tmp", "command": ["sleep", str(self.seconds)],
                            "logEnviron": False}}
        executor.send(frames.frame(frames.START, marshal.dumps(request)))

    def executor_frame(self, kind: int, channel: int, payload: bytes) -> None:
        if kind == frames.COMPLETE:
            self.completed = frames.load(payload)
            assert self.executor is not None
            self.pool.release(self.executor)

    def executor_lost(self, reason: str) -> None:
        self.lost = reason


def main() -> None:
    pool = ExecutorPool(reactor, min_idle=1, max_size=3, idle_timeout=0.5)
    pool.start()
    clients = [Client(pool, f"c{i}", 1.0 if i < 4 else 30) for i in range(5)]

    async def scenario() -> None:
        await task.deferLater(reactor, 0.5, lambda: None)
        observed["size_at_start"] = pool.size
        for c in clients[:4]:
            pool.acquire(c, c.start)
        observed["started_at_bound"] = [c.started for c in clients[:4]]
        observed["size_at_bound"] = pool.size
        await task.deferLater(reactor, 3.5, lambda: None)
        observed["completed"] = [c.completed for c in clients[:4]]
        await task.deferLater(reactor, 1.5, lambda: None)
        observed["size_after_idle"] = pool.size
        victim = clients[4]
        pool.acquire(victim, victim.start)
        await task.deferLater(reactor, 0.5, lambda: None)
        assert victim.executor is not None and victim.executor.pid is not None
        os.kill(victim.executor.pid, signal.SIGKILL)
        await task.deferLater(reactor, 1.0, lambda: None)
        observed["lost"] = victim.lost
        observed["size_after_death"] = pool.size
        observed["idle_after_death"] = len(pool.idle)
        await pool.stop()
        observed["size_after_stop"] = pool.size

    d = task.ensureDeferred(scenario())
    d.addErrback(lambda f: observed.__setitem__("error", f.getTraceback()))
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    json.dump(observed, sys.stdout)


if __name__ == "__main__":
    main()
