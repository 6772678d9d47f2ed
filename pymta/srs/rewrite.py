"""The SRS forward rewrite: the envelope sender of forwarded mail from foreign senders
becomes an ``SRS0=…@<SRS domain>`` address (PostSRSd's sender_canonical map, in-process).

When it applies: the sender is not null, its domain is none of ours (neither a local domain
nor the SRS domain), and at least one recipient is *forwarded*, i.e. a remote Target that
was reached through one of our addresses (``Recipient.local`` false and ``original`` in a
local domain: an alias to a foreign address, or a reversed SRS address). Relayed mail of
authenticated or MYNETWORKS clients to foreign addresses they named themselves is not
forwarding and keeps its sender; so does mail from our own domains (it is ours to sign).

One sender per message: the queue holds one envelope sender for all recipients of a
message, so a message with both local and forwarded recipients is rewritten for all of them
(as PostSRSd's sender_canonical_maps does for every recipient). Local recipients then see
the SRS address in ``Return-Path:``; a bounce from their delivery goes to that address and is
reversed to the original sender, so nothing is lost. Senders that are already SRS addresses
become SRS1 addresses (the bounce goes straight back to the first forwarder).

The stage runs after the other modifiers (``pymta.wiring.PIPELINE_STAGES``), so DKIM signing,
ARC sealing and Authentication-Results see the sender the client gave; the checks (SPF,
DMARC) always do. The original sender is kept in ``txn.results["srs"]`` and logged.
"""

from __future__ import annotations

import logging

from pymta.pipeline import SpooledBody, Transaction
from pymta.srs.codec import SRS
from pymta.types import Address

log = logging.getLogger("pymta.srs")


class SRSRewrite:
    """:class:`~pymta.pipeline.Modifier` that rewrites the envelope sender (module doc)."""

    name = "srs"

    def __init__(self, srs: SRS) -> None:
        self.srs = srs

    def applies(self, txn: Transaction) -> bool:
        sender = txn.sender
        if not sender or "@" not in sender:
            return False
        domain = Address(sender).domain.rstrip(".")
        if domain in txn.local_domains or domain == self.srs.domain:
            return False
        return any(not r.local and Address(r.original).domain in txn.local_domains
                   for r in txn.recipients)

    async def modify(self, txn: Transaction, body: SpooledBody) -> None:
        if not self.applies(txn):
            return
        original = txn.sender
        rewritten = self.srs.forward(original)
        if rewritten == original:
            return
        txn.sender = rewritten
        txn.results["srs"] = original
        forwarded = sum(1 for r in txn.recipients if not r.local)
        log.info("%s: srs: from=<%s> rewritten to <%s> (%d forwarded recipient%s)", txn.qid,
                 original, rewritten, forwarded, "" if forwarded == 1 else "s")
