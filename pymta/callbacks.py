"""Plain Python values as extension points, for programs that embed an MTA.

An application that runs ``pymta.MTA`` inside itself usually has its recipients in a dict
or behind a coroutine, and wants each message handed to a coroutine of its own; writing a
class with the right method for that is busywork. ``MTA`` therefore also takes:

* as a **recipient lookup** (``MTA(config, lookups=...)``): any
  :class:`~pymta.contracts.RecipientLookup`; a **mapping** from address to value (a dict,
  or anything with ``Mapping``'s ``get``); or a **callable** taking the address as the
  client wrote it (a ``str``) and returning such a value, or an awaitable of one (an
  ``async def``). Both become a :class:`~pymta.contracts.RecipientLookup` here.
* as the **delivery agent of local recipients** (``MTA(config, agent=...)``): any
  :class:`~pymta.contracts.DeliveryAgent`, or a **callable** ``callback(message,
  recipients)`` (``async def`` or not), given a :class:`~pymta.types.QueuedMessage` and the
  :class:`~pymta.types.Recipient`\\ s to deliver it to.

The value a mapping or a lookup callable gives for an address:

==============================  ===========================================================
``None`` (or missing)           nobody by that name: ``550 5.1.1``
a ``str``                       a local mailbox path, as in ``MAIL_BOXES`` (relative to
                                ``PYMTA_MAIL_DIR``, ending in ``/`` for maildir)
``True`` (any other true value) a local recipient whose mailbox is its own address (as a
                                ``MAIL_BOXES`` entry without ``:mailbox``)
``False``                       nobody by that name (as ``None``)
a :class:`~pymta.types.Target`  that one target (another address, a remote forward ...)
a :class:`~pymta.types.Destination` or a sequence of Targets: all of them (an alias)
==============================  ===========================================================

Mappings are looked up by the address as written, then in lower case (Postfix tables fold
case; keep the keys in lower case and one lookup suffices). A callable that raises
:class:`~pymta.types.TemporaryFailure` gives the client ``451 4.3.0``; any other exception is
a fault: ``451 4.3.0`` and one log line, never a ``550``. Either way the server's lookup chain
caches the answers (``PYMTA_LOOKUP_CACHE_TTL``, ``0`` turns that off) and the session bounds
each RCPT's lookup in time.

A delivery callback says what happened by how it ends: it returns normally (``None``):
every recipient was delivered; it raises :class:`~pymta.types.SMTPError` (e.g.
``TemporaryFailure("mailbox busy")`` or ``SMTPError(Reply(550, "5.1.1", "no such user"))``):
every recipient gets that reply, temporary (retried by the queue) or permanent (bounced with
a DSN); it returns a list of :class:`~pymta.types.Outcome`: one per recipient, as a
:class:`~pymta.contracts.DeliveryAgent` does. Any other exception is a temporary failure of
every recipient (retried, never lost). :func:`message_bytes` gives the message as it is
delivered (our header fields included).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pymta.contracts import DeliveryAgent, RecipientLookup
from pymta.types import (
    Address,
    Destination,
    Outcome,
    OutcomeKind,
    QueuedMessage,
    Recipient,
    Reply,
    SMTPError,
    Target,
)

__all__ = ["CallableAgent", "CallableLookup", "MappingLookup", "as_delivery_agent",
           "as_recipient_lookup", "message_bytes"]

log = logging.getLogger("pymta")

#: What a mapping or a lookup callable may give for an address (see the module docstring).
LookupValue = Destination | Target | Sequence[Target] | str | bool | None
#: A recipient lookup in any form ``MTA`` takes.
LookupLike = RecipientLookup | Mapping[str, Any] | Callable[[str], Any]
#: A delivery agent in any form ``MTA`` takes.
AgentLike = DeliveryAgent | Callable[[QueuedMessage, Sequence[Recipient]], Any]

DELIVERED = Reply(250, "2.0.0", "Ok: delivered to the application")


def destination_of(address: Address, value: object) -> Destination | None:
    """The Destination a lookup value stands for (table in the module docstring)."""
    if value is None or value is False:
        return None
    if isinstance(value, Destination):
        return value
    if isinstance(value, Target):
        return Destination((value,))
    if isinstance(value, str):
        return Destination((Target(address.text, True, value),))
    if isinstance(value, Sequence):
        targets = tuple(value)
        if not all(isinstance(t, Target) for t in targets):
            raise TypeError(f"lookup value for <{address.text}>: a sequence of Targets, "
                            f"got {value!r}")
        return Destination(targets) if targets else None
    return Destination((Target(address.text, True, address.text),))


class MappingLookup:
    """A :class:`~pymta.contracts.RecipientLookup` over a mapping (module docstring). The
    mapping is read at each lookup, so an application may change it while the server runs
    (the chain's cache keeps an answer for ``PYMTA_LOOKUP_CACHE_TTL``)."""

    def __init__(self, mapping: Mapping[str, Any]) -> None:
        self.mapping = mapping

    def __repr__(self) -> str:
        return f"MappingLookup({len(self.mapping)} addresses)"

    async def lookup(self, address: Address) -> Destination | None:
        value = self.mapping.get(address.text)
        if value is None and address.key != address.text:
            value = self.mapping.get(address.key)
        return destination_of(address, value)


class CallableLookup:
    """A :class:`~pymta.contracts.RecipientLookup` calling ``function(address: str)``
    (module docstring); an awaitable result is awaited."""

    def __init__(self, function: Callable[[str], Any]) -> None:
        self.function = function

    def __repr__(self) -> str:
        return f"CallableLookup({getattr(self.function, '__qualname__', self.function)!r})"

    async def lookup(self, address: Address) -> Destination | None:
        value = self.function(address.text)
        if inspect.isawaitable(value):
            value = await value
        return destination_of(address, value)


def as_recipient_lookup(source: LookupLike) -> RecipientLookup:
    """``source`` as a :class:`~pymta.contracts.RecipientLookup`: as it is when it is one,
    else a :class:`MappingLookup` or :class:`CallableLookup`. TypeError for anything else."""
    if isinstance(source, RecipientLookup):
        return source
    if isinstance(source, Mapping):
        return MappingLookup(source)
    if callable(source):
        return CallableLookup(source)
    raise TypeError(f"not a recipient lookup, mapping or callable: {source!r}")


class CallableAgent:
    """A :class:`~pymta.contracts.DeliveryAgent` calling ``callback(message, recipients)``
    (module docstring)."""

    def __init__(self, callback: Callable[[QueuedMessage, Sequence[Recipient]], Any],
                 relay: str = "application") -> None:
        self.callback = callback
        self.relay = relay

    def __repr__(self) -> str:
        return f"CallableAgent({getattr(self.callback, '__qualname__', self.callback)!r})"

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient]) -> list[Outcome]:
        try:
            result = self.callback(msg, rcpts)
            if inspect.isawaitable(result):
                result = await result
        except SMTPError as exc:
            kind = OutcomeKind.PERMANENT if exc.reply.is_permanent else OutcomeKind.TEMPORARY
            return [Outcome(r.address, kind, exc.reply, self.relay) for r in rcpts]
        if result is None:
            return [Outcome(r.address, OutcomeKind.DELIVERED, DELIVERED, self.relay)
                    for r in rcpts]
        if isinstance(result, Iterable):
            outcomes = list(result)
            if all(isinstance(o, Outcome) for o in outcomes):
                return outcomes
        raise TypeError(f"{self!r} returned {result!r}: None or a list of Outcomes")


def as_delivery_agent(agent: AgentLike) -> DeliveryAgent:
    """``agent`` as a :class:`~pymta.contracts.DeliveryAgent`: as it is when it is one, else a
    :class:`CallableAgent`. TypeError for anything else."""
    if isinstance(agent, DeliveryAgent):
        return agent
    if callable(agent):
        return CallableAgent(agent)
    raise TypeError(f"not a delivery agent or callable: {agent!r}")


def message_bytes(msg: QueuedMessage) -> bytes:
    """The message as delivered: the header fields the server added after receiving it
    (``Authentication-Results``, ``DKIM-Signature`` ...), then the spooled message (our
    ``Received:`` first); CRLF line ends. Reads the whole body: for a large message, stream
    ``msg.open()`` instead."""
    if msg.body is not None:
        body = msg.body
    else:
        with msg.open() as f:
            body = f.read()
    return msg.envelope.prepend.encode("utf-8", "surrogateescape") + body

