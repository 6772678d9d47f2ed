"""The static router: local recipients to the local agent, everything else to the relay.

With no relay transport configured, remote recipients (alias forwards to foreign domains)
are deferred rather than bounced: the mail is kept until a relay is configured or the queue
lifetime expires, matching Postfix's "deferred" handling of a missing transport.
"""

from __future__ import annotations

from collections.abc import Sequence

from pymta.types import DeliveryAgent, Outcome, OutcomeKind, QueuedMessage, Recipient, Reply

NO_RELAY_REPLY = Reply(451, "4.4.0", "No relay transport configured for remote recipients")


class UnroutableAgent:
    """Answers every recipient TEMPORARY: there is nowhere to send it (yet)."""

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient]) -> list[Outcome]:
        return [Outcome(r.address, OutcomeKind.TEMPORARY, NO_RELAY_REPLY, "none") for r in rcpts]


class StaticRouter:
    """A :class:`~pymta.types.Router` choosing by ``Recipient.local`` alone."""

    def __init__(self, local: DeliveryAgent, remote: DeliveryAgent | None = None) -> None:
        self.local = local
        self.remote = remote
        self._unroutable = UnroutableAgent()

    def route(self, rcpt: Recipient) -> tuple[str, DeliveryAgent]:
        if rcpt.local:
            return "local", self.local
        if self.remote is not None:
            return "relay", self.remote
        return "unroutable", self._unroutable
