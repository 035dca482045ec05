"""An HTTP CONNECT tunnel endpoint for ``--proxy-connection-string`` (PROTOCOL.md 1.1).

The worker connects to the proxy, sends exactly ``CONNECT <host>:<port> HTTP/1.1\\r\\n\\r\\n``,
requires a ``200`` status in the first response line, and then speaks PB over the same socket;
any bytes after the response's blank line belong to PB.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()


class TunnelError(Exception):
    """The proxy refused or broke the CONNECT request."""


class _TunnelProtocol(protocol.Protocol):
    def __init__(self, host: str, port: int, factory: Any, done: defer.Deferred[Any]) -> None:
        self.target = f"{host}:{port}"
        self.request = f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode()
        # not ``self.factory``: Factory.buildProtocol sets that to the tunnel's own factory
        self.inner_factory = factory
        self.done = done
        self.buffer = b""
        self.inner: protocol.Protocol | None = None

    def connectionMade(self) -> None:  # noqa: N802 - Twisted
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > 65536:
                self._fail("proxy response header too long")
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        first_line = head.split(b"\r\n", 1)[0]
        status = first_line.split(b" ")
        if len(status) < 2 or status[1] != b"200":
            self._fail(f"proxy refused CONNECT: {first_line!r}")
            return
        self.inner = self.inner_factory.buildProtocol(self.transport.getPeer())  # type: ignore[union-attr]
        if self.inner is None:
            self._fail("factory refused the connection")
            return
        self.inner.makeConnection(self.transport)
        self.done.callback(self.inner)
        if rest:
            self.inner.dataReceived(rest)

    def _fail(self, why: str) -> None:
        log.info("HTTP proxy tunnel to {target}: {why}", target=self.target, why=why)
        self.transport.loseConnection()  # type: ignore[union-attr]
        if not self.done.called:
            self.done.errback(TunnelError(why))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802 - Twisted
        if self.inner is not None:
            self.inner.connectionLost(reason)
        elif not self.done.called:
            why = "proxy closed the connection during CONNECT"
            log.info("HTTP proxy tunnel to {target}: {why}", target=self.target, why=why)
            self.done.errback(TunnelError(why))


@implementer(IStreamClientEndpoint)
class HTTPTunnelEndpoint:
    """Connects to ``host:port`` through an HTTP proxy reached by ``proxy_endpoint``."""

    def __init__(self, host: str, port: int, proxy_endpoint: Any) -> None:
        self.host = host
        self.port = port
        self.proxy_endpoint = proxy_endpoint

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        done: defer.Deferred[Any] = defer.Deferred()
        tunnel_factory = protocol.Factory.forProtocol(
            lambda: _TunnelProtocol(self.host, self.port, factory, done)
        )
        d = self.proxy_endpoint.connect(tunnel_factory)

        def proxy_failed(failure: Failure) -> None:
            log.info(
                "cannot reach the HTTP proxy for {host}:{port}: {why}",
                host=self.host,
                port=self.port,
                why=failure.getErrorMessage(),
            )
            if not done.called:
                done.errback(failure)

        d.addErrback(proxy_failed)
        return done
