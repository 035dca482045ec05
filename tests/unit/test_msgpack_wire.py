"""The msgpack wire on a StringTransport: the real WebSocket handshake and frames, then the
message layer (numbering, ops, errors), start_command through the core to a session with a
fake pool, and the whole-line rule for text."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import txaio
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from unit_fakes import FakePool, StopRecorder, make_config, text_frame, value_frame

from pyworker import frames
from pyworker.frontend import metrics
from pyworker.frontend.core import WorkerCore
from pyworker.frontend.msgpack import (
    MASTER_UTIME_BUG,
    READ_NONE_WARNING,
    ConnectionLostError,
    MsgpackFactory,
    MsgpackFront,
    MsgpackMasterSide,
    RemoteError,
    encode_basic_auth,
)
from pyworker.frontend.session import CommandSession

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
NOW = 1_000_000.0


def server_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One unmasked, final WebSocket frame, as a server sends it."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + n.to_bytes(2, "big")
    else:
        head += bytes([127]) + n.to_bytes(8, "big")
    return head + payload


def client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Decode the masked frames a client sent (whole frames only)."""
    out = []
    i = 0
    while i < len(data):
        opcode = data[i] & 0x0F
        assert data[i] & 0x80, "we never fragment"
        masked, n = data[i + 1] & 0x80, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = int.from_bytes(data[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i:i + 8], "big"), i + 8
        assert masked, "a client masks every frame (RFC 6455 5.3)"
        mask, i = data[i:i + 4], i + 4
        payload = bytes(b ^ mask[k % 4] for k, b in enumerate(data[i:i + n]))
        i += n
        out.append((opcode, payload))
    return out


class Master:
    """The master's end of one msgpack WebSocket, on a StringTransport and a fake clock."""

    def __init__(self, basedir: Path) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(NOW)
        self.pool = FakePool()
        self.core = WorkerCore(make_config(str(basedir), protocol="msgpack_experimental_v7"),
                               self.pool, self.clock, StopRecorder())  # type: ignore[arg-type]
        self.front = MsgpackFront(self.core)
        self.factory = MsgpackFactory(self.front, "ws://127.0.0.1:9989",
                                      encode_basic_auth("w1", "pw"))
        self.proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9989))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 9989))
        self.proto.makeConnection(self.transport)
        self.request = self.transport.value().decode("latin-1")
        self.transport.clear()

    def accept(self) -> None:
        """Answer the upgrade request as the master does."""
        headers = dict(
            line.split(": ", 1) for line in self.request.split("\r\n")[1:] if ": " in line
        )
        key = headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.proto.dataReceived(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode())

    def send(self, msg: Any, opcode: int = 0x2) -> None:
        payload = msg if isinstance(msg, bytes) else msgpack.packb(msg, use_bin_type=True)
        self.proto.dataReceived(server_frame(payload, opcode))

    def received(self) -> list[dict[str, Any]]:
        """The messages the worker sent since the last call."""
        data = self.transport.value()
        self.transport.clear()
        msgs = []
        for opcode, payload in client_frames(data):
            assert opcode == 0x2, "msgpack travels in binary frames"
            msgs.append(msgpack.unpackb(payload, raw=False))
        return msgs

    def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one request; the worker's one answer."""
        self.send(msg)
        (answer,) = self.received()
        return answer

    def start(self, command_id: str = "c1", name: str = "shell",
              args: dict[str, Any] | None = None) -> CommandSession:
        answer = self.ask({"op": "start_command", "seq_number": 100, "builder_name": "b1",
                           "command_id": command_id, "command_name": name,
                           "args": args or {"workdir": "/abs/wd", "command": ["make"]}})
        assert answer == {"op": "response", "seq_number": 100, "result": None}
        return self.core.sessions[("b1", command_id)]


@pytest.fixture
def master(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Master]:
    m = Master(tmp_path)
    # autobahn's own timers (handshake timeouts) go through txaio: keep them on our clock
    monkeypatch.setattr(txaio.config, "loop", m.clock)
    m.accept()
    yield m


# -- handshake and connection state -----------------------------------------------------------


def test_upgrade_request_carries_basic_auth_and_opening_connects_the_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = Master(tmp_path)
    monkeypatch.setattr(txaio.config, "loop", m.clock)
    assert m.request.startswith("GET / HTTP/1.1\r\n")
    assert "Authorization: Basic " + base64.b64encode(b"w1:pw").decode() in m.request
    assert "Host: 127.0.0.1:9989" in m.request
    assert not m.front.connected and not metrics.STATS.connected
    m.accept()
    assert m.front.connected and m.front.proto is m.proto
    assert metrics.STATS.connected and metrics.STATS.connected_since == NOW


def test_closing_fails_waiting_requests_and_stops_the_commands(master: Master) -> None:
    session = master.start()
    executor = master.pool.serve()
    side = session.master
    results: list[Any] = []
    side.call("reader", "read", (10,)).addErrback(results.append)
    master.received()
    master.proto.connectionLost(Failure(error.ConnectionDone()))
    assert len(results) == 1 and results[0].check(ConnectionLostError)
    assert not master.front.connected and not metrics.STATS.connected
    assert master.core.sessions == {}
    assert executor.sent[-1] == (frames.INTERRUPT, "silenced")


# -- the message layer --------------------------------------------------------------------------


def test_requests_are_answered_with_their_own_seq_number(master: Master) -> None:
    assert master.ask({"op": "print", "seq_number": 7, "message": "hello"}) == {
        "op": "response", "seq_number": 7, "result": None}
    assert master.ask({"op": "keepalive", "seq_number": 8}) == {
        "op": "response", "seq_number": 8, "result": None}
    info = master.ask({"op": "get_worker_info", "seq_number": 9})
    assert info["seq_number"] == 9 and "is_exception" not in info
    assert info["result"]["basedir"] == master.core.basedir


def test_unknown_op_and_missing_keys_are_exceptions(master: Master) -> None:
    assert master.ask({"op": "no_such_op", "seq_number": 3}) == {
        "op": "response", "seq_number": 3, "result": "Command no_such_op does not exist.",
        "is_exception": True}
    answer = master.ask({"op": "print", "seq_number": 4})
    assert answer["is_exception"] is True
    assert answer["result"] == 'message did not contain obligatory "message" key'
    answer = master.ask({"op": "start_command", "seq_number": 5, "command_id": "x",
                         "command_name": "nosuch", "args": {}})
    assert answer["is_exception"] is True and "unrecognized WorkerCommand" in answer["result"]


def test_frames_that_are_not_requests_get_no_answer(master: Master) -> None:
    master.send(b'{"op": "print", "seq_number": 1, "message": "x"}', opcode=0x1)  # text
    master.send(b"\xc1 not msgpack")
    master.send({"op": "print"})  # no seq_number
    master.send({"op": "response", "seq_number": 12345, "result": None})  # to nothing of ours
    assert master.received() == []
    assert master.front.connected


def test_set_worker_settings_is_validated(master: Master) -> None:
    answer = master.ask({"op": "set_worker_settings", "seq_number": 1, "args": [1, 2]})
    assert answer["is_exception"] and answer["result"] == "set_worker_settings: args must be a map"
    answer = master.ask({"op": "set_worker_settings", "seq_number": 2,
                         "args": {"buffer_size": 1}})
    assert answer["is_exception"]
    assert answer["result"] == "message did not contain obligatory settings for worker"
    settings = {"buffer_size": 4096, "buffer_timeout": 5, "newline_re": r"(\r\n|\r(?=.)|\n)",
                "max_line_length": 4096}
    assert master.ask({"op": "set_worker_settings", "seq_number": 3, "args": settings}) == {
        "op": "response", "seq_number": 3, "result": None}
    assert master.front.settings == settings


# -- commands -----------------------------------------------------------------------------------


def test_start_command_runs_a_session_whose_updates_are_numbered_requests(
    master: Master,
) -> None:
    session = master.start()
    executor = master.pool.serve()
    ((kind, request),) = executor.sent
    assert kind == frames.START
    assert request["args"] == {"workdir": "/abs/wd", "command": ["make"]}, "paths pass through"
    session.executor_frame(*text_frame("one\ntwo\n"))
    (update,) = master.received()
    assert update == {"op": "update", "command_id": "c1", "seq_number": 0,
                      "args": [["stdout", ["one\ntwo\n", [3, 7], [NOW, NOW]]]]}
    session.executor_frame(*value_frame(frames.UPDATE, [("rc", 0)]))
    assert master.received() == [], "the next update waits for the master's answer"
    master.send({"op": "response", "seq_number": 0, "result": None})
    (update,) = master.received()
    assert update["seq_number"] == 1 and update["args"] == [["rc", 0]]
    master.send({"op": "response", "seq_number": 1, "result": None})
    session.executor_frame(*value_frame(frames.COMPLETE, None))
    assert master.received() == [
        {"op": "complete", "command_id": "c1", "seq_number": 2, "args": None}]
    assert master.core.sessions == {}


def test_transfer_leftovers_are_dropped_and_interrupt_reaches_the_executor(
    master: Master,
) -> None:
    master.start("up", "upload_file", {"workdir": "wd", "workersrc": "f", "path": "/abs/wd/f",
                                       "maxsize": None, "blocksize": 16384, "keepstamp": False})
    executor = master.pool.serve()
    assert executor.sent[0][1]["args"] == {"path": "/abs/wd/f", "maxsize": None,
                                           "blocksize": 16384, "keepstamp": False}
    assert master.ask({"op": "interrupt_command", "seq_number": 6, "builder_name": "b1",
                       "command_id": "up", "why": "stop"}) == {
        "op": "response", "seq_number": 6, "result": None}
    assert executor.sent[-1] == (frames.INTERRUPT, "stop")


def test_text_goes_out_as_whole_lines_and_complete_flushes_held_tails(master: Master) -> None:
    session = master.start()
    master.pool.serve()
    session.executor_frame(*text_frame("abc\nde"))
    (update,) = master.received()
    assert update["args"] == [["stdout", ["abc\n", [3], [NOW]]]]
    master.send({"op": "response", "seq_number": update["seq_number"], "result": None})
    session.executor_frame(*text_frame("f\nxyz"))
    (update,) = master.received()
    assert update["args"] == [["stdout", ["def\n", [3], [NOW]]]]
    master.send({"op": "response", "seq_number": update["seq_number"], "result": None})
    session.executor_frame(*value_frame(frames.LOG, ("build.log", b"partial")))
    assert master.received() == [], "a text with no whole line sends nothing"
    session.executor_frame(*value_frame(frames.COMPLETE, None))
    flush, complete = master.received()
    assert flush["op"] == "update" and complete["op"] == "complete"
    assert complete["seq_number"] == flush["seq_number"] + 1
    assert sorted(flush["args"], key=str) == sorted([
        ["stdout", ["xyz\n", [3], [NOW]]],
        ["log", ["build.log", ["partial\n", [7], [NOW]]]],
    ], key=str)


# -- the master's answers to our calls ------------------------------------------------------------


def test_master_bugs_in_utime_and_read_are_handled(master: Master) -> None:
    session = master.start()
    side = session.master
    assert isinstance(side, MsgpackMasterSide)
    results: list[Any] = []
    side.call("writer", "utime", ((1.0, 2.0),)).addBoth(results.append)
    (msg,) = master.received()
    assert msg["op"] == "update_upload_file_utime"
    assert (msg["access_time"], msg["modified_time"]) == (1.0, 2.0)
    master.send({"op": "response", "seq_number": msg["seq_number"], "is_exception": True,
                 "result": f"{MASTER_UTIME_BUG} 2 positional arguments but 3 were given"})
    assert results == [None], "the upload is kept; only the time stamps are lost"

    side.call("writer", "close", ()).addBoth(results.append)
    (msg,) = master.received()
    master.send({"op": "response", "seq_number": msg["seq_number"], "is_exception": True,
                 "result": "disk full"})
    assert results[-1].check(RemoteError) and str(results[-1].value) == "disk full"

    # the master answers reads with None: the end of the file, as the reference takes it,
    # said once in the worker log however many reads were in flight
    with capturedLogs() as events:
        for _ in range(2):
            side.call("reader", "read", (4096,)).addBoth(results.append)
        first, second = master.received()
        assert first == {"op": "update_read_file", "length": 4096, "command_id": "c1",
                         "seq_number": first["seq_number"]}
        for msg in (first, second):
            master.send({"op": "response", "seq_number": msg["seq_number"], "result": None})
    assert results[-2:] == [b"", b""]
    said = [formatEvent(e) for e in events if e.get("log_format") == READ_NONE_WARNING]
    assert said == [READ_NONE_WARNING.format(id="c1")]
    side.call("reader", "read", (4096,)).addBoth(results.append)
    (msg,) = master.received()
    master.send({"op": "response", "seq_number": msg["seq_number"], "result": b"data"})
    assert results[-1] == b"data"
