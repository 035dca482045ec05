"""Tests of pyworker.iocore: one suite run against both twins (C and Python).

Real files, real pipes; the tar writer is compared byte for byte with
``tarfile`` and between the twins, and extracted like the master does.
"""

from __future__ import annotations

import bz2
import faulthandler
import gzip
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyworker
from pyworker.iocore import _python

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

FRAME = _python.FRAME_HEADER
MODES = {None: ("w", "r"), "gz": ("w|gz", "r|gz"), "bz2": ("w|bz2", "r|bz2")}


def _backend_params() -> list[Any]:
    only = os.environ.get("PYWORKER_IO")
    params = []
    if only != "python":
        params.append(
            pytest.param("c", marks=pytest.mark.skipif(_c is None, reason="C core not built"))
        )
    if only != "c":
        params.append("python")
    return params


@pytest.fixture(params=_backend_params())
def twin(request: pytest.FixtureRequest) -> ModuleType:
    """The twin module under test (pyworker.iocore._c or ._python)."""
    return _c if request.param == "c" else _python


@pytest.fixture
def ctwin() -> ModuleType:
    if _c is None or os.environ.get("PYWORKER_IO") == "python":
        pytest.skip("C core not in use")
    return _c


# ----------------------------------------------------------------------------
# helpers


def reference_tar(root: str, compress: str | None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(mode=MODES[compress][0], fileobj=buf) as tf:
        tf.add(root, arcname="")
    return buf.getvalue()


def stream_all(
    mod: ModuleType,
    root: str,
    compress: str | None,
    level: int = 9,
    chunk: int = 65536,
    gzip_mtime: int | None = 0,
) -> bytes:
    parts = []
    with mod.TarStream(root, compress, level, gzip_mtime=gzip_mtime) as ts:
        while True:
            data = ts.read(chunk)
            if not data:
                break
            assert len(data) <= chunk
            parts.append(data)
        assert ts.read(chunk) == b""
    # every chunk but the last is full
    assert all(len(p) == chunk for p in parts[:-1])
    return b"".join(parts)


def gzip_mtime_of(data: bytes) -> int:
    return int.from_bytes(data[4:8], "little")


def snapshot(root: Path) -> dict[str, tuple[str, Any]]:
    """name -> (kind, content/target) of everything below root."""
    out: dict[str, tuple[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = os.fsdecode(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", None)
            elif p.is_file():
                out[rel] = ("file", p.read_bytes())
            else:
                out[rel] = ("other", None)
    return out


def extract(data: bytes, compress: str | None, dest: Path) -> None:
    with tarfile.open(mode=MODES[compress][1], fileobj=io.BytesIO(data)) as tf:
        tf.extractall(dest, filter="data")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tree with most kinds of entries (and names) tarfile handles."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "file1.txt").write_bytes(b"hello\n")
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "f2.txt").write_bytes(b"x" * 513)
    (root / "sub" / "deeper" / "f3").write_bytes(b"y" * 512)
    (root / "emptydir").mkdir()
    (root / "Zupper").write_bytes(b"sorted before lowercase")
    (root / "ünïcødé-名前").write_bytes(b"non-ascii name")
    long_dir = root / ("d" * 90) / ("e" * 90)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 120)).write_bytes(b"long path > 255 bytes")
    (root / "link").symlink_to("file1.txt")
    (root / "dangling").symlink_to("does-not-exist")
    (root / "dirlink").symlink_to("sub")
    (root / "longlink").symlink_to("sub/" + "../sub/" * 20 + "f2.txt")
    os.link(root / "file1.txt", root / "hardlink")
    os.chmod(root / "sub" / "f2.txt", 0o640)
    os.chmod(root / "sub" / "deeper", 0o750)
    os.utime(root / "file1.txt", (1_000_000_000.5, 1_000_000_000.5))
    os.utime(root / "empty", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return root


@pytest.fixture
def special_tree(tree: Path) -> Path:
    """tree plus entries the 'data' filter refuses (fifo, undecodable name)."""
    os.mkfifo(tree / "fifo")
    (Path(os.fsdecode(bytes(tree) + b"/bad-\xff\xfe-name"))).write_bytes(b"undecodable")
    return tree


# ----------------------------------------------------------------------------
# backend selection


def _run_py(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e.pop("PYWORKER_IO", None)
    e.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        env=e,
        capture_output=True,
        text=True,
        # where this test imported pyworker from (the installed package in CI): the
        # source tree has no compiled core in a fresh clone
        cwd=str(Path(pyworker.__file__).resolve().parent.parent),
        timeout=60,
    )


def test_backend_selection() -> None:
    show = "import pyworker.iocore as m; print(m.BACKEND, m.C_IMPORT_ERROR is None)"
    r = _run_py(show, PYWORKER_IO="python")
    assert r.stdout.split() == ["python", "True"], r.stderr
    if _c is not None:
        assert _run_py(show).stdout.split() == ["c", "True"]
        assert _run_py(show, PYWORKER_IO="c").stdout.split() == ["c", "True"]
    r = _run_py(show, PYWORKER_IO="bogus")
    assert r.returncode != 0 and "ImportError" in r.stderr


def test_backend_fallback_when_c_missing() -> None:
    block = "import sys; sys.modules['pyworker.iocore._iocore'] = None\n"
    r = _run_py(block + "import pyworker.iocore as m; print(m.BACKEND, repr(m.C_IMPORT_ERROR))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("python ModuleNotFoundError")
    assert r.stderr == ""  # falls back without logging
    r = _run_py(block + "import pyworker.iocore", PYWORKER_IO="c")
    assert r.returncode != 0 and "C I/O core cannot be loaded" in r.stderr


def test_same_names_in_both_twins() -> None:
    if _c is None:
        pytest.skip("C core not built")
    assert set(_c.__all__) == set(_python.__all__)


# ----------------------------------------------------------------------------
# tar


@pytest.mark.parametrize("compress", [None, "gz", "bz2"])
def test_tar_matches_tarfile(twin: ModuleType, special_tree: Path, compress: str | None) -> None:
    ref = reference_tar(str(special_tree), compress)
    mtime = gzip_mtime_of(ref) if compress == "gz" else 0
    ours = stream_all(twin, str(special_tree), compress, 9, gzip_mtime=mtime)
    assert ours == ref


@pytest.mark.parametrize("compress", [None, "gz", "bz2"])
def test_tar_extracts_identically(
    twin: ModuleType, tree: Path, tmp_path: Path, compress: str | None
) -> None:
    data = stream_all(twin, str(tree), compress)
    dest = tmp_path / "out"
    dest.mkdir()
    extract(data, compress, dest)
    assert snapshot(dest) == snapshot(tree)
    assert os.stat(dest / "hardlink").st_ino == os.stat(dest / "file1.txt").st_ino
    assert os.stat(dest / "file1.txt").st_mtime == 1_000_000_000.5  # PAX mtime kept


def test_tar_member_metadata(twin: ModuleType, special_tree: Path) -> None:
    data = stream_all(twin, str(special_tree), None)
    with tarfile.open(mode="r", fileobj=io.BytesIO(data)) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert list(members)[0] == ""  # written as "/", read back without the slash
    assert members["sub/f2.txt"].mode == 0o640
    assert members["sub/deeper"].isdir() and members["sub/deeper"].mode == 0o750
    assert members["link"].issym() and members["link"].linkname == "file1.txt"
    assert members["hardlink"].islnk() and members["hardlink"].linkname == "file1.txt"
    assert members["fifo"].isfifo()
    assert members["empty"].mtime == 1_600_000_000.1234567
    assert members["emptydir"].isdir()
    st_ = os.lstat(special_tree / "file1.txt")
    assert members["file1.txt"].uid == st_.st_uid


@pytest.mark.parametrize(
    "compress,level", [(None, 0), ("gz", 1), ("gz", 6), ("bz2", 1), ("bz2", 9)]
)
def test_tar_twins_identical(special_tree: Path, compress: str | None, level: int) -> None:
    if _c is None:
        pytest.skip("C core not built")
    a = stream_all(_c, str(special_tree), compress, level, chunk=10_000)
    b = stream_all(_python, str(special_tree), compress, level, chunk=777)
    assert a == b


@pytest.mark.parametrize("chunk", [1, 511, 512, 513, 10240, 1 << 20])
def test_tar_chunk_sizes(twin: ModuleType, tree: Path, chunk: int) -> None:
    if chunk == 1 and twin is _python:
        chunk = 97  # the Python twin is slow byte by byte
    expected = reference_tar(str(tree), None)
    assert stream_all(twin, str(tree), None, chunk=chunk) == expected
    gz = stream_all(twin, str(tree), "gz", chunk=max(chunk, 97))
    assert gzip.decompress(gz) == expected


def test_tar_single_gzip_member_and_bz2_stream(twin: ModuleType, tree: Path) -> None:
    gz = stream_all(twin, str(tree), "gz")
    assert gz[:4] == b"\x1f\x8b\x08\x08" and gz[8:11] == b"\x02\xff\x00"
    d = zlib.decompressobj(31)
    d.decompress(gz)
    assert d.eof and d.unused_data == b""
    bz = stream_all(twin, str(tree), "bz2")
    dec = bz2.BZ2Decompressor()
    dec.decompress(bz)
    assert dec.eof and dec.unused_data == b""


def test_tar_gzip_mtime_defaults_to_now(twin: ModuleType, tree: Path) -> None:
    # time(2) reads the coarse clock, which can trail time.time() across a second boundary
    before = int(time.time()) - 1
    gz = stream_all(twin, str(tree), "gz", gzip_mtime=None)
    assert before <= gzip_mtime_of(gz) <= int(time.time()) + 1


def test_tar_record_padding(twin: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"z" * 20000)
    data = stream_all(twin, str(tmp_path), None)
    assert len(data) % tarfile.RECORDSIZE == 0
    assert data == reference_tar(str(tmp_path), None)


def test_tar_root_is_file(twin: ModuleType, tmp_path: Path) -> None:
    f = tmp_path / "single"
    f.write_bytes(b"abc")
    assert stream_all(twin, str(f), None) == reference_tar(str(f), None)


def test_tar_root_missing(twin: ModuleType, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as ei:
        twin.TarStream(missing, None, 9)
    assert ei.value.filename == missing
    msg = f"Cannot read directory '{missing}' for upload: {ei.value}"
    assert "No such file or directory" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_tar_root_unreadable(twin: ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0)
    try:
        with pytest.raises(PermissionError):
            twin.TarStream(str(d), None, 9)
    finally:
        d.chmod(0o755)


def test_tar_bad_arguments(twin: ModuleType, tree: Path) -> None:
    with pytest.raises(ValueError):
        twin.TarStream(str(tree), "xz", 9)
    with pytest.raises(ValueError):
        twin.TarStream(str(tree), "bz2", 0)
    with pytest.raises(ValueError):
        twin.TarStream(str(tree), "gz", 10)
    ts = twin.TarStream(str(tree), None, 9)
    ts.close()
    with pytest.raises(ValueError):
        ts.read(10)


def test_tar_huge_file_uses_pax_size(twin: ModuleType, tmp_path: Path) -> None:
    big = tmp_path / "huge"
    with open(big, "wb") as f:
        f.truncate(8 * 1024**3 + 1)  # sparse, > 8 GiB
    with twin.TarStream(str(tmp_path), None, 9) as ts:
        head = ts.read(4096)
    assert b" size=8589934593\n" in head
    with tarfile.open(mode="r|", fileobj=io.BytesIO(head + bytes(4096))) as tf:
        root = tf.next()
        member = tf.next()
    assert root is not None and member is not None
    assert member.name == "huge" and member.size == 8 * 1024**3 + 1


def test_tar_file_shrinks_is_zero_padded(twin: ModuleType, tmp_path: Path) -> None:
    f = tmp_path / "shrinking"
    original = os.urandom(200_000)
    f.write_bytes(original)
    with twin.TarStream(str(tmp_path), None, 9) as ts:
        first = ts.read(4096)  # headers and the first data block
        with open(f, "r+b") as fh:
            fh.truncate(10)
        rest = []
        while chunk := ts.read(65536):
            rest.append(chunk)
    data = first + b"".join(rest)
    with tarfile.open(mode="r", fileobj=io.BytesIO(data)) as tf:
        m = tf.getmember("shrinking")
        content = tf.extractfile(m).read()  # type: ignore[union-attr]
    assert m.size == 200_000 and len(content) == 200_000
    assert content[:10] == original[:10]
    assert content[-1000:] == bytes(1000)


def test_tar_vanished_entries(twin: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b" * 5000)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_bytes(b"x")
    with twin.TarStream(str(tmp_path), None, 9) as ts:
        (tmp_path / "a").unlink()  # vanished before lstat: skipped
        shutil.rmtree(tmp_path / "c")
        data = b""
        while chunk := ts.read(65536):
            data += chunk
    with tarfile.open(mode="r", fileobj=io.BytesIO(data)) as tf:
        names = tf.getnames()
    assert names == ["", "b"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists everything")
def test_tar_unreadable_subdir_raises_oserror(twin: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    inner = tmp_path / "z" / "inner"
    inner.mkdir(parents=True)
    (inner / "f").write_bytes(b"f")
    inner.chmod(0)
    try:
        with twin.TarStream(str(tmp_path), None, 9) as ts, pytest.raises(PermissionError) as ei:
            while ts.read(65536):
                pass
        assert ei.value.filename == str(inner)
    finally:
        inner.chmod(0o755)


def test_send_file_frames_from_pipe(twin: ModuleType, tmp_path: Path) -> None:
    """A pipe source with data arriving late (splice path waits, framing unchanged)."""
    src_r, src_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        reader = PipeReader(out_r)

        def feed() -> None:
            time.sleep(0.05)
            os.write(src_w, b"a" * 5000)
            time.sleep(0.05)
            os.write(src_w, b"b" * 5000)
            os.close(src_w)

        t = threading.Thread(target=feed, daemon=True)
        t.start()
        assert twin.send_file_frames(src_r, out_w, 2, 0, 20000, 4096) == 10000
        t.join(10)
        os.close(out_w)
        out_w = -1
        frames = parse_frames(reader.join())
        assert [len(p) for _, _, p in frames] == [4096, 4096, 1808]
        assert b"".join(p for _, _, p in frames) == b"a" * 5000 + b"b" * 5000
    finally:
        for fd in (src_r, out_r, out_w):
            if fd >= 0:
                os.close(fd)


# names: no '/', no NUL, not '.'/'..', at most 255 bytes
_name = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="/\x00"),
    min_size=1,
    max_size=40,
).filter(lambda s: s not in (".", "..") and len(s.encode()) <= 255)
_long_name = st.sampled_from(["L" * 101, "é" * 60, "n" * 255, "ñ" * 127])
# undecodable bytes: surrogate-escaped str names, PAX hdrcharset=BINARY
_bytes_name = st.binary(min_size=1, max_size=30).filter(
    lambda b: b"/" not in b and b"\x00" not in b and b not in (b".", b"..")).map(os.fsdecode)
_any_name = st.one_of(_name, _name, _long_name, _bytes_name)
_leaf = st.one_of(
    st.binary(max_size=3000).map(lambda b: ("file", b)),
    st.just(("file", b"")),
    st.just(("dir", {})),
    _any_name.map(lambda n: ("link", n)),
)
_tree = st.recursive(
    _leaf,
    lambda children: st.dictionaries(_any_name, children, max_size=5).map(lambda d: ("dir", d)),
    max_leaves=25,
)


def _build(root: Path, node: tuple[str, Any]) -> None:
    kind, value = node
    if kind == "dir":
        root.mkdir()
        for name, child in value.items():
            _build(root / name, child)
    elif kind == "file":
        root.write_bytes(value)
    else:
        root.symlink_to(value)


@given(node=_tree, compress=st.sampled_from([None, "gz", "bz2"]))
def test_tar_property_random_trees(node: tuple[str, Any], compress: str | None) -> None:
    if node[0] != "dir":
        node = ("dir", {"only": node})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "r"
        _build(root, node)
        ref = reference_tar(str(root), compress)
        mtime = gzip_mtime_of(ref) if compress == "gz" else 0
        outs = [stream_all(_python, str(root), compress, gzip_mtime=mtime, chunk=4096)]
        if _c is not None:
            outs.append(stream_all(_c, str(root), compress, gzip_mtime=mtime, chunk=5000))
        for out in outs:
            assert out == ref
        dest = Path(tmp) / "x"
        dest.mkdir()
        extract(outs[-1], compress, dest)
        assert snapshot(dest) == snapshot(root)


# ----------------------------------------------------------------------------
# frames


class PipeReader:
    """Drain a pipe in a thread (so blocking writes into it make progress)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while chunk := os.read(self.fd, 1 << 20):
            self.data += chunk

    def join(self) -> bytes:
        self.thread.join(30)
        assert not self.thread.is_alive()
        return bytes(self.data)


def parse_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    frames = []
    pos = 0
    while pos < len(data):
        length, kind, channel, zero = FRAME.unpack_from(data, pos)
        assert zero == 0
        pos += FRAME.size
        frames.append((kind, channel, data[pos : pos + length]))
        assert len(data[pos : pos + length]) == length
        pos += length
    return frames


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.mark.parametrize(
    "frame_max,count_delta",
    [(65536, 0), (65536, -1000), (4096, 10**9), (1, -(1 << 20) + 10), (1 << 21, 10**9)],
)
@pytest.mark.parametrize("use_splice", [True, False])
def test_send_file_frames(
    twin: ModuleType,
    tmp_path: Path,
    pipe: tuple[int, int],
    frame_max: int,
    count_delta: int,
    use_splice: bool,
) -> None:
    payload = os.urandom((1 << 20) + 123)
    src = tmp_path / "src"
    src.write_bytes(b"skip" + payload)
    r, w = pipe
    saved = twin.features()
    twin.set_features(saved if use_splice else saved - {"splice"})
    try:
        reader = PipeReader(r)
        count = len(payload) + count_delta
        with open(src, "rb") as f:
            f.seek(4)
            sent = twin.send_file_frames(f.fileno(), w, 7, 3, count, frame_max)
            offset = f.tell()
        os.close(w)
        data = reader.join()
    finally:
        twin.set_features(saved)
    expected = payload[:count]
    assert sent == len(expected)
    assert offset == 4 + len(expected)
    frames = parse_frames(data)
    assert all(k == 7 and c == 3 for k, c, _ in frames)
    assert [len(p) for _, _, p in frames[:-1]] == [frame_max] * (len(frames) - 1)
    assert b"".join(p for _, _, p in frames) == expected


def test_send_file_frames_to_regular_file_and_eof(twin: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"abcdefghij")
    out = tmp_path / "out"
    with open(src, "rb") as f, open(out, "wb") as o:
        assert twin.send_file_frames(f.fileno(), o.fileno(), 1, 2, 100, 4) == 10
        assert twin.send_file_frames(f.fileno(), o.fileno(), 1, 2, 100, 4) == 0
        assert twin.send_file_frames(f.fileno(), o.fileno(), 1, 2, 0, 4) == 0
    frames = parse_frames(out.read_bytes())
    assert [p for _, _, p in frames] == [b"abcd", b"efgh", b"ij"]
    with pytest.raises(ValueError):
        twin.send_file_frames(0, 1, 256, 0, 1, 1)
    with pytest.raises(ValueError):
        twin.send_file_frames(0, 1, 0, 0, 1, 0)


def test_send_file_frames_errors(twin: ModuleType, tmp_path: Path, pipe: tuple[int, int]) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 100)
    r, w = pipe
    os.close(r)
    with open(src, "rb") as f, pytest.raises(BrokenPipeError):
        twin.send_file_frames(f.fileno(), w, 1, 1, 100, 10)
    with pytest.raises(OSError):
        twin.send_file_frames(9999, w, 1, 1, 100, 10)


# ----------------------------------------------------------------------------
# recv_to_file


@pytest.mark.parametrize("use_splice", [True, False])
@pytest.mark.parametrize("nonblocking", [False, True])
def test_recv_to_file(
    twin: ModuleType, tmp_path: Path, pipe: tuple[int, int], use_splice: bool, nonblocking: bool
) -> None:
    data = os.urandom(3 * (1 << 20) + 7)
    extra = b"rest-of-stream"
    r, w = pipe
    if nonblocking:
        os.set_blocking(r, False)

    def writer() -> None:
        view = memoryview(data + extra)
        step = 100_003
        for i in range(0, len(view), step):
            os.write(w, view[i : i + step])
            if i == 0:
                time.sleep(0.05)

    saved = twin.features()
    twin.set_features(saved if use_splice else saved - {"splice"})
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        dst = tmp_path / "dst"
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(fd, b"HEAD")
            assert twin.recv_to_file(r, fd, len(data)) == len(data)
        finally:
            os.close(fd)
    finally:
        t.join(30)
        twin.set_features(saved)
    assert dst.read_bytes() == b"HEAD" + data
    os.set_blocking(r, True)
    assert os.read(r, 100) == extra


def test_recv_to_file_append_mode_and_eof(
    twin: ModuleType, tmp_path: Path, pipe: tuple[int, int]
) -> None:
    r, w = pipe
    os.write(w, b"0123456789")
    dst = tmp_path / "dst"
    dst.write_bytes(b"old:")
    fd = os.open(dst, os.O_WRONLY | os.O_APPEND)
    try:
        assert twin.recv_to_file(r, fd, 4) == 4
        assert twin.recv_to_file(r, fd, 0) == 0
        os.close(w)
        with pytest.raises(EOFError):
            twin.recv_to_file(r, fd, 100)
    finally:
        os.close(fd)
    assert dst.read_bytes() == b"old:0123456789"


# ----------------------------------------------------------------------------
# copy_file


@pytest.mark.parametrize("feats", ["all", "sendfile", "none"])
@pytest.mark.parametrize("size", [0, 1, 70_000, 5 * (1 << 20) + 3])
def test_copy_file(twin: ModuleType, tmp_path: Path, feats: str, size: int) -> None:
    src = tmp_path / "src"
    payload = os.urandom(size)
    src.write_bytes(payload)
    src.chmod(0o751)
    dst = tmp_path / "dst"
    dst.write_bytes(b"previous content that is longer than some sources" * 100)
    saved = twin.features()
    twin.set_features({"all": saved, "sendfile": {"sendfile"}, "none": set()}[feats])
    try:
        twin.copy_file(str(src), str(dst))
    finally:
        twin.set_features(saved)
    assert dst.read_bytes() == payload
    assert stat.S_IMODE(dst.stat().st_mode) == 0o751


def test_copy_file_errors(twin: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"data")
    with pytest.raises(FileNotFoundError) as ei:
        twin.copy_file(str(tmp_path / "missing"), str(tmp_path / "x"))
    assert ei.value.filename == str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as ei:
        twin.copy_file(str(src), str(tmp_path / "no" / "dir"))
    assert ei.value.filename == str(tmp_path / "no" / "dir")
    with pytest.raises(shutil.SameFileError):
        twin.copy_file(str(src), str(src))
    assert src.read_bytes() == b"data"
    with pytest.raises(IsADirectoryError):
        twin.copy_file(str(tmp_path), str(tmp_path / "y"))


def test_copy_file_pseudo_file(twin: ModuleType, tmp_path: Path) -> None:
    dst = tmp_path / "status"
    twin.copy_file("/proc/self/status", str(dst))
    assert b"Name:" in dst.read_bytes()


# ----------------------------------------------------------------------------
# concurrency / GIL


def test_gil_released_during_blocking_call(
    ctwin: ModuleType, tmp_path: Path, pipe: tuple[int, int]
) -> None:
    """A thread blocked in C must not stop this thread from running Python code."""
    r, w = pipe
    faulthandler.dump_traceback_later(60, exit=True)
    try:
        done = threading.Event()
        dst = tmp_path / "dst"

        def blocked() -> None:
            with open(dst, "wb") as f:
                ctwin.recv_to_file(r, f.fileno(), 5)
            done.set()

        t = threading.Thread(target=blocked)
        t.start()
        deadline = time.monotonic() + 0.2
        spins = 0
        while time.monotonic() < deadline:  # runs only if the GIL is free
            spins += 1
        assert not done.is_set()
        os.write(w, b"hello")
        t.join(10)
        assert done.is_set() and spins > 1000
        assert dst.read_bytes() == b"hello"
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_concurrent_c_paths(ctwin: ModuleType, tree: Path, tmp_path: Path) -> None:
    expected = {c: reference_tar(str(tree), c) for c in (None, "bz2")}
    errors: list[BaseException] = []
    big = tmp_path / "big"
    big.write_bytes(os.urandom(4 << 20))

    def work(i: int) -> None:
        try:
            for compress in (None, "bz2"):
                assert stream_all(ctwin, str(tree), compress, chunk=3000 + i) == expected[compress]
            dst = tmp_path / f"copy{i}"
            ctwin.copy_file(str(big), str(dst))
            assert dst.read_bytes() == big.read_bytes()
            r, w = os.pipe()
            try:
                reader = PipeReader(r)
                with open(big, "rb") as f:
                    ctwin.send_file_frames(f.fileno(), w, i, i, 1 << 30, 65536)
                os.close(w)
                w = -1
                payload = b"".join(p for _, _, p in parse_frames(reader.join()))
                assert payload == big.read_bytes()
            finally:
                os.close(r)
                if w >= 0:
                    os.close(w)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_features_reported(ctwin: ModuleType) -> None:
    assert ctwin.FEATURES <= {"splice", "copy_file_range", "sendfile"}
    if sys.platform.startswith("linux"):
        assert "splice" in ctwin.FEATURES
