"""The executor: everything that runs inside an executor process (``python -m pyworker.executor``).

``main`` is the process's loop, ``channel`` its end of the pipes to the front end and the
errors a command ends with, ``process`` what it does to processes (subreaper, kills),
``commands`` the command registry and the commands, ``compress`` the compression of directory
uploads. Blocking Python, no reactor.

May import: ``pyworker.config``, ``pyworker.frames``, ``pyworker.commandset``,
``pyworker.linux``, ``pyworker.iocore``. Never ``pyworker.frontend``, ``pyworker.cli`` or
``pyworker.bench``.
"""
