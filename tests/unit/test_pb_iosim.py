"""The PB wire through ``twisted.test.iosim``: an in-test PB master and the worker's BotFactory.

The master here is a few lines of Perspective Broker (a portal, a realm, an avatar with
``perspective_keepalive``, a ``RemoteCommand``-like referenceable); the worker side is the
real :class:`~pyworker.frontend.pb.BotFactory` and :class:`~pyworker.frontend.core.WorkerCore`
with a fake pool. Bytes move only when the test pumps, time only when it advances the clock.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.cred import checkers, portal
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.spread import pb
from twisted.test import iosim
from unit_fakes import FakePool, StopRecorder, make_config, text_frame, value_frame
from zope.interface import implementer

from pyworker import commandset, frames
from pyworker import config as config_mod
from pyworker.frontend import metrics
from pyworker.frontend.core import WorkerCore
from pyworker.frontend.pb import BotFactory

# -- the in-test master ------------------------------------------------------------------------


class MasterAvatar(pb.Avatar):
    """The master's perspective for one worker: what the worker may call on the master."""

    def __init__(self, name: bytes, mind: Any) -> None:
        self.name = name
        self.mind = mind
        self.keepalives = 0
        self.shutdowns = 0

    def perspective_keepalive(self) -> None:
        self.keepalives += 1

    def perspective_shutdown(self) -> None:
        self.shutdowns += 1


@implementer(portal.IRealm)
class MasterRealm:
    def __init__(self) -> None:
        self.avatars: list[MasterAvatar] = []

    def requestAvatar(self, avatar_id: bytes, mind: Any, *interfaces: Any) -> Any:  # noqa: N802
        assert pb.IPerspective in interfaces
        avatar = MasterAvatar(avatar_id, mind)
        self.avatars.append(avatar)
        return pb.IPerspective, avatar, lambda: None


class RemoteCommand(pb.Referenceable):
    """The master's handle on one running command (what ``startCommand`` is given)."""

    def __init__(self) -> None:
        self.updates: list[Any] = []
        self.completes: list[Any] = []

    def remote_update(self, updates: Any) -> int:
        self.updates.append(updates)
        return 0

    def remote_complete(self, failure: Any) -> None:
        self.completes.append(failure)


class Connection:
    """A master, a worker and the IOPump between them, on one clock."""

    def __init__(self, basedir: Path, password: str = "pw", root: Any = None,
                 **config: Any) -> None:
        self.clock = MemoryReactorClock()
        self.realm = MasterRealm()
        if root is None:
            checker = checkers.InMemoryUsernamePasswordDatabaseDontUse(w1=password.encode())
            server_factory = pb.PBServerFactory(portal.Portal(self.realm, [checker]))
        else:
            server_factory = pb.PBServerFactory(root)
        self.pool = FakePool()
        self.stops = StopRecorder()
        self.config = make_config(str(basedir), **config)
        self.core = WorkerCore(self.config, self.pool, self.clock, self.stops)  # type: ignore[arg-type]
        self.factory = BotFactory(self.core)
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: self.factory.buildProtocol(None),
            clock=self.clock,
        )

    @property
    def avatar(self) -> MasterAvatar:
        (avatar,) = self.realm.avatars
        return avatar

    def call(self, ref: Any, method: str, *args: Any) -> Any:
        """Call a remote method, pump until it is answered, return the result (or Failure)."""
        d = ref.callRemote(method, *args)
        self.pump.flush()
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, f"{method} was not answered"
        return results[0]

    def builder(self, name: str = "b1", builddir: str = "build1") -> Any:
        faces = self.call(self.avatar.mind, "setBuilderList", [(name, builddir)])
        return faces[name]


@pytest.fixture
def basedir(tmp_path: Path) -> Path:
    return tmp_path


# -- login ---------------------------------------------------------------------------------------


def test_login_with_newcred_gives_the_master_the_bot(basedir: Path) -> None:
    conn = Connection(basedir)
    assert conn.avatar.name == b"w1"
    assert isinstance(conn.avatar.mind, pb.RemoteReference)
    assert conn.factory.connected
    assert metrics.STATS.connected and metrics.STATS.connected_since == conn.clock.seconds()
    assert conn.stops.codes == []


def test_a_refused_login_is_retried_after_the_backoff_delay(basedir: Path) -> None:
    conn = Connection(basedir, password="not the worker's")
    assert conn.realm.avatars == [] and not conn.factory.connected
    assert conn.stops.codes == [], "a wrong password is retried, not fatal"
    assert not conn.pump.clientIO.disconnecting
    (call,) = conn.clock.getDelayedCalls()
    delay = call.getTime() - conn.clock.seconds()
    assert 1.5 <= delay < 2.5, "the reference's backoffPolicy for a first failed attempt"
    conn.clock.advance(delay - 0.01)
    assert not conn.pump.clientIO.disconnecting, "the retry waits for its delay"
    conn.clock.advance(0.02)
    assert conn.pump.clientIO.disconnecting, "the connection is dropped so the service retries"


def test_refused_logins_stop_the_worker_past_maxretries(basedir: Path) -> None:
    conn = Connection(basedir, password="wrong", maxretries=1)
    assert conn.stops.codes == [1]
    assert conn.clock.getDelayedCalls() == []


def test_any_other_login_error_stops_the_worker_with_exit_1(basedir: Path) -> None:
    conn = Connection(basedir, root=pb.Root())  # no remote_login: not a Buildbot master
    assert conn.stops.codes == [1]
    assert not conn.factory.connected


# -- the master's calls on the Bot ---------------------------------------------------------------


def test_get_worker_info_commands_and_version(basedir: Path) -> None:
    (basedir / "info").mkdir()
    (basedir / "info" / "admin").write_text("Jane <jane@example.org>\n")
    conn = Connection(basedir)
    info = conn.call(conn.avatar.mind, "getWorkerInfo")
    assert info["admin"] == "Jane <jane@example.org>\n"
    assert info["basedir"] == str(basedir)
    assert info["worker_commands"] == dict(commandset.WORKER_COMMANDS)
    assert info["version"] == config_mod.REFERENCE_VERSION
    assert conn.call(conn.avatar.mind, "getCommands") == dict(commandset.WORKER_COMMANDS)
    assert conn.call(conn.avatar.mind, "getVersion") == config_mod.REFERENCE_VERSION


def test_set_builder_list_makes_directories_and_forgets_removed_builders(basedir: Path) -> None:
    conn = Connection(basedir)
    faces = conn.call(conn.avatar.mind, "setBuilderList", [("b1", "build1"), ("b2", "build2")])
    assert sorted(faces) == ["b1", "b2"]
    assert all(isinstance(f, pb.RemoteReference) for f in faces.values())
    assert (basedir / "build1").is_dir() and (basedir / "build2").is_dir()
    faces = conn.call(conn.avatar.mind, "setBuilderList", [("b2", "build2")])
    assert sorted(faces) == ["b2"] and sorted(conn.core.builders) == ["b2"]
    refused = conn.call(conn.avatar.mind, "setBuilderList", "not a list")
    assert isinstance(refused, Failure) and "must be a list" in refused.getErrorMessage()


# -- commands ------------------------------------------------------------------------------------


def test_start_command_reaches_the_core_with_absolute_paths_and_reports_back(
    basedir: Path,
) -> None:
    conn = Connection(basedir)
    face = conn.builder()
    command = RemoteCommand()
    result = conn.call(face, "startCommand", command, "3", "shell",
                       {"workdir": "wd", "command": ["make", "all"], "env": {"A": "1"}})
    assert result is None
    session = conn.core.sessions[("b1", "3")]
    executor = conn.pool.serve()
    ((kind, request),) = executor.sent
    assert kind == frames.START
    assert request["name"] == "shell" and request["command_id"] == "3"
    assert request["args"]["workdir"] == os.path.join(str(basedir), "build1", "wd")
    assert request["args"]["command"] == ["make", "all"]
    assert request["basedir"] == str(basedir)

    session.executor_frame(*text_frame("compiling\n"))
    session.executor_frame(*value_frame(frames.UPDATE, [("rc", 0)]))
    session.executor_frame(*value_frame(frames.COMPLETE, None))
    conn.pump.flush()
    updates = [entry for batch in command.updates for entry in batch]
    assert updates == [[{"stdout": "compiling\n"}, 0], [{"rc": 0}, 0]]
    assert command.completes == [None]
    assert conn.core.sessions == {}
    assert conn.pool.released == [executor]


@pytest.mark.parametrize(("command", "args", "translated"), [
    ("mkdir", {"dir": ["a", "b/c"]}, {"paths": ["{b}/a", "{b}/b/c"]}),
    ("rmdir", {"dir": "gone"}, {"paths": ["{b}/gone"]}),
    ("cpdir", {"fromdir": "src", "todir": "dst"}, {"from_path": "{b}/src",
                                                 "to_path": "{b}/dst"}),
    ("stat", {"file": "f", "workdir": "wd"}, {"path": "{b}/wd/f", "workdir": "wd"}),
    ("listdir", {"dir": "wd"}, {"path": "{b}/wd"}),
    ("glob", {"path": "wd/*.o"}, {"path": "{b}/wd/*.o"}),
])
def test_pb_relative_paths_become_absolute_under_the_builder_directory(
    basedir: Path, command: str, args: dict[str, Any], translated: dict[str, Any],
) -> None:
    conn = Connection(basedir)
    face = conn.builder()
    assert conn.call(face, "startCommand", RemoteCommand(), "9", command, args) is None
    ((_, request),) = conn.pool.serve().sent
    b = os.path.join(str(basedir), "build1")
    expected = {k: [p.format(b=b) for p in v] if isinstance(v, list) else
                v.format(b=b) if k != "workdir" else v for k, v in translated.items()}
    assert request["args"] == expected


class Writer(pb.Referenceable):
    """The master's file writer for an upload."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def remote_write(self, data: bytes) -> None:
        self.data += data

    def remote_close(self) -> None:
        self.closed = True


def test_an_upload_writes_through_the_masters_writer(basedir: Path) -> None:
    conn = Connection(basedir)
    face = conn.builder()
    writer = Writer()
    conn.call(face, "startCommand", RemoteCommand(), "8", "uploadFile",
              {"workdir": "wd", "workersrc": "out.bin", "writer": writer, "blocksize": 16384,
               "maxsize": None, "keepstamp": False})
    executor = conn.pool.serve()
    ((_, request),) = executor.sent
    assert request["args"]["path"] == os.path.join(str(basedir), "build1", "wd", "out.bin")
    assert "writer" not in request["args"], "references stay in the front end"
    session = conn.core.sessions[("b1", "8")]
    session.executor_frame(frames.WRITE, 0, b"chunk of data")
    session.executor_frame(*value_frame(frames.CALL, ("writer", "close", ())))
    conn.pump.flush()
    assert writer.data == b"chunk of data" and writer.closed
    assert executor.sent[1:] == [(frames.ACK, (13, None)), (frames.RESULT, (True, None))]


class Reader(pb.Referenceable):
    """The master's file reader for a download."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def remote_read(self, length: int) -> bytes:
        block, self.data = self.data[:length], self.data[length:]
        return block


def test_a_download_reads_through_the_masters_reader(basedir: Path) -> None:
    conn = Connection(basedir)
    face = conn.builder()
    conn.call(face, "startCommand", RemoteCommand(), "8", "downloadFile",
              {"workdir": "wd", "workerdest": "in.bin", "reader": Reader(b"0123456789"),
               "blocksize": 4, "maxsize": None, "mode": None})
    executor = conn.pool.serve()
    ((_, request),) = executor.sent
    assert request["args"]["path"] == os.path.join(str(basedir), "build1", "wd", "in.bin")
    assert "reader" not in request["args"]
    session = conn.core.sessions[("b1", "8")]
    session.executor_frame(*value_frame(frames.READ, 4))
    session.executor_frame(*value_frame(frames.READ, 4))
    conn.pump.flush()
    assert executor.sent[1:] == [(frames.DATA, b"0123"), (frames.DATA, b"4567")]


def test_a_failed_command_reaches_the_master_as_a_failure(basedir: Path) -> None:
    conn = Connection(basedir)
    face = conn.builder()
    command = RemoteCommand()
    conn.call(face, "startCommand", command, "4", "stat", {"file": "x"})
    conn.pool.serve()
    conn.core.sessions[("b1", "4")].executor_frame(
        *value_frame(frames.COMPLETE, "stat: no such file"))
    conn.pump.flush()
    (failure,) = command.completes
    assert failure is not None and "stat: no such file" in str(failure.value)


def test_unknown_command_and_missing_args_are_refused(basedir: Path) -> None:
    conn = Connection(basedir)
    face = conn.builder()
    unknown = conn.call(face, "startCommand", RemoteCommand(), "5", "nosuch", {})
    assert isinstance(unknown, Failure)
    assert unknown.check("pyworker.frontend.pb.UnknownCommand")
    assert "unrecognized WorkerCommand 'nosuch'" in unknown.getErrorMessage()
    missing = conn.call(face, "startCommand", RemoteCommand(), "6", "shell", {"workdir": "wd"})
    assert isinstance(missing, Failure) and "missing args: command" in missing.getErrorMessage()
    assert conn.core.sessions == {} and not conn.pool.waiting


def test_interrupt_command_reaches_the_executor(basedir: Path) -> None:
    conn = Connection(basedir)
    face = conn.builder()
    conn.call(face, "startCommand", RemoteCommand(), "3", "shell",
              {"workdir": "wd", "command": ["sleep", "100"]})
    executor = conn.pool.serve()
    conn.call(face, "interruptCommand", "3", "the user pressed stop")
    assert executor.sent[-1] == (frames.INTERRUPT, "the user pressed stop")


def test_losing_the_master_stops_its_commands_and_the_keepalive(basedir: Path) -> None:
    conn = Connection(basedir, keepalive=600)
    face = conn.builder()
    command = RemoteCommand()
    conn.call(face, "startCommand", command, "3", "shell",
              {"workdir": "wd", "command": ["sleep", "100"]})
    executor = conn.pool.serve()
    conn.pump.clientIO.loseConnection()
    conn.pump.flush()
    assert not conn.factory.connected and not metrics.STATS.connected
    assert conn.core.sessions == {}
    assert executor.sent[-1] == (frames.INTERRUPT, "silenced")
    conn.core.stop_commands()  # nothing left to stop
    assert command.updates == [] and command.completes == []
    assert conn.clock.getDelayedCalls() == [], "no keepalive is left scheduled"


# -- keepalive -----------------------------------------------------------------------------------


def test_keepalive_every_interval_on_the_core_clock(basedir: Path) -> None:
    conn = Connection(basedir, keepalive=600)
    assert conn.avatar.keepalives == 0, "the first keepalive waits one interval"
    conn.clock.advance(599)
    conn.pump.flush()
    assert conn.avatar.keepalives == 0
    conn.clock.advance(1)
    conn.pump.flush()
    assert conn.avatar.keepalives == 1
    conn.clock.advance(600)
    conn.pump.flush()
    assert conn.avatar.keepalives == 2


@pytest.mark.parametrize("keepalive", [0, None])
def test_no_keepalive_when_disabled(basedir: Path, keepalive: int | None) -> None:
    conn = Connection(basedir, keepalive=keepalive)
    assert conn.factory.connected
    assert conn.clock.getDelayedCalls() == []


def test_ask_master_to_drain_calls_shutdown_on_the_perspective(basedir: Path) -> None:
    conn = Connection(basedir)
    d = conn.factory.ask_master_to_drain()
    assert isinstance(d, defer.Deferred)
    conn.pump.flush()
    assert conn.avatar.shutdowns == 1
