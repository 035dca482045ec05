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


@given(
    st.lists(st.tuples(st.integers(1, 30), st.sampled_from([0, 5, 16 * 1024 - 1, 16 * 1024,
                                                            70_000, 200_000])), max_size=8),
    st.lists(st.integers(1, 300_000), min_size=1, max_size=30),
    st.integers(0, 5),
)
def test_large_payloads_any_split_and_early_stops(sizes: list[tuple[int, int]],
                                                 cuts: list[int], stop_after: int) -> None:
    """Transfer-sized payloads are gathered across chunks; a consumer that stops iterating
    gets the frames it did not take from the next feed."""
    frames = [(k, i % 3, bytes([i]) * n) for i, (k, n) in enumerate(sizes)]
    stream = b"".join(wire.frame(k, p, c) for k, c, p in frames)
    decoder = wire.FrameDecoder()
    got: list[tuple[int, int, bytes]] = []
    pos = 0
    chunks = []
    for cut in cuts:
        chunks.append(stream[pos : pos + cut])
        pos += cut
    chunks.append(stream[pos:])
    for i, chunk in enumerate(chunks):
        it = decoder.feed(chunk)
        for n, item in enumerate(it):
            got.append(item)
            if i % 2 and n + 1 >= stop_after:
                break
        it.close()
    got.extend(decoder.feed(b""))
    while decoder.pending and len(got) < len(frames):
        before = len(got)
        got.extend(decoder.feed(b""))
        if len(got) == before:
            break
    assert got == frames
    assert decoder.pending == 0
    assert all(type(p) is bytes for _, _, p in got)


def test_oversized_length_is_rejected() -> None:
    bad = wire.HEADER.pack(wire.MAX_PAYLOAD + 1, wire.TEXT, 0, 0)
    with pytest.raises(wire.WireError):
        list(wire.FrameDecoder().feed(bad))


def test_bad_marshal_payload() -> None:
    with pytest.raises(wire.WireError):
        wire.load(b"\xff\x00garbage")


# -- split_text: text in pieces that fit a frame and the master's wire -------------------------

TEXTS = st.lists(st.sampled_from(["a", "é", "€", "𝄞", "\n", "\ufffd", "xyz\n"]), max_size=400)


@given(TEXTS, st.integers(4, 64))
def test_split_text_keeps_every_byte_and_each_piece_is_utf8(parts: list[str], limit: int) -> None:
    data = "".join(parts).encode()
    pieces = wire.split_text(data, limit)
    assert b"".join(pieces) == data
    assert all(len(p) <= limit for p in pieces)
    assert all(p for p in pieces) or data == b""
    for p in pieces:
        p.decode("utf-8")  # a character is never cut in two


@given(st.lists(st.text(alphabet="aé€\n", max_size=30).map(lambda s: s + "\n"), max_size=40),
       st.integers(120, 400))
def test_split_text_cuts_only_between_lines_when_lines_fit(lines: list[str], limit: int) -> None:
    data = "".join(lines).encode()
    for piece in wire.split_text(data, limit) if data else ():
        assert piece.endswith(b"\n"), "a whole line was cut"


def test_split_text_of_a_long_line_and_of_bytes_that_are_not_utf8() -> None:
    line = ("€" * 1000).encode()  # 3000 bytes, no newline
    pieces = wire.split_text(line, 100)
    assert [len(p) for p in pieces[:-1]] == [99] * (len(pieces) - 1)
    assert b"".join(pieces) == line
    junk = b"\x80" * 50
    assert b"".join(wire.split_text(junk, 8)) == junk
