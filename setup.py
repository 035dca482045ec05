"""Build hook for pyworker: compiles the cffi C I/O core (``pyworker.iocore._iocore``).

Project metadata lives in pyproject.toml; this file only adds the cffi module.
"""

from setuptools import setup

setup(
    packages=["pyworker", "pyworker.commands", "pyworker.iocore"],
    cffi_modules=["pyworker/iocore/_build.py:ffibuilder"],
)
