"""The core's builder directories under ``restrict_paths`` (setBuilderList, PROTOCOL.md 2.3):
made beneath the basedir by pyworker.paths, never through a link out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task

from pyworker import config as config_mod
from pyworker import paths
from pyworker.frontend.core import Builder, CommandRefused, WorkerCore


def _core(basedir: Path, restrict: bool) -> WorkerCore:
    config = config_mod.WorkerConfig(basedir=str(basedir), workername="w", password="pw",
                                     restrict_paths=restrict)
    pool: Any = None  # builder directories need no executor
    return WorkerCore(config, pool, task.Clock(), lambda code: None)


@pytest.fixture
def basedir(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "buildbot.tac").write_text("tac")
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", base / "out")
    return base


@pytest.mark.parametrize("builddir", ["../outside/b", "OUTSIDE/b", "out/b", "info",
                                      "buildbot.tac"])
def test_builder_dirs_outside_or_of_the_worker_are_refused(basedir: Path,
                                                           builddir: str) -> None:
    outside = basedir.parent / "outside"
    core = _core(basedir, restrict=True)
    with pytest.raises(CommandRefused, match=r"builder 'x': directory .*refused: the worker "
                                             r"runs with restrict_paths"):
        Builder(core, "x", builddir.replace("OUTSIDE", str(outside)))
    assert os.listdir(outside) == []
    assert sorted(os.listdir(basedir)) == ["buildbot.tac", "out"]


def test_builder_dirs_inside_are_made(basedir: Path) -> None:
    core = _core(basedir, restrict=True)
    b = Builder(core, "x", "deep/er")
    assert b.path == str(basedir / "deep/er") and (basedir / "deep/er").is_dir()
    b.set_builddir(str(basedir / "abs"))
    assert (basedir / "abs").is_dir()


def test_without_restrict_paths_the_directory_is_made_as_given(basedir: Path) -> None:
    core = _core(basedir, restrict=False)
    Builder(core, "x", "out/b")
    assert (basedir.parent / "outside" / "b").is_dir()
    assert core.restrict is None and _core(basedir, True).restrict == {
        "root": str(basedir), "protected": list(paths.WORKER_FILES)}
