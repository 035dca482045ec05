"""pyworker as a latent worker's container, on Buildbot 4.3.0's own latent-worker classes.

Docker is not needed: :data:`LATENT` is a ``DockerBaseWorker`` (what ``DockerLatentWorker``
and ``KubeLatentWorker`` are built on) whose "container" is a local process. Its instance
start runs ``contrib/docker/entrypoint.sh`` in a fresh copy of the image's worker directory
(``contrib/docker/buildbot.tac``) with exactly the environment Buildbot gives a container
(``createEnvironment``: ``BUILDMASTER``, ``BUILDMASTER_PORT``, ``BUILDMASTER_PROTOCOL``,
``WORKERNAME``, ``WORKERPASS``) plus the image's ``PATH``; its instance stop is
``docker stop``'s: SIGTERM, SIGKILL after 10 s. Each exit status is recorded.

The master substantiates the worker for a build, runs it, insubstantiates it (the worker
must exit cleanly, status 0) and substantiates it again for the next build. The password
must appear in no build's environment, no step header, no ``getWorkerInfo`` answer, no
worker log and not in the master's log.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from realmaster import Builder, RealMaster, wait_for

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib" / "docker"
PASSWORD = "latent-secret-7f3a9c"

LATENT = """
import json, os, shutil, signal, subprocess, tempfile
from twisted.internet import defer, threads
from buildbot.worker.docker import DockerBaseWorker


class LocalContainerWorker(DockerBaseWorker):
    '''A Docker latent worker whose container is a local process (see the test's docstring).'''

    def checkConfig(self, name, password=None, run_dir=None, image_dir=None, path=None,
                    extra_env=None, **kwargs):
        super().checkConfig(name, password, image='pyworker-local', **kwargs)

    def reconfigService(self, name, password=None, run_dir=None, image_dir=None, path=None,
                        extra_env=None, **kwargs):
        self.run_dir, self.image_dir, self.path = run_dir, image_dir, path
        self.extra_env = extra_env or {}
        self.proc = None
        return super().reconfigService(name, password, image='pyworker-local',
                                       masterFQDN='127.0.0.1', **kwargs)

    def start_instance(self, build):
        if self.proc is not None:
            raise ValueError('instance active')
        # a new container: a fresh copy of the image's worker directory
        basedir = tempfile.mkdtemp(prefix='container-', dir=self.run_dir)
        shutil.copy(os.path.join(self.image_dir, 'buildbot.tac'), basedir)
        env = dict(self.createEnvironment(build), PATH=self.path, **self.extra_env)
        with open(os.path.join(self.run_dir, 'environments.jsonl'), 'a') as f:
            f.write(json.dumps(sorted(env)) + '\\n')
        out = open(os.path.join(basedir + '.stdout'), 'wb')
        self.proc = subprocess.Popen([os.path.join(self.image_dir, 'entrypoint.sh')],
                                     env=env, cwd=basedir, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        out.close()
        return defer.succeed(True)

    def stop_instance(self, fast=False):
        proc, self.proc = self.proc, None
        if proc is None:
            return defer.succeed(None)
        return threads.deferToThread(self._docker_stop, proc)

    def _docker_stop(self, proc):
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = 'killed after 10 s: ' + str(proc.wait())
        with open(os.path.join(self.run_dir, 'exits.txt'), 'a') as f:
            f.write(f'{rc}\\n')


from buildbot.process import buildstep, results as _results


class WorkerEnviron(buildstep.BuildStep):
    '''Logs the environment the worker reported in getWorkerInfo (the master keeps it).'''
    name = 'worker-environ'

    async def run(self):
        log = await self.addLog('environ')
        environ = self.build.workerforbuilder.worker.worker_environ
        await log.addStdout(json.dumps(environ, sort_keys=True) + '\\n')
        return _results.SUCCESS


c['workers'].append(LocalContainerWorker(
    'latent1', %(password)r, run_dir=%(run_dir)r, image_dir=%(image_dir)r, path=%(path)r,
    extra_env=%(extra_env)r, build_wait_timeout=0))
"""

STEPS = (
    "[WorkerEnviron(), steps.ShellCommand(name='env', command=['env']),"
    " steps.ShellCommand(name='ancestors', command=[%(python)r, '-c', %(ancestors)r],"
    " logEnviron=False)]"
)
#: prints LEAK for every ancestor process whose initial environment block holds the password
ANCESTORS = (
    "import os\n"
    "pid = os.getppid()\n"
    "while pid > 1:\n"
    "    try:\n"
    "        data = open(f'/proc/{pid}/environ', 'rb').read()\n"
    "    except OSError as e:\n"
    "        print(pid, 'unreadable', e.errno)\n"
    "    else:\n"
    # the password written backwards: the step's own command line must not hold it
    f"        print(pid, 'LEAK' if {PASSWORD[::-1].encode()!r}[::-1] in data else 'clean')\n"
    "    pid = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])\n"
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("containers")


@pytest.fixture(scope="module")
def master(master_venv: Path, tmp_path_factory: pytest.TempPathFactory, run_dir: Path,
           pyworker_executable: str) -> Iterator[RealMaster]:
    extra_env = {k: v for k, v in os.environ.items() if k == "PYWORKER_IO"}
    config = LATENT % {
        "password": PASSWORD, "run_dir": str(run_dir), "image_dir": str(CONTRIB),
        "path": f"{Path(pyworker_executable).parent}:/usr/bin:/bin", "extra_env": extra_env,
    }
    steps = STEPS % {"python": sys.executable, "ancestors": ANCESTORS}
    m = RealMaster(tmp_path_factory.mktemp("realmaster"),
                   {"latent-build": Builder(steps, workers=["latent1"])},
                   venv=master_venv, workers=(), extra_config=config)
    try:
        m.start()
        yield m
    finally:
        leftovers = m.stop()
    assert not leftovers, leftovers


def _exits(run_dir: Path) -> list[str]:
    path = run_dir / "exits.txt"
    return path.read_text().split() if path.exists() else []


def test_substantiate_build_insubstantiate_and_again(master: RealMaster, run_dir: Path) -> None:
    infos = []
    for n in (1, 2):
        build = master.wait_build(master.request_build("latent-build"), timeout=120)
        assert build.result == "SUCCESS", build.describe()
        env_step = build.step("env")
        assert "WORKERPASS" not in env_step.logs["stdio"]
        assert PASSWORD not in json.dumps([s.logs for s in build.steps])
        ancestors = build.step("ancestors").stream("stdio", "o")
        assert "LEAK" not in ancestors, ancestors
        infos.append(json.loads(build.step("worker-environ").stream("environ", "o")))
        # the build is over: build_wait_timeout=0 stops the "container", which must exit 0
        wait_for(lambda n=n: len(_exits(run_dir)) >= n or None, 60,
                 f"the worker of build {n} to be stopped", master.logs)
        assert _exits(run_dir)[n - 1] == "0", _exits(run_dir)
    # getWorkerInfo's environ: the container's variables, less the password
    assert all(info.get("WORKERNAME") == "latent1" for info in infos), infos
    assert not any("WORKERPASS" in info for info in infos)
    assert PASSWORD not in json.dumps(infos)
    environments = [json.loads(line)
                    for line in (run_dir / "environments.jsonl").read_text().splitlines()]
    assert len(environments) == 2 and "WORKERPASS" in environments[0]
    for out in run_dir.glob("container-*.stdout"):
        text = out.read_text(errors="replace")
        assert "connected" in text.lower() or "attached" in text.lower(), text[-2000:]
        assert PASSWORD not in text
    assert PASSWORD not in master.twistd_log.read_text(errors="replace")
