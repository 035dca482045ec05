"""Benchmarks: collect ``bench_*.py`` when pytest is given the directory (``pytest bench``).

``pytest bench --benchmark-disable`` (CI) runs every benchmark once with small sizes, so the
benchmarks cannot rot; ``pytest bench`` measures. The real-master benchmarks use the same
environment as ``tests/`` (``BUILDBOT_MASTER_VENV``, ``REFERENCE_WORKER``, ``PYWORKER``) and
the harness in ``tests/realmaster.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
BENCH_DIR = Path(__file__).resolve().parent
for _path in (TESTS_DIR, BENCH_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def pytest_collect_file(file_path: Path, parent: Any) -> Any:
    # files named on the command line are collected by pytest itself
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_master_venv() -> Path:
    value = os.environ.get("BUILDBOT_MASTER_VENV")
    if not value:
        pytest.skip("needs a real Buildbot master: set BUILDBOT_MASTER_VENV")
    return Path(value).absolute()


@pytest.fixture(scope="session")
def bench_reference_worker(bench_master_venv: Path) -> str:
    exe = os.environ.get("REFERENCE_WORKER") or str(bench_master_venv / "bin" / "buildbot-worker")
    if not os.access(exe, os.X_OK):
        pytest.skip(f"reference worker {exe} is not executable")
    return os.path.abspath(exe)


@pytest.fixture(scope="session")
def bench_minimal_worker(bench_master_venv: Path, tmp_path_factory: Any) -> str:
    """The minimal pipelining worker (``minimal_worker.py``), the transfers' baseline."""
    from realmaster_bench import minimal_worker_exe

    return minimal_worker_exe(bench_master_venv, tmp_path_factory.mktemp("minimal-worker"))


@pytest.fixture(scope="session")
def bench_pyworker() -> str:
    exe = os.environ.get("PYWORKER")
    if not exe or not os.access(exe, os.X_OK):
        pytest.skip("PYWORKER is not set")
    return os.path.abspath(exe)
