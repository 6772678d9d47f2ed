"""The SMTP protocol engine, sans-I/O: bytes in, events and replies out.

``engine.py`` is the state machine (command syntax and order, DATA/BDAT framing, SASL, the
defences against smuggling and pipelining abuse), ``params.py`` parses the MAIL/RCPT
arguments, ``events.py`` holds what the engine hands to its driver. The driver is
:mod:`pymta.receiving` (the listener reads the socket, the session answers the decisions).

Pure by rule: nothing here opens a socket, starts a task or waits, and nothing imports
pymta beyond this package and the values of :mod:`pymta.types` (``tests/unit/test_layout.py``
and the import contracts of ``pyproject.toml`` check it), so the engine can be tested and
fuzzed byte by byte without an event loop.
"""
