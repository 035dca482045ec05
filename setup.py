"""Build hook for pyworker: compiles the cffi C I/O core (``pyworker.iocore._iocore``).

Project metadata and the package list live in pyproject.toml (its
``[tool.setuptools] packages`` overrides any ``packages=`` given here); this
file only adds the cffi module.
"""

from setuptools import setup

setup(cffi_modules=["pyworker/iocore/_build.py:ffibuilder"])
