"""The front end's PB broker encodes large strings its own way: the same bytes as Twisted's."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.spread import pb

from pyworker.frontend.pb import Broker


class _Factory:
    def clientConnectionMade(self, broker: Any) -> None:  # noqa: N802 - Twisted
        pass


def _wire(broker_class: Any, message: Any) -> bytes:
    broker = broker_class()
    broker.factory = _Factory()
    transport = StringTransport()
    broker.makeConnection(transport)  # sends its dialect choice: not compared
    broker._selectDialect(b"pb")
    transport.clear()
    broker.sendEncoded(message)
    return bytes(transport.value())


def test_long_strings_encode_as_twisted_does() -> None:
    block = bytes(range(256)) * 2048  # a 512 KiB transfer block
    message = [b"message", 7, b"writer", b"write", 1, [b"tuple", block, b"x" * 257],
               [b"dictionary"], b"None", b"version", -5, 2**40, 1.5, b"b" * 256]
    assert _wire(Broker, message) == _wire(pb.Broker, message)


def test_symbols_still_become_vocabulary() -> None:
    message = [b"tuple", b"dictionary", b"None", b"unicode"]
    assert _wire(Broker, message) == _wire(pb.Broker, message)
    assert len(_wire(Broker, message)) < sum(len(s) for s in message)
