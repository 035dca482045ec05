"""A small loopback TCP proxy for fault injection: cut, stall or throttle a connection.

Point a worker at the proxy instead of the master (``create-worker ... 127.0.0.1:<proxy.port>``)
and the test decides what happens to the bytes in between::

    with TcpProxy(master.pb_port) as proxy:
        worker = master.start_worker(exe, master_addr=...)  # see test_reliability_realmaster
        proxy.cut()              # every open connection is reset (RST), new ones are accepted
        proxy.stall()            # nothing is forwarded any more; the sockets stay open
        proxy.resume()           # forwarding goes on where it stopped
        proxy.throttle(1 << 20)  # client -> target at most 1 MiB/s (None: no limit)

It listens and connects on 127.0.0.1 only, serves at most ``max_connections`` connections at
a time and holds at most ``buffer_size`` bytes per direction per connection (it reads from one
side only while the other side has taken what it read before), so a stalled or throttled
peer pushes back on the sender as a slow network would, and the proxy's memory stays bounded.
Everything runs in one daemon thread around a selector.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from types import TracebackType

LOOPBACK = "127.0.0.1"


class _Pipe:
    """One proxied connection: the client's socket, the target's, a buffer per direction."""

    def __init__(self, client: socket.socket, target: socket.socket) -> None:
        self.client = client
        self.target = target
        self.up = bytearray()  # client -> target
        self.down = bytearray()  # target -> client
        self.closed = False

    def sockets(self) -> tuple[socket.socket, socket.socket]:
        return self.client, self.target


class TcpProxy:
    """Forwards connections made to ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``."""

    def __init__(
        self,
        target_port: int,
        *,
        port: int = 0,
        max_connections: int = 16,
        buffer_size: int = 64 * 1024,
    ) -> None:
        self.target_port = target_port
        self.max_connections = max_connections
        self.buffer_size = buffer_size
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, port))
        self._listener.listen(16)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._lock = threading.Lock()
        self._pipes: list[_Pipe] = []
        self._stalled = False
        self._rate: float | None = None
        self._rate_down = False  # the throttle applies to target -> client instead
        self._tokens = 0.0
        self._last_refill = time.monotonic()
        self._cut_requested = False
        self._stop = False
        #: statistics, for test messages
        self.accepted = 0
        self.cuts = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._thread = threading.Thread(target=self._run, name="tcpproxy", daemon=True)

    # ---- control (any thread) ----------------------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(10)
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pipes)

    def cut(self, timeout: float = 5.0) -> int:
        """Reset every open connection (both sides get an RST); the number of connections."""
        with self._lock:
            count = len(self._pipes)
            self._cut_requested = True
        self._wake()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._cut_requested:
                    return count
            time.sleep(0.01)
        raise TimeoutError("the proxy thread did not cut the connections")

    def stall(self) -> None:
        """Stop forwarding in both directions; the connections stay open."""
        self._stalled = True
        self._wake()

    def resume(self) -> None:
        self._stalled = False
        self._wake()

    def throttle(self, bytes_per_second: float | None, *, down: bool = False) -> None:
        """Limit the client -> target direction, or with ``down`` the target -> client one
        (None: unlimited)."""
        with self._lock:
            self._rate = bytes_per_second
            self._rate_down = down
            self._tokens = 0.0
            self._last_refill = time.monotonic()
        self._wake()

    # ---- the proxy thread ------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        sel.register(self._listener, selectors.EVENT_READ)
        registered: dict[socket.socket, int] = {}
        try:
            while not self._stop:
                self._refill()
                with self._lock:
                    if self._cut_requested:
                        for p in self._pipes:
                            self._close_pipe(p, reset=True)
                        self.cuts += 1
                        self._cut_requested = False
                    self._pipes = [p for p in self._pipes if not p.closed]
                    pipes = list(self._pipes)
                wanted = self._interest(pipes)
                for s in list(registered):
                    if s not in wanted:
                        with contextlib.suppress(KeyError, ValueError, OSError):
                            sel.unregister(s)
                        del registered[s]
                for s, mask in wanted.items():
                    if s in registered:
                        if registered[s] != mask:
                            sel.modify(s, mask)
                    else:
                        sel.register(s, mask)
                    registered[s] = mask
                timeout = 0.02 if self._rate is not None else 0.5
                for key, events in sel.select(timeout):
                    sock = key.fileobj
                    if sock is self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                    elif sock is self._listener:
                        self._accept()
                    else:
                        assert isinstance(sock, socket.socket)
                        self._service(sock, events, pipes)
        finally:
            sel.close()
            with self._lock:
                for p in self._pipes:
                    self._close_pipe(p, reset=False)
                self._pipes = []

    def _refill(self) -> None:
        with self._lock:
            if self._rate is None:
                return
            now = time.monotonic()
            self._tokens = min(self._tokens + (now - self._last_refill) * self._rate,
                               max(self._rate / 10, 1.0))
            self._last_refill = now

    def _interest(self, pipes: list[_Pipe]) -> dict[socket.socket, int]:
        wanted: dict[socket.socket, int] = {}
        if self._stalled:
            return wanted
        for p in pipes:
            c = t = 0
            may_up = self._rate is None or self._rate_down or self._tokens >= 1
            may_down = self._rate is None or not self._rate_down or self._tokens >= 1
            if len(p.up) < self.buffer_size and may_up:
                c |= selectors.EVENT_READ
            if len(p.down) < self.buffer_size and may_down:
                t |= selectors.EVENT_READ
            if p.up:
                t |= selectors.EVENT_WRITE
            if p.down:
                c |= selectors.EVENT_WRITE
            if c:
                wanted[p.client] = c
            if t:
                wanted[p.target] = t
        return wanted

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        with self._lock:
            full = len(self._pipes) >= self.max_connections
        if full:
            client.close()
            return
        try:
            target = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
        except OSError:
            self._reset(client)
            return
        for s in (client, target):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._pipes.append(_Pipe(client, target))
            self.accepted += 1

    def _service(self, sock: socket.socket, events: int, pipes: list[_Pipe]) -> None:
        for p in pipes:
            if p.closed or sock not in p.sockets():
                continue
            from_client = sock is p.client
            try:
                if events & selectors.EVENT_READ:
                    self._read(p, from_client)
                if events & selectors.EVENT_WRITE and not p.closed:
                    self._write(p, to_client=from_client)
            except OSError:
                with self._lock:
                    self._close_pipe(p, reset=True)
            return

    def _read(self, p: _Pipe, from_client: bool) -> None:
        sock = p.client if from_client else p.target
        buf = p.up if from_client else p.down
        room = self.buffer_size - len(buf)
        throttled = self._rate is not None and from_client != self._rate_down
        if throttled:
            with self._lock:
                room = min(room, int(self._tokens))
        if room <= 0:
            return
        try:
            data = sock.recv(room)
        except BlockingIOError:
            return
        if not data:
            # one side closed: close both (PB has no use for half-open connections)
            with self._lock:
                self._close_pipe(p, reset=False)
            return
        buf += data
        if from_client:
            self.bytes_up += len(data)
        else:
            self.bytes_down += len(data)
        if throttled:
            with self._lock:
                self._tokens -= len(data)

    def _write(self, p: _Pipe, to_client: bool) -> None:
        # EVENT_WRITE on the client means the target->client buffer can move, and the reverse
        sock = p.client if to_client else p.target
        buf = p.down if to_client else p.up
        if not buf:
            return
        try:
            n = sock.send(buf)
        except BlockingIOError:
            return
        del buf[:n]

    def _close_pipe(self, p: _Pipe, reset: bool) -> None:
        if p.closed:
            return
        p.closed = True
        for s in p.sockets():
            if reset:
                self._reset(s)
            else:
                with contextlib.suppress(OSError):
                    s.close()

    @staticmethod
    def _reset(s: socket.socket) -> None:
        """Close with an RST (SO_LINGER 0), as a dropped route or a firewall would."""
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            s.close()
