"""Transfer throughput against a real Buildbot 4.3.0 master: pyworker next to the reference.

One master, three workers: the reference ``buildbot-worker``, ``pyworker`` and the minimal
pipelining worker (``minimal_worker.py``: 4 calls of 512 KiB in flight, nothing else), the
baseline of what the master allows. One builder per transfer kind and worker, the steps'
default arguments (FileUpload 256 KiB blocks, the others 16 KiB; the minimal worker ignores
them). Each benchmark round runs the same transfer once on each worker, the order turning
by one each round, so all see the same machine; the figures are medians over the rounds:

* MiB/s: payload size / (build wall time - wall time of an empty build of that worker);
* worker CPU s/GiB: CPU time of the worker process and all its children (psutil).

The minimal worker runs the file transfers and the uncompressed directory upload (it has
no compression). The ratios pyworker/reference (``ratio``) and pyworker/minimal
(``minimal_ratio``) are attached to ``extra_info`` and printed (``-s``)::

    PYWORKER_BENCH_MIB=128 PYWORKER_BENCH_TREE_MIB=50 pytest bench/bench_transfer.py -s
    pytest bench --benchmark-disable     # CI: once each, small sizes

``PYWORKER_BENCH_ROUNDS`` sets the rounds (default 5; 1 with ``--benchmark-disable``).
The payload and the uploaded copies live in ``/dev/shm`` when there is one, so the disk
is not what is measured.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from realmaster import Builder, RealMaster
from realmaster_bench import WORKERS, interleaved, timed_build

MINIMAL = "minimal"
ALL_WORKERS = (*WORKERS, MINIMAL)

MiB = 1024 * 1024
FILE_MIB = int(os.environ.get("PYWORKER_BENCH_MIB", "4"))
TREE_MIB = int(os.environ.get("PYWORKER_BENCH_TREE_MIB", "2"))
ROUNDS = int(os.environ.get("PYWORKER_BENCH_ROUNDS", "5"))

P_SRC = "util.Property('src')"
P_DST = "util.Property('dst')"
KINDS = {
    "noop": f"[steps.StringDownload('x', workerdest={P_DST})]",
    "upload_file": f"[steps.FileUpload(workersrc={P_SRC}, masterdest={P_DST})]",
    "download_file": f"[steps.FileDownload(mastersrc={P_SRC}, workerdest={P_DST})]",
    "upload_dir_none": f"[steps.DirectoryUpload(workersrc={P_SRC}, masterdest={P_DST})]",
    "upload_dir_gz": f"[steps.DirectoryUpload(workersrc={P_SRC}, masterdest={P_DST},"
    " compress='gz')]",
    "upload_dir_bz2": f"[steps.DirectoryUpload(workersrc={P_SRC}, masterdest={P_DST},"
    " compress='bz2')]",
}
#: the kinds the minimal worker runs too (it has no compression)
MINIMAL_KINDS = ("noop", "upload_file", "download_file", "upload_dir_none")


def workers_for(kind: str) -> tuple[str, ...]:
    return ALL_WORKERS if kind in MINIMAL_KINDS else WORKERS


def make_tree(root: Path, total: int) -> int:
    """A mixed tree: text (compressible), random binary, many small files; returns its size."""
    rnd = os.urandom(MiB)
    words = b"the quick brown fox jumps over the lazy dog 0123456789 worker master\n"
    size = 0
    i = 0
    while size < total:
        d = root / f"d{i % 7}" / f"sub{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        kind = i % 4
        if kind == 0:
            data = (words * (total // 40 // len(words) + 1))[: max(1, total // 40)]
        elif kind == 1:
            data = rnd[(i * 7919) % (MiB // 2) :][: max(1, total // 60)]
        else:
            data = words[i % 30 :] * 20
        (d / f"f{i}.{'txt' if kind != 1 else 'bin'}").write_bytes(data)
        size += len(data)
        i += 1
    return size


@pytest.fixture(scope="module")
def setup(
    bench_master_venv: Path,
    bench_reference_worker: str,
    bench_pyworker: str,
    bench_minimal_worker: str,
    tmp_path_factory: Any,
) -> Iterator[dict[str, Any]]:
    work: Path = tmp_path_factory.mktemp("bench-transfer")
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    payload = Path(tempfile.mkdtemp(prefix="pyworker-bench-", dir=shm or work))
    data = payload / "data"
    data.mkdir()
    block = os.urandom(MiB)
    with open(data / "file.bin", "wb") as f:
        for i in range(FILE_MIB):
            f.write(block[i % 4096 :] + block[: i % 4096])
    tree_size = make_tree(data / "tree", TREE_MIB * MiB)
    builders = {
        f"{k}-{w}": Builder(factory=src, workers=[w])
        for k, src in KINDS.items()
        for w in workers_for(k)
    }
    m = RealMaster(work / "m", builders, venv=bench_master_venv, workers=ALL_WORKERS)
    try:
        m.start()
        pids = {
            "reference": m.start_worker(bench_reference_worker, "reference").pid,
            "pyworker": m.start_worker(bench_pyworker, "pyworker").pid,
            MINIMAL: m.start_worker(bench_minimal_worker, MINIMAL).pid,
        }
        yield {
            "master": m,
            "pids": pids,
            "data": data,
            "out": payload / "out",
            "sizes": {"file": FILE_MIB * MiB, "tree": tree_size},
        }
    finally:
        m.stop()
        shutil.rmtree(payload, ignore_errors=True)


def _build(s: dict[str, Any], kind: str, worker: str) -> tuple[float, float]:
    """One build: (wall seconds, worker CPU seconds)."""
    m: RealMaster = s["master"]
    data: Path = s["data"]
    out: Path = s["out"] / worker
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if kind in ("upload_file", "download_file"):
        src = data / "file.bin"
    else:
        src = data / "tree"
    props = {"src": str(src), "dst": str(out / "dest")}
    wall, cpu = timed_build(m, f"{kind}-{worker}", s["pids"][worker], props)
    if kind != "noop":  # a short copy would make a fast figure
        assert payload_bytes(out / "dest") == payload_bytes(src), f"{kind} on {worker}"
    shutil.rmtree(out, ignore_errors=True)
    return wall, cpu


def payload_bytes(path: Path) -> int:
    """The size of a file, or the sum of the file sizes in a tree."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "kind", ["upload_file", "download_file", "upload_dir_none", "upload_dir_gz", "upload_dir_bz2"]
)
def test_transfer(benchmark: Any, setup: dict[str, Any], kind: str) -> None:
    size = setup["sizes"]["file" if kind.endswith("_file") else "tree"]
    workers = workers_for(kind)
    noop: dict[str, list[float]] = {w: [] for w in workers}

    def one(w: str) -> tuple[float, float]:
        noop[w].append(_build(setup, "noop", w)[0])
        return _build(setup, kind, w)

    runs = interleaved(benchmark, ROUNDS, one, workers)
    walls = {w: runs[w][0] for w in workers}
    cpus = {w: runs[w][1] for w in workers}
    gib = size / (1024 * MiB)
    result: dict[str, float] = {}
    for w in workers:
        net = max(statistics.median(walls[w]) - statistics.median(noop[w]), 1e-3)
        result[f"{w}_mib_s"] = round(size / MiB / net, 2)
        result[f"{w}_cpu_s_per_gib"] = round(statistics.median(cpus[w]) / gib, 2)
    result["ratio"] = round(result["pyworker_mib_s"] / result["reference_mib_s"], 2)
    figures = ", ".join(
        f"{w} {result[f'{w}_mib_s']} MiB/s ({result[f'{w}_cpu_s_per_gib']} CPU s/GiB)"
        for w in workers
    )
    ratios = f"pyworker/reference {result['ratio']}x"
    if MINIMAL in workers:
        result["minimal_ratio"] = round(result["pyworker_mib_s"] / result["minimal_mib_s"], 2)
        ratios += f", pyworker/minimal {result['minimal_ratio']}x"
    benchmark.extra_info.update(result)
    print(f"\n{kind}: {size / MiB:.0f} MiB, {len(walls['pyworker'])} rounds: {figures}; {ratios}")
