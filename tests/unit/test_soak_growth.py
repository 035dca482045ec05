"""The soak's verdict (``pyworker bench --only soak``): flat passes, any growth fails, PSS
within its tolerance only."""

from __future__ import annotations

import pytest

from pyworker.bench.scenarios import SOAK_PSS_TOLERANCE, soak_growth

MiB = 1024 * 1024
START = {"fds_frontend": 16, "fds_executors": 10, "pss": 60 * MiB, "processes": 3,
         "leftovers": 0}


def test_a_flat_soak_passes() -> None:
    assert soak_growth(START, dict(START), 1000) is None
    # fewer is not growth (an executor ended by the shrink), nor PSS noise within tolerance
    end = {**START, "fds_executors": 5, "processes": 2, "pss": START["pss"] + SOAK_PSS_TOLERANCE}
    assert soak_growth(START, end, 1000) is None


@pytest.mark.parametrize("key", ["fds_frontend", "fds_executors", "processes", "leftovers"])
def test_one_more_of_anything_counted_fails(key: str) -> None:
    verdict = soak_growth(START, {**START, key: START[key] + 1}, 1000)
    assert verdict == f"soak: grew from start to end: {key} {START[key]} -> {START[key] + 1}"


def test_pss_beyond_the_tolerance_fails_with_the_growth_per_build() -> None:
    end = {**START, "pss": START["pss"] + SOAK_PSS_TOLERANCE + MiB}
    verdict = soak_growth(START, end, 1000)
    assert verdict is not None and verdict.startswith("soak: PSS grew 60.0 -> 69.0 MiB")
    assert "(9.2 KiB a build; tolerance 8 MiB)" in verdict
