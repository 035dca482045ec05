"""``pyworker bench``: real runs against the real pyworker, and detection of a bad worker.

The end-to-end tests run ``pyworker bench`` as a subprocess (the installed console script
when ``PYWORKER`` is set, else this checkout's ``pyworker.cli``): the bench starts its
embedded master and real worker processes. No timing is asserted, only that every scenario
validated, and that a worker which loses data makes the run fail with a readable message.
The unit tests check the embedded master's decoder and line splitter against Twisted's and
Buildbot's originals.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path
from typing import Any

import psutil
import pytest
from twisted.spread import banana

from pyworker.bench import profiler as bench
from pyworker.bench.embedded_master import CommandReceiver, FastBroker, LineSplitter

ROOT = Path(__file__).resolve().parent.parent


def bench_argv() -> list[str]:
    exe = os.environ.get("PYWORKER")
    if exe:
        return [exe, "bench"]
    return [sys.executable, "-m", "pyworker.cli", "bench"]


def run_bench(
    args: list[str], timeout: float = 240
) -> tuple[subprocess.CompletedProcess[str], Any]:
    json_path = args[args.index("--json") + 1]
    proc = subprocess.run(
        bench_argv() + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    report = None
    if os.path.exists(json_path):
        with open(json_path) as f:
            report = json.load(f)
    return proc, report


# -- end to end -----------------------------------------------------------------------------


def test_quick_run_against_real_pyworker(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    scenarios = ["stdout-pipe", "stdout-pty", "streams", "cpdir", "latency", "latency-stat"]
    args = ["--quick", "--scale", "0.25", "--no-progress", "--json", str(out)]
    for s in scenarios:
        args += ["--only", s]
    proc, report = run_bench(args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every byte arrived intact" in proc.stdout
    assert "I/O backend:" in proc.stdout
    assert report is not None and report["ok"] is True
    assert set(report["scenarios"]) == set(scenarios)
    for name in ("stdout-pipe", "stdout-pty", "streams", "cpdir"):
        s = report["scenarios"][name]["summary"]["pyworker"]
        assert s["ok"] and s["mib_s"] > 0 and s["cpu_s_per_gib"] >= 0, (name, s)
        assert s["peak_rss_mib"] > 0
    assert report["scenarios"]["stdout-pipe"]["summary"]["pyworker"]["cpu_s_per_gib"] > 0
    lat = report["scenarios"]["latency"]["summary"]["pyworker"]
    assert lat["commands"] >= 10 and 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    # the table is printed per scenario
    assert re.search(r"^stdout-pipe: .*\n\s+worker\s+MiB/s", proc.stdout, re.M)


def test_own_memory_bursts_concurrency_and_start_scenarios(tmp_path: Path) -> None:
    """Issue 14's scenarios run, validate and report the worker's own memory beside RSS."""
    out = tmp_path / "bench.json"
    scenarios = ["idle", "streams", "burst-8", "concurrent-steps", "start-stop", "idle-after"]
    args = ["--quick", "--scale", "0.25", "--no-progress", "--json", str(out)]
    for s in scenarios:
        args += ["--only", s]
    proc, report = run_bench(args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report is not None and report["ok"] is True
    assert list(report["scenarios"]) == scenarios  # in the order they run
    for name in scenarios:
        s = report["scenarios"][name]["summary"]["pyworker"]
        assert s["ok"], (name, s)
        # PSS and USS of the front end and its executors: each process's USS <= its PSS
        assert 0 < s["own_uss_peak_mib"] <= s["own_pss_peak_mib"], (name, s)
        assert 0 < s["own_uss_end_mib"] <= s["own_pss_end_mib"] <= s["own_pss_peak_mib"]
        assert s["peak_processes"] >= 1 and s["peak_rss_mib"] > 0
    burst = report["scenarios"]["burst-8"]["summary"]["pyworker"]
    assert burst["commands"] == 8
    assert 0 < burst["serial_p50_ms"] <= burst["serial_p95_ms"]
    assert 0 < burst["p50_ms"] <= burst["p95_ms"] <= burst["max_ms"]
    steps = report["scenarios"]["concurrent-steps"]["summary"]["pyworker"]
    assert steps["commands"] == 64  # 64 builders x 1 step at this scale
    start = report["scenarios"]["start-stop"]["summary"]["pyworker"]
    assert 0 < start["attach_p50_ms"] <= start["p50_ms"] and start["stop_p50_ms"] > 0
    # the table: the memory columns beside RSS, and the targets' lines
    assert re.search(r"^\s+worker\s+MiB/s.*RSS MiB\s+PSS pk\s+USS pk\s+PSS end\s+procs",
                     proc.stdout, re.M), proc.stdout
    assert re.search(r"serial p50 [\d.]+ ms; at once p50 [\d.]+ ms, p95 [\d.]+ ms: p50 "
                     r"[\d.]+x serial", proc.stdout), proc.stdout
    assert re.search(r"start --nodaemon to attached p50 \d+ ms, to a first command answered "
                     r"p50 \d+ ms", proc.stdout), proc.stdout


def test_own_memory_counts_executors_and_finds_leftovers() -> None:
    """A stand-in front end with one child marked as an executor and one command child."""
    from pyworker.bench import memory

    front = subprocess.Popen(
        ["sh", "-c", f"sleep 60 & exec {sys.executable} -c "
         "'import subprocess, sys, time; "
         "subprocess.Popen([sys.executable, \"-c\", \"import time; time.sleep(60)\", "
         "\"pyworker.executor\"]); time.sleep(60)'"]
    )
    try:
        ps = psutil.Process(front.pid)
        deadline = time.monotonic() + 30
        while len(ps.children(recursive=True)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        own = memory.own_processes(ps)
        assert len(own) == 2 and own[0].pid == ps.pid
        assert "pyworker.executor" in own[1].cmdline()
        sample = memory.own_memory(ps)
        assert sample.processes == 2 and sample.executors == 1
        assert 0 < sample.uss <= sample.pss
        left = memory.leftovers(ps)
        assert len(left) == 1 and "sleep 60" in left[0], left
    finally:
        for child in psutil.Process(front.pid).children(recursive=True):
            child.kill()
        front.kill()
        front.wait()


#: A worker with the buildbot-worker command line that runs shell commands but drops one
#: byte of their stdout (and reports success): the bench must notice.
LOSSY_WORKER = textwrap.dedent(
    r'''
    import hashlib, json, os, subprocess, sys
    from twisted.internet import reactor
    from twisted.spread import pb
    from twisted.cred import credentials

    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "create-worker":
        basedir, hostport, name, pw = [a for a in rest if a != "-q"]
        os.makedirs(basedir, exist_ok=True)
        with open(os.path.join(basedir, "fake.json"), "w") as f:
            json.dump([hostport, name, pw], f)
        sys.exit(0)
    assert cmd == "start", cmd
    basedir = rest[-1]
    hostport, name, pw = json.load(open(os.path.join(basedir, "fake.json")))
    host, port = hostport.rsplit(":", 1)

    class WFB(pb.Referenceable):
        def remote_startBuild(self):
            pass

        def remote_startCommand(self, ref, cid, command, args):
            out = subprocess.run(args["command"], capture_output=True).stdout
            out = out[: len(out) // 2] + out[len(out) // 2 + 1 :]  # lose one byte
            for i in range(0, len(out), 65536):
                ref.callRemote("update", [[{"stdout": out[i : i + 65536].decode()}, 0]])
            ref.callRemote("update", [[{"rc": 0}, 0]])
            ref.callRemote("complete", None)

    class Bot(pb.Referenceable):
        def remote_print(self, message):
            pass

        def remote_getWorkerInfo(self):
            return {"version": "lossy", "basedir": basedir}

        def remote_setBuilderList(self, wanted):
            return {b: WFB() for b, _ in wanted}

        def remote_shutdown(self):
            reactor.callLater(0.1, reactor.stop)

    factory = pb.PBClientFactory()
    reactor.connectTCP(host, int(port), factory)
    perspective = []  # keep the reference: dropping it logs the worker out
    d = factory.login(credentials.UsernamePassword(name.encode(), pw.encode()), Bot())
    d.addCallback(perspective.append)
    reactor.run()
    '''
)


def test_lossy_worker_fails_the_run(tmp_path: Path) -> None:
    exe = tmp_path / "lossy-worker"
    exe.write_text(f"#!{sys.executable}\n" + LOSSY_WORKER)
    exe.chmod(0o755)
    out = tmp_path / "bench.json"
    args = [
        "--quick", "--scale", "0.1", "--no-progress", "--only", "stdout-pipe",
        "--against", str(exe), "--json", str(out),
    ]
    proc, report = run_bench(args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout
    assert re.search(r"stdout: expected \d+ bytes .* the master got \d+ bytes .*data was lost",
                     proc.stdout), proc.stdout
    assert report is not None and report["ok"] is False
    summary = report["scenarios"]["stdout-pipe"]["summary"]
    assert summary["pyworker"]["ok"] is True
    assert summary["lossy-worker"]["ok"] is False


# -- the embedded master's parts ------------------------------------------------------------


def _encode(items: list[Any]) -> bytes:
    enc = banana.Banana()
    enc.setPrefixLimit(64)
    enc.currentDialect = b"pb"
    out: list[bytes] = []
    for item in items:
        enc._encode(item, out.append)
    return b"".join(out)


def _decode(decoder: Any, data: bytes, chunk_sizes: list[int]) -> list[Any]:
    got: list[Any] = []
    decoder.setPrefixLimit(64)
    decoder.currentDialect = b"pb"
    decoder.expressionReceived = got.append
    pos = 0
    for n in chunk_sizes:
        decoder.dataReceived(data[pos : pos + n])
        pos += n
    if pos < len(data):
        decoder.dataReceived(data[pos:])
    return got


@pytest.mark.parametrize("seed", range(6))
def test_fast_broker_decodes_like_banana(seed: int) -> None:
    rng = random.Random(seed)
    items: list[Any] = [
        [b"message", 7, b"update", 1, [[[b"dictionary", [b"stdout", b"x" * n]], 0]]]
        for n in (0, 1, 127, 128, 70_000, 600_000)
    ]
    items += [[-5, 2**70, -(2**70), 1.5, b"", [b"None"]], b"tail", 12345]
    rng.shuffle(items)
    data = _encode(items)
    sizes = [rng.choice([1, 2, 7, 100, 8192, 65536, 300_000]) for _ in range(200)]
    expected = _decode(banana.Banana(), data, sizes)
    assert expected == items
    assert _decode(FastBroker(isClient=False), data, sizes) == items


def test_fast_broker_enforces_the_size_limit() -> None:
    fb = FastBroker(isClient=False)
    fb.setPrefixLimit(64)
    fb.currentDialect = b"pb"
    big = b"".join([bytes(o) for o in [[1]]])  # placeholder to keep the encoder simple
    out: list[bytes] = []
    banana.int2b128(banana.SIZE_LIMIT + 1, out.append)
    with pytest.raises(banana.BananaError):
        fb.dataReceived(b"".join(out) + banana.STRING + big)


MASTER_RE = re.compile(r"(\r\n|\r(?=.)|\033\[u|\033\[[0-9]+;[0-9]+[Hf]|\033\[2J|\x08+)")


@pytest.mark.parametrize(
    "chunks",
    [
        ["abc\n", "def"],
        ["a\r\nb\rc\r", "\nd\x1b[2Je\x08\x08f\x1b[3;4Hg\n"],
        ["x" * 5000, "y" * 10, "\n"],
        ["no newline at all"],
        ["\r", "\r", "\n"],
    ],
)
def test_line_splitter_is_the_masters(chunks: list[str]) -> None:
    # Buildbot 4.3.0's LineBoundaryFinder, transcribed: unconditional regex sub.
    partial: str | None = None
    want: list[str] = []

    def master_append(text: str) -> str | None:
        nonlocal partial
        if partial:
            if len(partial) > 4096:
                partial, text = text, partial
                ret = []
                while len(text) > 4096:
                    ret.append(text[:4096])
                    text = text[4096:]
                ret.append(text)
                return "\n".join(ret) + "\n"
            text = partial + text
            partial = None
        text = MASTER_RE.sub("\n", text)
        if text and text[-1] != "\n":
            i = text.rfind("\n")
            if i < 0:
                partial = text
                return None
            partial, text = text[i + 1 :], text[: i + 1]
        return text or None

    ours = LineSplitter()
    got: list[str] = []
    for c in chunks:
        for fn, sink in ((master_append, want), (ours.append, got)):
            r = fn(c)
            if r is not None:
                sink.append(r)
    if partial is not None:
        r = master_append("\n")
        if r:
            want.append(r)
    r = ours.flush()
    if r is not None:
        got.append(r)
    assert "".join(got) == "".join(want)


def test_receiver_counts_and_detects_loss() -> None:
    size = 3 * bench.BLOCK + 640
    data = subprocess.run(
        [sys.executable, "-c", bench.STREAM_CHILD, str(size)], capture_output=True, check=True
    ).stdout
    assert len(data) == size and zlib.crc32(data) == bench.stream_crc(size)
    text = data.decode()

    def receive(pieces: list[str]) -> Any:
        rec = CommandReceiver("shell")
        for p in pieces:
            assert rec.remote_update([[{"stdout": p}, 0]]) == 0
        rec.remote_update([[{"rc": 0}, 0], [{"elapsed": 0.1}, 0]])
        results: list[Any] = []
        rec.done.addCallback(results.append)
        rec.remote_complete(None)
        from twisted.internet import reactor

        for call in reactor.getDelayedCalls():  # the result is delivered with callLater(0)
            if not call.called and not call.cancelled:
                call.func(*call.args, **call.kw)
                call.cancel()
        return results[0]

    good = receive([text[:1000], text[1000:70_000], text[70_000:]])
    bench.check_result(good, "good")
    bench.check_stream(good, "stdout", size, "good")
    assert good.stream("stdout").lines == size // 64
    bad = receive([text[:1000], text[1001:]])
    with pytest.raises(bench.BenchFailure, match="data was lost"):
        bench.check_stream(bad, "stdout", size, "bad")
    flipped = receive([text[:500] + ("X" if text[500] != "X" else "Y") + text[501:]])
    with pytest.raises(bench.BenchFailure, match="corrupted"):
        bench.check_stream(flipped, "stdout", size, "flipped")


def test_tree_check_detects_differences(tmp_path: Path) -> None:
    root = tmp_path / "t"
    manifest = bench.make_tree(str(root), 400_000)
    bench.check_tree(str(root), manifest, "same")
    victim = next(k for k, v in manifest.items() if v[0] == "file")
    with open(root / victim, "r+b") as f:
        f.write(b"!")
    with pytest.raises(bench.BenchFailure, match=re.escape(victim)):
        bench.check_tree(str(root), manifest, "changed")
