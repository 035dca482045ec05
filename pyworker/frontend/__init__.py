"""The front end: the one Twisted process that holds the connection to the master.

``core`` is the worker as the master sees it, whatever the wire (builders, command sessions,
worker info, path policy, life cycle); ``session`` relays one command between an executor and
the master; ``pool`` supervises the executor processes; ``pb`` and ``msgpack`` translate
their wire format to the core and back; ``worker`` runs them together in a process;
``tunnel`` (HTTP CONNECT) and ``metrics`` serve the connection and the operator.

May import: Twisted, ``pyworker.config``, ``pyworker.frames``, ``pyworker.commandset``,
``pyworker.linux``. Never ``pyworker.executor`` or ``pyworker.iocore``: commands run in
executor processes, not here.
"""
