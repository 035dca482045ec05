"""ExecutorPool on a MemoryReactorClock: pre-start, slots, growth across executors, waiting
order, shrink, heal, backoff.

The pool is the real one; only ``spawnProcess`` is faked (:class:`unit_fakes.ProcessReactor`):
the socket and the slots' pipes are real and the test holds their far ends, receiving slots,
reading control frames and writing event frames as an executor process would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from unit_fakes import FakeChild, FakeSlot, ProcessReactor

from pyworker import frames
from pyworker.frontend.pool import ExecutorPool, ExecutorSlot

EXECUTABLE = "/opt/fake/python3"


class Client:
    """A pool client (what a CommandSession is to the pool), recording what it is told."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.slot: ExecutorSlot | None = None
        self.frames: list[tuple[int, int, bytes]] = []
        self.lost: list[str] = []
        #: frames and losses in the order they came
        self.events: list[Any] = []

    def start(self, slot: ExecutorSlot) -> None:
        self.slot = slot

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
            assert all(s.reader.fd == -1 and s.writer.fd == -1 for s in child.opened)
    r.close_all()


def make_pool(reactor: ProcessReactor, **kwargs: Any) -> ExecutorPool:
    kwargs.setdefault("executable", EXECUTABLE)
    kwargs.setdefault("max_executors", 2)
    return ExecutorPool(reactor, adopt_orphans=False, **kwargs)


def acquire(pool: ExecutorPool, name: str) -> Client:
    client = Client(name)
    pool.acquire(client, client.start)
    return client


def child_of(reactor: ProcessReactor, slot: ExecutorSlot | None) -> FakeChild:
    assert slot is not None
    (child,) = [c for c in reactor.children if c.protocol is slot.executor]
    return child


def far_end(reactor: ProcessReactor, slot: ExecutorSlot | None) -> FakeSlot:
    assert slot is not None
    return child_of(reactor, slot).slot(slot)


# -- pre-start and slots ---------------------------------------------------------------------


def test_start_runs_one_executor_with_min_idle_slots_ahead_of_demand(
    reactor: ProcessReactor,
) -> None:
    pool = make_pool(reactor, min_idle=2, extra_env={"PYWORKER_IO": "python"})
    pool.start()
    (child,) = reactor.children
    assert len(pool.idle) == 2 and pool.size == 2 and pool.started_count == 1
    assert child.argv[:2] == [EXECUTABLE, "-c"]
    assert "from pyworker.executor.main import main" in child.argv[2]
    assert child.env["PYWORKER_IO"] == "python"
    assert child.protocol.sock_reader in reactor.readers
    assert [s.number for s in child.receive()] == [1, 2], "each slot's pipes came over"
    assert all(s.front.reader in reactor.readers for s in child.slots)


def test_acquire_takes_an_idle_slot_and_keeps_min_idle_ready(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=1, max_size=4)
    pool.start()
    (prestarted,) = pool.idle
    c1 = acquire(pool, "c1")
    assert c1.slot is prestarted, "the command did not wait for a fresh slot"
    assert prestarted.client is c1
    assert len(reactor.children) == 1, "a slot is not a process"
    assert len(pool.idle) == 1 and len(pool.busy) == 1


def test_concurrent_acquires_grow_to_max_size_then_wait_and_are_served_in_order(
    reactor: ProcessReactor,
) -> None:
    pool = make_pool(reactor, min_idle=1, max_size=3)
    pool.start()
    running = [acquire(pool, f"c{i}") for i in range(3)]
    assert all(c.slot is not None for c in running)
    assert len({id(c.slot) for c in running}) == 3
    assert len(reactor.children) == 1 and pool.size == 3, "never beyond max_size"
    c3, c4, c5 = acquire(pool, "c3"), acquire(pool, "c4"), acquire(pool, "c5")
    assert (c3.slot, c4.slot, c5.slot) == (None, None, None)
    assert pool.cancel_wait(c4) is True
    assert pool.cancel_wait(c4) is False
    pool.release(running[1].slot)  # type: ignore[arg-type]
    assert c3.slot is running[1].slot
    assert c3.slot.client is c3  # type: ignore[union-attr]
    pool.release(running[0].slot)  # type: ignore[arg-type]
    assert c5.slot is running[0].slot, "c4 gave up its place; c5 is next"
    assert not pool.waiting
    pool.release(running[2].slot)  # type: ignore[arg-type]
    assert pool.idle == [running[2].slot] and len(reactor.children) == 1


def test_slots_spread_to_a_second_executor_once_it_is_ready(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=0, max_size=10, slots_per_executor=2)
    pool.start()
    first = [acquire(pool, f"a{i}") for i in range(2)]
    (a,) = reactor.children
    a.ready()
    third = acquire(pool, "a2")
    assert len(reactor.children) == 2, "a second executor starts when the first is full"
    b = reactor.children[1]
    assert third.slot is not None and third.slot.executor is a.protocol, (
        "the command does not wait for the new executor's start-up")
    fourth = acquire(pool, "a3")
    assert fourth.slot is not None and fourth.slot.executor is a.protocol
    b.ready()
    fifth = acquire(pool, "b0")
    assert fifth.slot is not None and fifth.slot.executor is b.protocol, "the least busy one"
    assert len(reactor.children) == 2, "never more than max_executors"
    assert {c.slot.executor for c in first} == {a.protocol}  # type: ignore[union-attr]


# -- the pipes ---------------------------------------------------------------------------------


def test_frames_cross_the_pipes_and_pause_stops_reading(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=1)
    pool.start()
    client = acquire(pool, "c1")
    slot = client.slot
    assert slot is not None
    far = far_end(reactor, slot)
    slot.send(frames.value_frame(frames.START, {"name": "shell"}))
    assert [(k, frames.load(p)) for k, _, p in far.read_control()] == [
        (frames.START, {"name": "shell"})]
    far.emit(frames.frame(frames.TEXT, b"line 1\n", frames.CHANNEL_OF["stdout"]))
    assert client.frames == [(frames.TEXT, frames.CHANNEL_OF["stdout"], b"line 1\n")]
    slot.pause()
    assert slot.reader not in reactor.readers
    far.emit(frames.frame(frames.TEXT, b"line 2\n", 1))
    assert len(client.frames) == 1, "a paused slot's output stays in its pipe"
    slot.resume()
    assert slot.reader in reactor.readers
    far.deliver()
    assert client.frames[-1] == (frames.TEXT, 1, b"line 2\n")


def test_two_slots_of_one_executor_carry_their_own_frames(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=0)
    pool.start()
    one, two = acquire(pool, "one"), acquire(pool, "two")
    assert one.slot is not None and two.slot is not None
    assert one.slot.executor is two.slot.executor
    far_end(reactor, two.slot).emit(frames.value_frame(frames.COMPLETE, "two's"))
    far_end(reactor, one.slot).emit(frames.value_frame(frames.COMPLETE, None))
    assert [frames.load(p) for _, _, p in one.frames] == [None]
    assert [frames.load(p) for _, _, p in two.frames] == ["two's"]


def test_frames_written_just_before_an_exit_are_not_lost(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=1)
    pool.start()
    reactor.advance(10)
    client = acquire(pool, "c1")
    slot = client.slot
    assert slot is not None
    far = far_end(reactor, slot)
    slot.pause()
    far.emit(frames.frame(frames.TEXT, b"last words\n", 1)
             + frames.value_frame(frames.COMPLETE, None))
    child_of(reactor, slot).exit(signal=9)
    assert client.events == [frames.TEXT, frames.COMPLETE, "lost"]


def test_a_slot_its_executor_closed_is_not_handed_out_again(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=1)
    pool.start()
    client = acquire(pool, "c1")
    slot = client.slot
    assert slot is not None
    far = far_end(reactor, slot)
    # the thread ended on a bug: it says so in a COMPLETE, then its pipes close
    far.emit(frames.value_frame(frames.COMPLETE, "pyworker executor error: boom"))
    far.end()
    assert [frames.load(p) for _, _, p in client.frames] == ["pyworker executor error: boom"]
    pool.release(slot)
    assert slot not in pool.idle and slot.closed
    assert acquire(pool, "c2").slot is not slot


# -- shrink ------------------------------------------------------------------------------------


def test_idle_slots_beyond_min_idle_close_after_idle_timeout(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=1, max_size=3, idle_timeout=60)
    pool.start()
    clients = [acquire(pool, f"c{i}") for i in range(3)]
    (child,) = reactor.children
    for c in clients:
        pool.release(c.slot)  # type: ignore[arg-type]
    assert len(pool.idle) == 3
    reactor.advance(59.9)
    assert all(not s.read_control() and not s.control_closed for s in child.receive())
    reactor.advance(0.1)
    for s in child.slots:
        s.read_control()
    closed = [s for s in child.slots if s.control_closed]
    assert len(closed) == 2, "all but min_idle close"
    assert len(pool.idle) == 1 and pool.idle[0].number not in [s.number for s in closed]
    assert not child.receive() or not child.socket_closed, "the last executor stays"
    assert pool.size == 1


def test_only_slots_idle_for_the_whole_timeout_close(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=0, max_size=3, idle_timeout=60)
    pool.start()
    assert reactor.children == []
    old, recent = acquire(pool, "old"), acquire(pool, "recent")
    pool.release(old.slot)  # type: ignore[arg-type]
    reactor.advance(30)
    pool.release(recent.slot)  # type: ignore[arg-type]
    reactor.advance(30)
    old_far, recent_far = far_end(reactor, old.slot), far_end(reactor, recent.slot)
    old_far.read_control()
    recent_far.read_control()
    assert old_far.control_closed and not recent_far.control_closed
    assert pool.idle == [recent.slot]
    reactor.advance(60)
    recent_far.read_control()
    assert recent_far.control_closed and pool.idle == []


def test_a_pool_shrinks_back_within_one_timeout_of_its_last_release(
    reactor: ProcessReactor,
) -> None:
    pool = make_pool(reactor, min_idle=0, max_size=3, idle_timeout=60)
    pool.start()
    first, last = acquire(pool, "first"), acquire(pool, "last")
    pool.release(first.slot)  # type: ignore[arg-type]
    reactor.advance(50)
    pool.release(last.slot)  # type: ignore[arg-type]
    reactor.advance(10)  # 60 s after the first release: the shrink closes it
    first_far, last_far = far_end(reactor, first.slot), far_end(reactor, last.slot)
    first_far.read_control()
    assert first_far.control_closed and pool.idle == [last.slot]
    reactor.advance(49.9)
    last_far.read_control()
    assert not last_far.control_closed, "idle for 59.9 s only"
    reactor.advance(0.1)
    last_far.read_control()
    assert last_far.control_closed, "closed 60 s after its release, not 60 s after the shrink"
    assert pool.idle == []


def test_an_executor_left_without_slots_ends_but_one_stays(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=0, max_size=10, slots_per_executor=1, idle_timeout=60)
    pool.start()
    c1 = acquire(pool, "c1")
    a = reactor.children[0]
    a.ready()
    c2 = acquire(pool, "c2")  # a is full: b starts
    b = reactor.children[1]
    b.ready()
    c3 = acquire(pool, "c3")
    assert c3.slot is not None and c3.slot.executor is b.protocol
    for c in (c1, c2, c3):
        pool.release(c.slot)  # type: ignore[arg-type]
    reactor.advance(60)
    a.receive()
    b.receive()
    assert pool.idle == []
    assert [a.socket_closed, b.socket_closed].count(True) == 1, "one executor stays"


# -- heal and backoff ------------------------------------------------------------------------


def test_an_executor_dying_under_commands_fails_them_and_the_pool_heals(
    reactor: ProcessReactor,
) -> None:
    pool = make_pool(reactor, min_idle=1, max_size=4)
    pool.start()
    reactor.children[0].ready()
    reactor.advance(10)
    c1, c2 = acquire(pool, "c1"), acquire(pool, "c2")
    child_of(reactor, c1.slot).exit(signal=9)
    lost = "the pyworker executor process killed by signal 9 (SIGKILL)"
    assert c1.lost == [lost] and c2.lost == [lost]
    assert pool.died_count == 2 and not pool.busy
    assert len(reactor.children) == 2, "a new executor takes the idle slot"
    assert len(pool.idle) == 1 and pool.idle[0].executor is reactor.children[1].protocol


def test_an_executor_exiting_with_a_status_says_so(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=0)
    pool.start()
    client = acquire(pool, "c1")
    reactor.children[0].ready()
    reactor.advance(10)
    child_of(reactor, client.slot).exit(code=3)
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
        reactor.children[-1].exit(code=1)  # dies at once, never ready
        (delay,) = delays(reactor)
        seen.append(delay)
        spawned = len(reactor.children)
        reactor.advance(delay - 0.001)
        assert len(reactor.children) == spawned, "no respawn before the delay"
        reactor.advance(0.002)  # past the due time, whatever the float rounding
        assert len(reactor.children) == spawned + 1
    assert seen == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    # One executor that started and lived past start-up resets the backoff.
    reactor.children[-1].ready()
    reactor.advance(5)
    reactor.children[-1].exit(code=1)
    assert delays(reactor) == [] and len(reactor.children) == 12, "replaced at once"
    reactor.children[-1].exit(code=1)
    assert delays(reactor) == [0.2]


# -- stop ----------------------------------------------------------------------------------------


def test_stop_ends_every_executor_and_tells_waiting_clients(reactor: ProcessReactor) -> None:
    pool = make_pool(reactor, min_idle=1, max_size=2, slots_per_executor=1)
    pool.start()
    reactor.children[0].ready()
    busy = acquire(pool, "busy")
    reactor.children[1].ready()
    acquire(pool, "other")
    waiting = acquire(pool, "waiting")
    assert waiting.slot is None
    assert len(reactor.children) == 2
    d = pool.stop(grace=5)
    fired: list[object] = []
    d.addCallback(fired.append)
    assert waiting.lost == ["the worker is shutting down"]
    for child in reactor.children:
        child.receive()
        assert child.socket_closed and child.transport.signals == ["TERM"]
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
