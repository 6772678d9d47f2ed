"""The quarantine: blocked messages kept in the queue, on hold, marked as quarantined.

A message the content filter blocks (virus, banned file, spam, bad header, by the
``FINAL_*_DESTINY`` settings) is committed like any other message, with its envelope held
and marked here, so it is exactly as durable as the queue (the same fsynced commit, the same
store whatever the store becomes) and ``pymta queue`` sees it as held. What makes it a
quarantined message rather than a held one is in ``Envelope.extra``:

- ``quarantine``: why (the filter's reason, for ``pymta quarantine list``);
- ``quarantine_kind``: ``virus``, ``banned``, ``spam`` or ``bad-header``;
- ``quarantined_at``: when (Unix time, ``repr``), for expiry after
  ``PYMTA_QUARANTINE_LIFETIME``;
- ``quarantine_blocked``: the indices (space separated) of the recipients that did not get
  the message.

The quarantined copy gets amavis's header fields above the message (``Envelope.prepend``):
``X-Quarantine-ID``, ``X-Envelope-From``, ``X-Envelope-To`` (every recipient) and
``X-Envelope-To-Blocked`` (the blocked ones, in the same order). A release (:func:`release`)
takes the envelope fields away again (who else the message was for is nobody's business)
and keeps ``X-Quarantine-ID``, as amavisd-release does; the message then goes to delivery
as it is, not through the filters again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Sequence

from pymta import contracts
from pymta.headervalue import angle_address
from pymta.pipeline.headers import field_name, split_fields
from pymta.types import Envelope, QueueId, RcptState, Recipient

__all__ = ["BLOCKED", "KIND", "QUARANTINE", "QUARANTINED_AT", "blocked", "envelope_fields",
           "expire_quarantine", "expired", "is_quarantined", "keep_blocked", "mark", "release"]

log = logging.getLogger("pymta.queue")

QUARANTINE = "quarantine"
KIND = "quarantine_kind"
QUARANTINED_AT = "quarantined_at"
BLOCKED = "quarantine_blocked"

_ENVELOPE_FIELDS = frozenset({"x-envelope-from", "x-envelope-to", "x-envelope-to-blocked"})


def _address_list(name: str, rcpts: Sequence[Recipient]) -> str:
    """``Name: <a>,\\r\\n <b>``: one address per line, so no line passes the length limit."""
    addresses = (angle_address(r.original or r.address) for r in rcpts)
    return f"{name}: " + ",\r\n ".join(addresses) + "\r\n"


def envelope_fields(qid: QueueId, env: Envelope, blocked_rcpts: Sequence[Recipient]) -> str:
    """The header fields a quarantined copy gets (CRLF-terminated)."""
    fields = [f"X-Quarantine-ID: <{qid}>\r\n",
              f"X-Envelope-From: {angle_address(env.sender)}\r\n"]
    if env.recipients:
        fields.append(_address_list("X-Envelope-To", env.recipients))
    if blocked_rcpts:
        fields.append(_address_list("X-Envelope-To-Blocked", blocked_rcpts))
    return "".join(fields)


def mark(env: Envelope, qid: QueueId, reason: str, kind: str, *,
         blocked_indices: Collection[int] | None = None, now: float | None = None) -> None:
    """Make ``env`` (about to be committed, or loaded under the message's lock) a
    quarantined message: held, marked, with the envelope fields above the message.
    ``blocked_indices`` None: every recipient is blocked."""
    indices = sorted(range(len(env.recipients)) if blocked_indices is None
                     else set(blocked_indices))
    env.held = True
    env.extra[QUARANTINE] = reason or "quarantined"
    env.extra[KIND] = kind
    env.extra[QUARANTINED_AT] = repr(time.time() if now is None else now)
    env.extra[BLOCKED] = " ".join(str(i) for i in indices)
    rcpts = [env.recipients[i] for i in indices if 0 <= i < len(env.recipients)]
    env.prepend = envelope_fields(qid, env, rcpts) + env.prepend


def is_quarantined(env: Envelope) -> bool:
    return QUARANTINE in env.extra and KIND in env.extra


def blocked(env: Envelope) -> list[int]:
    """Indices of the recipients that did not get the message."""
    words = env.extra.get(BLOCKED, "").split()
    return [int(w) for w in words
            if w.isascii() and w.isdigit() and int(w) < len(env.recipients)]


def quarantined_at(env: Envelope) -> float:
    try:
        return float(env.extra.get(QUARANTINED_AT, ""))
    except ValueError:
        return env.received_at


def expired(env: Envelope, lifetime: float, now: float) -> bool:
    """Whether a quarantined message is older than ``lifetime`` seconds (0: kept forever)."""
    return lifetime > 0 and is_quarantined(env) and quarantined_at(env) + lifetime <= now


def _replace_fields(prepend: str, names: frozenset[str], replacement: str = "") -> str:
    """``prepend`` without the fields named in ``names`` (lower case; folded lines go with
    their field); ``replacement`` stands where the first of them stood."""
    out: list[bytes] = []
    for raw in split_fields(prepend.encode("utf-8", "surrogateescape")):
        if field_name(raw) not in names:
            out.append(raw)
        elif replacement:
            out.append(replacement.encode("utf-8", "surrogateescape"))
            replacement = ""
    return b"".join(out).decode("utf-8", "surrogateescape")


def release(env: Envelope, addresses: Collection[str] | None = None) -> list[Recipient]:
    """Turn the quarantined ``env`` into a message for delivery (the caller saves it and
    tells the queue manager): unheld, unmarked, its envelope fields removed. ``addresses``
    (compared without case) limits delivery to those recipients among the blocked ones; the
    others are dropped from this envelope. Returns the recipients released; ValueError when
    ``addresses`` names none of the blocked recipients."""
    chosen = blocked(env)
    if addresses is not None:
        wanted = {a.lower() for a in addresses}
        chosen = [i for i in chosen
                  if env.recipients[i].address.lower() in wanted
                  or env.recipients[i].original.lower() in wanted]
        if not chosen:
            raise ValueError("none of the given recipients is blocked in this message")
    keep = set(chosen)
    released = [env.recipients[i] for i in sorted(keep)]
    for r in released:
        if r.state is not RcptState.DELIVERED:
            r.state = RcptState.PENDING
    env.recipients = released
    env.held = False
    for key in (QUARANTINE, KIND, QUARANTINED_AT, BLOCKED):
        env.extra.pop(key, None)
    env.prepend = _replace_fields(env.prepend, _ENVELOPE_FIELDS)
    return released


def keep_blocked(env: Envelope, indices: Collection[int]) -> None:
    """After a release of some blocked recipients into a new message (``pymta quarantine
    release --rcpt``): the quarantined ``env`` keeps only ``indices`` blocked, and its
    ``X-Envelope-To-Blocked`` field says so, where it stood, so the quarantined copy never
    names a recipient who has since got the message."""
    kept = sorted({i for i in indices if 0 <= i < len(env.recipients)})
    env.extra[BLOCKED] = " ".join(str(i) for i in kept)
    field = (_address_list("X-Envelope-To-Blocked", [env.recipients[i] for i in kept])
             if kept else "")
    env.prepend = _replace_fields(env.prepend, frozenset({"x-envelope-to-blocked"}), field)


async def expire_quarantine(store: contracts.QueueStore, lifetime: float,
                            now: float) -> list[QueueId]:
    """Remove the quarantined messages older than ``lifetime`` seconds (0: none); returns
    their ids. Each is removed under its claim, after a second look at its envelope (it
    may have been released meanwhile); a message someone holds (a ``pymta quarantine
    release`` in progress) is skipped until the next run. A fault on one message is logged
    and does not stop the others: this runs periodically in the server, and again from
    ``pymta quarantine expire``."""
    removed: list[QueueId] = []
    if lifetime <= 0:
        return removed
    for qid in await store.list_queued():
        try:
            if await _expire_one(store, qid, lifetime, now):
                removed.append(qid)
        except OSError as exc:
            log.warning("%s: quarantine expiry failed: %s", qid, exc)
    return removed


async def _expire_one(store: contracts.QueueStore, qid: QueueId, lifetime: float,
                      now: float) -> bool:
    env = await store.load_envelope(qid)
    if env is None or not expired(env, lifetime, now):
        return False            # the cheap look first: most queued messages are not ours
    lock = await store.claim(qid)
    if lock is None:
        return False            # busy, or gone meanwhile
    try:
        env = await store.load_envelope(qid)
        if env is None or not expired(env, lifetime, now):
            return False
        await store.remove(qid)
    finally:
        lock.release()
    log.info("%s: removed from quarantine (older than %g s)", qid, lifetime)
    return True
