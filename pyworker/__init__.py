"""pyworker: a drop-in replacement for the Buildbot worker daemon (buildbot-worker 4.3.0).

The layout names the architecture (README, "Architecture"):

* ``frontend/``: the Twisted process holding the master's connection;
* ``executor/``: what runs inside an executor process;
* ``iocore/``: the I/O core (C through cffi, and its pure-Python twin);
* ``cli/``: the command line, ``buildbot.tac``, daemon and logging;
* ``bench/``: the profiler and its embedded master;
* shared by both processes, importing nothing else of pyworker: ``config`` (settings),
  ``frames`` (the pipe protocol), ``commandset`` (command names), ``linux`` (prctl).
"""
