"""Tests of ``StreamPump`` (pyworker.iocore): both twins against the executor's Python path.

The reference is what ``ProcessRunner._pump`` + ``Channel.text`` send today: per chunk read,
``decoder.decode`` (UTF-8, ``errors='replace'``), ``LineSplitter.append`` and one ``TEXT``
frame if that completes lines; at the end ``decoder.decode(b'', final=True)`` and
``LineSplitter.flush()`` (one frame from ``StreamPump.flush``).  Real pipes and PTYs; every
frame is compared byte for byte.
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import os
import pty
import select
import threading
import time
import tty
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyworker import frames as wire
from pyworker.iocore import _python
from pyworker.iocore.lines import LINE_COUNT_RE, LineSplitter

try:
    from pyworker.iocore import _c
except ImportError:  # pragma: no cover - C core not built
    _c = None  # type: ignore[assignment]

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "expensive",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

Frames = list[tuple[int, int, bytes]]
STDOUT = wire.CHANNEL_OF["stdout"]


def _backend_params() -> list[Any]:
    only = os.environ.get("PYWORKER_IO")
    params = []
    if only != "python":
        no_c = pytest.mark.skipif(_c is None, reason="C core not built")
        params.append(pytest.param("c", marks=no_c))
        params.append(pytest.param("c-sse2", marks=no_c))  # the scan without AVX2
    if only != "c":
        params.append("python")
    return params


@pytest.fixture(params=_backend_params())
def twin(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The twin module under test (pyworker.iocore._c or ._python)."""
    if request.param == "python":
        yield _python
        return
    saved = _c._pump_simd()
    if request.param == "c-sse2":
        _c._pump_simd(0)
    try:
        yield _c
    finally:
        _c._pump_simd(saved)


def _twins() -> list[ModuleType]:
    """Both twins when the C core is in use (for direct C == Python comparisons)."""
    if _c is None or os.environ.get("PYWORKER_IO") == "python":
        return [_python]
    if os.environ.get("PYWORKER_IO") == "c":
        return [_c]
    return [_c, _python]


# -- the reference: the executor's current path --------------------------------------------


def reference(chunks: list[bytes], max_line_length: int = 4096, *, channel: int = STDOUT,
              flush: bool = True) -> Frames:
    """Frames ``decoder.decode`` + ``LineSplitter`` + ``Channel.text`` send for these reads."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    splitter = LineSplitter(max_line_length)
    frames: Frames = []
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            lines = splitter.append(text)
            if lines:
                frames.append((wire.TEXT, channel, lines.encode("utf-8")))
    if flush:
        tail = decoder.decode(b"", final=True)
        lines = (splitter.append(tail) if tail else "") + splitter.flush()
        if lines:
            frames.append((wire.TEXT, channel, lines.encode("utf-8")))
    return frames


def reference_counts(chunks: list[bytes]) -> list[int]:
    """``LINE_COUNT_RE`` matches per chunk, on the decoded text (``_count_lines``)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [len(LINE_COUNT_RE.findall(decoder.decode(chunk))) for chunk in chunks]


# -- harness -------------------------------------------------------------------------------


class Drain:
    """Reads the pump's output pipe in a thread (so the pump never blocks) and parses frames."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe()
        self._data = bytearray()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            data = os.read(self.rfd, 1 << 20)
            if not data:
                break
            self._data += data

    def frames(self) -> Frames:
        """Close the write end, wait for everything, return the frames."""
        os.close(self.wfd)
        self._thread.join(30)
        os.close(self.rfd)
        decoder = wire.FrameDecoder()
        frames = list(decoder.feed(bytes(self._data)))
        assert decoder.pending == 0
        return frames


def pump_through_pipe(mod: ModuleType, chunks: list[bytes], max_line_length: int = 4096, *,
                      count_lines: bool = False) -> tuple[Frames, list[int]]:
    """Write each chunk into a real pipe and let the pump read exactly that chunk."""
    drain = Drain()
    rfd, wfd = os.pipe()
    counts = []
    try:
        with mod.StreamPump(drain.wfd, STDOUT, max_line_length,
                            count_lines=count_lines) as pump:
            for chunk in chunks:
                os.write(wfd, chunk)
                n = pump.read_from(rfd, max(len(chunk), 1))
                assert n == len(chunk)
                counts.append(pump.last_newlines)
                assert 0 <= pump.tail_chars < max_line_length
            os.close(wfd)
            wfd = -1
            assert pump.read_from(rfd) == 0
            pump.flush()
            assert pump.tail_chars == 0
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
    return drain.frames(), counts


def pump_by_feed(mod: ModuleType, chunks: list[bytes], max_line_length: int = 4096) -> Frames:
    drain = Drain()
    with mod.StreamPump(drain.wfd, STDOUT, max_line_length) as pump:
        for chunk in chunks:
            pump.feed(chunk)
        pump.flush()
    return drain.frames()


# -- inputs --------------------------------------------------------------------------------

TOKENS = [
    b"a", b"xyz", b" ", b"\n", b"\r", b"\r\n", b"\n\r", b"\x08", b"\x08\x08\x08", b"\x1b",
    b"[", b"u", b"2", b"J", b";", b"H", b"f", b"7", b"\x1b[u", b"\x1b[2J", b"\x1b[22J",
    b"\x1b[12;3H", b"\x1b[1;40f", b"\x1b[1;H", b"\x1b[;1H", b"\x1b[0m", b"\t", b"\x00",
    "é".encode(), "€".encode(), "😀".encode(), "日本語".encode(),
    b"\xe0", b"\xa0", b"\x80", b"\xbf", b"\xed", b"\xed\xa0", b"\xed\xa0\x80", b"\xf0",
    b"\xf0\x90", b"\xf0\x90\x80", b"\xf4\x90", b"\xf5", b"\xc0", b"\xc1\xbf", b"\xc3", b"\xff",
]


@st.composite
def streams(draw: st.DrawFn, max_long: int = 9000) -> bytes:
    """Bytes rich in the cases that matter: tokens, random bytes, long lines, text."""
    parts = draw(st.lists(
        st.one_of(
            st.sampled_from(TOKENS),
            st.binary(max_size=40),
            st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
            st.builds(lambda n, c: c * n, st.integers(1, max_long),
                      st.sampled_from([b"x", "é".encode(), b"0123456789"])),
        ),
        max_size=40,
    ))
    return b"".join(parts)


@st.composite
def chunkings(draw: st.DrawFn, data: bytes, max_chunk: int = 65536) -> list[bytes]:
    """``data`` cut at random places into chunks of at most ``max_chunk`` bytes."""
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=12))))
    chunks = []
    prev = 0
    for cut in [*cuts, len(data)]:
        while cut - prev > max_chunk:
            chunks.append(data[prev : prev + max_chunk])
            prev += max_chunk
        if cut > prev:
            chunks.append(data[prev:cut])
            prev = cut
    return chunks


LINE_LENGTHS = st.sampled_from([2, 3, 5, 8, 64, 65, 66, 100, 4096])


# -- property tests ------------------------------------------------------------------------


@given(data=st.data(), stream=streams(), max_line_length=LINE_LENGTHS)
def test_pipe_frames_match_reference(twin: ModuleType, data: st.DataObject, stream: bytes,
                                     max_line_length: int) -> None:
    chunks = data.draw(chunkings(stream))
    frames, counts = pump_through_pipe(twin, chunks, max_line_length, count_lines=True)
    assert frames == reference(chunks, max_line_length)
    assert counts == reference_counts(chunks)


@given(data=st.data(), stream=streams(max_long=300), max_line_length=LINE_LENGTHS)
def test_feed_frames_identical_between_twins(data: st.DataObject, stream: bytes,
                                             max_line_length: int) -> None:
    chunks = data.draw(chunkings(stream))
    expected = reference(chunks, max_line_length)
    for mod in _twins():
        assert pump_by_feed(mod, chunks, max_line_length) == expected


@given(data=st.data(), stream=streams(max_long=20000))
def test_long_lines_near_the_cut(data: st.DataObject, stream: bytes) -> None:
    """Held CR/ESC prefixes where a 4095-character piece ends, and the partial cut."""
    prefix = b"y" * data.draw(st.sampled_from([4090, 4093, 4094, 4095, 4096, 8189, 8190]))
    tail = data.draw(st.sampled_from([b"\r", b"\x1b", b"\x1b[", b"\x1b[1", b"\x1b[12;",
                                      b"\x1b[12;3", b"\x1b[2", b"\x08"]))
    chunks = [prefix + tail, *data.draw(chunkings(stream))]
    expected = reference(chunks)
    for mod in _twins():
        assert pump_by_feed(mod, chunks) == expected


def test_known_cases(twin: ModuleType) -> None:
    cases: list[list[bytes]] = [
        [b"a\r\nb\rc\n"],
        [b"a\r", b"\nb"],                      # CR LF across reads
        [b"a\r", b"b\r", b"\r"],               # lone CRs, one at the very end
        [b"x\x08", b"\x08y\n"],                # a backspace run split by a read: two newlines
        [b"p\x1b[1", b"2;3", b"4Hq\n"],          # cursor movement across reads
        [b"\x1b[2J\x1b[22J\x1b[u\x1b[1;2f\n"],
        [b"caf\xc3", b"\xa9\n"],               # a character split across reads
        [b"\xed\xa0", b"\x80\n"],              # CPython keeps a truncated surrogate
        [b"\xe0\x80\xf0\x90\n\xff\n"],
        [b"x" * 10000 + b"\n"],
        [b"x" * 4094 + b"\x1b[1", b"2;3H\n"],  # the cut splits ESC[12;3H in the reference
        [b"x" * 4095, b"\r", b"\n"],
        [b"no newline at the end"],
        [b"ends in \xf0\x9f"],                 # incomplete at EOF: U+FFFD
        [b"\r"],
        [],
    ]
    for chunks in cases:
        frames, counts = pump_through_pipe(twin, chunks, count_lines=True)
        assert frames == reference(chunks), chunks
        assert counts == reference_counts(chunks), chunks


def test_frame_header(twin: ModuleType) -> None:
    drain = Drain()
    with twin.StreamPump(drain.wfd, 2, kind=wire.TEXT) as pump:
        pump.feed(b"one\ntwo")
        pump.flush()
    raw_frames = drain.frames()
    assert raw_frames == [(wire.TEXT, 2, b"one\n"), (wire.TEXT, 2, b"two\n")]


# -- the API -------------------------------------------------------------------------------


def test_eof_then_flush(twin: ModuleType) -> None:
    """eof() sends what the decoder's end completes (the current path at EOF); flush the rest."""
    drain = Drain()
    with twin.StreamPump(drain.wfd, STDOUT) as pump:
        pump.feed(b"abc\r\xe2\x82")
        assert pump.tail_chars == 4
        pump.eof()
        pump.eof()
        pump.flush()
        pump.flush()
    assert drain.frames() == [
        (wire.TEXT, STDOUT, b"abc\n"),
        (wire.TEXT, STDOUT, "\ufffd\n".encode()),
    ]


def test_send_false_keeps_the_frame(twin: ModuleType) -> None:
    drain = Drain()
    rfd, wfd = os.pipe()
    try:
        with twin.StreamPump(drain.wfd, STDOUT, count_lines=True) as pump:
            os.write(wfd, b"1\r\n2\r3\n4")
            assert pump.read_from(rfd, send=False) == 8
            assert pump.last_newlines == 3
            assert pump.pending == len(b"1\n2\n3\n")
            os.write(drain.wfd, wire.frame(wire.UPDATE, b"kill header"))
            pump.send()
            assert pump.pending == 0
            os.write(wfd, b"5\n")
            assert pump.read_from(rfd, send=False) == 2
            pump.feed(b"6\n")  # a kept frame goes out before new work
            pump.flush()
    finally:
        os.close(rfd)
        os.close(wfd)
    assert drain.frames() == [
        (wire.UPDATE, 0, b"kill header"),
        (wire.TEXT, STDOUT, b"1\n2\n3\n"),
        (wire.TEXT, STDOUT, b"45\n"),
        (wire.TEXT, STDOUT, b"6\n"),
    ]


def test_count_lines_off(twin: ModuleType) -> None:
    drain = Drain()
    with twin.StreamPump(drain.wfd, STDOUT) as pump:
        pump.feed(b"a\nb\n")
        assert pump.last_newlines == 0
    drain.frames()


def test_discard_from(twin: ModuleType) -> None:
    drain = Drain()
    rfd, wfd = os.pipe()
    try:
        with twin.StreamPump(drain.wfd, STDOUT) as pump:
            os.write(wfd, b"dropped\n" * 100)
            assert pump.discard_from(rfd, 300) == 300
            assert pump.discard_from(rfd) == 500
            os.set_blocking(rfd, False)
            assert pump.discard_from(rfd) == -1
            os.close(wfd)
            wfd = -1
            assert pump.discard_from(rfd) == 0
            pump.flush()
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
    assert drain.frames() == []


def test_eagain_returns_minus_one(twin: ModuleType) -> None:
    drain = Drain()
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    try:
        with twin.StreamPump(drain.wfd, STDOUT) as pump:
            assert pump.read_from(rfd) == -1
            os.write(wfd, b"x\n")
            assert pump.read_from(rfd) == 2
            assert pump.read_from(rfd) == -1
    finally:
        os.close(rfd)
        os.close(wfd)
    assert drain.frames() == [(wire.TEXT, STDOUT, b"x\n")]


def test_errors(twin: ModuleType) -> None:
    rfd, wfd = os.pipe()
    os.close(wfd)
    with twin.StreamPump(rfd, STDOUT) as pump:
        bad = os.open(os.devnull, os.O_RDONLY)
        os.close(bad)
        with pytest.raises(OSError) as info:
            pump.read_from(bad)
        assert info.value.errno == errno.EBADF
        with pytest.raises(ValueError):
            pump.read_from(rfd, 0)
        with pytest.raises(ValueError):
            pump.read_from(rfd, twin.PUMP_MAX_READ + 1)
        with pytest.raises(OSError):  # writing frames to a read end
            pump.feed(b"line\n")
    os.close(rfd)
    rfd, wfd = os.pipe()
    os.close(rfd)
    with twin.StreamPump(wfd, STDOUT) as pump, pytest.raises(BrokenPipeError):
        pump.feed(b"line\n")
    os.close(wfd)
    with pytest.raises(ValueError):
        twin.StreamPump(1, 256)
    with pytest.raises(ValueError):
        twin.StreamPump(1, 1, 1)


def test_closed_pump(twin: ModuleType) -> None:
    pump = twin.StreamPump(1, STDOUT)
    pump.close()
    pump.close()
    with pytest.raises(ValueError):
        pump.feed(b"x")
    with pytest.raises(ValueError):
        pump.flush()


def test_max_read_is_the_same() -> None:
    if _c is not None:
        assert _c.PUMP_MAX_READ == _python.PUMP_MAX_READ


def test_big_feed_is_sliced(twin: ModuleType) -> None:
    """feed() of more than PUMP_MAX_READ: one frame per slice, as reads of that size would."""
    data = (b"0123456789" * 8 + b"\n") * (twin.PUMP_MAX_READ // 81 * 2 + 10)
    slices = [data[i : i + twin.PUMP_MAX_READ] for i in range(0, len(data), twin.PUMP_MAX_READ)]
    assert pump_by_feed(twin, [data]) == reference(slices)


def test_bounded_tail(twin: ModuleType) -> None:
    drain = Drain()
    with twin.StreamPump(drain.wfd, STDOUT, 100) as pump:
        for _ in range(50):
            pump.feed("é".encode() * 1001 + b"\x1b[" + b"1" * 500)
            assert pump.tail_chars < 100
        pump.flush()
    frames = drain.frames()
    text = b"".join(f[2] for f in frames).decode()
    assert max(len(line) for line in text.split("\n")) == 99


# -- back-pressure and concurrency -------------------------------------------------------


def test_back_pressure_blocks_the_pump(twin: ModuleType) -> None:
    """A full output pipe (even non-blocking) pauses the pump until the reader drains it."""
    out_r, out_w = os.pipe()
    os.set_blocking(out_w, False)
    line = b"z" * 99 + b"\n"
    data = line * 20000  # 2 MB, far more than the pipe holds
    done = threading.Event()

    def run() -> None:
        with twin.StreamPump(out_w, STDOUT) as pump:
            for i in range(0, len(data), 200000):
                pump.feed(data[i : i + 200000])
            pump.flush()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.3)
    assert not done.is_set()  # blocked on the full pipe
    received = bytearray()
    while not done.is_set() or select.select([out_r], [], [], 0)[0]:
        if select.select([out_r], [], [], 0.1)[0]:
            received += os.read(out_r, 1 << 20)
    thread.join(10)
    os.close(out_w)
    os.close(out_r)
    payload = b"".join(f[2] for f in wire.FrameDecoder().feed(bytes(received)))
    assert payload == data


def test_two_pumps_in_two_threads() -> None:
    """cffi releases the GIL: two pumps at once, each with its own input and output."""
    mods = _twins()
    inputs = [(b"thread %d line %d \xc3\xa9\r\n" % (t, i)) * 3 for t in range(2) for i in range(3)]
    data = [b"".join(inputs[t * 3 : t * 3 + 3]) * 4000 for t in range(2)]
    for mod in mods:
        results: list[Frames | None] = [None, None]
        errors: list[BaseException] = []

        def run(t: int, mod: ModuleType = mod, results: list[Frames | None] = results,
                errors: list[BaseException] = errors) -> None:
            try:
                chunks = [data[t][i : i + 7777] for i in range(0, len(data[t]), 7777)]
                results[t] = pump_through_pipe(mod, chunks)[0]
                assert results[t] == reference(chunks)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(t,)) for t in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors, errors
        assert all(r for r in results)


# -- PTY -----------------------------------------------------------------------------------


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    master, slave = pty.openpty()
    tty.setraw(slave)
    yield master, slave
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.mark.parametrize("nonblocking", [True, False])
def test_pty(twin: ModuleType, pty_pair: tuple[int, int], nonblocking: bool) -> None:
    """Reads from a PTY master gather more than one 4 KiB read; EIO after the slave closes
    is EOF.  The text has no chunk-dependent sequences, so the content is the reference's."""
    master, slave = pty_pair
    if nonblocking:
        fl = fcntl.fcntl(master, fcntl.F_GETFL)
        fcntl.fcntl(master, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    data = b"".join(b"pty line %05d \xe2\x82\xac\r\n" % i for i in range(3000))
    writer = threading.Thread(target=lambda: _write_all(slave, data))
    writer.start()
    drain = Drain()
    sizes = []
    with twin.StreamPump(drain.wfd, STDOUT) as pump:
        got = 0
        while got < len(data):
            select.select([master], [], [], 5)
            n = pump.read_from(master)
            if n == -1:
                continue
            assert n > 0
            sizes.append(n)
            got += n
        writer.join(10)
        os.close(slave)
        select.select([master], [], [], 5)
        assert pump.read_from(master) == 0  # EIO: the last writer is gone
        pump.flush()
    frames = drain.frames()
    payload = b"".join(f[2] for f in frames)
    assert payload == b"".join(f[2] for f in reference([data]))
    assert all(f[2].endswith(b"\n") for f in frames)
    assert got == len(data)


def test_pty_read_gathers(twin: ModuleType, pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    fl = fcntl.fcntl(master, fcntl.F_GETFL)
    fcntl.fcntl(master, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    os.set_blocking(slave, False)
    data = b"q" * 70 + b"\n"
    written = 0
    try:
        while written < 32768:
            written += os.write(slave, data)
    except BlockingIOError:  # pragma: no cover - small tty buffer
        pass
    drain = Drain()
    with twin.StreamPump(drain.wfd, STDOUT) as pump:
        time.sleep(0.05)
        n = pump.read_from(master, 1 << 20)
    drain.frames()
    assert n > 4096


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:4096]) :]
