"""The framed pipe protocol between the front end and its executor processes.

Every message is one frame: an 8-byte header ``<IBBH`` = (payload length, kind, channel, 0)
followed by ``length`` payload bytes. Bulk data (output text, transfer blocks) travels as raw
payload bytes, never re-encoded; small structured values (updates, arguments, results)
travel as :mod:`marshal` data, which both ends of a pipe we own can trust.

Front end -> executor
    ``START``      marshal ``dict``: ``name``, ``args`` (paths already absolute), ``command_id``,
                   ``basedir`` (the worker's), ``io`` (transfer tuning).
    ``INTERRUPT``  marshal ``str``: the reason. The command stops as the reference would.
    ``RESULT``     marshal ``(ok, value)``: the answer to the executor's last ``CALL``.
    ``ACK``        marshal ``(nbytes, error)``: a ``WRITE`` block was accepted by the master
                   (``error`` None), or the master's writer failed (``error`` is the text).
    ``DATA``       raw bytes: a block the master's reader returned for a download.

Executor -> front end
    ``UPDATE``     marshal ``list[(key, value)]``: non-text updates (``rc``, ``elapsed``, ...).
    ``TEXT``       raw UTF-8: text for the stream named by ``channel`` (``TEXT_CHANNELS``);
                   always whole lines, except at a command's final flush. The executor
                   sends at most ``TEXT_FRAME_BYTES`` of text per ``TEXT``/``LOG`` frame it
                   frames itself (:func:`split_text`); its I/O core's pumps send what one
                   read decodes to.
    ``LOG``        marshal ``(logname, utf8_bytes)``: text of a watched logfile, whole lines
                   as for ``TEXT``.
    ``COMPLETE``   marshal ``None`` or ``str``: the command ended (``str``: it failed, with
                   that message). The executor is idle again afterwards.
    ``CALL``       marshal ``(target, method, args)``: call ``method`` on the master's
                   ``writer``/``reader`` reference and answer with ``RESULT``.
    ``WRITE``      raw bytes: pass to the master's ``writer.write``; answered with ``ACK``.
    ``READ``       marshal ``int``: issue ``reader.read(n)``; answered with ``DATA`` (``b''``
                   at EOF) in order, or ``RESULT (False, text)`` if the master failed.
    ``USAGE``      marshal ``dict``: the command's resource use (``cpu_user``,
                   ``cpu_system`` seconds, ``peak_rss`` bytes), just before ``COMPLETE``.
"""

from __future__ import annotations

import marshal
import struct
from collections.abc import Iterator
from typing import Any, Final

HEADER: Final = struct.Struct("<IBBH")
HEADER_SIZE: Final = HEADER.size
#: Frames are bounded so that a corrupt length cannot make a reader allocate without bound.
MAX_PAYLOAD: Final = 16 * 1024 * 1024

# front end -> executor
START: Final = 1
INTERRUPT: Final = 2
RESULT: Final = 3
ACK: Final = 4
DATA: Final = 5
# executor -> front end
UPDATE: Final = 16
TEXT: Final = 17
LOG: Final = 18
COMPLETE: Final = 19
CALL: Final = 20
WRITE: Final = 21
READ: Final = 22
USAGE: Final = 23

#: Most text bytes the executor puts in one ``TEXT``/``LOG`` frame of its own.
TEXT_FRAME_BYTES: Final = 256 * 1024

#: Text streams carried by ``TEXT`` frames, by channel number.
TEXT_CHANNELS: Final = ("header", "stdout", "stderr")
CHANNEL_OF: Final = {name: i for i, name in enumerate(TEXT_CHANNELS)}


class WireError(Exception):
    """The byte stream is not a valid sequence of frames."""


def header(kind: int, length: int, channel: int = 0) -> bytes:
    """The header of a frame whose ``length`` payload bytes are written after it."""
    return HEADER.pack(length, kind, channel, 0)


def frame(kind: int, payload: bytes = b"", channel: int = 0) -> bytes:
    """One frame as bytes (header and payload)."""
    return HEADER.pack(len(payload), kind, channel, 0) + payload


def value_frame(kind: int, value: Any) -> bytes:
    """A frame whose payload is a marshalled value."""
    return frame(kind, marshal.dumps(value))


def load(payload: bytes) -> Any:
    """The value of a marshalled payload."""
    try:
        return marshal.loads(payload)
    except (EOFError, ValueError, TypeError) as e:
        raise WireError(f"bad marshalled payload: {e}") from None


def _top_up(buf: bytearray, size: int, data: bytes, pos: int) -> int:
    """Move bytes of ``data`` from ``pos`` into ``buf`` until it holds ``size`` (or ``data``
    ends); the new position in ``data``."""
    take = min(size - len(buf), len(data) - pos)
    buf += data[pos : pos + take]
    return pos + take


class FrameDecoder:
    """Incremental decoder: feed it bytes, iterate over the whole frames they complete.

    Each payload is copied once at most: a frame that lies whole in one fed chunk is a slice
    of it; a large payload split over several chunks (a transfer block) is kept as views of
    them and joined once it is complete. Only headers and small frames cut by a chunk's end
    are buffered. A consumer that stops iterating early loses nothing: the frames not yet
    yielded come out of the next :meth:`feed`.
    """

    #: Payloads from this size on are gathered as views rather than in the buffer.
    GATHER_SIZE: Final = 16 * 1024

    def __init__(self) -> None:
        self._buffer = bytearray()  # a cut header or small frame (more only after an early stop)
        self._parts: list[bytes | memoryview] | None = None  # a large payload being gathered
        self._missing = 0
        self._kind = 0
        self._channel = 0
        self._gathered = 0

    def feed(self, data: bytes) -> Iterator[tuple[int, int, bytes]]:
        """Add ``data`` and yield each complete ``(kind, channel, payload)``."""
        if type(data) is not bytes:
            data = bytes(data)  # views into it are kept: it must not change
        view = memoryview(data)
        end = len(data)
        pos = 0
        try:
            while True:
                if self._parts is not None:  # the rest of a large payload
                    take = min(self._missing, end - pos)
                    if take:
                        self._parts.append(data if take == end else view[pos : pos + take])
                        pos += take
                        self._missing -= take
                        self._gathered += take
                    if self._missing:
                        return
                    parts, self._parts = self._parts, None
                    self._gathered = 0
                    first = parts[0]
                    payload = first if len(parts) == 1 and type(first) is bytes else b"".join(parts)
                    yield self._kind, self._channel, payload
                elif self._buffer:
                    item, pos = self._from_buffer(data, pos)
                    if item is not None:
                        yield item
                    elif pos == end and self._parts is None:
                        return
                else:
                    length = kind = channel = 0
                    while end - pos >= HEADER_SIZE:
                        length, kind, channel, _ = HEADER.unpack_from(data, pos)
                        if length > MAX_PAYLOAD:
                            raise WireError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
                        stop = pos + HEADER_SIZE + length
                        if stop > end:
                            break
                        start, pos = pos + HEADER_SIZE, stop
                        yield kind, channel, data[start:stop]
                    if pos == end:
                        return
                    if end - pos >= HEADER_SIZE and length >= self.GATHER_SIZE:
                        self._gather(kind, channel, length)
                        pos += HEADER_SIZE
                    else:
                        self._buffer += view[pos:]
                        pos = end
                        return
        finally:
            if pos < end:  # stopped early (or a bad header): keep what was not taken
                self._buffer += view[pos:]

    def _gather(self, kind: int, channel: int, length: int) -> None:
        self._kind, self._channel = kind, channel
        self._parts = []
        self._missing = length
        self._gathered = 0

    def _from_buffer(self, data: bytes, pos: int
                     ) -> tuple[tuple[int, int, bytes] | None, int]:
        """Complete the buffered frame with as few bytes of ``data`` (from ``pos``) as it
        needs: (the frame, or None if it is incomplete or now gathered; the new position)."""
        buf = self._buffer
        if len(buf) < HEADER_SIZE:
            pos = _top_up(buf, HEADER_SIZE, data, pos)
            if len(buf) < HEADER_SIZE:
                return None, pos
        length, kind, channel, _ = HEADER.unpack_from(buf, 0)
        if length > MAX_PAYLOAD:
            raise WireError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
        total = HEADER_SIZE + length
        if len(buf) < total and length >= self.GATHER_SIZE:
            self._gather(kind, channel, length)
            if len(buf) > HEADER_SIZE:
                head = bytes(buf[HEADER_SIZE:])
                assert self._parts is not None
                self._parts.append(head)
                self._missing -= len(head)
                self._gathered = len(head)
            buf.clear()
            return None, pos
        if len(buf) < total:
            pos = _top_up(buf, total, data, pos)
            if len(buf) < total:
                return None, pos
        payload = bytes(buf[HEADER_SIZE:total])
        del buf[:total]
        return (kind, channel, payload), pos

    @property
    def needed(self) -> int:
        """Bytes that complete the frame begun (0: none is begun, or the buffer already
        holds whole frames, which ``feed(b"")`` yields)."""
        if self._parts is not None:
            return self._missing
        buf = self._buffer
        if not buf:
            return 0
        if len(buf) < HEADER_SIZE:
            return HEADER_SIZE - len(buf)
        length: int = HEADER.unpack_from(buf, 0)[0]
        return max(HEADER_SIZE + length - len(buf), 0)

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        if self._parts is not None:
            return len(self._buffer) + HEADER_SIZE + self._gathered
        return len(self._buffer)


def split_text(data: bytes, limit: int) -> list[bytes]:
    """UTF-8 ``data`` in pieces of at most ``limit`` bytes, with no byte lost or added.

    Each piece ends after the last newline that fits, so whole lines stay whole; a line
    longer than ``limit`` is cut before a character's first byte, so every piece is valid
    UTF-8 on its own (``limit`` must be at least 4).
    """
    if len(data) <= limit:
        return [data]
    pieces = []
    start, end = 0, len(data)
    while end - start > limit:
        cut = data.rfind(b"\n", start, start + limit) + 1
        if cut <= start:
            cut = start + limit
            while cut > start and data[cut] & 0xC0 == 0x80:  # back to a character's lead
                cut -= 1
            if cut == start:  # not UTF-8 at all: cut anywhere rather than loop
                cut = start + limit
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


def describe_usage(usage: dict[str, Any]) -> str:
    """One line for a command's resource use (the worker log, ``report_resources``)."""
    cpu = usage["cpu_user"] + usage["cpu_system"]
    text = (f" resources: {cpu:.2f} CPU seconds (user {usage['cpu_user']:.2f}, "
            f"system {usage['cpu_system']:.2f})")
    if usage.get("peak_rss"):
        text += f", peak RSS {usage['peak_rss'] / 2**20:.1f} MiB"
    if usage.get("note"):
        text += f"; {usage['note']}"
    return text
