"""CommandSession: batching at BATCH_BYTES, back-pressure at the water marks, order, interrupt,
silence and a lost executor, with a master whose ``update`` replies the test fires by hand."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from unit_fakes import (
    FakeExecutor,
    FakeMaster,
    FakePool,
    batch_text_bytes,
    text_frame,
    text_of,
    value_frame,
)

from pyworker import frames
from pyworker.frontend import metrics
from pyworker.frontend.session import (
    BATCH_BYTES,
    GLOBAL_HIGH_WATER,
    GLOBAL_LOW_WATER,
    HIGH_WATER,
    IN_FLIGHT_BUDGET,
    LOW_WATER,
    Backlog,
    CommandSession,
)

KiB = 1024
REQUEST = {"name": "shell", "args": {"command": ["true"]}, "command_id": "7"}


def chunk(size: int, char: str = "x") -> str:
    """``size`` bytes of ASCII text ending in a newline (executors send whole lines)."""
    return char * (size - 1) + "\n"


class Run:
    """One session on a fake pool and master; ``done`` collects the on_done calls."""

    def __init__(self, *, serve: bool = True) -> None:
        self.pool = FakePool()
        self.master = FakeMaster()
        self.done: list[CommandSession] = []
        self.session = CommandSession(self.pool, self.master, "shell", "7", dict(REQUEST),
                                      on_done=self.done.append)
        self.session.start()
        self.executor: FakeExecutor | None = self.pool.serve() if serve else None

    def text(self, text: str, stream: str = "stdout") -> None:
        self.session.executor_frame(*text_frame(text, stream))

    def frame(self, kind: int, value: Any) -> None:
        self.session.executor_frame(*value_frame(kind, value))


# -- batching --------------------------------------------------------------------------------


def test_start_sends_the_request_and_the_first_text_goes_out_at_once() -> None:
    run = Run()
    assert run.executor is not None
    assert run.executor.sent == [(frames.START, REQUEST)]
    run.text("hello\n")
    assert run.master.updates == [[("stdout", "hello\n")]]
    assert metrics.STATS.running_commands == 1
    assert metrics.STATS.bytes["stdout"] == 6


def test_text_waiting_for_an_update_in_flight_joins_up_to_the_bound() -> None:
    run = Run()
    run.text("first\n")  # in flight until acked
    for char in "abc":
        run.text(chunk(200 * KiB, char))
    assert len(run.master.updates) == 1, "nothing more is sent while an update is in flight"
    run.master.ack_update()
    # a and b joined (400 KiB); c would pass 512 KiB, so it waits for the next update
    assert run.master.updates[1] == [("stdout", chunk(200 * KiB, "a") + chunk(200 * KiB, "b"))]
    run.master.ack_update()
    assert run.master.updates[2] == [("stdout", chunk(200 * KiB, "c"))]
    run.master.ack_update()
    assert len(run.master.updates) == 3
    assert run.session.in_flight == 0 and run.session.pending_bytes == 0


def test_a_batch_may_reach_the_bound_exactly_but_never_pass_it() -> None:
    run = Run()
    run.text("first\n")
    run.text(chunk(256 * KiB, "a"))
    run.text(chunk(256 * KiB, "b"))
    run.text("y\n")
    run.master.ack_update()
    second = run.master.updates[1]
    assert batch_text_bytes(second) == BATCH_BYTES
    assert second == [("stdout", chunk(256 * KiB, "a") + chunk(256 * KiB, "b"))]
    run.master.ack_update()
    assert run.master.updates[2] == [("stdout", "y\n")]


def test_one_update_carries_several_streams_in_their_order() -> None:
    run = Run()
    run.text("first\n")
    run.text("out 1\n")
    run.text("err 1\n", "stderr")
    run.text("out 2\n")
    run.frame(frames.UPDATE, [("rc", 0)])
    run.frame(frames.LOG, ("build.log", b"log 1\n"))
    run.frame(frames.LOG, ("build.log", b"log 2\n"))
    run.frame(frames.LOG, ("other.log", b"other\n"))
    run.master.ack_update()
    assert run.master.updates[1] == [
        ("stdout", "out 1\n"),
        ("stderr", "err 1\n"),
        ("stdout", "out 2\n"),
        ("rc", 0),
        ("log", ("build.log", "log 1\nlog 2\n")),
        ("log", ("other.log", "other\n")),
    ]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.sampled_from(["stdout", "stderr"]), st.integers(1, BATCH_BYTES)),
    st.just(("ack", 0)),
), max_size=30))
def test_no_update_ever_passes_the_bound_and_no_text_is_lost(ops: list[tuple[str, int]]) -> None:
    run = Run()
    sent: dict[str, list[str]] = {"stdout": [], "stderr": []}
    for i, (what, size) in enumerate(ops):
        if what == "ack":
            if run.master.update_deferreds:
                run.master.ack_update()
            continue
        text = chunk(size, "abcdefghij"[i % 10])
        sent[what].append(text)
        run.text(text, what)
        assert all(entry[2] <= BATCH_BYTES for entry in run.session.pending)
    run.master.ack_all()
    for update in run.master.updates:
        assert 0 < batch_text_bytes(update) <= BATCH_BYTES
    for stream, texts in sent.items():
        assert "".join(text_of(u, stream) for u in run.master.updates) == "".join(texts)
    assert run.session.pending_bytes == 0


# -- back-pressure ---------------------------------------------------------------------------


def test_executor_paused_above_high_water_and_resumed_below_low_water() -> None:
    run = Run()
    assert run.executor is not None
    run.text("first\n")  # in flight: everything after it waits
    quarter = 256 * KiB
    for i in range(HIGH_WATER // quarter):
        run.text(chunk(quarter, "abcdefgh"[i % 8]))
    assert run.session.pending_bytes == HIGH_WATER
    assert not run.executor.paused, "exactly at the high-water mark is not above it"
    run.text(chunk(quarter))
    assert run.executor.paused
    assert run.executor.transitions == ["pause"]
    # Each ack lets one 512 KiB update out: 8.25 MiB waiting falls by 0.5 MiB per ack.
    acks = 0
    while not run.executor.transitions[-1] == "resume":
        assert run.session.pending_bytes >= LOW_WATER
        run.master.ack_update()
        acks += 1
        assert acks < 100
    assert run.session.pending_bytes < LOW_WATER
    assert run.session.pending_bytes == HIGH_WATER + quarter - acks * BATCH_BYTES
    assert acks == 13
    assert run.executor.transitions == ["pause", "resume"]
    assert all(batch_text_bytes(u) <= BATCH_BYTES for u in run.master.updates)


# -- order and completion --------------------------------------------------------------------


def test_complete_follows_every_update_even_with_updates_in_flight() -> None:
    run = Run()
    run.text("first\n")
    for i in range(6):  # 3 MiB waiting: several updates at completion
        run.text(chunk(512 * KiB, "abcdef"[i]))
    run.frame(frames.UPDATE, [("rc", 0)])
    run.frame(frames.COMPLETE, None)
    kinds = [e[0] for e in run.master.events]
    assert kinds[-1] == "complete" and kinds.count("complete") == 1
    assert run.master.completes == [None]
    updates = run.master.updates
    assert updates[-1][-1] == ("rc", 0), "rc is the last update, before complete"
    assert "".join(text_of(u) for u in updates) == "first\n" + "".join(
        chunk(512 * KiB, c) for c in "abcdef")
    assert all(batch_text_bytes(u) <= BATCH_BYTES for u in updates)
    assert run.pool.released == [run.executor]
    assert run.done == [run.session]
    count = len(run.master.events)
    run.master.ack_all()
    assert len(run.master.events) == count, "nothing is sent after complete"
    assert metrics.STATS.running_commands == 0 and metrics.STATS.failed_commands == 0


def test_a_failed_command_completes_with_its_message() -> None:
    run = Run()
    run.frame(frames.COMPLETE, "shell: no such directory")
    assert run.master.completes == ["shell: no such directory"]
    assert metrics.STATS.failed_commands == 1


def test_a_failed_update_does_not_stop_the_next_ones() -> None:
    run = Run()
    run.text("a\n")
    run.text("b\n")
    run.master.update_deferreds.popleft().errback(RuntimeError("master hiccup"))
    assert run.master.updates[1] == [("stdout", "b\n")]


# -- interrupt -------------------------------------------------------------------------------


def test_interrupt_before_the_executor_is_handed_out_completes_without_running() -> None:
    run = Run(serve=False)
    run.session.interrupt("stop it")
    assert run.pool.cancelled == [run.session]
    assert not run.pool.waiting
    assert run.master.events == [("complete", None)]
    assert run.done == [run.session]
    assert metrics.STATS.running_commands == 0


def test_interrupt_after_the_executor_is_handed_out_goes_to_the_executor_once() -> None:
    run = Run()
    assert run.executor is not None
    run.session.interrupt("stop it")
    run.session.interrupt("again")
    assert run.executor.sent == [(frames.START, REQUEST), (frames.INTERRUPT, "stop it")]
    assert run.master.events == [], "complete waits for the executor to finish"
    run.frame(frames.UPDATE, [("rc", -1)])
    run.frame(frames.COMPLETE, None)
    assert run.master.completes == [None]


def test_interrupt_without_a_reason_and_after_completion() -> None:
    run = Run()
    assert run.executor is not None
    run.session.interrupt("")
    assert run.executor.sent[-1] == (frames.INTERRUPT, "interrupted")
    other = Run()
    assert other.executor is not None
    other.frame(frames.COMPLETE, None)
    other.session.interrupt("late")
    assert frames.INTERRUPT not in other.executor.kinds


# -- silence ---------------------------------------------------------------------------------


def test_silence_drops_waiting_output_resumes_and_stops_the_executor() -> None:
    run = Run()
    assert run.executor is not None
    run.text("first\n")
    for _ in range(HIGH_WATER // BATCH_BYTES + 1):
        run.text(chunk(BATCH_BYTES))
    assert run.executor.paused
    run.session.silence()
    assert run.session.pending_bytes == 0 and not run.session.pending
    assert not run.executor.paused, "a silenced command must be able to run to its end"
    assert run.executor.sent[-1] == (frames.INTERRUPT, "silenced")
    run.text("more\n")
    run.frame(frames.CALL, ("writer", "close", ()))
    assert run.executor.sent[-1] == (frames.RESULT,
                                     (False, "the connection to the master was lost"))
    run.frame(frames.COMPLETE, None)
    run.master.ack_all()
    assert run.master.updates == [[("stdout", "first\n")]]
    assert run.master.completes == []
    assert run.pool.released == [run.executor]
    assert run.done == [run.session]


def test_silence_before_the_executor_is_handed_out() -> None:
    run = Run(serve=False)
    run.session.silence()
    assert run.pool.cancelled == [run.session] and not run.pool.waiting
    assert run.master.events == []
    assert run.done == [run.session]


# -- executor lost ---------------------------------------------------------------------------


def test_executor_lost_says_so_in_the_log_and_fails_the_step() -> None:
    run = Run()
    run.text("working\n")
    run.text("still working\n")
    reason = "the pyworker executor process killed by signal 9 (SIGKILL)"
    run.session.executor_lost(reason)
    assert run.master.completes == [f"{reason} while running command 7 (shell)"]
    updates = run.master.updates
    assert text_of(updates[-1], "stdout") == "still working\n"
    assert text_of(updates[-1], "header") == f"\n{reason}; the command was abandoned\n"
    assert run.pool.released == [], "a dead executor does not go back to the pool"
    assert metrics.STATS.failed_commands == 1
    run.session.executor_lost("again")
    assert len(run.master.completes) == 1


# -- transfers relayed to the master ----------------------------------------------------------


def test_calls_writes_and_reads_are_relayed_and_answered() -> None:
    run = Run()
    assert run.executor is not None
    run.frame(frames.CALL, ("writer", "utime", ((1.0, 2.0),)))
    target, method, args, d = run.master.calls[-1]
    assert (target, method, args) == ("writer", "utime", ((1.0, 2.0),))
    d.callback("done")
    assert run.executor.sent[-1] == (frames.RESULT, (True, "done"))

    run.session.executor_frame(frames.WRITE, 0, b"block")
    run.master.calls[-1][3].callback(None)
    assert run.executor.sent[-1] == (frames.ACK, (5, None))
    assert metrics.STATS.bytes["upload"] == 5

    run.session.executor_frame(frames.WRITE, 0, b"next")
    run.master.calls[-1][3].errback(RuntimeError("disk full"))
    assert run.executor.sent[-1] == (frames.ACK, (4, "RuntimeError: disk full"))
    calls = len(run.master.calls)
    run.session.executor_frame(frames.WRITE, 0, b"after")
    assert len(run.master.calls) == calls, "after a failed write, nothing more is written"
    assert run.executor.sent[-1] == (frames.ACK, (5, "RuntimeError: disk full"))

    run.frame(frames.READ, 1024)
    assert run.master.calls[-1][:3] == ("reader", "read", (1024,))
    run.master.calls[-1][3].callback(b"payload")
    assert run.executor.sent[-1] == (frames.DATA, b"payload")
    assert metrics.STATS.bytes["download"] == 7


# -- texts bigger than one update (Twisted refuses strings > 640 KiB) ----------------------------


def _sent_texts(run: Run, key: str) -> list[str]:
    """Acknowledge updates until none is in flight; the ``key`` texts, in order."""
    while run.session.in_flight:
        run.master.ack_update()
    out = []
    for update in run.master.updates:
        for k, value in update:
            if k == key:
                out.append(value if key != "log" else value[1])
    return out


def test_one_frame_of_several_mib_goes_out_in_updates_below_the_limit() -> None:
    run = Run()
    text = "".join(f"line {i} {'€' * (i % 50)}\n" for i in range(40_000))  # ~3.5 MiB of UTF-8
    run.text(text)  # one TEXT frame, as a pump's read of invalid bytes can make
    sent = _sent_texts(run, "stdout")
    assert "".join(sent) == text
    assert len(sent) > 1
    assert all(len(t.encode()) <= BATCH_BYTES for t in sent)
    assert all(t.endswith("\n") for t in sent), "pieces end at line ends"


def test_a_logfile_frame_of_several_mib_goes_out_in_updates_below_the_limit() -> None:
    run = Run()
    text = ("x" * 4095 + "\n") * 600  # 2.4 MiB written to a logfile at once
    run.frame(frames.LOG, ("report.xml", text.encode()))
    sent = _sent_texts(run, "log")
    assert "".join(sent) == text
    assert all(len(t.encode()) <= BATCH_BYTES for t in sent)
    assert {value[0] for u in run.master.updates for k, value in u if k == "log"} == {
        "report.xml"}


def test_arguments_bigger_than_an_executor_takes_are_refused_before_any_executor() -> None:
    pool = FakePool()
    request = {"name": "shell", "args": {"command": ["x" * frames.MAX_PAYLOAD]},
               "command_id": "8"}
    session = CommandSession(pool, FakeMaster(), "shell", "8", request)
    try:
        session.start()
    except ValueError as e:
        assert "more than" in str(e)
    else:
        raise AssertionError("a request no executor can read was sent")
    assert not pool.waiting, "it waits for an executor"


# -- all sessions together -------------------------------------------------------------------


class Worker:
    """``n`` sessions sharing one :class:`Backlog` (as the core's do), one master each."""

    def __init__(self, n: int) -> None:
        self.backlog = Backlog()
        self.pool = FakePool()
        self.masters = [FakeMaster() for _ in range(n)]
        self.sessions = [CommandSession(self.pool, m, "shell", str(i), dict(REQUEST),
                                        backlog=self.backlog)
                         for i, m in enumerate(self.masters)]
        for s in self.sessions:
            s.start()
        self.executors = [self.pool.serve() for _ in self.sessions]

    def text(self, i: int, text: str) -> None:
        self.sessions[i].executor_frame(*text_frame(text))

    def in_flight(self) -> int:
        return sum(len(m.update_deferreds) for m in self.masters)


def test_the_sessions_text_in_flight_is_bounded_together_and_each_waits_its_turn() -> None:
    n = IN_FLIGHT_BUDGET // BATCH_BYTES + 4
    w = Worker(n)
    for i in range(n):
        w.text(i, chunk(BATCH_BYTES, chr(ord("a") + i)))
    allowed = IN_FLIGHT_BUDGET // BATCH_BYTES
    assert w.in_flight() == allowed, "beyond the budget, sessions wait"
    assert w.backlog.in_flight == allowed * BATCH_BYTES
    assert [len(m.update_deferreds) for m in w.masters[:allowed]] == [1] * allowed
    # one answer lets the first session that waited send
    w.masters[0].ack_update()
    assert len(w.masters[allowed].update_deferreds) == 1
    assert w.in_flight() == allowed
    # answering everything in turn: every session's text goes out, once, whole
    while w.in_flight():
        for m in w.masters:
            if m.update_deferreds:
                m.ack_update()
    for i, m in enumerate(w.masters):
        assert m.updates == [[("stdout", chunk(BATCH_BYTES, chr(ord("a") + i)))]]
    assert w.backlog.in_flight == 0 and not w.backlog.waiting


def test_a_session_completing_while_it_waits_sends_its_text_before_complete() -> None:
    n = IN_FLIGHT_BUDGET // BATCH_BYTES + 1
    w = Worker(n)
    for i in range(n):
        w.text(i, chunk(BATCH_BYTES))
    last = w.sessions[-1]
    assert last in w.backlog.waiting
    last.executor_frame(*value_frame(frames.COMPLETE, None))
    assert [e[0] for e in w.masters[-1].events] == ["update", "complete"]
    assert last not in w.backlog.waiting


def test_all_sessions_output_past_the_global_mark_pauses_and_below_it_resumes() -> None:
    n = GLOBAL_HIGH_WATER // HIGH_WATER * 4  # each session stays under its own mark
    w = Worker(n)
    per = GLOBAL_HIGH_WATER // n + BATCH_BYTES
    for i in range(n):
        for _ in range(per // (256 * KiB)):
            w.text(i, chunk(256 * KiB))
    assert all(s.pending_bytes < HIGH_WATER for s in w.sessions)
    assert w.backlog.total > GLOBAL_HIGH_WATER
    paused = [e for e in w.executors if e.paused]
    assert paused, "no session paused at the global mark"
    # the master catches up: every paused executor is read again once below the low mark
    while w.backlog.total >= GLOBAL_LOW_WATER:
        for m in w.masters:
            if m.update_deferreds:
                m.ack_update()
    assert not any(e.paused for e in w.executors)
    assert all(e.transitions[-1] == "resume" for e in paused)
