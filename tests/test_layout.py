"""The architecture as the running code shows it: what the front end loads, and the command
names both processes agree on."""

from __future__ import annotations

import subprocess
import sys

from pyworker import commandset
from pyworker.executor.commands import registry


def test_the_executor_runs_exactly_the_commands_the_front_end_offers() -> None:
    assert set(registry.COMMANDS) == set(commandset.COMMAND_NAMES)
    assert len(commandset.COMMAND_NAMES) == len(set(commandset.COMMAND_NAMES))


def test_the_front_end_loads_no_executor_code_and_no_io_core() -> None:
    # a fresh interpreter: what importing every front-end module (both wires, the process,
    # metrics, the tunnel) pulls in, late imports of start-up included
    code = (
        "import sys\n"
        "import pyworker.frontend.worker, pyworker.frontend.pb, pyworker.frontend.msgpack\n"
        "import pyworker.frontend.tunnel\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('pyworker')))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         check=True, cwd="/").stdout.split()
    assert "pyworker.frontend.core" in out
    loaded = [m for m in out if m.startswith(("pyworker.executor", "pyworker.iocore"))]
    assert loaded == []


def test_a_pb_start_loads_no_web_server_and_no_package_metadata_scan() -> None:
    # What a latent worker's start loads before attached is time its build waits for:
    # twisted.web (about 20 ms) is the metrics endpoint's, loaded only with metrics_port,
    # and the version in the start-up line is read without importlib.metadata (about
    # 10 ms) when pyworker is installed with its dist-info beside it, as pip does.
    code = (
        "import sys\n"
        "import pyworker.cli.main, pyworker.cli.daemon, pyworker.frontend.worker\n"
        "import pyworker.frontend.pb\n"
        "from twisted.internet import reactor\n"
        "from pyworker.cli.daemon import _pyworker_version, _version_beside_package\n"
        "_pyworker_version()\n"
        "print('beside' if _version_beside_package() else 'elsewhere')\n"
        "print('\\n'.join(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         check=True, cwd="/").stdout.split()
    unwanted = ["twisted.web", "prometheus_client"]
    if out[0] == "beside":
        unwanted.append("importlib.metadata")
    loaded = [m for m in out[1:] if m.startswith(tuple(unwanted))]
    assert loaded == []


def test_the_version_read_beside_the_package_is_importlib_metadata_s() -> None:
    code = (
        "from importlib.metadata import version\n"
        "from pyworker.cli.daemon import _pyworker_version\n"
        "print(_pyworker_version(), version('pyworker'))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         check=True, cwd="/").stdout.split()
    assert out[0] == out[1] != "unknown"
