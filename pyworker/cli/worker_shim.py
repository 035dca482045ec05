"""The ``buildbot_worker`` a tac sees while pyworker runs it: a ``bot.Worker`` that records.

:func:`installed` puts stand-in modules ``buildbot_worker``, ``buildbot_worker.bot`` and
``buildbot_worker.pb`` in :data:`sys.modules` for the time the tac runs (the real
buildbot-worker, installed or not, is never imported), then puts back what was there.
Their :class:`Worker` takes exactly the arguments of buildbot-worker 4.3.0's
``buildbot_worker.pb.Worker``, raises what the reference raises while it is built (unknown
argument, unknown protocol, a connection string next to host and port) and only records
the arguments; :mod:`pyworker.cli.tac` turns them into a :class:`~pyworker.config.WorkerConfig`.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.application import service

from pyworker.config import PROTOCOLS, REFERENCE_VERSION


def _reference_signature(
    buildmaster_host: Any,
    port: Any,
    name: Any,
    passwd: Any,
    basedir: Any,
    keepalive: Any,
    keepaliveTimeout: Any = None,  # noqa: N803 - the reference's names
    umask: Any = None,
    maxdelay: Any = None,
    numcpus: Any = None,
    unicode_encoding: Any = None,
    protocol: Any = "pb",
    useTls: Any = None,  # noqa: N803
    allow_shutdown: Any = None,
    maxRetries: Any = None,  # noqa: N803
    connection_string: Any = None,
    path: Any = None,
    delete_leftover_dirs: Any = False,
    proxy_connection_string: Any = None,
) -> None:
    """``buildbot_worker.pb.Worker.__init__`` of 4.3.0, without ``self``."""


WORKER_SIGNATURE = inspect.signature(_reference_signature)


class Worker(service.MultiService):
    """``buildbot_worker.bot.Worker`` as pyworker runs a tac: ``args`` holds every parameter
    (defaults filled in); ``lineno`` is the tac line of the call (0 if not from the tac)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        try:
            bound = WORKER_SIGNATURE.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"Worker(): {exc}") from None
        bound.apply_defaults()
        self.args: dict[str, Any] = dict(bound.arguments)
        caller: types.FrameType | None = sys._getframe(1)
        while caller is not None and isinstance(caller.f_locals.get("self"), Worker):
            caller = caller.f_back  # a subclass's __init__ calling ours
        self.caller = (caller.f_code.co_filename, caller.f_lineno) if caller else ("", 0)
        # what the reference's __init__ refuses, with its words
        if self.args["connection_string"] is not None and (
            self.args["buildmaster_host"],
            self.args["port"],
        ) != (None, None):
            raise AssertionError(
                "If you want to supply a connection string, then set host and port to None"
            )
        if self.args["protocol"] not in PROTOCOLS:
            raise ValueError(f"Unknown protocol {self.args['protocol']}")
        if self.args["proxy_connection_string"] and self.args["connection_string"]:
            raise AssertionError(
                "If you want to use HTTP tunneling, then supply build master "
                "host and port rather than a connection string"
            )


class LocalWorker(service.MultiService):
    """``buildbot_worker.bot.LocalWorker`` (a worker inside the master) is not pyworker's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("LocalWorker runs inside a buildbot master; pyworker runs Worker only")


def _modules() -> dict[str, types.ModuleType]:
    package = types.ModuleType("buildbot_worker", "pyworker's stand-in for buildbot-worker")
    package.__path__ = []  # a package: `import buildbot_worker.bot` finds sys.modules' entry
    package.version = REFERENCE_VERSION  # type: ignore[attr-defined]
    package.__version__ = REFERENCE_VERSION  # type: ignore[attr-defined]
    modules = {"buildbot_worker": package}
    for name in ("bot", "pb"):
        module = types.ModuleType(f"buildbot_worker.{name}")
        module.Worker = Worker  # type: ignore[attr-defined]
        if name == "bot":
            module.LocalWorker = LocalWorker  # type: ignore[attr-defined]
        setattr(package, name, module)
        modules[module.__name__] = module
    return modules


@contextmanager
def installed() -> Iterator[None]:
    """``buildbot_worker`` is pyworker's stand-in inside the block (and only there)."""
    modules = _modules()
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
