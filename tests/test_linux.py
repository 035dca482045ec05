"""pyworker.linux: what it does to a real process."""

from __future__ import annotations

import os
import subprocess
import sys

ERASE = """
import os
from pyworker import linux
del os.environ['SECRET_A']
os.environ['KEPT'] = 'changed'
print(linux.erase_initial_environment({'SECRET_A', 'KEPT', 'ABSENT'}))
block = open('/proc/self/environ', 'rb').read()
print(b'hunter2' in block, b'OTHER=visible' in block, os.environ['OTHER'])
"""


def test_a_removed_variable_leaves_proc_environ_and_the_others_stay() -> None:
    env = {"SECRET_A": "hunter2", "OTHER": "visible", "KEPT": "x",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", ERASE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    # only the variable that is gone is erased: KEPT is still set (its old text stays)
    assert out == ["1", "False", "True", "visible"]
