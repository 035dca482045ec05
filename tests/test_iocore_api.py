"""Both I/O core twins satisfy the one interface in ``pyworker.iocore.api``.

mypy checks each twin module against :class:`IOCore` where the package loads it; this checks
the same at run time, by name and signature, for both twins (the C twin's names are Python
wrappers around cffi, so they have signatures too), and that the interface lists everything
the twins offer: a name one twin adds is either in the interface or private.
"""

from __future__ import annotations

import inspect
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pyworker import iocore
from pyworker.iocore import _python
from pyworker.iocore.api import IOCore, StreamPumpAPI, TarStreamAPI

try:
    from pyworker.iocore import _c
except ImportError:  # pragma: no cover - C core not built
    _c = None  # type: ignore[assignment]

#: The interface's classes, by the factory name a twin exports them under.
OBJECT_APIS: dict[str, type] = {"StreamPump": StreamPumpAPI, "TarStream": TarStreamAPI}
#: Dunder methods that are part of the interface (context managers).
DUNDERS = ("__enter__", "__exit__")


@pytest.fixture(params=[
    pytest.param("c", marks=pytest.mark.skipif(_c is None, reason="C core not built")),
    "python",
])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return _c if request.param == "c" else _python


def members(proto: type) -> tuple[dict[str, Any], set[str]]:
    """(methods and properties by name, data attribute names) that ``proto`` declares."""
    callables = {name: value for name, value in vars(proto).items()
                 if not name.startswith("_") or name in DUNDERS}
    return callables, set(proto.__annotations__)


def without_self(sig: inspect.Signature, *, keep_return: bool = True) -> inspect.Signature:
    params = list(sig.parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    ret = sig.return_annotation if keep_return else inspect.Signature.empty
    return sig.replace(parameters=params, return_annotation=ret)


def public_names(obj: Any) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


@pytest.fixture
def made(twin: ModuleType, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """One object of each of the twin's classes, as the executor makes them."""
    r, w = os.pipe()
    pump = twin.StreamPump(w, 1)
    tar = twin.TarStream(str(tmp_path), None)
    try:
        yield {"StreamPump": pump, "TarStream": tar}
    finally:
        pump.close()
        tar.close()
        os.close(r)
        os.close(w)


def test_module_exports_exactly_the_interface(twin: ModuleType) -> None:
    callables, data = members(IOCore)
    assert set(twin.__all__) == set(callables) | data
    assert isinstance(twin.FEATURES, frozenset)
    assert isinstance(twin.FRAME_HEADER, struct.Struct)
    assert isinstance(twin.PUMP_MAX_READ, int) and twin.PUMP_MAX_READ == _python.PUMP_MAX_READ
    assert twin.FRAME_HEADER.format == _python.FRAME_HEADER.format


def test_functions_have_the_interface_signatures(twin: ModuleType) -> None:
    callables, _ = members(IOCore)
    for name, declared in callables.items():
        expected = without_self(inspect.signature(declared))
        if name in OBJECT_APIS:
            # a class: its constructor's parameters; what it returns is checked below
            got = without_self(inspect.signature(getattr(twin, name)), keep_return=False)
            assert got == expected.replace(return_annotation=inspect.Signature.empty), name
        else:
            assert inspect.signature(getattr(twin, name)) == expected, name


@pytest.mark.parametrize("factory", sorted(OBJECT_APIS))
def test_objects_have_the_interface_members(
    twin: ModuleType, made: dict[str, Any], factory: str
) -> None:
    proto = OBJECT_APIS[factory]
    cls = getattr(twin, factory)
    obj = made[factory]
    assert isinstance(obj, cls)
    callables, data = members(proto)
    # nothing public beyond the interface (else mypy would refuse callers that use it)
    assert public_names(obj) == {n for n in callables if n not in DUNDERS} | data
    for name in data:
        assert not callable(getattr(obj, name)), name
        assert type(getattr(obj, name)).__name__ == proto.__annotations__[name], name
    for name, declared in callables.items():
        actual = inspect.getattr_static(cls, name)
        if isinstance(declared, property):
            assert isinstance(actual, property), name
            returns = inspect.signature(declared.fget).return_annotation
            assert type(getattr(obj, name)).__name__ == returns, name
            continue
        # ``__enter__`` returns the twin's own class where the interface says ``Self``
        keep_return = name != "__enter__"
        assert (without_self(inspect.signature(actual), keep_return=keep_return)
                == without_self(inspect.signature(declared), keep_return=keep_return)), name
    assert obj.__enter__() is obj


def test_package_exports_the_chosen_twin() -> None:
    twin = {"c": _c, "python": _python}[iocore.BACKEND]
    for name in twin.__all__:
        assert getattr(iocore, name) is getattr(twin, name), name
    assert {"IOCore", "StreamPumpAPI", "TarStreamAPI"} <= set(iocore.__all__)
