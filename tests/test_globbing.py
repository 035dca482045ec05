"""pyworker.executor.commands.globbing: the standard ``glob`` on trees without loops, and a
walk that ends (with every name listed once per path) where link loops would not let it."""

from __future__ import annotations

import glob
import os
import random
from pathlib import Path

import pytest

from pyworker.executor.commands.globbing import TICK_EVERY, Globber

PATTERNS = [
    "**", "**/", "**/*", "**/*.txt", "**/.*", "**/.h*/**", "*/**", "*/**/", "d*/**/*.txt",
    "**/d?", "**/d1/**", "**/**/*.txt", "*", ".*", "*/", "*/*", "d0/*", "d0/**", "d0/**/f*",
    "d0/f0.txt", "d0/", "nothere/**", "l*/**", "[dl]*/**/*", "**/f[0-3]*", "",
]


def _random_tree(root: Path, rng: random.Random) -> None:
    """Directories, hidden names, files, and links to files, to nothing, and to directories
    that hold no links (so there is no loop)."""
    targets = root / "t"
    for i in range(3):
        (targets / f"d{i}" / "sub").mkdir(parents=True)
        (targets / f"d{i}" / "sub" / f"f{i}.txt").write_text("x")
    dirs = [root]
    for n in range(rng.randrange(20, 60)):
        parent = rng.choice(dirs)
        kind = rng.random()
        name = rng.choice(["d", "f", ".h", "l", "x"]) + str(n % 7)
        if os.path.lexists(parent / name):
            continue
        if kind < 0.35:
            (parent / name).mkdir()
            dirs.append(parent / name)
        elif kind < 0.7:
            (parent / (name + rng.choice([".txt", ".c", ""]))).write_text("x")
        elif kind < 0.8:
            os.symlink(targets / f"d{n % 3}", parent / name)
        elif kind < 0.9:
            os.symlink("nowhere", parent / name)
        else:
            os.symlink(targets / "d0" / "sub" / "f0.txt", parent / name)


@pytest.mark.parametrize("seed", range(12))
def test_same_results_and_order_as_glob_without_loops(tmp_path: Path, seed: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _random_tree(tmp_path, random.Random(seed))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for pattern in PATTERNS:
            assert list(Globber(fd).glob(pattern)) == glob.glob(
                pattern, dir_fd=fd, recursive=True), pattern
            absolute = os.path.join(tmp_path, pattern)
            assert list(Globber().glob(absolute)) == glob.glob(absolute, recursive=True), \
                absolute
        monkeypatch.chdir(tmp_path)
        for pattern in PATTERNS:
            assert list(Globber().glob(pattern)) == glob.glob(pattern, recursive=True), pattern
    finally:
        os.close(fd)


@pytest.fixture
def loops(tmp_path: Path) -> Path:
    """root/a/{l1,l2} -> .. and root/a/b/f: the standard ``glob`` of ``**`` never ends."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("x")
    os.symlink("..", tmp_path / "a" / "l1")
    os.symlink("..", tmp_path / "a" / "l2")
    return tmp_path


def test_link_loops_are_listed_not_entered(loops: Path) -> None:
    found = sorted(os.path.relpath(p, loops) for p in Globber().glob(f"{loops}/**"))
    assert found == [".", "a", "a/b", "a/b/f", "a/l1", "a/l2"]
    assert sorted(Globber().glob(f"{loops}/**/f")) == [f"{loops}/a/b/f"]


def test_a_link_back_up_from_deeper_is_a_loop_too(tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    os.symlink("../..", tmp_path / "a" / "b" / "c" / "up")  # -> a
    os.symlink(tmp_path / "a" / "b", tmp_path / "side")  # not a loop: walked once more
    found = sorted(os.path.relpath(p, tmp_path) for p in Globber().glob(f"{tmp_path}/**/"))
    # side/c/up is a, which is not on that path: entered; its b is side itself: not
    assert found == [".", "a", "a/b", "a/b/c", "a/b/c/up", "side", "side/c", "side/c/up",
                     "side/c/up/b"]


def test_tick_is_called_as_the_walk_goes_and_can_stop_it(loops: Path) -> None:
    for i in range(3 * TICK_EVERY):
        (loops / "a" / "b" / f"g{i}").write_text("")
    ticks = []

    def tick() -> None:
        ticks.append(1)
        if len(ticks) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(Globber(tick=tick).glob(f"{loops}/**"))
    assert len(ticks) == 2


def test_follow_decides_whether_a_linked_directory_is_entered(loops: Path) -> None:
    asked: list[str] = []

    def follow(path: str) -> bool:
        asked.append(path)
        return False

    os.symlink("b", loops / "a" / "lb")
    found = sorted(os.path.relpath(p, loops) for p in Globber(follow=follow).glob(f"{loops}/**"))
    assert found == [".", "a", "a/b", "a/b/f", "a/l1", "a/l2", "a/lb"]
    assert asked == [f"{loops}/a/lb"]  # the loops were not entered anyway; plain dirs are
