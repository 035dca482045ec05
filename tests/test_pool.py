"""The executor pool with real processes under a real reactor: pre-started executors, the
size bound with waiting commands, shrinking when idle, and healing after a death."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyworker


def test_pool_life_cycle() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(pyworker.__file__))), here]
    )
    out = subprocess.run(
        [sys.executable, os.path.join(here, "pool_scenario.py")],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    )
    seen = json.loads(out.stdout)
    assert "error" not in seen, seen["error"]
    assert seen["size_at_start"] == 1  # one executor started ahead of demand
    # bound of 3: the fourth command waits, then runs when one is free
    assert seen["started_at_bound"] == [True, True, True, False]
    assert seen["size_at_bound"] == 3
    assert seen["completed"] == [None, None, None, None]
    assert seen["size_after_idle"] == 1  # shrunk back to min_idle
    assert seen["lost"] is not None and "killed by signal 9" in seen["lost"]
    assert seen["size_after_death"] >= 1 and seen["idle_after_death"] >= 1  # healed
    assert seen["size_after_stop"] == 0
