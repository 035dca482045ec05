"""Reconnecting: the core's backoff (the reference's ``backoffPolicy``, ``maxretries``) and the
Worker's ClientService retrying on the injected clock, for both wire protocols."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.application.internet import backoffPolicy
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from unit_fakes import FakePool, StopRecorder, make_config

from pyworker import config as config_mod
from pyworker.frontend.core import WorkerCore
from pyworker.frontend.worker import Worker


def make_core(tmp_path: Path, **config: object) -> tuple[WorkerCore, StopRecorder]:
    stops = StopRecorder()
    core = WorkerCore(make_config(str(tmp_path), **config), FakePool(), MemoryReactorClock(),  # type: ignore[arg-type]
                      stops)
    return core, stops


@pytest.fixture
def seeded_random() -> Iterator[None]:
    """The backoff's jitter is ``random.random``: seed it here, restore it after."""
    state = random.getstate()
    yield
    random.setstate(state)


def test_retry_delay_is_the_reference_backoff_policy(tmp_path: Path, seeded_random: None) -> None:
    core, stops = make_core(tmp_path)
    for attempt in range(1, 16):
        random.seed(attempt)
        expected = backoffPolicy()(attempt)
        random.seed(attempt)
        assert core.retry_delay(attempt) == expected
        base = min(1.5**attempt, 60.0)
        delay = core.retry_delay(attempt)
        assert delay is not None and base <= delay < base + 1.0
    assert stops.codes == []


@pytest.mark.parametrize("maxretries", [None, 0])
def test_without_maxretries_the_worker_retries_for_ever(
    tmp_path: Path, maxretries: int | None
) -> None:
    core, stops = make_core(tmp_path, maxretries=maxretries)
    delay = core.retry_delay(10_000)
    assert delay is not None and 60.0 <= delay < 61.0
    assert stops.codes == []


def test_maxretries_stops_the_worker_with_exit_1(tmp_path: Path) -> None:
    core, stops = make_core(tmp_path, maxretries=3)
    assert core.retry_delay(1) is not None and core.retry_delay(2) is not None
    assert stops.codes == []
    assert core.retry_delay(3) is None
    assert stops.codes == [1]


@pytest.mark.parametrize("protocol", [config_mod.PROTOCOL_PB, config_mod.PROTOCOL_MSGPACK])
def test_the_service_retries_on_the_injected_clock_until_maxretries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    monkeypatch.delenv("PYWORKER_IO", raising=False)  # Worker() pops it from os.environ
    reactor = MemoryReactorClock()
    worker = Worker(make_config(str(tmp_path), master_host="127.0.0.1", port=9989,
                                protocol=protocol, maxretries=3), reactor)
    worker.connect()
    assert worker.service is not None
    reactor.running = True  # as inside reactor.run() (MemoryReactor.run stops at once)
    worker.service.startService()
    for attempt in (1, 2):
        assert len(reactor.tcpClients) == attempt
        host, port, factory, _, _ = reactor.tcpClients[-1]
        assert (host, port) == ("127.0.0.1", 9989)
        factory.clientConnectionFailed(reactor.connectors[-1],
                                       Failure(error.ConnectionRefusedError()))
        (call,) = reactor.getDelayedCalls()
        delay = call.getTime() - reactor.seconds()
        base = 1.5**attempt
        assert base <= delay < base + 1.0, "the reference's backoff, on our clock"
        reactor.advance(delay - 0.01)
        assert len(reactor.tcpClients) == attempt, "no attempt before the delay"
        reactor.advance(0.02)
    assert len(reactor.tcpClients) == 3
    assert worker.exit_code == 0 and reactor.running
    reactor.tcpClients[-1][2].clientConnectionFailed(
        reactor.connectors[-1], Failure(error.ConnectionRefusedError()))
    assert worker.exit_code == 1 and worker.stopping
    assert not reactor.running and reactor.hasStopped
    worker.service.stopService()
