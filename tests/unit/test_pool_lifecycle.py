"""ExecutorPool on a MemoryReactorClock: pre-start, growth, waiting order, shrink, heal, backoff.

The pool is the real one; only ``spawnProcess`` is faked (:class:`unit_fakes.ProcessReactor`):
the pipes are real and the test holds their far ends, reading control frames and writing
event frames as an executor process would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from unit_fakes import FakeChild, ProcessReactor

from pyworker import frames
from pyworker.frontend.pool import Executor, ExecutorPool

EXECUTABLE = "/opt/fake/python3"


class Client:
    """A pool client (what a CommandSession is to the pool), recording what it is told."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.executor: Executor | None = None
        self.frames: list[tuple[int, int, bytes]] = []
        self.lost: list[str] = []
        #: frames and losses in the order they came
        self.events: list[Any] = []

    def start(self, executor: Executor) -> None:
        self.executor = executor

    def executor_frame(self, kind: int, channel: int, payload: bytes) -> None:
        self.frames.append((kind, channel, payload))
        self.events.append(kind)

    def executor_lost(self, reason: str) -> None:
        self.lost.append(reason)
        self.events.append("lost")


@pytest.fixture
def reactor() -> Iterator[ProcessReactor]:
    r = ProcessReactor()
    yield r
    for child in r.children:
        if not child.protocol.alive:  # the pool closed its ends of a dead executor's pipes
            assert child.protocol.reader.fd == -1 and child.protocol.writer.fd == -1
    r.close_all()


def make_pool(reactor: ProcessReactor, **kwargs: Any) -> ExecutorPool:
    kwargs.setdefault("executable", EXECUTABLE)
    return ExecutorPool(reactor, adopt_orphans=False, **kwargs)


def acquire(pool: ExecutorPool, name: str) -> Client:
    client = Client(name)
    pool.acquire(client, client.start)
    return client


def child_of(reactor: ProcessReactor, executor: Executor | None) -> FakeChild:
    (child,) = [c for c in reactor.children if c.protocol is executor]
    return child


# -- pre-start and growth --------------------------------------------------------------------


def test_start_runs_min_idle_executors_ahead_of_demand(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=2, extra_env={"PYWORKER_IO": "python"})
    pool.start()
    assert len(reactor.children) == 2
    assert len(pool.idle) == 2 and pool.size == 2 and pool.started_count == 2
    for child in reactor.children:
        assert child.argv[:2] == [EXECUTABLE, "-c"]
        assert "from pyworker.executor.main import main" in child.argv[2]
        assert child.env["PYWORKER_IO"] == "python"
        assert child.protocol.reader in reactor.readers


def test_acquire_takes_an_idle_executor_and_keeps_min_idle_ready(
    reactor: ProcessReactor,
) -> None:
    pool = make_pool(reactor, min_idle=1, max_size=4)
    pool.start()
    prestarted = reactor.children[0].protocol
    c1 = acquire(pool, "c1")
    assert c1.executor is prestarted, "the command did not wait for a fresh process"
    assert prestarted.client is c1
    assert len(reactor.children) == 2 and len(pool.idle) == 1 and len(pool.busy) == 1


def test_concurrent_acquires_grow_to_max_size_then_wait_and_are_served_in_order(
    reactor: ProcessReactor,
) -> None:
    pool = make_pool(reactor, min_idle=1, max_size=3)
    pool.start()
    running = [acquire(pool, f"c{i}") for i in range(3)]
    assert all(c.executor is not None for c in running)
    assert len({id(c.executor) for c in running}) == 3
    assert len(reactor.children) == 3 and pool.size == 3, "never beyond max_size"
    c3, c4, c5 = acquire(pool, "c3"), acquire(pool, "c4"), acquire(pool, "c5")
    assert (c3.executor, c4.executor, c5.executor) == (None, None, None)
    assert len(reactor.children) == 3
    assert pool.cancel_wait(c4) is True
    assert pool.cancel_wait(c4) is False
    pool.release(running[1].executor)  # type: ignore[arg-type]
    assert c3.executor is running[1].executor
    assert c3.executor.client is c3  # type: ignore[union-attr]
    pool.release(running[0].executor)  # type: ignore[arg-type]
    assert c5.executor is running[0].executor, "c4 gave up its place; c5 is next"
    assert not pool.waiting
    pool.release(running[2].executor)  # type: ignore[arg-type]
    assert pool.idle == [running[2].executor] and len(reactor.children) == 3


# -- the pipes ---------------------------------------------------------------------------------


def test_frames_cross_the_pipes_and_pause_stops_reading(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=1)
    pool.start()
    client = acquire(pool, "c1")
    executor = client.executor
    assert executor is not None
    child = child_of(reactor, executor)
    executor.send(frames.value_frame(frames.START, {"name": "shell"}))
    assert [(k, frames.load(p)) for k, _, p in child.read_control()] == [
        (frames.START, {"name": "shell"})]
    child.emit(frames.frame(frames.TEXT, b"line 1\n", frames.CHANNEL_OF["stdout"]))
    assert client.frames == [(frames.TEXT, frames.CHANNEL_OF["stdout"], b"line 1\n")]
    executor.pause()
    assert executor.reader not in reactor.readers
    child.emit(frames.frame(frames.TEXT, b"line 2\n", 1))
    assert len(client.frames) == 1, "a paused executor's output stays in its pipe"
    executor.resume()
    assert executor.reader in reactor.readers
    child.deliver()
    assert client.frames[-1] == (frames.TEXT, 1, b"line 2\n")


def test_frames_written_just_before_an_exit_are_not_lost(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=1)
    pool.start()
    reactor.advance(10)
    client = acquire(pool, "c1")
    executor = client.executor
    assert executor is not None
    child = child_of(reactor, executor)
    executor.pause()
    child.emit(frames.frame(frames.TEXT, b"last words\n", 1)
               + frames.value_frame(frames.COMPLETE, None))
    child.exit(signal=9)
    assert client.events == [frames.TEXT, frames.COMPLETE, "lost"]


# -- shrink ------------------------------------------------------------------------------------


def test_idle_executors_beyond_min_idle_end_after_idle_timeout(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=1, max_size=3, idle_timeout=60)
    pool.start()
    clients = [acquire(pool, f"c{i}") for i in range(3)]
    for c in clients:
        pool.release(c.executor)  # type: ignore[arg-type]
    assert len(pool.idle) == 3
    reactor.advance(59.9)
    assert all(not c.read_control() and not c.control_closed for c in reactor.children)
    reactor.advance(0.1)
    for c in reactor.children:
        c.read_control()
    closed = [c for c in reactor.children if c.control_closed]
    assert len(closed) == 2, "all but min_idle end"
    assert len(pool.idle) == 1 and pool.idle[0] not in [c.protocol for c in closed]
    for c in closed:
        c.exit(0)
    assert len(reactor.children) == 3, "an executor ended by the shrink is not replaced"
    assert pool.size == 1


def test_only_executors_idle_for_the_whole_timeout_end(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=0, max_size=3, idle_timeout=60)
    pool.start()
    assert reactor.children == []
    old, recent = acquire(pool, "old"), acquire(pool, "recent")
    pool.release(old.executor)  # type: ignore[arg-type]
    reactor.advance(30)
    pool.release(recent.executor)  # type: ignore[arg-type]
    reactor.advance(30)
    old_child, recent_child = child_of(reactor, old.executor), child_of(reactor, recent.executor)
    old_child.read_control()
    recent_child.read_control()
    assert old_child.control_closed and not recent_child.control_closed
    assert pool.idle == [recent.executor]
    reactor.advance(60)
    recent_child.read_control()
    assert recent_child.control_closed and pool.idle == []


def test_a_pool_shrinks_back_within_one_timeout_of_its_last_release(
    reactor: ProcessReactor,
) -> None:
    pool = make_pool(reactor, min_idle=0, max_size=3, idle_timeout=60)
    pool.start()
    first, last = acquire(pool, "first"), acquire(pool, "last")
    pool.release(first.executor)  # type: ignore[arg-type]
    reactor.advance(50)
    pool.release(last.executor)  # type: ignore[arg-type]
    reactor.advance(10)  # 60 s after the first release: the shrink ends it
    first_child, last_child = child_of(reactor, first.executor), child_of(reactor, last.executor)
    first_child.read_control()
    assert first_child.control_closed and pool.idle == [last.executor]
    reactor.advance(49.9)
    last_child.read_control()
    assert not last_child.control_closed, "idle for 59.9 s only"
    reactor.advance(0.1)
    last_child.read_control()
    assert last_child.control_closed, "ended 60 s after its release, not 60 s after the shrink"
    assert pool.idle == []


# -- heal and backoff ------------------------------------------------------------------------


def test_an_executor_dying_under_a_command_fails_it_and_the_pool_heals(
    reactor: ProcessReactor,
) -> None:
    pool = make_pool(reactor, min_idle=1, max_size=4)
    pool.start()
    reactor.advance(10)
    client = acquire(pool, "c1")
    assert len(reactor.children) == 2
    child_of(reactor, client.executor).exit(signal=9)
    assert client.lost == ["the pyworker executor process killed by signal 9 (SIGKILL)"]
    assert pool.died_count == 1 and not pool.busy
    assert len(reactor.children) == 2, "min_idle is still met by the idle executor"
    reactor.advance(10)
    idle = pool.idle[0]
    child_of(reactor, idle).exit(code=3)
    assert len(reactor.children) == 3, "a dead idle executor is replaced at once"
    assert pool.idle == [reactor.children[2].protocol]
    assert pool.died_count == 1, "only deaths under a command count as died"


def test_an_executor_exiting_with_a_status_says_so(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=0)
    pool.start()
    reactor.advance(10)
    client = acquire(pool, "c1")
    reactor.advance(10)
    child_of(reactor, client.executor).exit(code=3)
    assert client.lost == ["the pyworker executor process exited with status 3"]


def delays(reactor: ProcessReactor) -> list[float]:
    return [round(c.getTime() - reactor.seconds(), 6) for c in reactor.getDelayedCalls()]


def test_executors_dying_at_start_up_are_retried_with_a_growing_delay(
    reactor: ProcessReactor,
) -> None:
    pool = make_pool(reactor, min_idle=1)
    pool.start()
    seen = []
    for _ in range(10):
        reactor.children[-1].exit(code=1)  # dies at once
        (delay,) = delays(reactor)
        seen.append(delay)
        spawned = len(reactor.children)
        reactor.advance(delay - 0.001)
        assert len(reactor.children) == spawned, "no respawn before the delay"
        reactor.advance(0.002)  # past the due time, whatever the float rounding
        assert len(reactor.children) == spawned + 1
    assert seen == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    # One executor that lived past start-up resets the backoff.
    reactor.advance(5)
    reactor.children[-1].exit(code=1)
    assert delays(reactor) == [] and len(reactor.children) == 12, "replaced at once"
    reactor.children[-1].exit(code=1)
    assert delays(reactor) == [0.2]


# -- stop ----------------------------------------------------------------------------------------


def test_stop_ends_every_executor_and_tells_waiting_clients(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=1, max_size=2)
    pool.start()
    busy = acquire(pool, "busy")
    acquire(pool, "other")
    waiting = acquire(pool, "waiting")
    assert waiting.executor is None
    d = pool.stop(grace=5)
    fired: list[object] = []
    d.addCallback(fired.append)
    assert waiting.lost == ["the worker is shutting down"]
    for child in reactor.children:
        child.read_control()
        assert child.control_closed and child.transport.signals == ["TERM"]
    with pytest.raises(RuntimeError):
        acquire(pool, "late")
    reactor.children[0].exit(0)
    reactor.advance(5)
    assert reactor.children[1].transport.signals == ["TERM", "KILL"]
    assert reactor.children[0].transport.signals == ["TERM"]
    assert fired == []
    reactor.children[1].exit(signal=9)
    assert fired == [None]
    assert busy.lost == [], "at shutdown the sessions are stopped by the core, not failed"
    assert len(reactor.children) == 2, "nothing is respawned while stopping"
