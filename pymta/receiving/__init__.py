"""The receiving side: everything between an SMTP client's socket and the queue's intake.

The protocol itself (what is well-formed SMTP, replies, the SASL exchange, pipelining) is
the sans-I/O engine in :mod:`pymta.smtp`, which knows neither sockets nor policy. This
package puts it on the network and decides what is acceptable. A connection goes through
its modules in this order:

1. :mod:`~pymta.receiving.listener`: the asyncio protocol for one socket. Connection limits
   before the greeting, timeouts, STARTTLS, back-pressure; it feeds the engine the bytes
   that arrive and hands each engine event to the session.
2. :mod:`~pymta.receiving.session`: the policy of one SMTP session. HELO, ``MAIL FROM``,
   ``RCPT TO`` (the server's recipient lookup, the relay policy), and the message's way
   to the spool and, at the end of data, through the pre-queue pipeline to the queue's
   intake (:mod:`pymta.queue.intake`), which commits it before the client gets ``250``.
3. :mod:`~pymta.receiving.auth`: ``AUTH`` on the submission ports, when the client
   authenticates: the credentials checked under a time limit, the delay before a ``535``.
4. :mod:`~pymta.receiving.received`: the ``Received:`` header the session writes to the
   spool before the first byte of the message (``DATA``/``BDAT``).
5. :mod:`~pymta.receiving.headerscan`: watches the message's header section as it streams
   to the spool: the hop count (``Received`` fields), the header section's size, and a
   ``TLS-Required: No`` field (RFC 8689), which the session puts in the envelope.

Nothing here names an adapter: lookups, authenticators, pipeline stages and the queue are
the contracts of :mod:`pymta.contracts`, connected by :mod:`pymta.wiring`.
"""
