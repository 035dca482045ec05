"""cffi build script for the C I/O core (``pyworker.iocore._iocore``, API mode).

The cdef is read from ``csrc/*.h`` with preprocessor lines dropped; the
sources are ``csrc/*.c``.  ``PYWORKER_IOCORE_SANITIZE=1`` adds
``-fsanitize=address,undefined`` (used by ``ci/sanitizers.sh``).
"""

from __future__ import annotations

import glob
import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.normpath(os.path.join(_HERE, "..", "..", "csrc"))
#: Every header is part of the cdef and included by the generated module.
_HEADERS = sorted(glob.glob(os.path.join(_CSRC, "*.h")))


def _rel(path: str) -> str:
    """Paths relative to the current directory when possible (setuptools prefers them)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _cdef_source() -> str:
    lines: list[str] = []
    for header in _HEADERS:
        with open(header, encoding="utf-8") as f:
            for line in f.read().splitlines():
                if not line.lstrip().startswith("#"):
                    lines.append(line)
    return "\n".join(lines)


_compile_args = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"]
_link_args: list[str] = []
if os.environ.get("PYWORKER_IOCORE_SANITIZE") == "1":
    _compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
    _link_args += ["-fsanitize=address,undefined"]

ffibuilder = FFI()
ffibuilder.cdef(_cdef_source())
ffibuilder.set_source(
    "pyworker.iocore._iocore",
    "\n".join(f'#include "{os.path.basename(h)}"' for h in _HEADERS),
    sources=[_rel(p) for p in sorted(glob.glob(os.path.join(_CSRC, "*.c")))],
    include_dirs=[_rel(_CSRC)],
    depends=[_rel(p) for p in _HEADERS],
    libraries=["z", "bz2", "m"],
    extra_compile_args=_compile_args,
    extra_link_args=_link_args,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
