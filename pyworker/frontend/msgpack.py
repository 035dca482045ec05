"""The msgpack front end: Buildbot's ``msgpack_experimental_v7`` protocol (PROTOCOL.md App. A).

The worker opens a WebSocket (autobahn, Twisted API) to the master's msgpack port, with HTTP
basic authentication in the upgrade request. Every frame is one binary msgpack map; each side
numbers its own requests (``seq_number``) and answers the other's with ``op: 'response'``.

Only the wire format lives here: every request becomes a call on
:class:`~pyworker.frontend.core.WorkerCore`, exactly as PB's remote methods do (argument
checks, path policy and sessions are the core's), and :class:`MsgpackMasterSide` is the
session's :class:`~pyworker.frontend.session.MasterSide` for this protocol. The master has
already done all path work (absolute ``path``/``paths``/``workdir``...), so its arguments pass
through, less the leftover master-side keys of the transfer commands.

What the 4.3.0 master gets wrong, and what we do about it:

* ``update_read_file``: the master reads the block and answers ``None`` instead of the data,
  so a download cannot receive a single byte. As the reference worker does, we take ``None``
  for the end of the file: the download writes what it got (an empty file, with ``mode``
  applied) and ends with rc 0. The worker log says so, once per download, with the command
  id, since the step itself cannot tell.
* ``update_upload_file_utime``: the master calls the writer's ``utime`` with two literal
  strings, which always raises. The reference worker turns that into an EXCEPTION step; we
  keep the upload (the file is written and closed before ``utime``) and only log that the
  master could not set the time stamps.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import msgpack
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectingRequest, ConnectionResponse
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.endpoints import _parse as parse_endpoint_description
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pyworker import config as config_mod
from pyworker.frontend.core import CommandRefused, WorkerCore
from pyworker.frontend.session import TEXT_KEYS

log = Logger()

#: Commands whose leftover master-side path arguments we drop (the master sends ``path``).
TRANSFER_LEFTOVERS: dict[str, tuple[str, ...]] = {
    "upload_file": ("workdir", "workersrc"),
    "uploadFile": ("workdir", "workersrc"),
    "upload_directory": ("workdir", "workersrc"),
    "uploadDirectory": ("workdir", "workersrc"),
    "download_file": ("workdir", "workerdest"),
    "downloadFile": ("workdir", "workerdest"),
}
DIRECTORY_UPLOADS = frozenset({"upload_directory", "uploadDirectory"})
#: The text the 4.3.0 master answers ``update_upload_file_utime`` with (its own TypeError).
MASTER_UTIME_BUG = "remote_utime() takes"
#: Logged once per download whose read the master answered with ``None``.
READ_NONE_WARNING = (
    "(command {id}): the master answered a read with no data (Buildbot 4.3.0 masters drop "
    "downloaded data over msgpack); treating it as the end of the file, as buildbot-worker does"
)


class RemoteError(Exception):
    """The other side answered one of our requests with ``is_exception``."""


class ConnectionLostError(Exception):
    """The WebSocket closed before the master answered."""


# -- helpers ---------------------------------------------------------------------------------


def encode_basic_auth(name: str, password: str) -> str:
    """The ``Authorization`` header value; a ``:`` in the name cannot be carried."""
    if ":" in name:
        raise ValueError("the worker name must not contain a colon for msgpack (basic auth)")
    userpass = f"{name}:{password}".encode()
    return "Basic " + base64.b64encode(userpass).decode("ascii")


def connection_string_to_ws_url(description: str) -> str:
    """``ws://host:port`` for a Twisted client endpoint string, as the reference derives it."""
    args, kwargs = parse_endpoint_description(description)
    kind = str(args.pop(0)).upper() if args else ""
    host = kwargs.get("host")
    port = kwargs.get("port")
    if kind == "TCP":
        port = kwargs.get("port", 80)
        if len(args) == 2:
            host, port = args
        elif len(args) == 1:
            if "host" in kwargs:
                port = args[0]
            else:
                host = args[0]
    if not host or port is None:
        raise ValueError("Host and port must be specified in connection string")
    return f"ws://{_url_host(str(host))}:{port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def websocket_url(cfg: config_mod.WorkerConfig) -> str:
    if cfg.connection_string:
        url = connection_string_to_ws_url(cfg.connection_string)
    else:
        url = f"ws://{_url_host(cfg.master_host or 'localhost')}:{cfg.port}"
    path = cfg.path
    if path is not None:
        url += path if path.startswith("/") else "/" + path
    return url


def text_value(text: str, now: float) -> list[Any]:
    """``[text, [offset of every '\\n'], [one timestamp per line]]`` (PROTOCOL.md A.1)."""
    offsets = []
    find = text.find
    i = find("\n")
    while i >= 0:
        offsets.append(i)
        i = find("\n", i + 1)
    return [text, offsets, [now] * len(offsets)]


# -- the master side of one command ------------------------------------------------------------


class MsgpackMasterSide:
    """Implements :class:`pyworker.frontend.session.MasterSide` with msgpack requests.

    Text goes out as whole lines only: the msgpack master stores what it gets without
    re-splitting it. The session already sends whole lines; should a text ever end without
    a newline, its tail is held back and joined to the stream's next text, or sent with a
    newline at completion (as the reference's final flush does).
    """

    def __init__(
        self, proto: MsgpackProtocol, command_id: str, command: str, clock: IReactorTime
    ) -> None:
        self.proto = proto
        #: Stamps the lines (the core's reactor: its ``seconds()`` is ``time.time()``).
        self.clock = clock
        self.command_id = command_id
        self.command = command
        self.partial: dict[Any, str] = {}
        #: The master answered a read with ``None`` (logged once per command).
        self.read_none = False

    def _whole(self, key: Any, text: str) -> str:
        held = self.partial.pop(key, "")
        if held:
            text = held + text
        end = text.rfind("\n") + 1
        if end < len(text):
            self.partial[key] = text[end:]
            text = text[:end]
        return text

    def send_updates(self, updates: list[tuple[str, Any]]) -> defer.Deferred[Any]:
        now = self.clock.seconds()
        args: list[list[Any]] = []
        for key, value in updates:
            if key in TEXT_KEYS:
                text = self._whole(key, value)
                if text:
                    args.append([key, text_value(text, now)])
            elif key == "log":
                logname, text = value
                text = self._whole(("log", logname), text)
                if text:
                    args.append([key, [logname, text_value(text, now)]])
            else:
                args.append([key, value])
        if not args:
            return defer.succeed(None)
        return self._request({"op": "update", "args": args})

    def complete(self, failure: str | None) -> defer.Deferred[Any]:
        if self.partial:
            now = self.clock.seconds()
            args: list[list[Any]] = []
            for key in sorted(self.partial, key=str):
                text = self.partial[key] + "\n"
                if isinstance(key, tuple):
                    args.append(["log", [key[1], text_value(text, now)]])
                else:
                    args.append([key, text_value(text, now)])
            self.partial.clear()
            d = self._request({"op": "update", "args": args})
            d.addErrback(lambda f: log.warn("update failed: {f}", f=f.getErrorMessage()))
        return self._request({"op": "complete", "args": failure})

    def call(self, target: str, method: str, args: tuple[Any, ...]) -> defer.Deferred[Any]:
        msg: dict[str, Any]
        if target == "writer" and method == "write":
            kind = "directory" if self.command in DIRECTORY_UPLOADS else "file"
            msg = {"op": f"update_upload_{kind}_write", "args": bytes(args[0])}
        elif target == "writer" and method == "close":
            msg = {"op": "update_upload_file_close"}
        elif target == "writer" and method == "unpack":
            msg = {"op": "update_upload_directory_unpack"}
        elif target == "writer" and method == "utime":
            times = args[0] if len(args) == 1 else args
            msg = {"op": "update_upload_file_utime", "access_time": float(times[0]),
                   "modified_time": float(times[1])}
            return self._request(msg).addErrback(self._utime_failed)
        elif target == "reader" and method == "read":
            return self._request({"op": "update_read_file", "length": int(args[0])}).addCallback(
                self._read_result
            )
        elif target == "reader" and method == "close":
            msg = {"op": "update_read_file_close"}
        else:
            return defer.fail(RuntimeError(f"msgpack has no {target}.{method}"))
        return self._request(msg)

    def finished(self) -> None:
        pass

    def _utime_failed(self, f: Failure) -> Failure | None:
        if f.check(RemoteError) and MASTER_UTIME_BUG in str(f.value):
            log.warn("(command {id}): the master cannot set the uploaded file's time stamps "
                     "over msgpack (Buildbot 4.3.0 bug): {e}", id=self.command_id, e=f.value)
            return None
        return f

    def _read_result(self, data: Any) -> Any:
        """A read's answer; ``None`` (the 4.3.0 master's bug) is the end of the file."""
        if data is None:
            if not self.read_none:
                self.read_none = True
                log.warn(READ_NONE_WARNING, id=self.command_id)
            return b""
        return data

    def _request(self, msg: dict[str, Any]) -> defer.Deferred[Any]:
        msg["command_id"] = self.command_id
        return self.proto.request(msg)


# -- the connection -----------------------------------------------------------------------------


class MsgpackProtocol(WebSocketClientProtocol):
    """One WebSocket connection to the master."""

    factory: MsgpackFactory

    def __init__(self) -> None:
        super().__init__()
        self.seq_number = 0
        self.waiters: dict[int, defer.Deferred[Any]] = {}
        self.open = False

    # -- handshake -----------------------------------------------------------------------

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:  # noqa: N802
        f = self.factory
        return ConnectingRequest(
            host=f.host,
            port=f.port,
            resource=f.resource,
            headers={"Authorization": f.auth_header},
            useragent=f.useragent,
            origin=f.origin,
            protocols=f.protocols,
        )

    def onConnect(self, response: ConnectionResponse) -> None:  # noqa: N802
        log.info("WebSocket upgrade accepted by {peer}", peer=response.peer)

    def onOpen(self) -> None:  # noqa: N802
        log.info("Connected to buildmaster (msgpack); worker is ready")
        self.open = True
        self.seq_number = 0
        transport: Any = self.transport  # TCP or TLS over TCP: the option is tried
        try:
            transport.setTcpKeepAlive(1)
        except Exception:
            log.info("unable to set SO_KEEPALIVE")
        self.factory.front.connected_to(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802
        log.info("WebSocket connection closed: {reason}", reason=reason)
        waiters, self.waiters = self.waiters, {}
        for d in waiters.values():
            d.errback(ConnectionLostError("Connection lost"))
        if self.open:
            self.open = False
            self.factory.front.disconnected(self)

    # -- messages ------------------------------------------------------------------------

    def send_msg(self, msg: dict[str, Any]) -> None:
        self.sendMessage(msgpack.packb(msg, use_bin_type=True), isBinary=True)

    def request(self, msg: dict[str, Any]) -> defer.Deferred[Any]:
        """Send a request of ours; fires with the master's ``result``."""
        if not self.open:
            return defer.fail(ConnectionLostError("not connected to the master"))
        seq = self.seq_number
        self.seq_number += 1
        msg["seq_number"] = seq
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiters[seq] = d
        self.send_msg(msg)
        return d

    def respond(self, msg: dict[str, Any], result: Any, is_exception: bool = False) -> None:
        out: dict[str, Any] = {"op": "response", "seq_number": msg["seq_number"],
                               "result": result}
        if is_exception:
            out["is_exception"] = True
        if self.open:
            self.send_msg(out)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        if not isBinary:
            log.warn("text frame from the master ignored (msgpack uses binary frames)")
            return
        try:
            msg = msgpack.unpackb(payload, raw=False)
        except Exception as e:
            log.warn("undecodable message from the master: {e}", e=e)
            return
        if not isinstance(msg, dict) or "seq_number" not in msg or "op" not in msg:
            log.warn("invalid message from the master: {msg!r:.200}", msg=msg)
            return
        op = msg["op"]
        if op == "response":
            d = self.waiters.pop(msg["seq_number"], None)
            if d is None:
                log.warn("response to no request of ours: {seq}", seq=msg["seq_number"])
            elif msg.get("is_exception"):
                d.errback(RemoteError(msg.get("result")))
            else:
                d.callback(msg.get("result"))
            return
        handler = self.factory.front.handlers.get(op)
        if handler is None:
            self.respond(msg, f"Command {op} does not exist.", is_exception=True)
            return
        d = defer.maybeDeferred(handler, self, msg)
        d.addCallbacks(lambda result: self.respond(msg, result),
                       lambda f: self._request_failed(msg, f))

    def _request_failed(self, msg: dict[str, Any], f: Failure) -> None:
        if not f.check(KeyError, ValueError, RemoteError, CommandRefused):
            log.failure("while answering {op}", f, op=msg.get("op"))
        value = f.value
        text = str(value.args[0]) if isinstance(value, KeyError) and value.args else str(value)
        self.respond(msg, text, is_exception=True)


class MsgpackFactory(WebSocketClientFactory):
    # autobahn's factory is a plain ClientFactory (of any protocol), and Twisted's Factory is
    # invariant in it: no annotation makes our protocol's `factory: MsgpackFactory` fit.
    protocol = MsgpackProtocol  # type: ignore[assignment]

    def __init__(self, front: MsgpackFront, url: str, auth_header: str) -> None:
        super().__init__(url, reactor=front.core.reactor)
        self.front = front
        self.auth_header = auth_header
        self.noisy = False


# -- the worker's side: requests from the master ------------------------------------------------


def _need(msg: dict[str, Any], *keys: str) -> None:
    for k in keys:
        if k not in msg:
            raise KeyError(f'message did not contain obligatory "{k}" key')


class MsgpackFront:
    """Serves the master's requests on whichever connection is current, through the core.

    It is also the msgpack :class:`~pyworker.frontend.core.Link` of the worker.
    """

    def __init__(self, core: WorkerCore) -> None:
        self.core = core
        self.proto: MsgpackProtocol | None = None
        self.settings: dict[str, Any] = {}
        self.handlers: dict[str, Callable[[MsgpackProtocol, dict[str, Any]], Any]] = {
            "print": self.op_print,
            "keepalive": self.op_keepalive,
            "get_worker_info": self.op_get_worker_info,
            "set_worker_settings": self.op_set_worker_settings,
            "start_command": self.op_start_command,
            "interrupt_command": self.op_interrupt_command,
            "shutdown": self.op_shutdown,
        }

    # -- Link ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.proto is not None

    def ask_master_to_drain(self) -> defer.Deferred[Any] | None:
        return None  # msgpack has no worker -> master shutdown (PROTOCOL.md appendix A)

    # -- connection state ----------------------------------------------------------------

    def connected_to(self, proto: MsgpackProtocol) -> None:
        self.proto = proto
        self.core.connection_made()

    def disconnected(self, proto: MsgpackProtocol) -> None:
        if self.proto is proto:
            self.proto = None
        self.core.connection_lost(proto)

    # -- ops -----------------------------------------------------------------------------

    def op_print(self, proto: MsgpackProtocol, msg: dict[str, Any]) -> None:
        _need(msg, "message")
        self.core.print_message(msg["message"])

    def op_keepalive(self, proto: MsgpackProtocol, msg: dict[str, Any]) -> None:
        log.debug("keepalive from the master")

    def op_get_worker_info(self, proto: MsgpackProtocol, msg: dict[str, Any]) -> dict[str, Any]:
        return self.core.worker_info()

    def op_set_worker_settings(self, proto: MsgpackProtocol, msg: dict[str, Any]) -> None:
        _need(msg, "args")
        args = msg["args"]
        if not isinstance(args, dict):
            raise ValueError("set_worker_settings: args must be a map")
        for setting in ("buffer_size", "buffer_timeout", "newline_re", "max_line_length"):
            if setting not in args:
                raise KeyError("message did not contain obligatory settings for worker")
        # Our executors split lines with the master's own regex and send at once; the
        # settings are kept for the log only.
        self.settings = dict(args)

    def op_start_command(self, proto: MsgpackProtocol, msg: dict[str, Any]) -> None:
        _need(msg, "command_id", "command_name", "args")
        command_id = str(msg["command_id"])
        command = msg["command_name"]
        args = msg["args"]
        builder = msg.get("builder_name")
        if isinstance(args, dict):
            args = {k: v for k, v in args.items()
                    if k not in TRANSFER_LEFTOVERS.get(command, ())}
        master = MsgpackMasterSide(proto, command_id, command, self.core.reactor)
        self.core.start_command(
            master, _builder_name(builder), command_id, command, args, connection=proto,
        )

    def op_interrupt_command(self, proto: MsgpackProtocol, msg: dict[str, Any]) -> None:
        _need(msg, "command_id", "why")
        self.core.interrupt_command(_builder_name(msg.get("builder_name")),
                                    str(msg["command_id"]), msg["why"])

    def op_shutdown(self, proto: MsgpackProtocol, msg: dict[str, Any]) -> None:
        self.core.shutdown()


def _builder_name(value: Any) -> str | None:
    return None if value is None else str(value)


class MsgpackService(ClientService):
    """The reconnecting service; stopping it silences every running command first."""

    def __init__(self, front: MsgpackFront, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.front = front

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802 - Twisted
        self.front.core.stop_commands()
        return super().stopService()


def msgpack_link(core: WorkerCore, endpoint: Any,
                 policy: Callable[[int], float]) -> tuple[MsgpackFront, ClientService]:
    """The link and the connection service of a worker whose protocol is
    ``msgpack_experimental_v7``: same endpoint (TCP or TLS, connection string, HTTP proxy)
    and reconnect policy as PB."""
    cfg = core.config
    auth = encode_basic_auth(cfg.workername, cfg.password)
    url = websocket_url(cfg)
    if urlsplit(url).scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL: {url}")
    front = MsgpackFront(core)
    factory = MsgpackFactory(front, url, auth)
    log.info("connecting to {url} with msgpack_experimental_v7 (pid {pid})", url=url,
             pid=os.getpid())
    return front, MsgpackService(front, endpoint, factory, retryPolicy=policy,
                                 clock=core.reactor)
