"""The executor pipe framing: frames survive any split of the byte stream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyworker import frames as wire


def test_round_trip_value_and_raw_frames() -> None:
    stream = (
        wire.value_frame(wire.UPDATE, [("rc", 0), ("stat", (1, 2, 3))])
        + wire.frame(wire.TEXT, "héllo\n".encode(), wire.CHANNEL_OF["stderr"])
        + wire.frame(wire.COMPLETE, b"")
    )
    frames = list(wire.FrameDecoder().feed(stream))
    assert frames[0][0] == wire.UPDATE
    assert wire.load(frames[0][2]) == [("rc", 0), ("stat", (1, 2, 3))]
    assert frames[1] == (wire.TEXT, 2, "héllo\n".encode())
    assert frames[2] == (wire.COMPLETE, 0, b"")


@given(
    st.lists(
        st.tuples(st.integers(1, 30), st.integers(0, 3), st.binary(max_size=200)), max_size=20
    ),
    st.integers(1, 50),
)
def test_any_split_of_the_stream(frames: list[tuple[int, int, bytes]], step: int) -> None:
    stream = b"".join(wire.frame(k, p, c) for k, c, p in frames)
    decoder = wire.FrameDecoder()
    got = []
    for i in range(0, len(stream), step):
        got.extend(decoder.feed(stream[i : i + step]))
    assert got == [(k, c, p) for k, c, p in frames]
    assert decoder.pending == 0


def test_oversized_length_is_rejected() -> None:
    bad = wire.HEADER.pack(wire.MAX_PAYLOAD + 1, wire.TEXT, 0, 0)
    with pytest.raises(wire.WireError):
        list(wire.FrameDecoder().feed(bad))


def test_bad_marshal_payload() -> None:
    with pytest.raises(wire.WireError):
        wire.load(b"\xff\x00garbage")
