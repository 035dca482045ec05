"""Benchmarks of pyworker.iocore (both twins) next to tarfile / shutil baselines.

Run:   .venv/bin/python -m pytest bench/bench_iocore.py --benchmark-columns=min,mean,rounds
Quick: .venv/bin/python -m pytest bench/bench_iocore.py --benchmark-disable  (small data)
``extra_info['MiB']`` holds the input size, so throughput = MiB / time
(``--benchmark-json=out.json`` keeps both).  On a busy machine add
``--benchmark-timer=time.process_time`` (CPU time of the process, all threads).
"""

from __future__ import annotations

import os
import random
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pyworker.iocore import _python

try:
    from pyworker.iocore import _c
except ImportError:  # pragma: no cover - C core not built
    _c = None  # type: ignore[assignment]

CHUNK = 64 * 1024
BACKENDS = ["c", "python"]


def _mod(name: str) -> ModuleType:
    if name == "c":
        if _c is None:
            pytest.skip("C core not built")
        return _c
    return _python


class _Sink:
    """A file object that counts and drops what tarfile writes."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return len(data)

    def tell(self) -> int:
        return self.n


def _text_like(rng: random.Random, size: int) -> bytes:
    words = [bytes(rng.choices(range(97, 123), k=rng.randint(2, 10))) for _ in range(2000)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(words, k=64)) + b"\n"
    return bytes(out[:size])


@pytest.fixture(scope="module")
def quick(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("benchmark_disable", False))


def _make_tree(root: Path, total: int, compressible: bool) -> int:
    """Build files of mixed sizes under root; return their total size."""
    rng = random.Random(42)
    done = 0
    i = 0
    sizes = [total // 4, total // 8] + [rng.randint(0, 64 * 1024) for _ in range(400)]
    while done < total:
        size = min(sizes[i % len(sizes)], total - done)
        sub = root / f"d{i % 17}" / f"e{i % 5}"
        sub.mkdir(parents=True, exist_ok=True)
        data = _text_like(rng, size) if compressible else rng.randbytes(size)
        (sub / f"file{i:05d}.dat").write_bytes(data)
        done += size
        i += 1
    return done


@pytest.fixture(scope="module")
def bench_tree(tmp_path_factory: pytest.TempPathFactory, quick: bool) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("bench") / "tree"
    root.mkdir()
    size = _make_tree(root, (1 << 20) if quick else (32 << 20), compressible=True)
    return root, size


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory, quick: bool) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("bigfile") / "big.bin"
    size = (1 << 20) if quick else (256 << 20)
    with open(path, "wb") as f:
        block = random.Random(1).randbytes(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
    return path, size


def _drain(stream: Any) -> int:
    n = 0
    while data := stream.read(CHUNK):
        n += len(data)
    return n


@pytest.mark.parametrize("compress", [None, "gz", "bz2"])
@pytest.mark.parametrize("backend", BACKENDS + ["tarfile"])
def test_bench_tar(benchmark: Any, bench_tree: tuple[Path, int], backend: str,
                   compress: str | None) -> None:
    root, size = bench_tree
    level = 9  # what the reference worker uses (tarfile w|gz and w|bz2)
    benchmark.group = f"tar-{compress or 'none'}"
    benchmark.extra_info["MiB"] = size / 2**20
    if backend == "tarfile":
        mode = {None: "w", "gz": "w|gz", "bz2": "w|bz2"}[compress]

        def run() -> int:
            sink = _Sink()
            with tarfile.open(mode=mode, fileobj=sink) as tf:  # type: ignore[call-overload]
                tf.add(str(root), arcname="")
            return sink.n
    else:
        mod = _mod(backend)

        def run() -> int:
            with mod.TarStream(str(root), compress, level) as ts:
                return _drain(ts)

    assert benchmark.pedantic(run, rounds=3, iterations=1) > (size if compress is None else 0)


@pytest.mark.parametrize("backend", BACKENDS + ["shutil"])
def test_bench_copy_file(benchmark: Any, big_file: tuple[Path, int], tmp_path: Path,
                         backend: str) -> None:
    src, size = big_file
    dst = tmp_path / "copy.bin"
    benchmark.group = "copy_file"
    benchmark.extra_info["MiB"] = size / 2**20
    copy = shutil.copy if backend == "shutil" else _mod(backend).copy_file
    benchmark.pedantic(copy, args=(str(src), str(dst)), rounds=5, iterations=1)
    assert dst.stat().st_size == size


@pytest.fixture
def drained_pipe() -> Iterator[tuple[int, list[int]]]:
    r, w = os.pipe()
    got = [0]

    def drain() -> None:
        while data := os.read(r, 1 << 20):
            got[0] += len(data)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    yield w, got
    os.close(w)
    t.join(30)
    os.close(r)


@pytest.mark.parametrize("backend", ["c", "c-nosplice", "python"])
def test_bench_send_file_frames(benchmark: Any, big_file: tuple[Path, int],
                                drained_pipe: tuple[int, list[int]], backend: str) -> None:
    src, size = big_file
    w, _ = drained_pipe
    mod = _mod(backend.split("-")[0])
    benchmark.group = "send_file_frames"
    benchmark.extra_info["MiB"] = size / 2**20
    saved = mod.features()
    if backend == "c-nosplice":
        mod.set_features(saved - {"splice"})

    def run() -> int:
        with open(src, "rb") as f:
            return int(mod.send_file_frames(f.fileno(), w, 1, 1, size, CHUNK))

    try:
        assert benchmark.pedantic(run, rounds=5, iterations=1) == size
    finally:
        mod.set_features(saved)
