"""The command line: ``pyworker create-worker/start/stop/restart/bench`` (``main``), reading
and writing ``buildbot.tac`` (``tac``), daemonising, pid file and logging (``daemon``).

May import: ``pyworker.config``, ``pyworker.frontend`` (to run the worker) and
``pyworker.bench`` (for ``pyworker bench``), both only when a command needs them.
"""
