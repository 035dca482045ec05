"""The worker commands, as they run inside an executor process.

Each command is one small class (see :mod:`pyworker.executor.commands.registry`). Commands receive
arguments whose paths the front end has already made absolute, so the same classes serve any
front end (PB, msgpack).
"""
