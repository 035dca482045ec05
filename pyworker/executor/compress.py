"""Multi-threaded gzip and bzip2 streams for directory uploads, at a level that follows the link.

:class:`ChunkedCompressor` turns an uncompressed byte source (a
:class:`pyworker.iocore.TarStream` without compression) into **one** gzip member or **one**
bzip2 stream, which is what the master's ``tarfile.open(mode='r|gz' / 'r|bz2')`` accepts.
The source is cut into chunks that are compressed independently, in a pool of threads
(``zlib`` and ``bz2`` release the GIL while they work), and joined in order:

* gzip, as pigz does it: every chunk is a raw deflate run primed with the last 32 KiB of
  the chunk before (``zdict``) and ended by a sync flush on a byte boundary; an empty final
  block, the CRC-32 and the length close the member;
* bzip2, as lbzip2 does it: every chunk is small enough to be a single bzip2 block; the
  block's bits are cut out of its own stream and spliced (bit-aligned) after the previous
  one, and the end-of-stream marker carries the combined CRC of all blocks.

The level may change from one chunk to the next, which gives ``'auto'``: whenever the
consumer (the upload loop, paced by the master's replies) asks for data that is already
compressed, the link is the bottleneck and later chunks are compressed harder; whenever it
has to wait for a chunk, compression is the bottleneck and the level goes down (for gzip
down to 0, stored blocks). The master cannot tell: any level gives the same tree.

Memory is bounded by ``2 * threads`` chunks in flight plus one chunk of output.
"""

from __future__ import annotations

import bz2
import math
import os
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from pyworker.config import LOWEST_LEVEL, valid_level

GZIP_CHUNK = 512 * 1024
#: ``'auto'`` moves between the format's lowest level and this one, starting at 1.
AUTO_HIGHEST = {"gz": 6, "bz2": 9}
AUTO_START = 1

_DICT_SIZE = 32 * 1024
_BZ_EOS_MAGIC = 0x177245385090
_BZ_BLOCK_MAGIC = 0x314159265359


def default_threads() -> int:
    """Compression threads when none are configured: the CPUs we may run on, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def bz2_chunk_size(level: int) -> int:
    """Largest input that libbz2 at ``level`` always packs into one block.

    A block holds ``100000 * level - 19`` bytes after the first run-length stage, which
    turns a run of 4 equal bytes into 5 bytes: input expands by at most 5/4.
    """
    return (100_000 * level - 19) * 4 // 5 - 8


@dataclass
class CompressionStats:
    """What a stream did, for the worker log."""

    bytes_in: int = 0
    bytes_out: int = 0
    chunks_per_level: dict[int, int] = field(default_factory=dict)

    def describe(self) -> str:
        levels = ", ".join(f"{n} at {lvl}" for lvl, n in sorted(self.chunks_per_level.items()))
        return (f"{self.bytes_in / 2**20:.1f} MiB -> {self.bytes_out / 2**20:.1f} MiB, "
                f"chunks: {levels or 'none'}")


class LevelSearch:
    """Perturb and observe: the level (a mix of two neighbouring levels) that moves the
    uncompressed stream out fastest.

    Every ``epoch`` bytes handed to the consumer, the rate of that epoch is compared with
    the rate of the one before: if the epoch with the higher mean level was faster, the
    level goes up by half a level, else down (a tie in levels: go on, or turn back if the
    rate fell). Levels are mixed by error diffusion, so 0.5 means every other chunk at 1.
    A lone level (``lo == hi``) gives a fixed level.
    """

    STEP = 0.5

    def __init__(self, lo: int, hi: int, start: int, epoch: int = 2 * 1024 * 1024) -> None:
        self.lo, self.hi = lo, hi
        self.level = float(start)
        self.direction = 1.0 if start <= lo else -1.0
        self.epoch = epoch
        self._carry = 0.0
        self._t0: float | None = None
        self._bytes = 0
        self._level_bytes = 0.0
        self._previous: tuple[float, float] | None = None  # (rate, mean level)

    def next_level(self) -> int:
        base = math.floor(self.level)
        self._carry += self.level - base
        if self._carry >= 1.0:
            self._carry -= 1.0
            return min(self.hi, base + 1)
        return base

    def consumed(self, size: int, level: int, now: float) -> None:
        """A chunk of ``size`` input bytes compressed at ``level`` went to the consumer."""
        if self.lo == self.hi:
            return
        if self._t0 is None:  # the first chunk's wait is start-up, not rate
            self._t0 = now
            return
        self._bytes += size
        self._level_bytes += level * size
        if self._bytes < self.epoch or now <= self._t0:
            return
        rate = self._bytes / (now - self._t0)
        mean = self._level_bytes / self._bytes
        if self._previous is not None:
            previous_rate, previous_mean = self._previous
            if abs(mean - previous_mean) >= 0.1:
                faster_when_higher = (rate - previous_rate) * (mean - previous_mean) > 0
                self.direction = 1.0 if faster_when_higher else -1.0
            elif rate < previous_rate:
                self.direction = -self.direction
        self.level = min(float(self.hi), max(float(self.lo), self.level + self.direction
                                              * self.STEP))
        self._previous = (rate, mean)
        self._t0, self._bytes, self._level_bytes = now, 0, 0.0


class ChunkedCompressor:
    """``read(max_bytes)`` gives the compressed stream of what ``source(n)`` returns.

    ``source(n)`` returns up to ``n`` bytes and ``b''`` at the end; its exceptions (an
    unreadable file in the tree) come out of :meth:`read`. ``level`` is a number for a
    fixed level (the output is then the same for any number of threads) or ``'auto'``.
    """

    def __init__(self, source: Callable[[int], bytes], fmt: str, level: int | str,
                 threads: int, *, gzip_mtime: int = 0) -> None:
        if fmt not in ("gz", "bz2"):
            raise ValueError(f"unknown compression {fmt!r}")
        lo = LOWEST_LEVEL[fmt]
        if not valid_level(fmt, level):
            raise ValueError(f"{fmt} level must be 'auto' or {lo} to 9, not {level!r}")
        if isinstance(level, int):
            self._hi = level
            self._search = LevelSearch(level, level, level)
        else:
            self._hi = AUTO_HIGHEST[fmt]
            self._search = LevelSearch(lo, self._hi, max(lo, AUTO_START))
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self._fmt = fmt
        self._source: Callable[[int], bytes] | None = source
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"compress-{fmt}")
        self._depth = 2 * threads
        self._pending: deque[Future[tuple[bytes, int, int]]] = deque()
        self._out = bytearray()
        self._closed = False
        self._ended = False
        self.stats = CompressionStats()
        # format state
        self._dict = b""
        self._crc = 0
        if fmt == "gz":
            self._emit(b"\x1f\x8b\x08\x00" + (gzip_mtime & 0xFFFFFFFF).to_bytes(4, "little")
                       + b"\x00\xff")
        else:
            self._emit(b"BZh" + str(self._hi).encode())
            self._bits = 0  # pending output bits (fewer than 8), value and count
            self._nbits = 0

    # -- public API ----------------------------------------------------------------------

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of the stream (fewer only at the end, ``b''`` after)."""
        if self._closed:
            raise ValueError("read from a closed ChunkedCompressor")
        while len(self._out) < max_bytes and not self._ended:
            self._fill()
            if not self._pending:
                self._finish()
                break
            data, level, size = self._pending[0].result()
            self._pending.popleft()
            self._search.consumed(size, level, time.monotonic())
            self._append(data, level)
        data = bytes(self._out[:max_bytes])
        del self._out[:max_bytes]
        return data

    def close(self) -> None:
        """Drop what is queued; a chunk being compressed finishes in the background."""
        self._closed = True
        self._source = None
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._out.clear()

    def __enter__(self) -> ChunkedCompressor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pipeline ------------------------------------------------------------------------

    def _fill(self) -> None:
        """Keep ``2 * threads`` chunks submitted while the source has data."""
        while self._source is not None and len(self._pending) < self._depth:
            level = self._search.next_level()
            chunk = self._source(GZIP_CHUNK if self._fmt == "gz" else bz2_chunk_size(level))
            if not chunk:
                self._source = None
                break
            self.stats.bytes_in += len(chunk)
            if self._fmt == "gz":
                self._crc = zlib.crc32(chunk, self._crc)
                zdict, self._dict = self._dict, chunk[-_DICT_SIZE:]
                self._pending.append(self._pool.submit(_deflate, chunk, level, zdict))
            else:
                self._pending.append(self._pool.submit(_bzip2_block, chunk, level))

    def _append(self, data: bytes, level: int) -> None:
        counts = self.stats.chunks_per_level
        counts[level] = counts.get(level, 0) + 1
        if self._fmt == "gz":
            self._emit(data)
            return
        bits, nbits, crc = _unpack_block(data)
        self._crc = (((self._crc << 1) | (self._crc >> 31)) & 0xFFFFFFFF) ^ crc
        self._put_bits(bits, nbits)

    def _put_bits(self, bits: int, nbits: int) -> None:
        value = (self._bits << nbits) | bits
        total = self._nbits + nbits
        keep = total % 8
        if total >= 8:
            self._emit((value >> keep).to_bytes((total - keep) // 8, "big"))
        self._bits = value & ((1 << keep) - 1)
        self._nbits = keep

    def _emit(self, data: bytes) -> None:
        self._out += data
        self.stats.bytes_out += len(data)

    def _finish(self) -> None:
        self._ended = True
        if self._fmt == "gz":
            isize = self.stats.bytes_in & 0xFFFFFFFF
            # an empty final fixed-Huffman block, then the gzip trailer
            self._emit(b"\x03\x00" + self._crc.to_bytes(4, "little") + isize.to_bytes(4, "little"))
        else:
            self._put_bits((_BZ_EOS_MAGIC << 32) | self._crc, 80)
            if self._nbits:
                self._put_bits(0, 8 - self._nbits)
        self._pool.shutdown(wait=False)


def _deflate(chunk: bytes, level: int, zdict: bytes) -> tuple[bytes, int, int]:
    """One chunk as raw deflate blocks ending on a byte boundary (runs in a pool thread)."""
    if zdict and level > 0:
        c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL,
                             zlib.Z_DEFAULT_STRATEGY, zdict)
    else:
        c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(chunk) + c.flush(zlib.Z_SYNC_FLUSH), level, len(chunk)


def _bzip2_block(chunk: bytes, level: int) -> tuple[bytes, int, int]:
    """One chunk as a one-block bzip2 stream (runs in a pool thread)."""
    return bz2.compress(chunk, level), level, len(chunk)


def _unpack_block(stream: bytes) -> tuple[int, int, int]:
    """The block of a one-block bzip2 stream: (its bits, how many, its CRC)."""
    total = len(stream) * 8
    value = int.from_bytes(stream, "big")
    for pad in range(8):
        end = total - pad - 80  # where the end-of-stream marker starts
        if (value >> (total - end - 48)) & ((1 << 48) - 1) == _BZ_EOS_MAGIC:
            break
    else:
        raise ValueError("bzip2 stream without an end-of-stream marker")
    stream_crc = (value >> pad) & 0xFFFFFFFF
    nbits = end - 32
    bits = (value >> (total - end)) & ((1 << nbits) - 1)
    magic = bits >> (nbits - 48)
    block_crc = (bits >> (nbits - 80)) & 0xFFFFFFFF
    if magic != _BZ_BLOCK_MAGIC or block_crc != stream_crc:
        # more than one block (the stream CRC combines them): the chunk bound is wrong
        raise ValueError("bzip2 chunk did not compress to exactly one block")
    return bits, nbits, block_crc
