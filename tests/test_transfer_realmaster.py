"""File transfers (PROTOCOL.md §6) against a real Buildbot 4.3.0 master.

Every case runs against the reference worker and pyworker on the same master, checking the
bytes on both sides: checksums of files and trees, modes, timestamps, the stdio logs and the
step results. pyworker-only cases cover what the reference cannot do (blocks above Twisted's
640 KiB string limit), what only pyworker promises (atomic downloads, bounded memory) and
interrupts.

The large transfer is 1 GiB each way (``PYWORKER_BIG_MIB`` changes it), in /dev/shm if possible.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realmaster import Builder, BuildResult, RealMaster, master_fixture

WORKERS = ("reference", "pyworker")
MiB = 1024 * 1024
#: The memory-bound transfer: 1 GiB each way, as issue 3 asks (``PYWORKER_BIG_MIB`` to change).
BIG = int(os.environ.get("PYWORKER_BIG_MIB", "1024")) * MiB
PSS_LIMIT = 100 * MiB

P_SRC = "util.Property('src')"
P_DST = "util.Property('dst')"

#: builder kind -> list-of-steps source (paths come from build properties)
KINDS: dict[str, str] = {
    "upload": f"[steps.FileUpload(workersrc={P_SRC}, masterdest={P_DST})]",
    "upload_keepstamp": f"[steps.FileUpload(workersrc={P_SRC}, masterdest={P_DST},"
    " keepstamp=True)]",
    "upload_max": f"[steps.FileUpload(workersrc={P_SRC}, masterdest={P_DST}, maxsize=1000)]",
    "upload_bigblock": f"[steps.FileUpload(workersrc={P_SRC}, masterdest={P_DST},"
    " blocksize=1024*1024)]",
    "dirup_none": f"[steps.DirectoryUpload(workersrc={P_SRC}, masterdest={P_DST})]",
    "dirup_gz": f"[steps.DirectoryUpload(workersrc={P_SRC}, masterdest={P_DST},"
    " compress='gz')]",
    "dirup_bz2": f"[steps.DirectoryUpload(workersrc={P_SRC}, masterdest={P_DST},"
    " compress='bz2')]",
    "dirup_max": f"[steps.DirectoryUpload(workersrc={P_SRC}, masterdest={P_DST},"
    " maxsize=20000)]",
    "download": f"[steps.FileDownload(mastersrc={P_SRC}, workerdest={P_DST}, mode=0o750)]",
    "download_nomode": f"[steps.FileDownload(mastersrc={P_SRC}, workerdest={P_DST})]",
    "download_max": f"[steps.FileDownload(mastersrc={P_SRC}, workerdest={P_DST},"
    " maxsize=1000)]",
    "download_bigblock": f"[steps.FileDownload(mastersrc={P_SRC}, workerdest={P_DST},"
    " blocksize=1024*1024)]",
    "string_download": "[steps.StringDownload(util.Property('content'),"
    f" workerdest={P_DST}, mode=0o640)]",
}

#: a pyworker created with fixed compression settings (``--gzip-level`` and friends)
FIXED = "pyfixed"

master = master_fixture(
    {
        **{
            f"{kind}-{w}": Builder(factory=source, workers=[w])
            for kind, source in KINDS.items()
            for w in WORKERS
        },
        **{f"dirup_{c}-{FIXED}": Builder(factory=KINDS[f"dirup_{c}"], workers=[FIXED])
           for c in ("gz", "bz2")},
    },
    workers=(*WORKERS, FIXED),
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: Any) -> Path:
    """Source files shared by both workers (read-only for the tests)."""
    d: Path = tmp_path_factory.mktemp("transfer-data")
    rnd = os.urandom(3 * MiB + 12345)
    (d / "binary.bin").write_bytes(rnd)
    (d / "exact1000.bin").write_bytes(rnd[:1000])
    (d / "small999.bin").write_bytes(rnd[:999])
    (d / "big.bin").write_bytes(rnd[: 2 * MiB + 1])
    (d / "empty.bin").write_bytes(b"")
    (d / "adir").mkdir()
    make_tree(d / "tree")
    return d


def make_tree(root: Path) -> None:
    """Nested and empty directories, symlinks, binary files, modes, non-ASCII and long names."""
    root.mkdir()
    (root / "file1.txt").write_text("hello\n")
    (root / "bin.dat").write_bytes(bytes(range(256)) * 1000 + os.urandom(70000))
    (root / "zeros.dat").write_bytes(bytes(300000))
    sub = root / "sub" / "deeper" / "deepest"
    sub.mkdir(parents=True)
    (sub / "leaf.txt").write_text("leaf\n" * 1000)
    (root / "sub" / "mid.txt").write_text("mid\n")
    (root / "empty_dir").mkdir()
    (root / "sub" / "empty_too").mkdir()
    (root / "ünïcødé-名前.txt").write_text("non-ascii name ✓\n", encoding="utf-8")
    (root / "Ωmega").mkdir()
    (root / "Ωmega" / "ß.bin").write_bytes(os.urandom(5000))
    long_dir = root / ("d" * 120)
    long_dir.mkdir()
    (long_dir / ("f" * 200 + ".txt")).write_text("long name\n")
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o755)
    os.chmod(root / "bin.dat", 0o600)
    os.symlink("file1.txt", root / "link-to-file")
    os.symlink("sub/deeper", root / "link-to-dir")
    os.symlink("../mid.txt", root / "sub" / "deeper" / "uplink")
    stamp = 1_600_000_000.25
    for p in sorted(root.rglob("*"), reverse=True):
        if not p.is_symlink():
            os.utime(p, (stamp, stamp))


def tree_manifest(root: Path) -> dict[str, tuple[Any, ...]]:
    """relative path -> (type, permission bits, content digest or link target, int mtime)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), sha(p), int(st.st_mtime))
    return out


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module", params=WORKERS)
def worker(request: pytest.FixtureRequest, master: RealMaster) -> str:
    """Each worker implementation, started once on the shared master."""
    name: str = request.param
    exe = request.getfixturevalue(
        "reference_worker" if name == "reference" else "pyworker_executable"
    )
    if not any(w.name == name and w.running() for w in master.worker_procs):
        master.start_worker(exe, name)
    return name


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path


def build(master: RealMaster, kind: str, worker: str, timeout: float = 120, **props: str
          ) -> BuildResult:
    return master.force_build(f"{kind}-{worker}", props, timeout=timeout)


def assert_no_temp_files(directory: Path) -> None:
    leftovers = [p.name for p in directory.iterdir() if "pyworker-tmp" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"


# ---- uploadFile ----------------------------------------------------------------------------


def test_upload_file(master: RealMaster, worker: str, data_dir: Path, out: Path) -> None:
    src = data_dir / "binary.bin"
    b = build(master, "upload", worker, src=str(src), dst=str(out / "got.bin"))
    assert b.result == "SUCCESS", b.describe()
    assert sha(out / "got.bin") == sha(src)
    stdio = b.steps[-1].logs["stdio"]
    assert f"hsending {src}\n" in stdio
    assert "hprogram finished with exit code 0\n" in stdio


def test_upload_empty_file(master: RealMaster, worker: str, data_dir: Path, out: Path) -> None:
    b = build(master, "upload", worker, src=str(data_dir / "empty.bin"), dst=str(out / "e"))
    assert b.result == "SUCCESS", b.describe()
    assert (out / "e").read_bytes() == b""


def test_upload_keepstamp(master: RealMaster, worker: str, tmp_path_factory: Any, out: Path
                          ) -> None:
    src = tmp_path_factory.mktemp("stamp") / "stamped.txt"
    src.write_bytes(b"stamped\n" * 1000)
    os.utime(src, (1_500_000_000.5, 1_400_000_000.75))
    b = build(master, "upload_keepstamp", worker, src=str(src), dst=str(out / "s.txt"))
    assert b.result == "SUCCESS", b.describe()
    st = (out / "s.txt").stat()
    assert abs(st.st_mtime - 1_400_000_000.75) < 1e-3
    assert abs(st.st_atime - 1_500_000_000.5) < 1e-3
    assert sha(out / "s.txt") == sha(src)


@pytest.mark.parametrize(("name", "ok"), [("small999.bin", True), ("exact1000.bin", False),
                                          ("binary.bin", False)])
def test_upload_maxsize(master: RealMaster, worker: str, data_dir: Path, out: Path,
                        name: str, ok: bool) -> None:
    """maxsize=1000: smaller files pass; a file of exactly 1000 bytes counts as truncated."""
    src = data_dir / name
    dst = out / "m.bin"
    b = build(master, "upload_max", worker, src=str(src), dst=str(dst))
    stdio = b.steps[-1].logs["stdio"]
    if ok:
        assert b.result == "SUCCESS", b.describe()
        assert dst.read_bytes() == src.read_bytes()
    else:
        assert b.result == "FAILURE", b.describe()
        assert f"eMaximum filesize reached, truncating file '{src}'" in stdio
        assert "hprogram finished with exit code 1\n" in stdio
        assert not dst.exists()  # the master deletes the destination of a failed step


def test_upload_missing_source(master: RealMaster, worker: str, data_dir: Path, out: Path
                               ) -> None:
    src = data_dir / "does-not-exist"
    b = build(master, "upload", worker, src=str(src), dst=str(out / "x"))
    assert b.result == "FAILURE", b.describe()
    stdio = b.steps[-1].logs["stdio"]
    assert f"hsending {src}\n" in stdio
    assert f"eCannot open file '{src}' for upload" in stdio
    assert not (out / "x").exists()


def test_upload_directory_as_file(master: RealMaster, worker: str, data_dir: Path, out: Path
                                  ) -> None:
    """The reference fails with an exception (it reads a directory); pyworker says why."""
    b = build(master, "upload", worker, src=str(data_dir / "adir"), dst=str(out / "x"))
    assert not (out / "x").exists()
    if worker == "reference":
        assert b.result in ("FAILURE", "EXCEPTION"), b.describe()
    else:
        assert b.result == "FAILURE", b.describe()
        assert f"eCannot open file '{data_dir / 'adir'}' for upload" in b.steps[-1].logs["stdio"]


def test_upload_blocksize_above_string_limit(master: RealMaster, worker: str, data_dir: Path,
                                             out: Path) -> None:
    """blocksize 1 MiB: the reference's write exceeds Twisted's 640 KiB limit; pyworker splits."""
    src = data_dir / "big.bin"
    b = build(master, "upload_bigblock", worker, src=str(src), dst=str(out / "b.bin"))
    if worker == "reference":
        assert b.result == "EXCEPTION", b.describe()
    else:
        assert b.result == "SUCCESS", b.describe()
        assert sha(out / "b.bin") == sha(src)


# ---- uploadDirectory -----------------------------------------------------------------------


@pytest.mark.parametrize("compress", ["none", "gz", "bz2"])
def test_upload_directory(master: RealMaster, worker: str, data_dir: Path, out: Path,
                          compress: str) -> None:
    src = data_dir / "tree"
    dst = out / "tree"
    b = build(master, f"dirup_{compress}", worker, src=str(src), dst=str(dst))
    assert b.result == "SUCCESS", b.describe()
    assert f"hsending {src}\n" in b.steps[-1].logs["stdio"]
    got = tree_manifest(dst)
    want = tree_manifest(src)
    assert got == want


def test_upload_directory_compression_settings(master: RealMaster, pyworker_executable: str,
                                               data_dir: Path, out: Path) -> None:
    """Fixed levels and a thread count from create-worker reach the compressor; the master
    extracts the same tree whatever they are."""
    w = master.start_worker(pyworker_executable, FIXED, create_args=[
        "--gzip-level=9", "--bz2-level=2", "--compress-threads=3"])
    try:
        src = data_dir / "tree"
        for compress, level in (("gz", 9), ("bz2", 2)):
            dst = out / compress
            b = build(master, f"dirup_{compress}", FIXED, src=str(src), dst=str(dst))
            assert b.result == "SUCCESS", b.describe()
            assert tree_manifest(dst) == tree_manifest(src)
            log = w.twistd_log.read_text()
            assert re.search(rf"{compress} [0-9.]+ MiB -> [0-9.]+ MiB, chunks: \d+ at {level}\n",
                             log), log[-3000:]
    finally:
        w.stop()


def test_upload_directory_missing(master: RealMaster, worker: str, data_dir: Path, out: Path
                                  ) -> None:
    src = data_dir / "no-such-dir"
    b = build(master, "dirup_gz", worker, src=str(src), dst=str(out / "t"))
    assert b.result == "FAILURE", b.describe()
    stdio = b.steps[-1].logs["stdio"]
    assert f"eCannot read directory '{src}' for upload: [Errno 2] No such file or directory" in (
        stdio
    )
    assert "sending" not in stdio
    assert not (out / "t").exists()


def test_upload_directory_maxsize(master: RealMaster, worker: str, data_dir: Path, out: Path
                                  ) -> None:
    if worker == "reference":
        pytest.skip("the reference never completes: its failed unpack crashes its error path")
    src = data_dir / "tree"
    b = build(master, "dirup_max", worker, src=str(src), dst=str(out / "t"))
    assert b.result in ("FAILURE", "EXCEPTION"), b.describe()
    assert f"eMaximum filesize reached, truncating file '{src}'" in b.steps[-1].logs["stdio"]


# ---- downloadFile --------------------------------------------------------------------------


def test_download_file(master: RealMaster, worker: str, data_dir: Path, out: Path) -> None:
    src = data_dir / "binary.bin"
    dst = out / "new" / "parents" / "got.bin"
    b = build(master, "download", worker, src=str(src), dst=str(dst))
    assert b.result == "SUCCESS", b.describe()
    assert sha(dst) == sha(src)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o750
    assert "sending" not in b.steps[-1].logs["stdio"]
    assert_no_temp_files(dst.parent)


def test_download_over_existing_keeps_mode(master: RealMaster, worker: str, data_dir: Path,
                                           out: Path) -> None:
    dst = out / "existing.bin"
    dst.write_bytes(b"old content")
    os.chmod(dst, 0o604)
    b = build(master, "download_nomode", worker, src=str(data_dir / "big.bin"), dst=str(dst))
    assert b.result == "SUCCESS", b.describe()
    assert sha(dst) == sha(data_dir / "big.bin")
    assert stat.S_IMODE(dst.stat().st_mode) == 0o604
    assert_no_temp_files(out)


def test_download_new_file_umask_mode(master: RealMaster, worker: str, data_dir: Path,
                                      out: Path) -> None:
    dst = out / "fresh.bin"
    b = build(master, "download_nomode", worker, src=str(data_dir / "small999.bin"),
              dst=str(dst))
    assert b.result == "SUCCESS", b.describe()
    # the worker runs with the default umask of its parent (022 here)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(("name", "ok"), [("small999.bin", True), ("exact1000.bin", False),
                                          ("binary.bin", False)])
def test_download_maxsize(master: RealMaster, worker: str, data_dir: Path, out: Path,
                          name: str, ok: bool) -> None:
    src = data_dir / name
    dst = out / "m.bin"
    b = build(master, "download_max", worker, src=str(src), dst=str(dst))
    stdio = b.steps[-1].logs["stdio"]
    if ok:
        assert b.result == "SUCCESS", b.describe()
    else:
        assert b.result == "FAILURE", b.describe()
        assert f"eMaximum filesize reached, truncating file '{dst}'" in stdio
        assert "hprogram finished with exit code 1\n" in stdio
    # as the reference: the first maxsize bytes are kept
    assert dst.read_bytes() == src.read_bytes()[:1000]


def test_download_into_directory(master: RealMaster, worker: str, data_dir: Path, out: Path
                                 ) -> None:
    dst = out / "isadir"
    dst.mkdir()
    b = build(master, "download", worker, src=str(data_dir / "small999.bin"), dst=str(dst))
    assert b.result == "FAILURE", b.describe()
    assert f"eCannot open file '{dst}' for download" in b.steps[-1].logs["stdio"]
    assert dst.is_dir()
    assert_no_temp_files(out)


def test_download_unwritable_destination(master: RealMaster, worker: str, data_dir: Path,
                                         out: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = out / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        dst = ro / "sub" / "f.bin"
        b = build(master, "download", worker, src=str(data_dir / "small999.bin"), dst=str(dst))
        assert b.result in ("FAILURE", "EXCEPTION"), b.describe()
        if worker == "pyworker":
            assert b.result == "FAILURE"
            assert f"eCannot open file '{dst}' for download" in b.steps[-1].logs["stdio"]
    finally:
        os.chmod(ro, 0o755)


def test_download_blocksize_above_string_limit(master: RealMaster, worker: str,
                                               data_dir: Path, out: Path) -> None:
    if worker == "reference":
        pytest.skip("the reference loses its connection (a 1 MiB read reply) and retries")
    src = data_dir / "big.bin"
    dst = out / "bb.bin"
    b = build(master, "download_bigblock", worker, src=str(src), dst=str(dst))
    assert b.result == "SUCCESS", b.describe()
    assert sha(dst) == sha(src)


def test_string_download(master: RealMaster, worker: str, out: Path) -> None:
    dst = out / "s" / "string.txt"
    content = "line one\nnon-ASCII: ünïcødé ✓\n" * 100
    b = build(master, "string_download", worker, content=content, dst=str(dst))
    assert b.result == "SUCCESS", b.describe()
    assert dst.read_text(encoding="utf-8") == content
    assert stat.S_IMODE(dst.stat().st_mode) == 0o640


# ---- pyworker only: memory, interrupts, atomicity ------------------------------------------


class OwnPssSampler:
    """Peak PSS of the worker's own processes (front end and executors, never the commands:
    :func:`pyworker.bench.memory.own_memory`), sampled in a thread.

    PSS, not the sum of RSS: each executor maps the same interpreter and libraries as the
    front end, and a sum of RSS counts those shared pages once per process, so it moves with
    how many executors happen to be alive rather than with what a transfer buffers. Every
    0.2 s: reading PSS walks the processes' page tables, which at 50 samples a second took
    a third of a CPU from the transfer it measures."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from pyworker.bench.memory import own_memory

        while not self._stop.is_set():
            self.peak = max(self.peak, own_memory(self.proc).pss)
            time.sleep(self.interval)

    def __enter__(self) -> OwnPssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def big_dir(tmp_path: Path) -> Iterator[Path]:
    """Room for three BIG files: in memory (/dev/shm) when there is one, so that the test
    measures the worker and not the disk's write-back; else the test's tmp directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 * BIG:
        d = Path(tempfile.mkdtemp(prefix="pyworker-big-", dir=shm))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


def write_big_file(path: Path) -> str:
    """BIG bytes (a shifted random MiB per MiB); returns their SHA-256."""
    block = os.urandom(MiB)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(BIG // MiB):
            piece = block[i % 256 :] + block[: i % 256]
            h.update(piece)
            f.write(piece)
    return h.hexdigest()


def _pid(master: RealMaster, name: str) -> int:
    return next(w.pid for w in master.worker_procs if w.name == name and w.running())


def test_big_transfers_bounded_memory(master: RealMaster, worker: str, big_dir: Path) -> None:
    if worker != "pyworker":
        pytest.skip("pyworker's memory bound")
    big_file = big_dir / "big.bin"
    digest = write_big_file(big_file)
    timeout = 60 + BIG / MiB
    with OwnPssSampler(_pid(master, worker)) as up:
        b = build(master, "upload", worker, timeout=timeout, src=str(big_file),
                  dst=str(big_dir / "up.bin"))
    assert b.result == "SUCCESS", b.describe()
    assert sha(big_dir / "up.bin") == digest
    (big_dir / "up.bin").unlink()
    dst = big_dir / "down.bin"
    with OwnPssSampler(_pid(master, worker)) as down:
        b = build(master, "download", worker, timeout=timeout, src=str(big_file), dst=str(dst))
    assert b.result == "SUCCESS", b.describe()
    assert sha(dst) == digest
    print(f"peak worker PSS: upload {up.peak / MiB:.1f} MiB, download {down.peak / MiB:.1f} MiB")
    assert up.peak < PSS_LIMIT
    assert down.peak < PSS_LIMIT


def _stop_when_running(master: RealMaster, kind: str, worker: str, **props: str
                       ) -> BuildResult:
    req = master.request_build(f"{kind}-{worker}", props)
    buildid = master.wait_build_started(req, step=None, timeout=30)
    # wait for the step to start, then stop the build as the UI's Stop button does
    master.wait_build_started(req, step=_step_name(kind), timeout=30)
    master.stop_build(buildid)
    return master.wait_build(req, timeout=120)


def _step_name(kind: str) -> str:
    if kind.startswith("download"):
        return "download"
    if kind.startswith("dirup"):
        return "upload"
    return "upload"


def test_interrupted_download_is_atomic(master: RealMaster, worker: str, out: Path) -> None:
    if worker != "pyworker":
        pytest.skip("the reference leaves a partial file")
    src = out / "huge-sparse.bin"
    with open(src, "wb") as f:
        f.truncate(8 * 1024 * MiB)  # the master reads it fast; we stop long before the end
    dst = out / "dl" / "target.bin"
    dst.parent.mkdir()
    dst.write_bytes(b"previous content")
    b = _stop_when_running(master, "download", worker, src=str(src), dst=str(dst))
    assert b.result == "CANCELLED", b.describe()
    assert dst.read_bytes() == b"previous content"
    assert_no_temp_files(dst.parent)
    assert "program finished with exit code 1" in b.steps[-1].logs["stdio"]
    # the worker keeps serving
    b = build(master, "download", worker, src=str(out / "dl" / "target.bin"),
              dst=str(out / "again.bin"))
    assert b.result == "SUCCESS", b.describe()


def test_interrupted_upload(master: RealMaster, worker: str, out: Path) -> None:
    if worker != "pyworker":
        pytest.skip("pyworker's interrupt latency")
    src = out / "huge-sparse-up.bin"
    with open(src, "wb") as f:
        f.truncate(8 * 1024 * MiB)
    started = time.monotonic()
    b = _stop_when_running(master, "upload", worker, src=str(src), dst=str(out / "up.bin"))
    assert b.result == "CANCELLED", b.describe()
    assert time.monotonic() - started < 60
    assert "program finished with exit code 1" in b.steps[-1].logs["stdio"]
    assert not (out / "up.bin").exists()
    b = build(master, "string_download", worker, content="still here", dst=str(out / "ok.txt"))
    assert b.result == "SUCCESS", b.describe()
