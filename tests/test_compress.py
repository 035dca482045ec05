"""ChunkedCompressor: one gzip member / one bzip2 stream that the master's tarfile reads.

The source is the I/O core's uncompressed TarStream (whichever backend ``PYWORKER_IO``
picks), as in a directory upload; the streams are checked with zlib, bz2 and tarfile
themselves, the way the master reads them.
"""

from __future__ import annotations

import bz2
import io
import os
import tarfile
import threading
import zlib
from pathlib import Path

import pytest

from pyworker import iocore
from pyworker.executor import compress
from pyworker.executor.compress import ChunkedCompressor, LevelSearch

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few MiB of text, random bytes, zeros and small files."""
    root: Path = tmp_path_factory.mktemp("ctree") / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "random.bin").write_bytes(os.urandom(MiB + 333))
    (root / "text.txt").write_bytes(b"the quick brown fox jumps over the lazy dog\n" * 60000)
    (root / "a" / "zeros").write_bytes(bytes(700_000))
    for i in range(50):
        (root / "a" / "b" / f"small{i}.txt").write_text(f"file {i}\n" * i)
    os.symlink("text.txt", root / "link")
    return root


def archive(root: Path) -> bytes:
    with iocore.TarStream(str(root), None) as tar:
        return b"".join(iter(lambda: tar.read(MiB), b""))


def compressed(source: bytes | Path, fmt: str, level: int | str, threads: int,
               read_size: int = 128 * 1024) -> tuple[bytes, ChunkedCompressor]:
    if isinstance(source, Path):
        tar = iocore.TarStream(str(source), None)
        read = tar.read
    else:
        buf = io.BytesIO(source)
        read = buf.read
    c = ChunkedCompressor(read, fmt, level, threads)
    try:
        parts = []
        while piece := c.read(read_size):
            assert len(piece) <= read_size
            parts.append(piece)
    finally:
        c.close()
    return b"".join(parts), c


def decompress_one_stream(data: bytes, fmt: str) -> bytes:
    """Decompress, insisting on exactly one gzip member or bzip2 stream."""
    if fmt == "gz":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = d.decompress(data)
    else:
        d = bz2.BZ2Decompressor()  # type: ignore[assignment]
        out = d.decompress(data)
    assert d.eof, "the stream does not end"
    assert d.unused_data == b"", "more than one stream"
    return out


@pytest.mark.parametrize("fmt,level,threads", [
    ("gz", 0, 1), ("gz", 1, 2), ("gz", 6, 3), ("gz", 9, 1), ("gz", "auto", 2),
    ("bz2", 1, 2), ("bz2", 5, 1), ("bz2", 9, 3), ("bz2", "auto", 2),
])  # fmt: skip
def test_stream_is_the_archive(tree: Path, tmp_path: Path, fmt: str, level: int | str,
                               threads: int) -> None:
    data, c = compressed(tree, fmt, level, threads)
    raw = archive(tree)
    assert decompress_one_stream(data, fmt) == raw
    assert c.stats.bytes_in == len(raw)
    assert c.stats.bytes_out == len(data)
    if level != "auto":
        assert set(c.stats.chunks_per_level) == {level}
    # the master's reader: a non-seekable stream and the data filter
    with tarfile.open(fileobj=io.BytesIO(data), mode=f"r|{fmt}") as tf:
        tf.extractall(tmp_path, filter="data")
    assert (tmp_path / "text.txt").read_bytes() == (tree / "text.txt").read_bytes()
    assert (tmp_path / "random.bin").read_bytes() == (tree / "random.bin").read_bytes()
    assert os.readlink(tmp_path / "link") == "text.txt"
    assert (tmp_path / "empty").is_dir()


@pytest.mark.parametrize("fmt,level", [("gz", 1), ("gz", 0), ("bz2", 3)])
def test_fixed_level_output_does_not_depend_on_threads(tree: Path, fmt: str, level: int) -> None:
    one, _ = compressed(tree, fmt, level, 1)
    three, _ = compressed(tree, fmt, level, 3, read_size=1000)
    assert one == three


def test_compressed_stream_is_smaller(tree: Path) -> None:
    raw = len(archive(tree))
    assert len(compressed(tree, "gz", 6, 2)[0]) < raw * 0.6
    assert len(compressed(tree, "bz2", 9, 2)[0]) < raw * 0.6
    # level 0: stored blocks, slightly larger than the archive
    assert raw < len(compressed(tree, "gz", 0, 2)[0]) < raw * 1.01


@pytest.mark.parametrize("level", [1, 9])
def test_bz2_chunks_stay_one_block_at_worst_case_expansion(level: int) -> None:
    # runs of exactly four equal bytes: bzip2's first stage grows them by 5/4, the most
    # it can; a chunk bound that ignored this would make two blocks (and raise)
    runs = b"".join(bytes([i % 251]) * 4 for i in range(250_000))
    data, c = compressed(runs, "bz2", level, 2)
    assert decompress_one_stream(data, "bz2") == runs
    assert c.stats.chunks_per_level[level] >= len(runs) // compress.bz2_chunk_size(level)


def test_bz2_chunk_bound_is_tight_enough_to_matter() -> None:
    # a little above the bound two blocks come out, and the check in _unpack_block fires
    size = compress.bz2_chunk_size(1) + 1000
    runs = b"".join(bytes([i % 251]) * 4 for i in range(size // 4))
    with pytest.raises(ValueError, match="exactly one block"):
        compress._unpack_block(bz2.compress(runs, 1))
    compress._unpack_block(bz2.compress(runs[: compress.bz2_chunk_size(1)], 1))


@pytest.mark.parametrize("fmt", ["gz", "bz2"])
def test_empty_source(fmt: str) -> None:
    data, c = compressed(b"", fmt, "auto", 2)
    assert decompress_one_stream(data, fmt) == b""
    assert c.stats.bytes_in == 0


def test_source_errors_come_out_of_read() -> None:
    calls = 0

    def source(n: int) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise PermissionError(13, "Permission denied", "/tree/secret")
        return os.urandom(n)

    c = ChunkedCompressor(source, "gz", 1, 2)
    with pytest.raises(PermissionError):
        while c.read(MiB):
            pass
    c.close()


def test_close_mid_stream_stops_the_threads(tree: Path) -> None:
    before = {t.name for t in threading.enumerate()}
    tar = iocore.TarStream(str(tree), None)
    c = ChunkedCompressor(tar.read, "bz2", 9, 3)
    assert c.read(1000)
    c.close()
    tar.close()
    with pytest.raises(ValueError, match="closed"):
        c.read(10)
    for t in threading.enumerate():
        if t.name.startswith("compress-") and t.name not in before:
            t.join(timeout=30)
            assert not t.is_alive()


@pytest.mark.parametrize("fmt,level,threads", [
    ("gz", 10, 1), ("gz", -1, 1), ("bz2", 0, 1), ("bz2", "fast", 1), ("gz", True, 1),
    ("gz", 1, 0), ("zstd", 1, 1),
])  # fmt: skip
def test_bad_arguments(fmt: str, level: object, threads: int) -> None:
    with pytest.raises(ValueError):
        ChunkedCompressor(lambda n: b"", fmt, level, threads)  # type: ignore[arg-type]


# -- the level search, fed with rates that depend on the level in a known way --------------


def drive(search: LevelSearch, rate_of_level: dict[int, float], chunks: int,
          size: int = 512 * 1024) -> list[int]:
    """Consume ``chunks`` chunks at the levels the search picks; return those levels."""
    now = 0.0
    levels = []
    for _ in range(chunks):
        level = search.next_level()
        levels.append(level)
        now += size / rate_of_level[level]
        search.consumed(size, level, now)
    return levels


def test_level_search_goes_down_when_compression_is_the_bottleneck() -> None:
    # a fast link: every level costs more time than it saves
    search = LevelSearch(0, 6, 1)
    levels = drive(search, {lvl: 800.0 / (1 + 3 * lvl) * MiB for lvl in range(7)}, 200)
    assert sum(levels[-50:]) / 50 < 0.7
    assert search.level <= 1


def test_level_search_goes_up_when_the_link_is_the_bottleneck() -> None:
    # a slow link: the smaller the output, the faster the tree goes out
    search = LevelSearch(0, 6, 1)
    levels = drive(search, {lvl: 10.0 * (1 + lvl) * MiB for lvl in range(7)}, 200)
    assert sum(levels[-50:]) / 50 > 5
    search = LevelSearch(1, 9, 1)
    levels = drive(search, {lvl: 2.0 * lvl * MiB for lvl in range(1, 10)}, 300)
    assert sum(levels[-50:]) / 50 > 8


def test_level_search_finds_an_optimum_in_the_middle() -> None:
    # rate peaks at level 3
    search = LevelSearch(0, 6, 1)
    levels = drive(search, {lvl: (100.0 - 15 * abs(lvl - 3)) * MiB for lvl in range(7)}, 400)
    tail = levels[-100:]
    assert 2 <= sum(tail) / len(tail) <= 4


def test_fixed_level_never_moves() -> None:
    search = LevelSearch(4, 4, 4)
    assert set(drive(search, {4: 50.0 * MiB}, 50)) == {4}


def test_levels_mix_by_error_diffusion() -> None:
    search = LevelSearch(0, 6, 0)
    search.level = 2.25
    picked = [search.next_level() for _ in range(400)]
    assert set(picked) == {2, 3}
    assert picked.count(3) == 100
