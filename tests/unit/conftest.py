"""The unit tier: the front end's protocol logic on Twisted's fakes, no master, no sleeps.

Everything here runs on a ``task.Clock`` / ``MemoryReactorClock``, a ``StringTransport`` or
``twisted.test.iosim``: time moves only when a test advances it, bytes move only when a test
pumps them. The fakes the tests share are in ``unit_fakes.py`` (this directory is on
``sys.path`` because it has no ``__init__.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from pyworker.frontend import metrics


@pytest.fixture(autouse=True)
def fresh_stats() -> Iterator[metrics.Stats]:
    """``metrics.STATS`` is a process-wide object others import by name: reset it in place."""

    def reset() -> None:
        fresh = metrics.Stats()
        for field in dataclasses.fields(metrics.Stats):
            setattr(metrics.STATS, field.name, getattr(fresh, field.name))

    reset()
    yield metrics.STATS
    reset()
