"""The executor's waits for the master's answers end on an interrupt (issue 12, item 1).

A real :class:`~pyworker.executor.channel.Channel` on pipes, the test playing the front end
that never answers: the interrupt alone must bring each command to its ``COMPLETE``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyworker import frames
from pyworker.executor.channel import Channel, Interrupted
from pyworker.executor.main import run_one


class FrontEnd:
    """The far ends of an executor channel's pipes."""

    def __init__(self) -> None:
        self.control_r, self.control_w = os.pipe()
        self.events_r, self.events_w = os.pipe()
        self.channel = Channel(self.control_r, self.events_w)
        self.decoder = frames.FrameDecoder()
        #: Answer each WRITE with its ACK (else writes are never acknowledged).
        self.ack_writes = False

    def send(self, kind: int, value: Any) -> None:
        os.write(self.control_w, frames.value_frame(kind, value))

    def interrupt_after(self, kind: int) -> threading.Thread:
        """Send INTERRUPT once the executor has sent a frame of ``kind`` (it then waits for
        an answer that never comes); the other frames are kept in ``seen``."""
        self.seen: list[tuple[int, int, bytes]] = []

        def watch() -> None:
            while True:
                data = os.read(self.events_r, 1 << 16)
                if not data:
                    return
                for item in self.decoder.feed(data):
                    self.seen.append(item)
                    if item[0] == frames.WRITE and self.ack_writes:
                        self.send(frames.ACK, (len(item[2]), None))
                    if item[0] == kind:
                        self.send(frames.INTERRUPT, "stop")
                    if item[0] == frames.COMPLETE:
                        return

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        for fd in (self.control_r, self.control_w, self.events_r, self.events_w):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def front() -> Iterator[FrontEnd]:
    f = FrontEnd()
    yield f
    f.close()


def test_a_call_waiting_for_its_result_ends_on_an_interrupt(front: FrontEnd) -> None:
    thread = front.interrupt_after(frames.CALL)
    with pytest.raises(Interrupted, match=r"interrupted while waiting for writer\.close\(\)"):
        front.channel.call("writer", "close")
    # once an answer is abandoned, none is matched any more: a late one is not taken
    front.send(frames.RESULT, (True, None))
    with pytest.raises(Interrupted):
        front.channel.call("writer", "utime", (1.0, 2.0))
    front.channel.finish(None)
    thread.join(10)
    assert not thread.is_alive()


def _run(front: FrontEnd, name: str, args: dict[str, Any], basedir: Path,
         interrupt_after: int) -> list[tuple[int, Any]]:
    thread = front.interrupt_after(interrupt_after)
    run_one(front.channel, {"name": name, "args": args, "command_id": "1",
                            "basedir": str(basedir), "io": {}})
    thread.join(10)
    assert not thread.is_alive(), "the command did not complete"
    return [(k, p if k in (frames.TEXT, frames.WRITE) else frames.load(p))
            for k, _, p in front.seen]


def test_an_upload_whose_writes_are_never_acknowledged_completes_on_interrupt(
    front: FrontEnd, tmp_path: Path,
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(64 * 1024))
    got = _run(front, "uploadFile", {"path": str(src), "blocksize": 4096, "maxsize": None,
                                     "keepstamp": True}, tmp_path, frames.WRITE)
    kinds = [k for k, _ in got]
    assert frames.WRITE in kinds
    calls = [v for k, v in got if k == frames.CALL]
    assert calls == [("writer", "close", ())], "the closing call is made, not waited for"
    assert (frames.UPDATE, [("rc", 1)]) in got
    assert got[-1] == (frames.COMPLETE, None), "an interrupt is not a failure"


def test_a_download_whose_reads_are_never_answered_completes_on_interrupt(
    front: FrontEnd, tmp_path: Path,
) -> None:
    dst = tmp_path / "dst.bin"
    dst.write_bytes(b"previous")
    got = _run(front, "downloadFile", {"path": str(dst), "blocksize": 4096, "maxsize": None,
                                       "mode": None}, tmp_path, frames.READ)
    assert [v for k, v in got if k == frames.CALL] == [("reader", "close", ())]
    assert (frames.UPDATE, [("rc", 1)]) in got
    assert got[-1] == (frames.COMPLETE, None)
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.bin"], "no temporary file left"


def test_a_directory_upload_whose_unpack_is_never_answered_completes_on_interrupt(
    front: FrontEnd, tmp_path: Path,
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    front.ack_writes = True  # the archive is written; the unpack call is never answered
    got = _run(front, "uploadDirectory", {"path": str(tmp_path / "d"), "blocksize": 4096,
                                          "maxsize": None, "compress": None},
               tmp_path, frames.CALL)
    assert [v for k, v in got if k == frames.CALL] == [("writer", "unpack", ())]
    assert (frames.UPDATE, [("rc", 1)]) in got
    assert got[-1] == (frames.COMPLETE, None)


def test_an_interrupt_read_with_its_start_is_kept_for_that_command(front: FrontEnd) -> None:
    start = frames.value_frame(frames.START, {"name": "shell"})
    # a late interrupt of the previous command, the new START and its own INTERRUPT: one read
    os.write(front.control_w, frames.value_frame(frames.INTERRUPT, "old")
             + start + frames.value_frame(frames.INTERRUPT, "new"))
    kind, _, _ = front.channel.next_frame()
    assert kind == frames.START
    front.channel.reset()
    assert front.channel.interrupt_reason == "new"
    assert not front.channel.has_frame()


def test_a_late_interrupt_of_the_previous_command_is_forgotten(front: FrontEnd) -> None:
    os.write(front.control_w, frames.value_frame(frames.INTERRUPT, "old")
             + frames.value_frame(frames.START, {"name": "shell"}))
    kind, _, _ = front.channel.next_frame()
    assert kind == frames.START
    front.channel.reset()
    assert front.channel.interrupt_reason is None
