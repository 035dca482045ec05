"""The msgpack front end (``msgpack_experimental_v7``) against a real Buildbot 4.3.0 master.

The reference worker and pyworker attach to one master over its msgpack port; each shell
scenario of ``test_shell_realmaster`` runs on both and the stored logs must be equal (the
msgpack master does not re-split lines, so this also checks that only whole lines are sent).
File-system commands, transfers, interrupts, reconnection and shutdown follow.

Where the 4.3.0 master itself is broken over msgpack, the tests state what it does:

* downloads: the master answers every ``update_read_file`` with ``None`` (it drops the data),
  so the reference worker writes an *empty* file and reports success; so does pyworker, which
  also says in its log that the master sent no data;
* ``keepstamp``: the master calls the writer's ``utime`` with two literal strings, which
  raises, so the reference worker's upload ends in EXCEPTION; pyworker keeps the (complete)
  upload and the master's file simply has the master's own time stamps.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from realmaster import (
    Builder,
    BuildResult,
    RealMaster,
    WorkerProcess,
    descendants,
    kill_processes,
    leftover_processes,
    normalize_stdio,
    wait_for,
    wait_for_process,
)
from test_shell_realmaster import RAW_COMMAND_STEP, SCENARIOS

MSGPACK = "msgpack_experimental_v7"
WHO = ("ref", "py")

#: A step that drives the file-system commands through CompositeStepMixin (as the interop
#: suite does) and writes what it got into a log, so both workers' answers can be compared.
FS_STEP = """
import stat as _stat
from buildbot.process import buildstep
from buildbot.process.results import SUCCESS
from buildbot.steps.worker import CompositeStepMixin

class FsTour(buildstep.BuildStep, CompositeStepMixin):
    logEnviron = False

    async def run(self):
        out = await self.addLog('tour')
        def note(what):
            out.addStdout(f'{what}\\n')
        note(f"glob none: {await self.runGlob('build/nothere/*')}")
        note(f"exists missing: {await self.pathExists('build/nothere')}")
        await self.runMkdir('build/a/b')
        await self.runMkdir(['build/c', 'build/d/e'])
        note(f"exists a/b: {await self.pathExists('build/a/b')}")
        found = await self.runGlob('build/*')
        note('glob: ' + ' '.join(sorted(os.path.basename(p) for p in found)))
        await self.runRmdir(['build/c', 'build/d'])
        note(f"exists c: {await self.pathExists('build/c')}")
        cmd = remotecommand.RemoteCommand('listdir', {'dir': 'build'})
        await self.runCommand(cmd)
        note(f"listdir: {sorted(cmd.updates['files'][-1])} rc {cmd.rc}")
        cmd = remotecommand.RemoteCommand('stat', {'file': 'build/a'})
        await self.runCommand(cmd)
        note(f"stat dir: {_stat.S_ISDIR(cmd.updates['stat'][-1][0])} rc {cmd.rc}")
        cmd = remotecommand.RemoteCommand('cpdir', {'fromdir': 'build/a', 'todir': 'build/z'})
        await self.runCommand(cmd)
        note(f"cpdir rc {cmd.rc}; exists z/b: {await self.pathExists('build/z/b')}")
        await self.runRmFile('build/a/nofile', abandonOnFailure=False)
        note('rmfile missing done')
        await self.runRmdir('build/z')
        note(f"exists z: {await self.pathExists('build/z')}")
        content = await self.getFileContentFromWorker('hello.txt')
        note(f'content: {content!r}')
        return SUCCESS
"""

MISC_STEPS = """
import os
from buildbot.process import remotecommand
""" + RAW_COMMAND_STEP + FS_STEP

FS_STEPS = (
    "[steps.ShellCommand(command='printf \"hi\\\\nthere\\\\n\" > hello.txt', logEnviron=False),"
    " FsTour(name='tour'),"
    " steps.MakeDirectory(dir='build/m1'), steps.FileExists(file='build/hello.txt'),"
    " steps.CopyDirectory(src='build/m1', dest='build/m2'),"
    " steps.RemoveDirectory(dir='build/m1'),"
    " steps.FileExists(file='build/m1', haltOnFailure=False, flunkOnFailure=False)]"
)

P_SRC = "util.Property('src')"
P_DST = "util.Property('dst')"
TRANSFERS = {
    "upload": f"[steps.FileUpload(workersrc={P_SRC}, masterdest={P_DST})]",
    "keepstamp": f"[steps.FileUpload(workersrc={P_SRC}, masterdest={P_DST}, keepstamp=True)]",
    "dirupload": f"[steps.DirectoryUpload(workersrc={P_SRC}, masterdest={P_DST},"
    " compress='gz')]",
    "download": f"[steps.FileDownload(mastersrc={P_SRC}, workerdest={P_DST}, mode=0o640)]",
    "missing": f"[steps.FileUpload(workersrc={P_SRC}, masterdest={P_DST})]",
}
OTHER = {
    "sleep": "[steps.ShellCommand(command='sleep 300 & sleep 300')]",
    "interrupt": "[steps.ShellCommand(command=['sleep', '100'], interruptSignal='KILL',"
    " logEnviron=False)]",
    "unknown": "[RawCommand('frobnicate', {})]",
    "big": "[steps.ShellCommand(command='seq 1 200000; printf tail', logEnviron=False)]",
    "fs": FS_STEPS,
}


def _builders() -> dict[str, Builder]:
    out: dict[str, Builder] = {}
    for table in (SCENARIOS, TRANSFERS, OTHER):
        for name, steps in table.items():
            for who in WHO:
                out[f"{name}-{who}"] = Builder(steps, workers=[who])
    return out


@pytest.fixture(scope="module")
def master(master_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealMaster]:
    m = RealMaster(tmp_path_factory.mktemp("realmaster"), _builders(), venv=master_venv,
                      workers=WHO, msgpack=True, extra_config=MISC_STEPS)
    try:
        m.start()
        yield m
    finally:
        leftovers = m.stop()
    if leftovers:
        pytest.fail("processes left behind:\n" + "\n".join(f"  {p}" for p in leftovers))


@pytest.fixture(scope="module")
def workers(
    master: RealMaster, reference_worker: str, pyworker_executable: str
) -> Iterator[dict[str, WorkerProcess]]:
    ws = {
        "ref": master.start_worker(reference_worker, "ref", protocol=MSGPACK),
        "py": master.start_worker(pyworker_executable, "py", protocol=MSGPACK),
    }
    yield ws
    for w in ws.values():
        w.stop()


def _normalized(build: BuildResult, worker: WorkerProcess) -> list[tuple[str, str, dict]]:  # type: ignore[type-arg]
    builder_dir = f"{worker.basedir}/{build.builder}"
    return [
        (s.name, s.result,
         {k: normalize_stdio(v, builder_dir).replace(str(worker.basedir), "<BASEDIR>")
          for k, v in s.logs.items()})
        for s in build.steps
    ]


def _both(master: RealMaster, name: str, props: dict[str, dict[str, str]] | None = None,
          ) -> tuple[BuildResult, BuildResult]:
    props = props or {}
    ref, py = master.force_builds(
        [(f"{name}-ref", props.get("ref")), (f"{name}-py", props.get("py"))]
    )
    return ref, py


# -- shell: stored logs equal the reference's --------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_shell_logs_identical_to_the_reference(
    master: RealMaster, workers: dict[str, WorkerProcess], scenario: str
) -> None:
    ref, py = _both(master, scenario)
    assert py.result == ref.result, py.describe() + "\n---\n" + ref.describe()
    assert _normalized(py, workers["py"]) == _normalized(ref, workers["ref"])


def test_big_output_and_final_partial_line(
    master: RealMaster, workers: dict[str, WorkerProcess]
) -> None:
    ref, py = _both(master, "big")
    assert py.result == ref.result == "SUCCESS", py.describe()
    expected = "".join(f"{i}\n" for i in range(1, 200001)) + "tail\n"
    assert py.step("shell").stream("stdio", "o") == expected
    assert _normalized(py, workers["py"]) == _normalized(ref, workers["ref"])


# -- file-system commands -------------------------------------------------------------------


def test_file_commands_answer_like_the_reference(
    master: RealMaster, workers: dict[str, WorkerProcess]
) -> None:
    ref, py = _both(master, "fs")
    assert ref.result == "SUCCESS", ref.describe()
    assert py.result == ref.result, py.describe() + "\n---\n" + ref.describe()
    assert _normalized(py, workers["py"]) == _normalized(ref, workers["ref"])
    tour = py.step("tour").logs["tour"]
    for expected in ("glob none: []", "exists missing: False", "exists a/b: True",
                     "glob: a c d hello.txt", "exists c: False", "listdir: ['a', 'hello.txt'] rc 0",
                     "stat dir: True rc 0", "cpdir rc 0; exists z/b: True", "exists z: False",
                     "content: 'hi\\nthere\\n'"):
        assert expected in tour, tour


def test_unknown_command_is_an_exception_and_the_worker_goes_on(
    master: RealMaster, workers: dict[str, WorkerProcess]
) -> None:
    build = master.force_build("unknown-py")
    assert build.result == "EXCEPTION", build.describe()
    assert "unrecognized WorkerCommand 'frobnicate'" in master.logs(400)
    assert master.force_build("echo-py").result == "SUCCESS"


# -- transfers --------------------------------------------------------------------------------


def test_uploads(master: RealMaster, workers: dict[str, WorkerProcess], tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    tree = {"a.txt": b"alpha\n", "sub/b.bin": os.urandom(70000), "sub/deeper/c": b""}
    for who, w in workers.items():
        (w.basedir / f"upload-{who}" / "build").mkdir(parents=True, exist_ok=True)
        (w.basedir / f"upload-{who}" / "build" / "data.bin").write_bytes(data)
        root = w.basedir / f"dirupload-{who}" / "build" / "tree"
        for rel, content in tree.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
    props = {who: {"src": "data.bin", "dst": str(tmp_path / f"up-{who}.bin")} for who in WHO}
    ref, py = _both(master, "upload", props)
    assert ref.result == py.result == "SUCCESS", py.describe()
    for who in WHO:
        assert (tmp_path / f"up-{who}.bin").read_bytes() == data
    props = {who: {"src": "tree", "dst": str(tmp_path / f"tree-{who}")} for who in WHO}
    ref, py = _both(master, "dirupload", props)
    assert ref.result == py.result == "SUCCESS", py.describe()
    for who in WHO:
        got = {
            str(p.relative_to(tmp_path / f"tree-{who}")): p.read_bytes()
            for p in (tmp_path / f"tree-{who}").rglob("*") if p.is_file()
        }
        assert got == tree


def test_upload_of_a_missing_file_fails_like_the_reference(
    master: RealMaster, workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    props = {who: {"src": "nothere", "dst": str(tmp_path / f"x-{who}")} for who in WHO}
    ref, py = _both(master, "missing", props)
    assert py.result == ref.result == "FAILURE", py.describe()
    assert "Cannot open file" in py.step("upload").logs["stdio"]
    assert _normalized(py, workers["py"]) == _normalized(ref, workers["ref"])


def test_keepstamp_master_bug(
    master: RealMaster, workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    """The 4.3.0 master cannot set time stamps over msgpack: the reference's step ends in
    EXCEPTION; pyworker's upload succeeds, without the worker file's time stamps."""
    for who, w in workers.items():
        src = w.basedir / f"keepstamp-{who}" / "build" / "old.txt"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(b"old\n")
        os.utime(src, (1_000_000_000, 1_000_000_000))
    props = {who: {"src": "old.txt", "dst": str(tmp_path / f"old-{who}.txt")} for who in WHO}
    ref, py = _both(master, "keepstamp", props)
    assert ref.result == "EXCEPTION", ref.describe()  # the master's bug, as it shows
    assert py.result == "SUCCESS", py.describe()
    got = tmp_path / "old-py.txt"
    assert got.read_bytes() == b"old\n"
    assert got.stat().st_mtime > 1_000_000_000 + 1  # the master could not keep the stamp
    assert "the master cannot set the uploaded file's time stamps" in (
        workers["py"].twistd_log.read_text()
    )


def test_download_master_bug(
    master: RealMaster, workers: dict[str, WorkerProcess], tmp_path: Path
) -> None:
    """The 4.3.0 master answers every read with None: the reference takes it for the end of
    the file, writes an empty file (with the step's mode) and reports SUCCESS; so does
    pyworker, and its log says, once, that the master sent no data."""
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    dsts = {}
    for who, w in workers.items():
        dsts[who] = dst = w.basedir / f"download-{who}" / "build" / "dst.bin"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(b"previous\n")
        dst.chmod(0o600)
    props = {who: {"src": str(src), "dst": "dst.bin"} for who in WHO}
    ref, py = _both(master, "download", props)
    assert py.result == ref.result == "SUCCESS", py.describe() + "\n---\n" + ref.describe()
    assert _normalized(py, workers["py"]) == _normalized(ref, workers["ref"])
    for who in WHO:
        assert dsts[who].read_bytes() == b"", who
        assert dsts[who].stat().st_mode & 0o7777 == 0o640, who
    said = [line for line in workers["py"].twistd_log.read_text().splitlines()
            if "the master answered a read with no data" in line]
    assert len(said) == 1, said
    assert "(command " in said[0]
    assert "treating it as the end of the file, as buildbot-worker does" in said[0]


# -- interrupt -----------------------------------------------------------------------------


def test_interrupt_kills_the_process_group(
    master: RealMaster, workers: dict[str, WorkerProcess]
) -> None:
    baseline = {p.pid for p in descendants()}
    request = master.request_build("sleep-py")
    buildid = master.wait_build_started(request)
    master.wait_for_log(buildid, "shell", "stdio", "using PTY")
    master.stop_build(buildid)
    build = master.wait_build(request)
    assert build.result == "CANCELLED", build.describe()
    assert "command interrupted, attempting to kill" in build.step("shell").logs["stdio"]
    # new executors the pool started meanwhile are the pool's, not the command's
    leftovers = [p for p in leftover_processes(baseline, grace=5)
                 if "pyworker.executor" not in p.cmdline]
    kill_processes(leftovers)
    assert leftovers == []


def test_interrupt_logs_like_the_reference(
    master: RealMaster, workers: dict[str, WorkerProcess]
) -> None:
    results = {}
    for who in WHO:
        request = master.request_build(f"interrupt-{who}")
        buildid = master.wait_build_started(request)
        master.wait_for_log(buildid, "shell", "stdio", "using PTY")
        master.stop_build(buildid)
        results[who] = master.wait_build(request)
    assert results["py"].result == results["ref"].result == "CANCELLED"
    assert _normalized(results["py"], workers["py"]) == _normalized(
        results["ref"], workers["ref"])


# -- connection: info, reconnect, bad password, shutdown ------------------------------------


def test_worker_info_matches_the_reference(
    master: RealMaster, workers: dict[str, WorkerProcess]
) -> None:
    assert master.worker_info("py")["workerinfo"] == master.worker_info("ref")["workerinfo"]


def test_master_restart_mid_build_then_reconnect(
    master: RealMaster, workers: dict[str, WorkerProcess]
) -> None:
    request = master.request_build("sleep-py")
    buildid = master.wait_build_started(request)
    master.wait_for_log(buildid, "shell", "stdio", "using PTY")
    master.restart()
    master.wait_worker_connected("py", timeout=60)
    master.wait_worker_connected("ref", timeout=60)
    # the command of the lost connection was killed with nothing left behind
    wait_for_process("sleep 300", timeout=15, gone=True)
    assert master.force_build("echo-py").result == "SUCCESS"
    log = workers["py"].twistd_log.read_text()
    assert log.count("Connected to buildmaster (msgpack); worker is ready") >= 2


def test_wrong_password_is_retried_and_shutdown_exits(
    master: RealMaster, workers: dict[str, WorkerProcess], pyworker_executable: str,
    tmp_path: Path,
) -> None:
    # a second pyworker with a wrong password: refused (401) and retried with backoff
    bad = WorkerProcess(pyworker_executable, tmp_path / "bad", "py", "wrong",
                        f"127.0.0.1:{master.msgpack_port}", MSGPACK)
    bad.create()
    bad.start()
    try:
        wait_for(lambda: bad.twistd_log.exists()
                 and bad.twistd_log.read_text().count("401") >= 2, 30, "two refused attempts")
        assert bad.running()
    finally:
        bad.stop()
    # the master's shutdown: exit 0 after 0.2 s, no reconnect
    master.control_worker("py", "kill")
    assert workers["py"].wait(15) == 0
    log = workers["py"].twistd_log.read_text()
    assert "worker shutting down on command from master" in log
    master.wait_worker_disconnected("py")  # the process is gone: it cannot reconnect
