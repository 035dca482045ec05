"""``restrict_paths`` against a real Buildbot 4.3.0 master, over PB and msgpack.

One master serves both protocols; pyworker workers ``pb`` and ``mp`` (created with
``--restrict-paths``) each have one builder per case. Every command that takes a path is
aimed at a directory next to the worker's basedir (``outside/``) four ways, one after the
other in the case's build (each variant's steps are suffixed with its name and run whatever
the steps before them ended with):

* ``dotdot``: a relative path climbing out (``../../../outside/...``);
* ``abs``: the absolute path of the outside place;
* ``link``: an earlier step makes ``build/out``, a symlink to ``outside/``, and the command
  uses ``build/out/...``;
* ``swap``: an earlier step makes ``build/d`` (a real directory, so a check of the path made
  then passes), a later one swaps it for a symlink to ``outside/``, then the command uses
  ``build/d/...``.

Each case asserts that ``outside/`` is exactly as it was (names, contents, times), that the
step did not succeed and its logs carry a readable refusal, and that the worker is still
connected. Shell logfiles also get the in-flight swap: the command itself replaces its
logfile's directory by a link out, and the watcher's last read (after the command exited)
must be refused. A download aimed at the worker's own ``buildbot.tac`` and builder
directories outside the basedir (``setBuilderList``) are refused too.

With ``PYWORKER_NO_OPENAT2=1`` in the test's environment the workers get it too, and
resolve by the fallback walk instead of ``openat2``.

The 4.3.0 master's msgpack transfers are broken (PROTOCOL.md appendix A); the refusals here
happen before any data moves, so the same assertions hold on both protocols.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from realmaster import (
    Builder,
    BuildRequest,
    BuildResult,
    RealMaster,
    WorkerProcess,
    default_worker_env,
    wait_for,
)
from test_shell_realmaster import RAW_COMMAND_STEP

MSGPACK = "msgpack_experimental_v7"
PROTOCOLS = {"pb": "pb", "mp": MSGPACK}
VARIANTS = ("dotdot", "abs", "link", "swap")
SECRET = "TOP-SECRET-9d41c7 do not leak"
REFUSED = "(refused: the worker runs with restrict_paths)"

#: A RawCommand that also writes the command's updates to a log (for glob/listdir results).
EXTRA_STEPS = RAW_COMMAND_STEP + """
class RawLogged(RawCommand):
    async def run(self):
        cmd = remotecommand.RemoteCommand(self.remote_name, dict(self.remote_args))
        await self.runCommand(cmd)
        out = await self.addLog('updates')
        await out.addStdout(repr({k: v for k, v in cmd.updates.items()}) + '\\n')
        return cmd.results()
"""


def _target(variant: str, outside: Path, x: str) -> str:
    """The path (relative to the builder directory, or absolute) for a variant."""
    tail = f"/{x}" if x else ""
    return {
        "dotdot": f"../../../outside{tail}",
        "abs": f"{outside}{tail}",
        "link": f"build/out{tail}",
        "swap": f"build/d{tail}",
    }[variant]


def _before(variant: str, outside: Path) -> list[str]:
    """Steps that set the stage: a ``build`` directory, and the link or the swap."""
    steps = ["steps.MakeDirectory(dir='build', name='stage-build')"]
    if variant == "link":
        steps.append(f"steps.ShellCommand(command=['ln', '-sfn', {str(outside)!r}, 'out'],"
                     " name='stage-link', logEnviron=False)")
    elif variant == "swap":
        steps.append("steps.MakeDirectory(dir='build/d', name='stage-dir')")
        steps.append(f"steps.ShellCommand(command='rm -rf d && ln -s {outside} d',"
                     " name='stage-swap', logEnviron=False)")
    return steps


def _command(case: str, p: str, outside: Path) -> str:
    """The step under test (named ``target``) for a case, aimed at ``p``."""
    n = "name='target', logEnviron=False"
    return {
        "shell-workdir": f"steps.ShellCommand(command=['touch', 'pwned'], workdir={p!r}, {n})",
        "shell-logfile": f"steps.ShellCommand(command=['true'], workdir='.',"
                         f" logfiles={{'leak': {p!r}}}, {n})",
        "mkdir": f"steps.MakeDirectory(dir={p!r}, name='target')",
        "rmdir": f"steps.RemoveDirectory(dir={p!r}, name='target')",
        "cpdir-dest": f"steps.CopyDirectory(src='build', dest={p!r}, name='target')",
        "cpdir-src": f"steps.CopyDirectory(src={p!r}, dest='build/copy', name='target')",
        "stat": f"steps.FileExists(file={p!r}, name='target')",
        "glob": f"RawLogged('glob', {{'path': {p!r}}}, name='target')",
        "listdir": f"RawLogged('listdir', {{'dir': {p!r}}}, name='target')",
        "rmfile": f"RawLogged('rmfile', {{'path': {p!r}}}, name='target')",
        "upload": f"steps.FileUpload(workersrc={p!r}, workdir='.',"
                  f" masterdest=util.Interpolate('%(prop:buildername)s.up'), name='target')",
        "dirupload": f"steps.DirectoryUpload(workersrc={p!r}, workdir='.',"
                     f" masterdest=util.Interpolate('%(prop:buildername)s.dir'), name='target')",
        "download": f"steps.FileDownload(mastersrc={str(outside.parent / 'payload')!r},"
                    f" workerdest={p!r}, workdir='.', name='target')",
    }[case]


#: case -> the entry of outside/ the command is aimed at ('' is outside/ itself)
CASES = {
    "shell-workdir": "",
    "shell-logfile": "secret",
    "mkdir": "newdir",
    "rmdir": "dir",
    "cpdir-dest": "copy",
    "cpdir-src": "dir",
    "stat": "secret",
    "glob": "*",
    "listdir": "",
    "rmfile": "secret",
    "upload": "secret",
    "dirupload": "dir",
    "download": "secret",
}


def _extra_cases(outside: Path) -> dict[str, str]:
    """Cases beyond the case x variant table: name -> steps source."""
    return {
        # the command swaps its own logfile's directory for a link out while it runs
        "logfile-inflight": "[steps.ShellCommand(workdir='.', logEnviron=False, name='target',"
        " command='mkdir -p build/lg && echo mine > build/lg/secret && rm -rf build/lg"
        f" && ln -s {outside} build/lg', logfiles={{'leak': 'build/lg/secret'}})]",
        # the worker's own tac (the next start would run without the restriction)
        "download-tac": "[steps.FileDownload(mastersrc="
        f"{str(outside.parent / 'payload')!r}, workerdest='../buildbot.tac', workdir='.',"
        " name='target')]",
        # copying into an existing destination whose entry is a link out
        "cpdir-into-link": "[steps.MakeDirectory(dir='build/src/sub', name='stage-src'),"
        " steps.MakeDirectory(dir='build/dst', name='stage-dst'),"
        f" steps.ShellCommand(command=['ln', '-s', {str(outside)!r}, 'dst/src'],"
        " name='stage-link', logEnviron=False),"
        " steps.CopyDirectory(src='build/src', dest='build/dst', name='target')]",
    }


def _inside_steps(outside: Path, proto: str) -> str:
    """Every command, on paths inside the basedir (links inside followed): all succeed."""
    steps = [
        "steps.ShellCommand(command='mkdir -p tree/sub up/sub && echo hi > hello.txt"
        f" && echo f > tree/sub/f && ln -sfn {outside} tree/lnout && ln -sfn tree inlink"
        " && echo f > up/sub/f && ln -sfn sub up/lnin"
        " && echo logged > my.log', logfiles={'mylog': 'my.log'}, logEnviron=False)",
        "steps.MakeDirectory(dir='build/m1')",
        "steps.CopyDirectory(src='build/tree', dest='build/m2')",
        "steps.FileExists(file='build/inlink/sub/f')",
        "steps.RemoveDirectory(dir='build/m1')",
        "RawLogged('glob', {'path': 'build/*'}, name='glob')",
        "RawLogged('listdir', {'dir': 'build/inlink'}, name='listdir')",
        "RawLogged('rmfile', {'path': 'build/m2/sub/f'}, name='rmfile')",
        "steps.FileUpload(workersrc='hello.txt',"
        " masterdest=util.Interpolate('%(prop:buildername)s.up'))",
        "steps.DirectoryUpload(workersrc='up', compress='gz',"
        " masterdest=util.Interpolate('%(prop:buildername)s.dir'))",
    ]
    if proto == "pb":  # the 4.3.0 master's msgpack downloads drop the data (appendix A)
        steps.append(f"steps.FileDownload(mastersrc={str(outside.parent / 'payload')!r},"
                     " workerdest='dl/got.txt')")
    return "[" + ", ".join(steps) + "]"


#: A step's name in :func:`_before` and :func:`_command`.
_STEP_NAME = re.compile(r"name='(target|stage-[a-z]+)'")


def _cases(outside: Path) -> dict[str, str]:
    """Builder (case) -> steps source. A case's build runs its variants in turn: their
    steps are named ``<name>-<variant>`` and run even after an exception before them.

    One builder per case rather than per case and variant: the 4.3.0 master queries every
    builder of a worker for requests when one of the worker's builds ends, so its CPU per
    build grows with the builders (with four times as many, the master's CPU was the limit
    of this module)."""
    out = {}
    for case, x in CASES.items():
        steps = []
        for variant in VARIANTS:
            for step in [*_before(variant, outside),
                         _command(case, _target(variant, outside, x), outside)]:
                steps.append(_STEP_NAME.sub(rf"name='\1-{variant}', alwaysRun=True", step))
        out[case] = "[" + ", ".join(steps) + "]"
    out.update(_extra_cases(outside))
    return out


#: builder directories (setBuilderList) a dedicated worker per protocol is given
BAD_BUILDDIRS = {"bd-dotdot": "../../outside/bd", "bd-abs": "OUTSIDE/bd"}


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("restrict")


@pytest.fixture(scope="module")
def outside(place: Path) -> Path:
    out = place / "outside"
    (out / "dir").mkdir(parents=True)
    (out / "dir" / "keep").write_text("keep\n")
    (out / "secret").write_text(SECRET + "\n")
    (place / "payload").write_text("payload from the master\n")
    return out


@pytest.fixture(scope="module")
def master(master_venv: Path, place: Path, outside: Path) -> Iterator[RealMaster]:
    builders: dict[str, Builder] = {}
    for proto in PROTOCOLS:
        for name, steps in _cases(outside).items():
            builders[f"{name}-{proto}"] = Builder(steps, workers=[proto])
        builders[f"inside-{proto}"] = Builder(_inside_steps(outside, proto), workers=[proto])
        for name, builddir in BAD_BUILDDIRS.items():
            builddir = builddir.replace("OUTSIDE", str(outside))
            builders[f"{name}-{proto}"] = Builder(
                "[steps.ShellCommand(command=['true'])]", workers=[f"{proto}dirs"],
                extra=f"workerbuilddir={builddir!r}")
    m = RealMaster(place, builders, venv=master_venv,
                   workers=[*PROTOCOLS, *(f"{p}dirs" for p in PROTOCOLS)], msgpack=True,
                   extra_config=EXTRA_STEPS)
    try:
        m.start()
        yield m
    finally:
        leftovers = m.stop()
    if leftovers:
        pytest.fail("processes left behind:\n" + "\n".join(f"  {p}" for p in leftovers))


def _worker_env(executable: str) -> dict[str, str]:
    env = default_worker_env(executable)
    if os.environ.get("PYWORKER_NO_OPENAT2"):
        env["PYWORKER_NO_OPENAT2"] = "1"
    return env


@pytest.fixture(scope="module")
def workers(master: RealMaster, pyworker_executable: str) -> Iterator[dict[str, WorkerProcess]]:
    ws = {proto: master.start_worker(pyworker_executable, proto, protocol=wire,
                                     create_args=["--restrict-paths"],
                                     env=_worker_env(pyworker_executable))
          for proto, wire in PROTOCOLS.items()}
    yield ws
    for w in ws.values():
        w.stop()


def snapshot(root: Path) -> dict[str, tuple[str, str, int]]:
    """Every entry under ``root``: kind, content (files) or target (links), mtime."""
    out: dict[str, tuple[str, str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if path.is_symlink():
                out[str(path.relative_to(root))] = ("link", os.readlink(path), st.st_mtime_ns)
            elif path.is_dir():
                out[str(path.relative_to(root))] = ("dir", "", st.st_mtime_ns)
            else:
                out[str(path.relative_to(root))] = ("file", path.read_text(), st.st_mtime_ns)
    out["."] = ("dir", "", root.stat().st_mtime_ns)
    return out


def _all_logs(build: BuildResult) -> str:
    return "".join(t for s in build.steps for t in s.logs.values())


def _check_refused(build: BuildResult, message: str = REFUSED, target_step: str = "target"
                   ) -> None:
    target = build.step(target_step)
    assert target.result not in ("SUCCESS", ""), build.describe()
    assert message in "".join(target.logs.values()) or message in target.state_string, \
        build.describe()
    assert SECRET not in _all_logs(build), build.describe()
    for stage in build.steps:
        if stage.name.startswith("stage"):
            assert stage.result == "SUCCESS", build.describe()


def _check_worker_alive(master: RealMaster, workers: dict[str, WorkerProcess],
                        proto: str) -> None:
    assert workers[proto].running(), workers[proto].logs()
    assert master.is_worker_connected(proto)


@pytest.fixture(scope="module")
def case_builds(master: RealMaster, workers: dict[str, WorkerProcess], outside: Path
                ) -> tuple[dict[str, tuple[str, str, int]], dict[tuple[str, str], BuildRequest]]:
    """``outside/`` before any case ran, and every case's build request, all forced at once:
    each refused step costs a second of the master's (it waits that long for an ``rc`` that
    a failed command never sends, as with the reference worker), so the builds overlap."""
    before = snapshot(outside)
    return before, {(case, proto): master.request_build(f"{case}-{proto}")
                    for case in CASES for proto in PROTOCOLS}


@pytest.mark.parametrize("proto", sorted(PROTOCOLS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_paths_outside_are_refused(
        master: RealMaster, workers: dict[str, WorkerProcess], outside: Path,
        case_builds: tuple[dict[str, tuple[str, str, int]], dict[tuple[str, str], BuildRequest]],
        case: str, proto: str) -> None:
    before, requests = case_builds
    build = master.wait_build(requests[(case, proto)], timeout=300)
    assert snapshot(outside) == before
    for variant in VARIANTS:
        _check_refused(build, target_step=f"target-{variant}")
    builder_dir = workers[proto].basedir / build.builder
    if case == "cpdir-src":
        assert not (builder_dir / "build" / "copy").exists()
    if case in ("upload", "dirupload"):
        master_file = master.basedir / f"{build.builder}.{'up' if case == 'upload' else 'dir'}"
        assert not master_file.exists() or SECRET not in master_file.read_text(
            errors="replace")
    assert not (outside / "pwned").exists()
    _check_worker_alive(master, workers, proto)


@pytest.mark.parametrize("proto", sorted(PROTOCOLS))
def test_every_command_works_inside(master: RealMaster, workers: dict[str, WorkerProcess],
                                    outside: Path, proto: str) -> None:
    before = snapshot(outside)
    build = master.force_build(f"inside-{proto}")
    assert snapshot(outside) == before
    assert build.result == "SUCCESS", build.describe()
    build_dir = workers[proto].basedir / build.builder / "build"
    assert build.step("shell").logs["mylog"] == "ologged\n"  # stream log: o prefix
    assert "/build/hello.txt'" in build.step("glob").logs["updates"]
    assert "'lnout'" in build.step("listdir").logs["updates"]
    assert (build_dir / "m2" / "sub").is_dir() and not (build_dir / "m2" / "sub" / "f").exists()
    assert os.readlink(build_dir / "m2" / "lnout") == str(outside)
    assert not (build_dir / "m1").exists()
    assert (master.basedir / f"{build.builder}.up").read_text() == "hi\n"
    uploaded = master.basedir / f"{build.builder}.dir"
    assert (uploaded / "sub" / "f").read_text() == "f\n"
    assert os.readlink(uploaded / "lnin") == "sub"  # archived as the link it is
    if proto == "pb":
        assert (build_dir / "dl" / "got.txt").read_text() == "payload from the master\n"


@pytest.mark.parametrize("proto", sorted(PROTOCOLS))
def test_logfile_swapped_for_a_link_while_the_command_runs(
        master: RealMaster, workers: dict[str, WorkerProcess], outside: Path,
        proto: str) -> None:
    before = snapshot(outside)
    build = master.force_build(f"logfile-inflight-{proto}")
    assert snapshot(outside) == before
    _check_refused(build)
    assert "logfile 'leak' not read" in build.describe() + _all_logs(build), build.describe()
    _check_worker_alive(master, workers, proto)


@pytest.mark.parametrize("proto", sorted(PROTOCOLS))
def test_download_onto_the_workers_own_tac_is_refused(
        master: RealMaster, workers: dict[str, WorkerProcess], proto: str) -> None:
    tac = workers[proto].basedir / "buildbot.tac"
    before = tac.read_bytes()
    build = master.force_build(f"download-tac-{proto}")
    assert tac.read_bytes() == before
    _check_refused(build, "one of the worker's own files")
    _check_worker_alive(master, workers, proto)


@pytest.mark.parametrize("proto", sorted(PROTOCOLS))
def test_copy_into_an_existing_link_out_writes_nothing_outside(
        master: RealMaster, workers: dict[str, WorkerProcess], outside: Path,
        proto: str) -> None:
    before = snapshot(outside)
    build = master.force_build(f"cpdir-into-link-{proto}")
    assert snapshot(outside) == before
    # the link is not followed (cp would write through it); the master's CopyDirectory
    # step keeps no log, so the failure is all it shows (as for the reference's cp errors)
    assert build.step("target").result == "FAILURE", build.describe()
    _check_worker_alive(master, workers, proto)


@pytest.mark.parametrize("proto", sorted(PROTOCOLS))
def test_builder_directories_outside_are_not_created(
        master: RealMaster, pyworker_executable: str, outside: Path, proto: str) -> None:
    before = snapshot(outside)
    worker = master.start_worker(pyworker_executable, f"{proto}dirs",
                                 protocol=PROTOCOLS[proto], create_args=["--restrict-paths"],
                                 env=_worker_env(pyworker_executable), wait=False)
    try:
        # PB: setBuilderList is refused (the worker logs why); msgpack: the master makes the
        # directories with a mkdir command, which fails (the master logs the answer)
        logs = (worker.twistd_log, master.twistd_log)
        wait_for(lambda: any("outside the worker's basedir" in p.read_text(errors="replace")
                             for p in logs if p.exists()) or None,
                 30, "the builder dir refusal")
        assert snapshot(outside) == before
        assert not (outside / "bd").exists()
        assert worker.running(), worker.logs()
    finally:
        worker.stop()
