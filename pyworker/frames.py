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


class FrameDecoder:
    """Incremental decoder: feed it bytes, iterate over the whole frames they complete."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, int, bytes]]:
        """Add ``data`` and yield each complete ``(kind, channel, payload)``."""
        buf = self._buffer
        buf += data
        offset = 0
        end = len(buf)
        try:
            while end - offset >= HEADER_SIZE:
                length, kind, channel, _ = HEADER.unpack_from(buf, offset)
                if length > MAX_PAYLOAD:
                    raise WireError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
                stop = offset + HEADER_SIZE + length
                if stop > end:
                    break
                payload = bytes(buf[offset + HEADER_SIZE : stop])
                offset = stop
                yield kind, channel, payload
        finally:
            del buf[:offset]

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
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
