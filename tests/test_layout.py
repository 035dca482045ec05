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
