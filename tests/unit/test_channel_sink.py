"""A download's blocks go from the control pipe into the file (``Channel.sink_data``):
the frames around them are decoded as ever, and a failing file loses no frame."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from pyworker import frames
from pyworker.executor.channel import SUNK, Channel


def _feed(w: int, data: bytes) -> threading.Thread:
    def run() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(w, view) :]

    t = threading.Thread(target=run)
    t.start()
    return t


def test_data_payloads_are_spliced_and_other_frames_decoded(tmp_path: Path) -> None:
    r, w = os.pipe()
    blocks = [os.urandom(512 * 1024), os.urandom(100_000), b"xyz"]
    stream = (frames.frame(frames.DATA, blocks[0]) + frames.value_frame(frames.RESULT, (True, 1))
              + frames.frame(frames.DATA, blocks[1]) + frames.frame(frames.DATA, blocks[2])
              + frames.frame(frames.DATA, b""))
    target = tmp_path / "out"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    channel = Channel(r, w)
    writer = _feed(w, stream)
    channel.sink_data(fd)
    got = []
    for _ in range(5):
        kind, _, payload = channel.next_answer("DATA")
        got.append((kind, channel.take_sunk() if kind == SUNK else payload))
    channel.sink_data(None)
    writer.join()
    os.close(fd)
    assert got == [(SUNK, len(blocks[0])), (frames.RESULT, frames.value_frame(
        frames.RESULT, (True, 1))[frames.HEADER_SIZE :]), (SUNK, len(blocks[1])),
        (SUNK, 3), (frames.DATA, b"")]
    assert target.read_bytes() == b"".join(blocks)
    assert channel.sink_error is None
    os.close(r)
    os.close(w)


def test_a_failing_file_drops_its_payloads_and_keeps_the_frames(tmp_path: Path) -> None:
    r, w = os.pipe()
    stream = (frames.frame(frames.DATA, b"a" * 300_000) + frames.value_frame(frames.RESULT,
              (False, "boom")) + frames.frame(frames.DATA, b"b" * 70_000))
    (tmp_path / "ro").write_bytes(b"")
    fd = os.open(tmp_path / "ro", os.O_RDONLY)  # every write fails (EBADF)
    channel = Channel(r, w)
    writer = _feed(w, stream)
    channel.sink_data(fd)
    kinds = []
    for _ in range(3):
        kind, _, payload = channel.next_answer("DATA")
        kinds.append(kind)
        if kind == SUNK:
            channel.take_sunk()
    writer.join()
    os.close(fd)
    assert kinds == [SUNK, frames.RESULT, SUNK]
    assert channel.sink_error is not None and "Errno" in channel.sink_error
    os.close(r)
    os.close(w)
