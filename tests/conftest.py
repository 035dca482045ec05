"""Shared fixtures: where the real master and the worker executables are.

Environment (``ci/test.sh`` sets all of them):

* ``BUILDBOT_MASTER_VENV`` — venv with buildbot 4.3.0 (made by ``ci/setup.sh`` as
  ``.venvs/master``). Unset: every test that needs a real master is skipped.
* ``REFERENCE_WORKER`` — the reference ``buildbot-worker`` executable (default:
  ``$BUILDBOT_MASTER_VENV/bin/buildbot-worker``).
* ``PYWORKER`` — the ``pyworker`` executable under test (e.g. ``.venvs/worker/bin/pyworker``).
  Unset: the ``pyworker`` variants of :func:`worker_executable` are skipped.

``--without-reference`` deselects the reference worker's runs of the tests that run against
both workers (a parameter whose value is ``"reference"``, as :func:`worker_executable`'s):
``PYWORKER_IO`` does not change the reference, so
CI runs them in its first I/O backend's stage only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from realmaster import (
    Builder,
    RealMaster,
    descendants,
    enable_subreaper,
    kill_processes,
    leftover_processes,
)

SETUP_HINT = (
    "run `bash ci/test.sh`, or `bash ci/setup.sh` and export BUILDBOT_MASTER_VENV=.venvs/master"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--without-reference", action="store_true",
        help="deselect the reference worker's runs of the tests that run against both workers",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--without-reference"):
        return
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "reference" in callspec.params.values():
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def master_venv() -> Path:
    """The Buildbot 4.3.0 master venv; skips the test when BUILDBOT_MASTER_VENV is unset."""
    value = os.environ.get("BUILDBOT_MASTER_VENV")
    if not value:
        pytest.skip(f"needs a real Buildbot master: BUILDBOT_MASTER_VENV is not set ({SETUP_HINT})")
    venv = Path(value).absolute()
    if not (venv / "bin" / "buildbot").exists():
        pytest.fail(f"BUILDBOT_MASTER_VENV={value} has no bin/buildbot ({SETUP_HINT})")
    return venv


@pytest.fixture(scope="session")
def reference_worker(master_venv: Path) -> str:
    """The reference worker executable (buildbot-worker 4.3.0)."""
    exe = os.environ.get("REFERENCE_WORKER") or str(master_venv / "bin" / "buildbot-worker")
    if not os.access(exe, os.X_OK):
        pytest.fail(f"reference worker {exe} is not executable ({SETUP_HINT})")
    return os.path.abspath(exe)


@pytest.fixture(scope="session")
def pyworker_executable() -> str:
    """The pyworker executable under test; skips the test when PYWORKER is unset."""
    exe = os.environ.get("PYWORKER")
    if not exe:
        pytest.skip(f"PYWORKER is not set ({SETUP_HINT})")
    if not os.access(exe, os.X_OK):
        pytest.fail(f"PYWORKER={exe} is not executable")
    return os.path.abspath(exe)


@pytest.fixture(scope="session", params=["reference", "pyworker"])
def worker_executable(request: pytest.FixtureRequest) -> str:
    """Each worker implementation in turn: the same test runs against both."""
    if request.param == "reference":
        exe: str = request.getfixturevalue("reference_worker")
    else:
        exe = request.getfixturevalue("pyworker_executable")
    return exe


@pytest.fixture
def no_leftover_processes() -> Iterator[None]:
    """Fail the test if it leaves any new descendant process running (they get killed)."""
    enable_subreaper()
    baseline = {p.pid for p in descendants()}
    yield
    leftovers = leftover_processes(baseline)
    if leftovers:
        kill_processes(leftovers)
        pytest.fail("processes left behind:\n" + "\n".join(f"  {p}" for p in leftovers))


MasterFactory = Callable[..., RealMaster]


@pytest.fixture
def make_master(
    master_venv: Path, tmp_path: Path, no_leftover_processes: None
) -> Iterator[MasterFactory]:
    """A factory for started masters, all stopped (and checked for leftovers) after the test.

    ``make_master(builders={...}, **RealMaster kwargs) -> RealMaster``
    """
    masters: list[RealMaster] = []

    def factory(builders: Mapping[str, str | Builder], **kwargs: Any) -> RealMaster:
        m = RealMaster(tmp_path / f"m{len(masters)}", builders, venv=master_venv, **kwargs)
        masters.append(m)
        m.start()
        return m

    yield factory
    leftovers = [p for m in masters for p in m.stop()]
    if leftovers:
        pytest.fail("processes left behind:\n" + "\n".join(f"  {p}" for p in leftovers))
