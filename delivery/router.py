"""The static router: local recipients to the local agent, everything else to the relay.

Keys decide batching: the queue manager hands all recipients of one message that share a key
to one agent call (one SMTP/LMTP session). Local recipients share ``local_key`` (``local`` for
maildir/mbox, ``lmtp`` when ``VIRTUAL_TRANSPORT`` sends them to an LMTP server); remote
recipients get ``remote_key(rcpt)``, the relay agent's destination (one key per smart host,
or one per recipient domain for MX delivery).

With no relay transport configured, remote recipients (alias forwards to foreign domains)
are deferred rather than bounced: the mail is kept until a relay is configured or the queue
lifetime expires, matching Postfix's "deferred" handling of a missing transport.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from pymta.contracts import Closeable, DeliveryAgent, FlushableAgent, StoppableAgent
from pymta.types import Outcome, OutcomeKind, QueuedMessage, Recipient, Reply

NO_RELAY_REPLY = Reply(451, "4.4.0", "No relay transport configured for remote recipients")


class UnroutableAgent:
    """Answers every recipient TEMPORARY: there is nowhere to send it (yet)."""

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient]) -> list[Outcome]:
        return [Outcome(r.address, OutcomeKind.TEMPORARY, NO_RELAY_REPLY, "none") for r in rcpts]


class StaticRouter:
    """A :class:`~pymta.contracts.Router` choosing by ``Recipient.local`` alone; it passes
    ``flush``, ``begin_stop`` and ``aclose`` on to the agents that have them."""

    def __init__(self, local: DeliveryAgent, remote: DeliveryAgent | None = None, *,
                 local_key: str = "local",
                 remote_key: Callable[[Recipient], str] | None = None) -> None:
        self.local = local
        self.remote = remote
        self.local_key = local_key
        self.remote_key = remote_key
        self._unroutable = UnroutableAgent()

    def route(self, rcpt: Recipient) -> tuple[str, DeliveryAgent]:
        if rcpt.local:
            return self.local_key, self.local
        if self.remote is not None:
            return (self.remote_key(rcpt) if self.remote_key else "relay"), self.remote
        return "unroutable", self._unroutable

    def flush(self) -> None:
        """``pymta queue flush``: the agents forget what they remember about dead hosts."""
        for agent in (self.local, self.remote):
            if isinstance(agent, FlushableAgent):
                agent.flush()

    def begin_stop(self) -> None:
        """The server is stopping: agents stop waiting (an mbox lock wait ends as a temporary
        failure), so their calls return with every outcome before the queue manager's stop
        grace runs out and it cancels what is left."""
        for agent in (self.local, self.remote):
            if isinstance(agent, StoppableAgent):
                agent.begin_stop()

    async def aclose(self) -> None:
        """Close the agents' cached connections and threads (the server is stopping)."""
        for agent in (self.local, self.remote):
            if isinstance(agent, Closeable):
                with contextlib.suppress(Exception):
                    await agent.aclose()
