"""A master with bugs never wedges a command (issue 12, items 1 and 5).

* A transfer whose ``writer``/``reader`` is not a remote reference is refused over PB before
  it starts, with a readable reason; no executor is taken.
* Whatever a ``MasterSide`` raises at once becomes a failed answer to the executor (and a
  session still ends), so no executor waits for ever.
* A second ``startCommand`` with the id of a running command is refused; the first goes on
  to its own ``complete``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_pb_iosim import Connection, RemoteCommand, Writer
from twisted.internet import defer
from twisted.python.failure import Failure
from unit_fakes import FakeMaster, FakePool, value_frame

from pyworker import frames
from pyworker.frontend.session import CommandSession

NOT_REFERENCES: list[Any] = ["not-a-reference", True, -1, 1.5, b"x", [], {}, None]

TRANSFERS: list[tuple[str, str, dict[str, Any]]] = [
    ("uploadFile", "writer", {"workdir": "wd", "workersrc": "f", "blocksize": 16384,
                              "maxsize": None, "keepstamp": False}),
    ("uploadDirectory", "writer", {"workdir": "wd", "workersrc": "d", "blocksize": 16384,
                                   "maxsize": None, "compress": None}),
    ("downloadFile", "reader", {"workdir": "wd", "workerdest": "f", "blocksize": 16384,
                                "maxsize": None, "mode": None}),
]


@pytest.mark.parametrize("value", NOT_REFERENCES, ids=repr)
@pytest.mark.parametrize(("command", "key", "args"), TRANSFERS, ids=[t[0] for t in TRANSFERS])
def test_a_transfer_whose_reference_is_not_one_is_refused_at_start(
    tmp_path: Path, command: str, key: str, args: dict[str, Any], value: Any,
) -> None:
    conn = Connection(tmp_path)
    face = conn.builder()
    refused = conn.call(face, "startCommand", RemoteCommand(), "1", command,
                        dict(args, **{key: value}))
    assert isinstance(refused, Failure)
    assert f"argument '{key}' must be a remote reference" in refused.getErrorMessage()
    assert conn.core.sessions == {} and not conn.pool.waiting, "no executor is asked for"
    # the builder goes on: a good transfer runs next
    assert conn.call(face, "startCommand", RemoteCommand(), "2", command,
                     dict(args, **{key: Writer()})) is None
    assert ("b1", "2") in conn.core.sessions


class RaisingMaster(FakeMaster):
    """A master side whose calls raise at once, as PB's ``callRemote`` does on a stale
    broker or a value that is not a reference."""

    def call(self, target: str, method: str, args: tuple[Any, ...]) -> defer.Deferred[Any]:
        self.events.append(("call", target, method, args))
        raise AttributeError("'str' object has no attribute 'callRemote'")


def _session(master: FakeMaster) -> tuple[CommandSession, Any, list[CommandSession]]:
    pool = FakePool()
    done: list[CommandSession] = []
    session = CommandSession(pool, master, "uploadFile", "7",
                             {"name": "uploadFile", "args": {}, "command_id": "7"},
                             on_done=done.append)
    session.start()
    return session, pool.serve(), done


def test_a_call_that_raises_at_once_is_a_failed_result() -> None:
    session, executor, _ = _session(RaisingMaster())
    session.executor_frame(*value_frame(frames.CALL, ("writer", "close", ())))
    kind, (ok, text) = executor.sent[-1]
    assert kind == frames.RESULT and ok is False
    assert "'str' object has no attribute 'callRemote'" in text


def test_a_write_that_raises_at_once_is_a_failed_ack() -> None:
    session, executor, _ = _session(RaisingMaster())
    session.executor_frame(frames.WRITE, 0, b"block")
    kind, (n, error) = executor.sent[-1]
    assert kind == frames.ACK and n == 5 and "callRemote" in error


def test_a_read_that_raises_at_once_is_a_failed_result() -> None:
    session, executor, _ = _session(RaisingMaster())
    session.executor_frame(*value_frame(frames.READ, 4096))
    kind, (ok, text) = executor.sent[-1]
    assert kind == frames.RESULT and ok is False and "callRemote" in text


class DeadMaster(FakeMaster):
    """Every call on the master raises at once (the broker is gone)."""

    def send_updates(self, updates: list[tuple[str, Any]]) -> defer.Deferred[Any]:
        raise RuntimeError("Calling Stale Broker")

    def complete(self, failure: str | None) -> defer.Deferred[Any]:
        self.events.append(("complete", failure))
        raise RuntimeError("Calling Stale Broker")


def test_a_session_ends_even_if_its_updates_and_complete_raise() -> None:
    master = DeadMaster()
    session, executor, done = _session(master)
    session.executor_frame(frames.TEXT, 0, b"some output\n")
    session.executor_frame(*value_frame(frames.UPDATE, [("rc", 0)]))
    session.executor_frame(*value_frame(frames.COMPLETE, None))
    assert session.done and done == [session]
    assert master.completes == [None]
    assert session.in_flight == 0


# -- a reused command id -----------------------------------------------------------------------


def test_a_reused_command_id_is_refused_and_the_first_still_completes(tmp_path: Path) -> None:
    conn = Connection(tmp_path)
    face = conn.builder()
    first = RemoteCommand()
    shell = {"workdir": "wd", "command": ["sleep", "10"]}
    assert conn.call(face, "startCommand", first, "5", "shell", shell) is None
    executor = conn.pool.serve()
    second = RemoteCommand()
    refused = conn.call(face, "startCommand", second, "5", "shell", shell)
    assert isinstance(refused, Failure)
    assert "command id 5 is already running" in refused.getErrorMessage()
    assert not conn.pool.waiting, "the second one never asked for an executor"
    assert [k for k, _ in executor.sent] == [frames.START], "the first is not interrupted"
    session = conn.core.sessions[("b1", "5")]
    session.executor_frame(*value_frame(frames.UPDATE, [("rc", 0)]))
    session.executor_frame(*value_frame(frames.COMPLETE, None))
    conn.pump.flush()
    assert first.completes == [None] and second.completes == []
    assert conn.core.sessions == {}
    # the id is free again once the first has completed
    assert conn.call(face, "startCommand", RemoteCommand(), "5", "shell", shell) is None


def test_the_same_id_on_another_builder_is_another_command(tmp_path: Path) -> None:
    conn = Connection(tmp_path)
    faces = conn.call(conn.avatar.mind, "setBuilderList", [("b1", "d1"), ("b2", "d2")])
    shell = {"workdir": "wd", "command": ["true"]}
    assert conn.call(faces["b1"], "startCommand", RemoteCommand(), "5", "shell", shell) is None
    assert conn.call(faces["b2"], "startCommand", RemoteCommand(), "5", "shell", shell) is None
    assert set(conn.core.sessions) == {("b1", "5"), ("b2", "5")}
